"""Evaluation tasks. Each yields examples (dicts with "id", "answer" and the prompt as "messages", or
as "raw" text in HumanEval's raw mode), scores a reply, and says whether it is generated
("generate") or scored by option letters ("choice")."""
import hashlib
import json
import os

from nanopost.tasks import choice, gsm8k, humaneval

NAMES = ("gsm8k", "mmlu", "cmmlu", "ceval", "humaneval")
CHOICE = ("mmlu", "cmmlu", "ceval")
SHOTS = {"gsm8k": 4, "mmlu": 0, "cmmlu": 0, "ceval": 0}  # default exemplars per prompt (HumanEval takes none)
# Default new-token budget of a generated reply. HumanEval's 768: a canonical solution in a
# ```python fence takes up to 560 Qwen2 tokens (29 of 164 exceed 256), and a chat reply adds prose.
NEW_TOKENS = {"gsm8k": 256, "mmlu": 256, "cmmlu": 256, "ceval": 256, "humaneval": 768}
# The scoring protocol: bump it whenever a prompt, a stop string, an extraction, a scorer or the
# model's outputs for a checkpoint (how its files are read) change, so that evaluate.py never reuses cached predictions made under another one.
PROTOCOL = 16  # 5: HumanEval ~~~/indented fences, unfenced code; GSM8K leading zeros; "correct option is X". 6: helpers carried only when used, stricter option rule.
# 7: helpers in source order, star imports, `x[0] = ...` binds nothing, parenthesized __future__; "correct option is A because"
# 8: HumanEval: the prompt's helpers the tests call restated after the reply; correct = the scorer's verdict (a failure whose last error line read "pass" counted)
# 9: HumanEval: a solution must compile on its own (a trailing decorator took the tests' check); letters: "Answer choice A is
#    wrong", "isn't A", "A or B", "A and B are wrong" no longer pick A/B
# 10: HumanEval's time limit leaves out time spent waiting for a CPU (a busy machine timed out solutions);
#     letters: a hedge in brackets "(A) or (B)", of three "A, B or C", "A/B", or "A or B is correct" picks no letter;
#     "not (A)", "Not A", "can't be A" are not A; "**答案**：B" is B; a question the reply makes up after its answer is not read
# 11: letters: options restated in a reply ("A. 1, B. 2, C. 3, D. 4. So B.") are not its answer; "B, or possibly C" is a hedge
#     prompts: a Qwen2 tokenizer.json saved without its NFC normalizer is read with it (as transformers reads it)
# 12: CMMLU and C-Eval questions in their own layouts ("题目：", "答案是：B" / "答案：B", no space); their
#     accuracies are means over subjects, as their official scripts report them
# 13: letters: "Is the answer A?", the first of options listed under "the answer:", "the wrong answer is B",
#     "neither A nor B", several letters named together as the answer ("Both A and C are correct", "Answer: C, D")
#     pick no letter; GSM8K: ASCII digits only; HumanEval: writes outside the scratch folder through io.FileIO,
#     dir_fd, os.mkdir and permission calls, sqlite3, and calls on other processes (pidfd signals, prlimit) are
#     refused; letter scoring: segments of 16 batches, each from no kept prefix (so a resumed run computes
#     exactly what an uninterrupted one does)
# 14: letters: not in a word joined by a hyphen or digits ("of B-cell origin", "B12", "3D"); a reply cut off at its
#     token limit while listing options ("each option:\n\nA. Live virus") has not answered A
# 15: HumanEval: a reply's code is cut into lines where Python ends them (a form feed or U+2028 in a string
#     shifted a carried helper's lines: a right solution failed)
# 16: HumanEval raw mode: the completion ends at its first top-level line (a self-test loop, an `if`, a closing
#     fence after a right body failed it), and generation also stops at "\nif " and "\n```"


