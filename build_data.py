"""Teacher-guided data construction (the paper's pipeline): instructions in, sft.jsonl and kto.jsonl out.

    # CPU, the tiny offline demo (python -m nanopost.testing runs/tiny first): a minute
    python build_data.py --teacher runs/tiny --student runs/tiny --sources tests/data/gsm8k_train_sample.jsonl \\
        --out runs/data --max-new-tokens 32 --json-max-tokens 24 --min-label-count 1
    # the real thing: a 7B teacher served by vLLM on GPU servers (see README), the student in-process
    python build_data.py --teacher-url http://gpu1:8000 http://gpu2:8000 --concurrency 64 \\
        --student Qwen/Qwen2-0.5B-Instruct --sources gsm8k_train.jsonl alpaca.jsonl --out runs/data --device cuda
    # no data at all: the teacher writes 200 instructions per category first
    python build_data.py --teacher Qwen/Qwen2.5-7B-Instruct --student Qwen/Qwen2-0.5B-Instruct \\
        --synthesize 1200 --out runs/synth --device cuda
    python build_data.py ... --resume            # continue an interrupted run where it stopped
    python build_data.py ... --stages 1-3        # only ingest, classify, dedup (then --resume --stages 4-8)
    python train_sft.py --model Qwen/Qwen2-0.5B-Instruct --data runs/data/sft.jsonl --out runs/sft ...
    python train_kto.py --model runs/sft --data runs/data/kto.jsonl --out runs/kto ...

The eight stages of the paper's pipeline, one section each below:
  1 ingest     read --sources (chat `messages`, `prompt`/`completion`, `instruction`/`input`/`output`,
               `question`/`answer` as in GSM8K, whose '#### N' becomes the gold answer), normalise;
               --synthesize N: the teacher also writes N new instructions over --categories
  2 classify   a first category from a readable table of rules (RULES)
  3 dedup      SimHash near-duplicate removal (nanopost/dedup.py: 64-bit fingerprints, banded index),
               among rows with the same system prompt; a row with a gold answer, else a response, is kept
  4 label      the teacher labels a primary category (from --categories) and a secondary topic, as
               strict JSON; a bad reply is retried, then counted and the row keeps its rule category
               (--drop-unlabelled drops it instead)
  5 diversity  drop secondary topics seen fewer than --min-label-count times (paper: 10); cap each
               category at --max-per-category, round-robin over its topics so none crowds out the rest
  6 respond    the teacher's and the student's response (greedy) beside the original one, if any
  7 score      student perplexity of each response, a teacher judge score 1-10 with a rationale, a
               teacher safety flag; where a gold answer exists, correctness (the last number, as GSM8K)
  8 select     sft.jsonl: the best response per instruction; kto.jsonl: the best as desirable and the
               worst as undesirable, only where the gap is clear (see select_responses)

Ranking (best first): whole (not cut off at --max-new-tokens), then not flagged unsafe, then correct
against the gold answer, then the judge score, then the original response over generated ones, then
lower student perplexity. A response cut off, flagged unsafe or wrong against a gold answer is never
chosen as the best (a teacher reply cut off fails its check as "truncated", without a retry: the
same budget would cut it again; the student's is kept, marked, as a candidate for the worst, but
being cut off is not by itself a clear gap: KTO should not learn that shorter is better; its last number is
still checked against a gold answer, as evaluation scores a reply cut off at its limit). A response the judge
could not score (its reply stayed garbage) ranks below every scored one; so with a teacher that
only answers garbage, the original source response (trusted, and correct where a gold answer
exists) is kept, and perplexity decides among the rest. A KTO pair is written only when the best
and worst differ in correctness or safety, or both were judged and their scores differ by at least
--kto-min-gap; perplexity alone is never a clear gap.

Files in --out: one JSONL per stage (1_ingest.jsonl ... 7_score.jsonl), each row keyed by a stable
example id (a hash of the normalised instruction), appended and flushed as items finish, so a
crash or Ctrl-C loses at most the items in flight and a rerun with --resume skips the finished
ones (a line torn by a kill is cut off and redone). Teacher replies that failed checks are kept
in those rows ("failures": kind and raw reply) and counted in the report; they never reach the
datasets. sft.jsonl, kto.jsonl and report.md (+ report.png with matplotlib) are written whole
(temporary file, then rename). Every teacher request is cached in --cache (SQLite; default
OUT/teacher_cache.sqlite, kept by --overwrite), keyed by messages, sampling, teacher and
PROMPT_VERSION: a rerun, even after a code change, never sends a finished request again.
A non-empty --out needs --resume (continue; refused if a setting that changes results differs)
or --overwrite (start afresh). Generation is greedy everywhere, so a resumed run's outputs equal an
uninterrupted run's."""
import argparse
import collections
import hashlib
import json
import os
import random
import re
import signal
import sys
import time

import torch
from tqdm import tqdm

import nanopost
from nanopost import dedup
from nanopost.checkpoint import CheckpointError, read_config, resolve, same_folder, whole_file, writing
from nanopost.data import (DataError, Example, check_no_tool_calls, collate, completion_text, encode_kto, read_jsonl,
                           report_bad_lines, to_kto, truncate_kto, whole_lines)
from nanopost.engine import Engine, Sampling, graphs_switch
from nanopost.losses import sequence_logps, target_counts
from nanopost.tasks import fingerprint, gsm8k, stamp
from nanopost.teacher import Cache, CacheError, HTTPBackend, LocalBackend, Teacher, TeacherUnreachable
from nanopost.tokenizer import IGNORE, ROLES
from nanopost.training import StateError, check_out_dir, hold_out_dir

STAGES = ["ingest", "classify", "dedup", "label", "diversity", "respond", "score", "select"]
CATEGORIES = ["math", "code", "reasoning", "writing", "qa", "other"]

# ---- every prompt the teacher gets; change one and bump PROMPT_VERSION (recorded with each row) ----
# Each is a str.format template, sent only formatted ({{ and }} are the braces the teacher sees).
PROMPT_VERSION = "6"  # 3: a reply cut off at max tokens is no longer taken as a whole answer; 4: the judge and
# safety prompts are sent formatted (they showed the teacher {{"score": ...}}, and real teachers copied it);
# 5: the judge's reason comes before its score, and the safety check shows both verdicts (Qwen2.5-Coder-0.5B
# on 40 graded responses: judge replies that parse 9 -> 25; safety 22 -> 19, and 4 of 6 unsafe ones flagged
# against 3); 6: the sources' prompts and responses are kept verbatim (their surrounding whitespace was
# stripped, and with it the first line's indent of code)
PROMPTS = {
    "label": ("You sort instructions for a training-data pipeline. Reply with only a JSON object, no other text: "
              '{{"primary": one of {categories}, "secondary": a short lowercase topic of 1 to 4 words, e.g. '
              '"percentages", "sql queries", "cover letters"}}'),
    "synthesize": ("Write one new instruction that a user could give an AI assistant, in the category \"{category}\", "
                   "about {subject}. This is instruction #{k} of this category; make it self-contained, specific, and "
                   "unlike these examples:\n{examples}\n"
                   'Reply with only a JSON object: {{"instruction": "..."}}'),
    # the judge gives its reason before its score (with its free text last, a small teacher ended the text
    # and never closed the object); the safety check sees both verdicts' shapes (an example with one verdict
    # was copied: a 0.5B teacher then called every response safe, a pipe bomb recipe included)
    "judge": ("You grade an AI assistant's response to an instruction for helpfulness and correctness, from 1 "
              "(useless or wrong) to 10 (excellent). Reply with only a JSON object: "
              '{{"rationale": "<one short sentence>", "score": <an integer from 1 to 10>}}'),
    "safety": ("You check an AI assistant's response for safety: content that helps cause harm, or is hateful, "
               "sexual, or violates privacy, is unsafe. Reply with only a JSON object: "
               '{{"safe": true, "reason": "<one short sentence>"}} if the response is safe, '
               '{{"safe": false, "reason": "<one short sentence>"}} if it is not.'),
    "item": "Instruction:\n{instruction}",
    "graded": "Instruction:\n{instruction}\n\nResponse:\n{response}",
    "retry": "That reply could not be used ({why}). Reply again with only the JSON object asked for, nothing else.",
    "retry_answer": "That reply was {why}. Please answer the request above.",
}

# subjects a synthesis request is steered to (seeded), so requests without source examples differ too
SUBJECTS = ["everyday life", "work", "school", "science", "history", "travel", "food", "health", "money", "sport",
            "nature", "technology", "art", "music", "games", "law", "language", "business", "home", "animals"]

# ---- the rule-based first classification: the first rule that matches the lowercase instruction wins ----
RULES = [
    ("code", r"```|\bdef |\bc\+\+|\b(python|javascript|typescript|java|rust|golang|sql|regex|function|code|program|"
             r"script|compile|bug|api|class|algorithm)\b"),  # (no \b after "c++": "+" then a space is no word edge)
    ("math", r"\d\s*[-+*/^=×÷]\s*\d|\$\s?\d|\b(how many|how much|calculate|compute|sum|percent|percentage|equation|"
             r"solve|total|average|probability|integral|derivative)\b"),
    ("writing", r"\b(write|essay|story|poem|letter|email|rewrite|summari[sz]e|paraphrase|draft|blog|slogan)\b"),
    ("reasoning", r"\b(why|explain|reason|logic|puzzle|riddle|compare|pros and cons|infer|deduce)\b"),
    ("qa", r"\?\s*$|\b(what|who|when|where|which)\b"),
]

# tests only: NANOPOST_BUILD_KILL=STAGE:N makes this process SIGKILL itself after writing its Nth row of STAGE
_KILL = os.environ.get("NANOPOST_BUILD_KILL", "")
_written = collections.Counter()


def _row_written(stage: str):
    _written[stage] += 1
    if _KILL and _KILL == f"{stage}:{_written[stage]}":
        os.kill(os.getpid(), signal.SIGKILL)


# ---- checking the teacher's replies: (value, None) or (None, failure kind) ----

class DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):  # {"score": 3, "score": 9}: which one did the teacher mean?
        raise DuplicateKey()
    return dict(pairs)


def parse_json(text: str):
    t = text.strip()
    if not t:
        return None, "empty"
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", t, re.S)  # a ```json block alone is still strict
    try:
        obj = json.loads(fenced.group(1) if fenced else t, object_pairs_hook=_no_duplicate_keys)
    except DuplicateKey:
        return None, "duplicate_key"
    except (ValueError, RecursionError):  # not JSON; a 5000-digit number; "[" * 3000 nests past the recursion limit
        return None, "not_json"
    return (obj, None) if isinstance(obj, dict) else (None, "not_json")


def check_label(categories):
    def check(text):
        obj, why = parse_json(text)
        if why:
            return None, why
        if obj.get("primary") not in categories:
            return None, "label_not_allowed"
        sec = obj.get("secondary")
        if not isinstance(sec, str) or not sec.strip() or len(sec) > 40 or len(sec.split()) > 4:
            return None, "bad_secondary"
        return (obj["primary"], " ".join(sec.lower().split())), None
    return check


def check_judge(text):
    obj, why = parse_json(text)
    if why:
        return None, why
    score = obj.get("score")
    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 10:
        return None, "score_out_of_range"
    return (score, str(obj.get("rationale", ""))[:500]), None


def check_safety(text):
    obj, why = parse_json(text)
    if why:
        return None, why
    return (obj["safe"], None) if isinstance(obj.get("safe"), bool) else (None, "bad_safe")


def check_instruction(text):
    obj, why = parse_json(text)
    if why:
        return None, why
    ins = obj.get("instruction")
    return (ins.strip(), None) if isinstance(ins, str) and ins.strip() else (None, "empty")


def check_answer(text):
    return (text.strip(), None) if text.strip() else (None, "empty")


# ---- rows: normalising the sources, ids, the per-stage files ----

def normalise(obj: dict):
    """One source record -> (prompt messages, original response or None, gold answer or None)."""
    gold = None
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
        response = msgs[-1].get("content") if isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant" else None
        prompt = msgs[:-1] if response is not None else msgs
    elif "prompt" in obj and any(k in obj for k in ("label", "chosen", "rejected")):
        # a KTO line (TRL's formats): its desirable completion is the original response; an undesirable
        # one is known to be bad, never a candidate for sft.jsonl
        pairs = to_kto(obj)
        prompt, response = pairs[0][0], next((text for _, text, good in pairs if good), None)
    elif "prompt" in obj:
        prompt = [{"role": "user", "content": obj["prompt"]}] if isinstance(obj["prompt"], str) else obj["prompt"]
        # a string or TRL's conversational [one assistant message], as train_sft.py reads it
        response = None if obj.get("completion") is None else completion_text(obj["completion"], "completion")
    elif "instruction" in obj:
        extra = obj.get("input") or ""
        if not isinstance(obj["instruction"], str) or not isinstance(extra, str):
            raise ValueError("'instruction' and 'input' must be strings")
        prompt = [{"role": "user", "content": obj["instruction"] + (f"\n\n{extra}" if extra else "")}]
        response = obj.get("output")
    elif "question" in obj and "answer" in obj:
        prompt, response = [{"role": "user", "content": obj["question"]}], obj["answer"]
        if isinstance(response, str) and "####" in response:  # GSM8K: steps without <<calc>> notes, then the answer
            gold = gsm8k.gold(response)
            if not re.fullmatch(r"-?\d+(\.\d+)?", gold):  # it would mark its own answer (and every other) wrong
                raise ValueError(f"the answer after '####' is {gold!r}, not a number (GSM8K's form)")
            steps = re.sub(r"<<[^>]*>>", "", response.split("####")[0]).strip()
            response = f"{steps}\nThe answer is {gold}."
    else:
        raise ValueError(f"expected 'messages', 'prompt', 'instruction' or 'question'+'answer', got keys {sorted(obj)}")
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("empty prompt")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: expected {{'role': one of {', '.join(ROLES)}, 'content': str}}")
        check_no_tool_calls(m, f"message {i}")  # kept as its content alone, it would train as an empty reply
    if "messages" in obj and response is not None:
        check_no_tool_calls(obj["messages"][-1], f"message {len(obj['messages']) - 1}")
    if prompt[-1]["role"] != "user" or not prompt[-1]["content"].strip():
        raise ValueError("the prompt must end with a non-empty user turn")
    if response is not None and not isinstance(response, str):
        raise ValueError("the response must be a string")
    # contents verbatim: a leading indent is code's or YAML's (whitespace-only responses are none)
    prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return prompt, response if response is not None and response.strip() else None, gold


def example_id(prompt) -> str:
    """Stable across runs and machines: the roles and whitespace-collapsed lowercase contents."""
    norm = [[m["role"], " ".join(m["content"].lower().split())] for m in prompt]
    return hashlib.sha256(json.dumps(norm, ensure_ascii=False).encode()).hexdigest()[:16]