def load(name: str, data_dir: str, shots: int | None = None, humaneval_mode: str = "chat"):
    """-> (examples, score function, mode). shots: None = the task's default (SHOTS).
    score(example, reply, cut=False) -> (prediction, correct); cut: the reply hit its token limit.
    An example prompts with "messages" (chat template) or "raw" text, optionally with "stop"."""
    if name not in NAMES:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(NAMES)})")
    shots = SHOTS.get(name, 0) if shots is None else shots
    if name == "gsm8k":
        return gsm8k.load(data_dir, shots), gsm8k.score, "generate"
    if name in CHOICE:
        return choice.load(name, data_dir, shots), choice.score, "choice"
    if shots:
        raise ValueError("humaneval takes no exemplars (--shots)")
    return humaneval.load(data_dir, humaneval_mode), humaneval.score, "generate"


def read_results(path: str) -> dict:
    """evaluate.py's results.json -> {model: {task: {accuracy, n, ...}}}; anything else is a
    ValueError that names the file and says why (evaluate.py and the server's page both read it)."""
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror}") from None
    except ValueError as e:  # not JSON, not UTF-8
        raise ValueError(f"{path}: not JSON ({e})") from None
    def cell(v):  # one task's result: what the readers of these files index into must have its shape
        return (isinstance(v, dict) and isinstance(v.get("settings", {}), dict)
                and ("accuracy" in v or "perplexity" in v)  # (lm-evaluation-harness's cells: "acc,none")
                and all(isinstance(v.get(k), (int, float, type(None))) for k in ("accuracy", "perplexity"))
                and all(isinstance(v.get(k), (str, type(None))) for k in ("data", "checkpoint", "path")))
    if not (isinstance(results, dict) and all(isinstance(r, dict) and all(cell(v) for v in r.values())
                                              for r in results.values())):
        raise ValueError(f"{path} is not an evaluate.py results.json ({{model: {{task: {{accuracy, ...}}}}}})")
    return results


# results.json: what evaluate.py writes and the server's compare page reads.
PROTOCOL_KEYS = ("shots", "mode", "limit", "max_new_tokens", "humaneval_mode", "protocol", "max_len", "skip_bad_lines",
                 "dtype", "letter_scoring", "cpu_half", "python")
QUESTION_KEYS = ("limit", "skip_bad_lines")  # which questions (lines) were asked: the "data" hash says it exactly


def fingerprint(ckpt_dir) -> list:
    """The checkpoint as evaluate.py's cache key sees it: name, size and mtime of every file the
    loader reads, and a hash of all but the weights (config, index, tokenizer, chat template). Cheap,
    and a retrained, re-merged or edited model gets a new key."""
    out = []
    for name in sorted(os.listdir(ckpt_dir)):
        if name.endswith((".json", ".safetensors", ".txt", ".jinja")):
            path = os.path.join(ckpt_dir, name)
            digest = None if name.endswith(".safetensors") else hashlib.sha256(open(path, "rb").read()).hexdigest()
            out.append([name, os.stat(path).st_size, os.stat(path).st_mtime_ns, digest])
    return out


def entry_folder(key: str, entry: dict) -> str | None:
    """The local folder a results.json entry was evaluated from, resolved: the absolute path its
    numbers record (evaluate.py writes it for a local --model, which it keys as given: a relative
    path means another folder from another working directory), else the key itself where it is a
    folder from here; None for a hub id."""
    for v in entry.values():
        if v.get("path") and os.path.isdir(v["path"]):
            return os.path.realpath(v["path"])
    return os.path.realpath(key) if os.path.isdir(key) else None


def stamp(checkpoint_print: list) -> str:
    """A short hash of a fingerprint(): what results.json records as each result's "checkpoint"."""
    return hashlib.sha256(json.dumps(checkpoint_print).encode()).hexdigest()[:16]


def protocol(result: dict) -> list:
    """What makes two results of one task comparable: the settings that change a score (shots,
    mode, token budget, dtype, scoring protocol, HumanEval's Python) and the questions asked (or the
    perplexity file), by their hash where recorded (--limit 100 of 24 questions asks what no limit
    asks), else by the flags that chose them."""
    settings, data = result.get("settings", {}), result.get("data")
    return [settings.get(k) for k in PROTOCOL_KEYS if not (data and k in QUESTION_KEYS)] + [data]