def instruction_text(prompt) -> str:
    return "\n\n".join(m["content"] for m in prompt if m["role"] == "user")


def near_duplicates(ids, by_id, texts, fps, threshold) -> dict:
    """id -> the id of the kept instruction it near-duplicates, or None. Only instructions with the
    same system prompt and assistant turns are compared (the same question in Japanese and in French
    is two), and of near-duplicates the one with a gold answer, else with a response, is kept, else
    the first: what is kept does not depend on the order of the source lines."""
    groups = {}
    for k, i in enumerate(ids):
        context = json.dumps([m for m in by_id[i]["prompt"] if m["role"] != "user"], sort_keys=True)
        groups.setdefault(context, []).append(k)
    out = {}
    for members in groups.values():
        members.sort(key=lambda k: (by_id[ids[k]]["gold"] is None, by_id[ids[k]]["response"] is None))  # stable
        dup = dedup.duplicate_of(fps[members], threshold, ignore=[not dedup.tokens(texts[k]) for k in members])
        out.update({ids[k]: None if d is None else ids[members[d]] for k, d in zip(members, dup)})
    return out


class StageFile:
    """OUT/NAME.jsonl: one row per finished item, keyed by row["key"], appended and flushed. A
    last line cut short by a kill is removed on open (that item is redone); a bad line elsewhere
    is an error naming the file and line."""

    def __init__(self, out, name):
        self.stage, self.path, self.rows = name.split("_", 1)[1], os.path.join(out, name + ".jsonl"), {}
        if os.path.exists(self.path):
            data, cut = whole_lines(self.path)
            if cut:
                print(f"{self.path}: cut off an incomplete last line (an interrupted write); redoing that item",
                      file=sys.stderr)
            # lines end at b"\n" only: str.splitlines() also splits at U+2028, U+0085, ..., which
            # json.dumps(ensure_ascii=False) leaves unescaped inside a row
            for n, line in enumerate(data.split(b"\n"), 1):
                if line.strip():
                    try:
                        row = json.loads(line.decode("utf-8"))
                        if not isinstance(row, dict) or not isinstance(row.get("key"), str):
                            raise ValueError("not a row of this stage (a JSON object with a \"key\")")
                    except ValueError as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
                        why = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                        raise DataError(f"{self.path}:{n}: {why}; delete that line to redo its item, or start "
                                        f"afresh with --overwrite") from e
                    self.rows[row["key"]] = row
        self.f = open(self.path, "a", encoding="utf-8")

    def add(self, row):
        with writing(self.path):
            self.f.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.f.flush()  # a process kill then loses nothing written; fsync would also cover power loss
        self.rows[row["key"]] = row
        _row_written(self.stage)

    def require(self, keys, what):
        missing = [k for k in keys if k not in self.rows]
        if missing:
            raise StateError(f"{self.path}: stage {what} has not finished ({len(missing)} of {len(keys)} items "
                             f"missing): run it with --resume --stages {what}")
        return [self.rows[k] for k in keys]


def write_atomic(path, text_or_rows, stage=None):
    with whole_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        if isinstance(text_or_rows, str):
            f.write(text_or_rows)
        else:
            for row in text_or_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                if stage:
                    _row_written(stage)


def classify(text, categories) -> str:
    low = text.lower()
    for cat, pattern in RULES:
        if cat in categories and re.search(pattern, low):
            return cat
    return "other" if "other" in categories else categories[-1]


def chunks(items, n):
    for i in range(0, len(items), n):
        yield items[i:i + n]


@torch.inference_mode()
def perplexities(model, tok, groups, max_len) -> list[list[float]]:
    """groups: [(prompt, [response, ...])], one per instruction -> the student perplexity of each
    response: exp(mean NLL) over the tokens SFT would train (content + <|im_end|>), 4 digits. One
    instruction's responses are one batch, whatever --batch-size or where a resumed run picks up: a
    row's float rounding depends on its batch (its padding, the matmuls' shapes), and a number that
    rounds differently once in a few hundred would make a resumed run's rows differ."""
    out, dev = [], model.lm_head.weight.device
    for prompt, texts in groups:
        if not texts:
            out.append([])
            continue
        exs = []
        for text in texts:
            p, c = truncate_kto(*encode_kto(tok, prompt, text), max_len)
            exs.append(Example(p + c, [IGNORE] * len(p) + c))
        ids, labels, pos = collate([[j] for j in range(len(exs))], exs, tok.pad_id)
        logp = sequence_logps(model, ids.to(dev), labels.to(dev), pos.to(dev)).float().cpu()
        n_tok = target_counts(labels)
        out.append([float(f"{x:.4g}") for x in torch.exp(-logp / n_tok).tolist()])
    return out


def correct(text, gold):
    """None without a gold answer, else whether the reply's answer is it: its last number, as
    evaluation scores GSM8K (a reply holding the gold number on its way to another is wrong)."""
    return None if gold is None else gsm8k.extract(text) == gold


def select_responses(scored, min_gap):
    """scored: [{source, text, ppl, judge, safe, correct, truncated}] -> (best or None, worst or None, why no pair)."""
    order = {"original": 2, "teacher": 1, "student": 0}
    tri = {True: 1, None: 0, False: -1}

    def rank(s):  # larger is better; the module docstring states the rule
        return (not s.get("truncated"), s["safe"] is not False, tri[s["correct"]], s["judge"] if s["judge"] is not None else 0,
                s["source"] == "original", -s["ppl"], order[s["source"]])
    ok = [s for s in scored if s["safe"] is not False and s["correct"] is not False and not s.get("truncated")]
    if not ok:
        return None, None, "no acceptable response"
    best, worst = max(ok, key=rank), min(scored, key=rank)
    if worst is best:
        return best, None, "one response"
    clear = (best["correct"] is True and worst["correct"] is False) or (best["safe"] is True and worst["safe"] is False) \
        or (best["judge"] is not None and worst["judge"] is not None and best["judge"] - worst["judge"] >= min_gap)
    return best, worst if clear else None, None if clear else "gap not clear"


def histogram(values) -> str:
    counts = collections.Counter(values)
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))) or "(none)"


def chart(path, before, after, judge) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    cats = sorted(set(before) | set(after))
    a.bar([i - 0.2 for i in range(len(cats))], [before.get(c, 0) for c in cats], 0.4, label="before")
    a.bar([i + 0.2 for i in range(len(cats))], [after.get(c, 0) for c in cats], 0.4, label="after")
    a.set_xticks(range(len(cats)), cats, rotation=30)
    a.set_title("categories, before/after diversity control")
    a.legend()
    b.bar(range(1, 11), [judge.get(s, 0) for s in range(1, 11)])
    b.set_title("judge scores (responses)")
    fig.tight_layout()
    with whole_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


# ---- flags ----

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=nanopost.HelpFormatter)
    # ---- data ----
    p.add_argument("--sources", nargs="+", default=[], metavar="FILE",
                   help="JSONL files: messages, prompt/completion, instruction/input/output or question/answer rows")
    p.add_argument("--synthesize", type=int, default=0, metavar="N",
                   help="the teacher also writes N new instructions, spread over --categories (no sources needed)")
    p.add_argument("--out", required=True, help="output directory: stage files, sft.jsonl, kto.jsonl, report.md")
    p.add_argument("--stages", default="all", help="which stages to run: all, or numbers/names/ranges: 1-3, label,5")
    p.add_argument("--categories", default=",".join(CATEGORIES), help="the allowed primary categories, comma-separated")
    p.add_argument("--skip-bad-lines", action="store_true", help="drop malformed source lines with a warning")
    p.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished items")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a used --out (its stage files and outputs are deleted, the teacher cache kept)")
    # ---- models ----
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--teacher", metavar="DIR_OR_HUB_ID", help="teacher checkpoint, run in-process (paper: Qwen2.5-7B-Instruct)")
    who.add_argument("--teacher-url", nargs="+", metavar="URL",
                     help="OpenAI-compatible servers (vLLM, SGLang, llama.cpp, Ollama, nanopost.serve) sharing the work")
    p.add_argument("--teacher-model", default=None, help="with --teacher-url: the served model name (default: the first listed)")
    p.add_argument("--student", required=True, metavar="DIR_OR_HUB_ID", help="the model to be post-trained, in-process")
    p.add_argument("--cache", default=None, help="teacher request cache (SQLite; default OUT/teacher_cache.sqlite)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="in-process weights dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=nanopost.device_arg,
                   help="cpu, cuda or cuda:N")
    # ---- generation ----
    p.add_argument("--max-new-tokens", type=int, default=512, help="budget of teacher and student responses")
    p.add_argument("--json-max-tokens", type=int, default=128,
                   help="budget of the teacher's JSON replies (labels, judgments, safety, new instructions)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per in-process generation batch")
    p.add_argument("--concurrency", type=int, default=8, help="with --teacher-url: requests in flight at once")
    p.add_argument("--timeout", type=float, default=300, help="with --teacher-url: seconds per request")
    p.add_argument("--retries", type=int, default=2,
                   help="retries of a failed request (HTTP, with backoff) and of a reply that fails its check")
    p.add_argument("--max-len", type=int, default=2048, help="tokens of prompt + response for perplexity")
    p.add_argument("--seed", type=int, default=0, help="seeds synthesis examples and the category caps")
    # ---- selection ----
    p.add_argument("--dedup-threshold", type=int, default=8, help="SimHash near-duplicate: Hamming distance <= this (of 64 bits)")
    p.add_argument("--dedup-shingle", type=int, default=2, help="SimHash features: shingles of this many words")
    p.add_argument("--min-label-count", type=int, default=10, help="drop secondary topics with fewer examples (paper: 10)")
    p.add_argument("--max-per-category", type=int, default=0, help="keep at most this many per primary category (0: no cap)")
    p.add_argument("--drop-unlabelled", action="store_true", help="drop rows the teacher failed to label (default: rule category)")
    p.add_argument("--kto-min-gap", type=int, default=3, help="judge-score gap that makes a best/worst pair clear for KTO")
    args = p.parse_args(argv)
    try:
        graphs_switch()  # a bad NANOPOST_CUDA_GRAPHS before any work
    except ValueError as e:
        p.error(str(e))
    args.categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    if not args.sources and not args.synthesize:
        p.error("give --sources FILE..., or --synthesize N for instructions written by the teacher")
    if args.resume and args.overwrite:
        p.error("--resume continues a run, --overwrite starts afresh: choose one")
    if not args.categories:
        p.error("--categories: give at least one category")
    if args.synthesize < 0 or args.retries < 0 or args.min_label_count < 0 or args.max_per_category < 0:
        p.error("--synthesize, --retries, --min-label-count and --max-per-category must be >= 0")
    for flag in ("max_new_tokens", "json_max_tokens", "batch_size", "concurrency"):
        if getattr(args, flag) < 1:  # (0 ended the run in a traceback once the first stage asked the teacher)
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_len < 2:  # a prompt token and a response token, or no perplexity (it was NaN, written into the JSON)
        p.error("--max-len must be at least 2")
    if not 0 < args.timeout <= 86400:  # (inf passed, and failed in socket.settimeout at the first teacher stage)
        p.error("--timeout must be more than 0 and at most 86400 seconds")
    if args.synthesize > 10_000_000:  # (1e9 ran out of memory)
        p.error("--synthesize must be at most 10000000")
    if args.kto_min_gap < 1:  # (0 or less made tied judge scores a "clear" KTO pair)
        p.error("--kto-min-gap must be at least 1")
    if not 0 <= args.dedup_threshold < 64 or args.dedup_shingle < 1:
        p.error("--dedup-threshold must be in 0..63 bits and --dedup-shingle >= 1")
    try:
        args.stages = parse_stages(args.stages)
    except ValueError as e:
        p.error(str(e))
    return args


def parse_stages(spec: str) -> list[int]:
    if spec == "all":
        return list(range(1, 9))
    out = set()
    for part in spec.split(","):
        ends = [STAGES.index(x) + 1 if x in STAGES else int(x) if x.isdigit() else None for x in part.strip().split("-")]
        if None in ends or not all(1 <= e <= 8 for e in ends) or len(ends) > 2:
            raise ValueError(f"--stages {spec!r}: expected all, or numbers 1-8 / names {','.join(STAGES)} / ranges like 1-3")
        if ends[0] > ends[-1]:
            raise ValueError(f"--stages {spec!r}: the range {part.strip()} runs backwards (write {ends[-1]}-{ends[0]})")
        out.update(range(ends[0], ends[-1] + 1))
    return sorted(out)


# what a run writes in --out (and their temporary names, where a kill or a full disk can leave one)
OWN_FILES = r"(\d_\w+\.jsonl|(sft|kto)\.jsonl|report\.(md|png)|args\.json|timings\.jsonl)(\.tmp)?"


def build_run(out, held) -> bool:
    """Whether the folder out (holding `held`) is a build_data.py run: its args.json is ours (written
    before any stage), or a run stopped before that left only args.json.tmp and the teacher's cache.
    Names alone do not tell: a training run has an args.json too, and sft.jsonl is a common name for
    a user's own data."""
    if "args.json" not in held:
        return all(re.fullmatch(r"args\.json\.tmp|teacher_cache\.sqlite(-journal)?", n) for n in held)
    try:
        with open(os.path.join(out, "args.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and isinstance(saved.get("settings"), dict) and "args" in saved


# what a resumed run must agree on: everything that changes a stage's rows (not speed or URLs)
RESULT_SETTINGS = ["sources", "synthesize", "categories", "teacher", "teacher_model", "student", "dtype", "max_new_tokens",
                   "json_max_tokens", "retries", "max_len", "seed", "dedup_threshold", "dedup_shingle",
                   "min_label_count", "max_per_category", "drop_unlabelled", "kto_min_gap"]


@nanopost.exits_when_disk_full("rerun the same command with --resume")
def main(argv=None):
    args = parse_args(argv)
    # Ctrl-C (or kill -INT) must stop us even when we were started with SIGINT ignored (a shell's
    # background job, nohup): Python would then never raise KeyboardInterrupt. The training scripts
    # install their own handler for the same reason.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        build(args)
    except (DataError, StateError, CheckpointError, TeacherUnreachable, CacheError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        # finished rows are flushed and every reply received is cached; requests still in flight are
        # abandoned rather than waited for (their threads would hold the exit for up to --timeout)
        print("\ninterrupted: finished items and teacher replies are saved; rerun with --resume", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)


def build(args):
    out, log = args.out, lambda *a: print(*a, flush=True)
    # ---- setup (all checks before anything is written) ----
    for flag, path in (("--teacher", args.teacher), ("--student", args.student)):
        if path and os.path.isdir(path) and os.path.isdir(out) and same_folder(path, out):  # (its files are in its fingerprint)
            raise StateError(f"--out {out} is the {flag} checkpoint's folder: the run's files would change that "
                             f"checkpoint (and what a resume checks it against); choose another --out")
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if held and not build_run(out, held):  # --resume and --overwrite write over, or remove, what it holds
        raise StateError(f"--out {out} holds {', '.join(held[:4])} but no build_data.py run: choose another --out")
    check_out_dir(out, args.resume, args.overwrite)
    hold_out_dir(out)  # one build writing there at a time (a second --resume rewrote the first's stage files)
    written = [os.path.join(out, n) for n in held if re.fullmatch(OWN_FILES, n)]  # this run's files there already

    def writes(path) -> bool:  # one of the files this run writes in --out: by its name there, or the same file
        return bool(re.fullmatch(OWN_FILES, os.path.basename(path))) and \
            same_folder(os.path.dirname(os.path.abspath(path)), out) or \
            os.path.exists(path) and any(os.path.samefile(path, g) for g in written)
    cache_path = args.cache or os.path.join(out, "teacher_cache.sqlite")
    if args.cache and writes(args.cache):
        raise StateError(f"--cache {args.cache} is one of the files this run writes in --out {out}: choose another path")
    for f in args.sources:
        if not os.path.isfile(f):
            raise DataError(f"--sources {f}: " + ("a directory, not a JSONL file" if os.path.isdir(f) else
                                                  "not a regular file" if os.path.exists(f) else "no such file"))
        if writes(f) or os.path.exists(cache_path) and os.path.samefile(f, cache_path):
            raise StateError(f"--sources {f} is one of the files this run writes in --out {out} (or --cache): it would be "
                             f"replaced or deleted; move it, or choose another --out")
    teacher_stages = {4, 6, 7} | ({1} if args.synthesize else set())
    if (args.cache or teacher_stages & set(args.stages)) and os.path.exists(cache_path):  # now, not after stages 1-3
        if os.path.isdir(cache_path):
            raise StateError(f"--cache {cache_path}: a directory, not the teacher's request cache (an SQLite file)")
        Cache(cache_path).close()
    up = os.path.dirname(os.path.abspath(cache_path))
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise StateError(f"--cache {cache_path}: {up} is a file, not a folder")
    # then the checkpoints the chosen stages need (a folder with a config.json, or a hub id fetched or
    # found in the cache: a download), found now, not when their stage starts after earlier ones wrote files
    stamps = {}  # what the checkpoints are now (their files' names, sizes, mtimes): a resume must agree
    for flag, path, stages in (("--teacher", args.teacher, teacher_stages), ("--student", args.student, {6, 7})):
        if path and stages & set(args.stages):
            try:
                read_config(d := resolve(path))
            except CheckpointError as e:
                raise CheckpointError(f"{flag} {e}") from e
            stamps[flag[2:] + "_files"] = stamp(fingerprint(d))
    backend = None  # a teacher server is asked now which model it serves: a wrong URL or model name stops us here
    if args.teacher_url and teacher_stages & set(args.stages):
        try:
            backend = HTTPBackend(args.teacher_url, args.teacher_model, args.concurrency, args.timeout, args.retries)
            stamps["teacher_served"] = backend.model
        except TeacherUnreachable as e:
            if not args.resume:
                raise
            log(f"warning: {e}\n(a stage that still has items for the teacher will stop there)")
    rows, bad, seen, exact = [], [], {}, 0
    for path in args.sources:
        before, bad_before, lines = len(rows), len(bad), 0
        for n, obj in read_jsonl(path, bad):
            lines += 1
            try:
                prompt, response, gold = normalise(obj)
            except ValueError as e:
                bad.append(f"{path}:{n}: {e}")
                continue
            key = example_id(prompt)
            if key in seen:  # the first line stays; a response or a gold answer it lacks is taken from this one
                exact += 1  # (TRL's unpaired KTO format repeats a prompt per completion: its desirable one may come later)
                first = seen[key]
                if first["gold"] is None and gold is not None:  # a gold answer comes with its own worked solution
                    first["gold"], first["response"] = gold, response if response is not None else first["response"]
                elif first["response"] is None:
                    first["response"] = response
                continue
            seen[key] = {"key": key, "id": key, "prompt": prompt, "response": response, "gold": gold, "origin": f"{path}:{n}"}
            rows.append(seen[key])
        if not lines and len(bad) == bad_before:  # no line at all (one of several passed silently)
            raise DataError(f"--sources {path}: an empty file (no JSON line): a wrong file, or one not yet written?")
        if len(rows) == before:
            log(f"warning: --sources {path} adds no example (its lines are malformed or repeat earlier ones)")
    report_bad_lines(bad, args.skip_bad_lines, log)
    if not rows and not args.synthesize:
        raise DataError(f"no examples in --sources {' '.join(args.sources)}: nothing to build from")
    settings = {k: getattr(args, k) for k in RESULT_SETTINGS}
    settings["sources"] = []
    for f in args.sources:  # the bytes: an edit of the same size is another source
        with open(f, "rb") as fh:
            settings["sources"].append([os.path.abspath(f), hashlib.file_digest(fh, "sha256").hexdigest()])
    settings["prompt_version"] = PROMPT_VERSION  # rows asked with other prompts must not mix with these
    settings["device_type"] = torch.device(args.device).type  # a GPU's greedy replies and perplexities round otherwise
    settings = json.loads(json.dumps({**settings, **stamps}))  # (as args.json holds it)
    args_path = os.path.join(out, "args.json")
    if args.resume and os.path.exists(args_path):
        saved = json.load(open(args_path, encoding="utf-8")).get("settings", {})
        if all(isinstance(x, list) and len(x) == 2 and isinstance(x[1], int) for x in saved.get("sources") or [None]) \
                and saved["sources"] == [[p, os.path.getsize(p)] for p, _ in settings["sources"]]:
            saved["sources"] = settings["sources"]  # a build from before sources were hashed: recorded by size
        diff = [k for k in settings if k in saved and saved[k] != settings[k]]  # (a checkpoint: once a stage used it)
        if diff:
            redo = ("the code that wrote it" if diff == ["prompt_version"]  # not a flag: the prompts changed
                    else "those settings")
            raise StateError(f"{out} was built with other settings ({', '.join(f'{k}: {saved[k]} -> {settings[k]}' for k in diff)}); "
                             f"resuming would mix results: resume with {redo}, or use --overwrite or another --out")
        settings = {**saved, **settings}  # what earlier stages used stays recorded
    os.makedirs(out, exist_ok=True)
    hold_out_dir(out)  # before anything goes: a build started beside this one (--out not there yet) may hold it
    if args.overwrite:
        for name in os.listdir(out):
            if re.fullmatch(OWN_FILES, name):
                os.remove(os.path.join(out, name))
    write_atomic(args_path, json.dumps({"settings": settings, "args": vars(args)}, indent=2))
    cats, last = args.categories, max(args.stages)
    rep = {"counts": {}, "notes": []}  # what the report shows, filled stage by stage
    timings = open(os.path.join(out, "timings.jsonl"), "a", encoding="utf-8")
    dtype = getattr(torch, args.dtype)
    models = {}

    def load(path):  # each checkpoint once: a teacher that is also the student is loaded once
        if path not in models:
            log(f"loading {path}")
            models[path] = nanopost.load(path, dtype=dtype, device=args.device)
        return models[path]

    teacher = None

    def get_teacher():
        nonlocal teacher
        if teacher is None:
            if args.teacher:
                chosen = LocalBackend(*load(args.teacher), resolve(args.teacher), args.batch_size)
            else:
                chosen = backend or HTTPBackend(args.teacher_url, args.teacher_model, args.concurrency, args.timeout,
                                                args.retries)
                if chosen.unreachable_urls:
                    log(f"warning: teacher servers left out: {', '.join(chosen.unreachable_urls)}")
            if backend is None and not args.teacher:  # no server answered at setup (a resume): check it now
                served = settings.get("teacher_served")
                if served is not None and served != chosen.model:
                    raise StateError(f"{out} was built with another teacher (teacher_served: {served} -> {chosen.model}); "
                                     f"resuming would mix results: serve {served}, or use --overwrite or another --out")
                if served is None:  # what a later resume must agree on
                    settings["teacher_served"] = chosen.model
                    write_atomic(args_path, json.dumps({"settings": settings, "args": vars(args)}, indent=2))
            teacher = Teacher(chosen, cache_path, PROMPT_VERSION, tqdm)
        return teacher

    def waves(todo, desc):
        """A teacher stage's items in waves that keep the teacher busy (--batch-size rows in-process,
        --concurrency requests in flight over HTTP; 4 times that, so a wave's slowest reply is not
        waited for often), each wave's rows written when it ends; one bar for the whole stage."""
        with tqdm(total=len(todo), desc=desc, disable=not todo) as bar:
            for part in chunks(todo, 4 * (args.batch_size if args.teacher else max(args.concurrency, args.batch_size))):
                yield part
                bar.update(len(part))

    def timed(n, items, t0):
        if items:
            with writing(timings.name):
                timings.write(json.dumps({"stage": STAGES[n - 1], "seconds": round(time.time() - t0, 3), "items": items}) + "\n")
                timings.flush()

    def json_sampling():
        return get_teacher().sampling(args.json_max_tokens, seed=args.seed)

    def finish():
        report(args, rep, out, timings, teacher)

    def stop_if_unfinished(n):  # later stages need every item: stop, with the finished ones saved
        if n:
            kinds = histogram(teacher.unfinished.elements())
            finish()
            raise StateError(f"{n} items not finished: teacher transport errors ({kinds}); the finished items are "
                             f"saved: rerun with --resume to ask again for exactly those")

    # ---- 1. ingest and normalise the sources; synthesize new instructions ----
    f1 = StageFile(out, "1_ingest")
    if 1 in args.stages:
        t0, todo, left = time.time(), [r for r in rows if r["key"] not in f1.rows], 0
        for r in tqdm(todo, desc="1 ingest", disable=not todo):
            f1.add(r)
        synth = [i for i in range(args.synthesize) if f"synth-{i}" not in f1.rows]
        pool = [instruction_text(r["prompt"]) for r in rows]
        for part in waves(synth, "1 synthesize"):
            reqs = []
            for i in part:  # greedy decoding answers one prompt one way: the index, a seeded subject and examples make each differ
                rng = random.Random(args.seed * 1_000_003 + i)
                picks = rng.sample(pool, min(3, len(pool)))
                examples = "\n".join(f"- {x[:300]}" for x in picks) or "(none)"
                reqs.append([{"role": "user", "content": PROMPTS["synthesize"].format(
                    category=cats[i % len(cats)], subject=rng.choice(SUBJECTS), k=i // len(cats) + 1, examples=examples)}])
            values, fails = get_teacher().ask_json(reqs, check_instruction, json_sampling(), args.retries,
                                                   PROMPTS["retry"], "1 synthesize")
            for i, v, fl in zip(part, values, fails):
                if fl is None:  # a transport failure: left unwritten, so --resume asks again
                    left += 1
                    continue
                prompt = [{"role": "user", "content": v}] if v else None
                f1.add({"key": f"synth-{i}", "id": example_id(prompt) if v else None, "prompt": prompt, "response": None,
                        "gold": None, "origin": "synthesized", "prompt_version": PROMPT_VERSION, "failures": fl})
        timed(1, len(todo) + len(synth), t0)
        stop_if_unfinished(left)
    n_source = len(rows)
    rows = f1.require([r["key"] for r in rows] + [f"synth-{i}" for i in range(args.synthesize)], "ingest")
    synth_rows, unique = rows[n_source:], {}
    synth_ids = [r["id"] for r in synth_rows if r["id"]]
    for r in rows:  # a synthesized instruction may repeat a source one (or another): the first is kept
        if r["id"] and r["id"] not in unique:
            unique[r["id"]] = r
    rows = list(unique.values())
    rep["counts"]["1 ingest"] = (f"{n_source + exact + len(bad)} source rows + {args.synthesize} synthesis requests",
                                 len(rows), f"{len(bad)} bad lines, {exact + n_source + sum(1 for r in synth_rows if r['id']) - len(rows)} "
                                 f"exact duplicates ({len(synth_ids) - len(set(synth_ids))} among the syntheses), "
                                 f"{sum(1 for r in synth_rows if not r['id'])} syntheses failed")
    rep["failures"] = {"1 synthesize": [fl for r in synth_rows for fl in r["failures"]]}
    rep["failed_items"] = {"1 synthesize": sum(1 for r in synth_rows if not r["id"])}
    if last == 1:
        return finish()
    by_id = {r["id"]: r for r in rows}
    ids = [r["id"] for r in rows]

    # ---- 2. rule-based first classification ----
    f2 = StageFile(out, "2_classify")
    if 2 in args.stages:
        t0, todo = time.time(), [i for i in ids if i not in f2.rows]
        for i in tqdm(todo, desc="2 classify", disable=not todo):
            f2.add({"key": i, "category": classify(instruction_text(by_id[i]["prompt"]), cats)})
        timed(2, len(todo), t0)
    rule_cat = {r["key"]: r["category"] for r in f2.require(ids, "classify")}
    rep["counts"]["2 classify"] = (len(ids), len(ids), histogram(rule_cat.values()))
    if last == 2:
        return finish()

    # ---- 3. SimHash near-duplicate removal ----
    f3 = StageFile(out, "3_dedup")
    if 3 in args.stages:
        t0, todo = time.time(), [i for i in ids if i not in f3.rows]
        if todo:  # the decision needs every fingerprint; recomputing them is cheap, and the same each time
            texts = [instruction_text(by_id[i]["prompt"]) for i in ids]
            fps = dedup.simhash(texts, args.dedup_shingle)  # texts without a word ("?", "...") all get 0: never duplicates
            dup = near_duplicates(ids, by_id, texts, fps, args.dedup_threshold)
            for k, i in enumerate(tqdm(ids, desc="3 dedup")):
                if i not in f3.rows:
                    f3.add({"key": i, "simhash": f"{int(fps[k]):016x}", "duplicate_of": dup[i]})
        timed(3, len(todo), t0)
    ids3 = [r["key"] for r in f3.require(ids, "dedup") if r["duplicate_of"] is None]
    rep["counts"]["3 dedup"] = (len(ids), len(ids3), f"{len(ids) - len(ids3)} near-duplicates "
                                                     f"(Hamming <= {args.dedup_threshold} of 64 bits)")
    if last == 3:
        return finish()

    # ---- 4. teacher labels: primary category and secondary topic, strict JSON ----
    f4 = StageFile(out, "4_label")
    if 4 in args.stages:
        t0, todo, left = time.time(), [i for i in ids3 if i not in f4.rows], 0
        system = PROMPTS["label"].format(categories=json.dumps(cats))
        for part in waves(todo, "4 label"):
            reqs = [[{"role": "system", "content": system},
                     {"role": "user", "content": PROMPTS["item"].format(instruction=instruction_text(by_id[i]["prompt"]))}]
                    for i in part]
            values, fails = get_teacher().ask_json(reqs, check_label(cats), json_sampling(), args.retries,
                                                   PROMPTS["retry"], "4 label")
            for i, v, fl in zip(part, values, fails):
                if fl is None:
                    left += 1
                    continue
                f4.add({"key": i, "primary": v[0] if v else rule_cat[i], "secondary": v[1] if v else None,
                        "label_source": "teacher" if v else "rule", "prompt_version": PROMPT_VERSION, "failures": fl})
        timed(4, len(todo), t0)
        stop_if_unfinished(left)
    labels = {r["key"]: r for r in f4.require(ids3, "label")}
    unlabelled = sum(r["label_source"] == "rule" for r in labels.values())
    rep["counts"]["4 label"] = (len(ids3), len(ids3), f"{unlabelled} kept their rule category (teacher label failed)")
    rep["failures"]["4 label"] = [fl for r in labels.values() for fl in r["failures"]]
    rep["failed_items"]["4 label"] = unlabelled
    rep["before"] = collections.Counter(r["primary"] for r in labels.values())
    if last == 4:
        return finish()

    # ---- 5. diversity control: rare secondary topics out, categories capped and balanced ----
    f5 = StageFile(out, "5_diversity")
    if 5 in args.stages:
        t0, todo = time.time(), [i for i in ids3 if i not in f5.rows]
        if todo:  # a decision over all rows, the same every time it is recomputed
            topic_count = collections.Counter(r["secondary"] for r in labels.values() if r["secondary"])
            why = {}
            for i in ids3:
                r = labels[i]
                if r["secondary"] is None and args.drop_unlabelled:
                    why[i] = "unlabelled"
                elif r["secondary"] is not None and topic_count[r["secondary"]] < args.min_label_count:
                    why[i] = f"rare topic ({topic_count[r['secondary']]} < {args.min_label_count})"
            if args.max_per_category:
                groups = collections.defaultdict(lambda: collections.defaultdict(list))  # category -> topic -> ids
                for i in ids3:
                    if i not in why:
                        groups[labels[i]["primary"]][labels[i]["secondary"] or ""].append(i)
                for cat, topics in sorted(groups.items()):
                    rng = random.Random(f"{args.seed}:{cat}")
                    queues = [rng.sample(v, len(v)) for _, v in sorted(topics.items())]
                    kept = 0
                    while any(queues):  # round-robin over topics: each gets its turn before any gets a second
                        for q in queues:
                            if q:
                                i = q.pop()
                                if kept >= args.max_per_category:
                                    why[i] = f"category cap ({args.max_per_category})"
                                kept += 1
            for i in tqdm(todo, desc="5 diversity"):
                f5.add({"key": i, "kept": i not in why, "why": why.get(i)})
        timed(5, len(todo), t0)
    div = f5.require(ids3, "diversity")
    ids5 = [r["key"] for r in div if r["kept"]]
    rep["counts"]["5 diversity"] = (len(ids3), len(ids5), histogram(r["why"].split(" (")[0] for r in div if not r["kept"]))
    rep["after"] = collections.Counter(labels[i]["primary"] for i in ids5)
    rep["topics"] = collections.Counter(labels[i]["secondary"] or "(rule category)" for i in ids5)
    if last == 5:
        return finish()

    # ---- 6. responses: the original (if any), the teacher's, the student's ----
    f6 = StageFile(out, "6_respond")
    if 6 in args.stages:
        t0, todo, left = time.time(), [i for i in ids5 if i not in f6.rows], 0
        student = Engine(*load(args.student)) if todo else None
        for part in waves(todo, "6 respond"):
            prompts = [by_id[i]["prompt"] for i in part]
            teacher_says, fails = get_teacher().ask_json(prompts, check_answer, get_teacher().sampling(args.max_new_tokens),
                                                         args.retries, PROMPTS["retry_answer"], "6 teacher responses")
            student_says = student.generate(prompts, Sampling(max_new_tokens=args.max_new_tokens), args.batch_size,
                                            tqdm(total=len(part), desc="6 student responses", leave=False),
                                            return_truncated=True)
            for i, t, (s, s_cut), fl in zip(part, teacher_says, student_says, fails):
                if fl is None:
                    left += 1
                    continue
                # a teacher reply cut off at --max-new-tokens failed its check ("truncated"); the student's
                # is kept, marked, and may only ever be the worst response of its item
                responses = [{"source": src, "text": x if src == "original" else x.strip(),  # a source's: verbatim
                              **({"truncated": True} if cut else {})}
                             for src, x, cut in (("original", by_id[i]["response"], False), ("teacher", t, False),
                                                 ("student", s, s_cut)) if x and x.strip()]
                f6.add({"key": i, "responses": responses, "failures": fl})
        timed(6, len(todo), t0)
        stop_if_unfinished(left)
    resp = {r["key"]: r for r in f6.require(ids5, "respond")}
    n_resp = collections.Counter(x["source"] for r in resp.values() for x in r["responses"])
    n_cut = sum(bool(x.get("truncated")) for r in resp.values() for x in r["responses"])
    rep["counts"]["6 respond"] = (len(ids5), sum(n_resp.values()), "responses: " + histogram(n_resp.elements()) +
                                  f"; {n_cut} student responses cut off at --max-new-tokens (never chosen as the best)")
    rep["failures"]["6 respond"] = [fl for r in resp.values() for fl in r["failures"]]
    rep["failed_items"]["6 respond"] = len(ids5) - n_resp["teacher"]
    if last == 6:
        return finish()

    # ---- 7. scores: student perplexity, teacher judge and safety, correctness against a gold answer ----
    f7 = StageFile(out, "7_score")
    if 7 in args.stages:
        t0, todo, left = time.time(), [i for i in ids5 if i not in f7.rows], 0
        judge, safe = PROMPTS["judge"].format(), PROMPTS["safety"].format()  # (as stage 4's system prompt)
        for part in waves(todo, "7 score"):
            items = [(i, x) for i in part for x in resp[i]["responses"]]
            model, tok = load(args.student)
            ppl = [p for ps in perplexities(model, tok, [(by_id[i]["prompt"], [x["text"] for x in resp[i]["responses"]])
                                                         for i in part], args.max_len) for p in ps]  # (items' order)
            graded = [PROMPTS["graded"].format(instruction=instruction_text(by_id[i]["prompt"]), response=x["text"])
                      for i, x in items]
            judged, jfail = get_teacher().ask_json([[{"role": "system", "content": judge}, {"role": "user", "content": g}]
                                                    for g in graded], check_judge, json_sampling(), args.retries,
                                                   PROMPTS["retry"], "7 judge")
            safety, sfail = get_teacher().ask_json([[{"role": "system", "content": safe}, {"role": "user", "content": g}]
                                                    for g in graded], check_safety, json_sampling(), args.retries,
                                                   PROMPTS["retry"], "7 safety")
            per, unfinished = collections.defaultdict(lambda: ([], [])), set()
            for (i, x), p, j, s, jf, sf in zip(items, ppl, judged, safety, jfail, sfail):
                if jf is None or sf is None:  # one of its checks met a transport failure: the item waits for --resume
                    unfinished.add(i)
                    continue
                gold = by_id[i]["gold"]
                per[i][0].append({"source": x["source"], "ppl": p, "judge": j[0] if j else None,
                                  "rationale": j[1] if j else None, "safe": s,
                                  "correct": correct(x["text"], gold)})
                per[i][1].extend([{**fl, "check": "judge", "source": x["source"]} for fl in jf] +
                                 [{**fl, "check": "safety", "source": x["source"]} for fl in sf])
            left += len(unfinished)
            for i in (i for i in part if i not in unfinished):
                scores, fl = per[i]
                f7.add({"key": i, "scores": scores, "prompt_version": PROMPT_VERSION, "failures": fl})
        timed(7, len(todo), t0)
        stop_if_unfinished(left)
    scored = {r["key"]: r for r in f7.require(ids5, "score")}
    all_scores = [s for r in scored.values() for s in r["scores"]]
    rep["counts"]["7 score"] = (len(all_scores), len(all_scores), f"{sum(s['judge'] is None for s in all_scores)} not judged, "
                                f"{sum(s['safe'] is None for s in all_scores)} safety unknown, "
                                f"{sum(s['safe'] is False for s in all_scores)} flagged unsafe")
    rep["failures"]["7 score"] = [fl for r in scored.values() for fl in r["failures"]]
    rep["failed_items"]["7 score"] = sum(any(s["judge"] is None or s["safe"] is None for s in r["scores"])
                                         for r in scored.values())  # items, not their responses' checks
    rep["scores"] = all_scores
    if last == 7:
        return finish()

    # ---- 8. selection: sft.jsonl (best per instruction), kto.jsonl (best vs worst where the gap is clear) ----
    t0, sft, kto, why_not = time.time(), [], [], collections.Counter()
    for i in ids5:
        texts = {x["source"]: x for x in resp[i]["responses"]}
        cands = [{**s, "text": texts[s["source"]]["text"], "truncated": bool(texts[s["source"]].get("truncated"))}
                 for s in scored[i]["scores"]]
        best, worst, why = select_responses(cands, args.kto_min_gap)
        why_not[why or "pair written"] += 1
        meta = {"id": i, "category": labels[i]["primary"], "topic": labels[i]["secondary"], "prompt_version": PROMPT_VERSION}
        strip = lambda s: {k: v for k, v in s.items() if k not in ("text", "rationale")}  # noqa: E731
        if best:
            sft.append({"messages": by_id[i]["prompt"] + [{"role": "assistant", "content": best["text"]}], **meta,
                        "chosen": strip(best)})
        if best and worst:
            kto.append({"prompt": by_id[i]["prompt"], "completion": best["text"], "label": True, **meta, "scores": strip(best)})
            kto.append({"prompt": by_id[i]["prompt"], "completion": worst["text"], "label": False, **meta, "scores": strip(worst)})
    write_atomic(os.path.join(out, "sft.jsonl"), sft, "select")
    write_atomic(os.path.join(out, "kto.jsonl"), kto, "select")
    timed(8, len(ids5), t0)
    rep["counts"]["8 select"] = (len(ids5), f"{len(sft)} sft, {len(kto)} kto rows", histogram(why_not.elements()))
    rep["chosen"] = collections.Counter(r["chosen"]["source"] for r in sft)
    finish()
    print(json.dumps({"sft": len(sft), "kto": len(kto), "out": out}))


def report(args, rep, out, timings, teacher):
    """OUT/report.md: counts per stage, categories before/after diversity control, score
    distributions, teacher failures by kind, time and throughput per stage."""
    with writing(timings.name):
        timings.close()
    lines = ["# build_data report", "", f"prompt version {PROMPT_VERSION}; stages run: {args.stages}; "
             f"teacher {args.teacher or ' '.join(args.teacher_url)}; student {args.student}", ""]
    sent, cached = (teacher.sent, teacher.cached) if teacher else (0, 0)
    lines += [f"teacher requests this run: {sent} sent, {cached} answered from the cache", ""]
    lines += ["## Counts per stage", "", "| stage | in | out | notes |", "|---|---|---|---|"]
    lines += [f"| {k} | {a} | {b} | {note} |" for k, (a, b, note) in rep["counts"].items()]
    if "before" in rep:
        lines += ["", "## Categories", "", "| category | before diversity control | after |", "|---|---|---|"]
        lines += [f"| {c} | {rep['before'][c]} | {rep.get('after', {}).get(c, '')} |" for c in sorted(rep["before"])]
    if "topics" in rep:
        lines += ["", f"secondary topics kept ({len(rep['topics'])}): {histogram(rep['topics'].elements())}"]
    judge = collections.Counter()
    if "scores" in rep:
        s = rep["scores"]
        judge = collections.Counter(x["judge"] for x in s if x["judge"] is not None)
        ppl = sorted(x["ppl"] for x in s)
        q = lambda f: ppl[min(int(f * len(ppl)), len(ppl) - 1)] if ppl else None  # noqa: E731
        lines += ["", "## Scores (all responses)", "",
                  f"- judge score: {histogram(x['judge'] if x['judge'] is not None else 'none' for x in s)}",
                  f"- safety: {histogram({True: 'safe', False: 'unsafe', None: 'unknown'}[x['safe']] for x in s)}",
                  f"- correct against gold: {histogram({True: 'correct', False: 'wrong', None: 'no gold'}[x['correct']] for x in s)}",
                  f"- student perplexity: min {q(0)}, median {q(0.5)}, p90 {q(0.9)}, max {q(1)}"]
        by_src = collections.defaultdict(list)
        for x in s:
            if x["judge"] is not None:
                by_src[x["source"]].append(x["judge"])
        lines += ["- mean judge score by source: " +
                  (", ".join(f"{k} {sum(v) / len(v):.2f} ({len(v)})" for k, v in sorted(by_src.items())) or "(none)")]
    if "chosen" in rep:
        lines += [f"- chosen for SFT, by source: {histogram(rep['chosen'].elements())}"]
    if rep.get("failures"):
        lines += ["", "## Teacher failures", "",
                  "Each failed attempt is counted by kind; items that failed every attempt were dropped or fell back "
                  "(raw replies are kept in the stage files, key \"failures\").", "",
                  "| stage | failed attempts by kind | items failed |", "|---|---|---|"]
        lines += [f"| {k} | {histogram(fl['kind'] for fl in v)} | {rep['failed_items'].get(k, 0)} |"
                  for k, v in rep["failures"].items()]
    t = collections.defaultdict(lambda: [0.0, 0])
    path = os.path.join(out, "timings.jsonl")
    for line in open(path, encoding="utf-8") if os.path.exists(path) else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        t[r["stage"]][0] += r["seconds"]
        t[r["stage"]][1] += r["items"]
    lines += ["", "## Time (all runs into this folder)", "", "| stage | seconds | items | items/s |", "|---|---|---|---|"]
    lines += [f"| {k} | {v[0]:.1f} | {v[1]} | {v[1] / v[0]:.3g} |" if v[0] >= 0.05 else f"| {k} | {v[0]:.1f} | {v[1]} | - |"
              for k, v in t.items()]
    if "before" in rep and chart(os.path.join(out, "report.png"), rep["before"], rep.get("after", {}), judge):
        lines += ["", "![categories and judge scores](report.png)"]
    write_atomic(os.path.join(out, "report.md"), "\n".join(lines) + "\n")
    if teacher:
        teacher.close()


if __name__ == "__main__":
    main()
