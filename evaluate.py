"""Evaluate one or many checkpoints on GSM8K, MMLU, CMMLU, C-Eval and HumanEval (the paper's protocol:
chat template, greedy decoding) and write one table comparing them.

    python evaluate.py --download --tasks gsm8k,mmlu,cmmlu,ceval,humaneval    # benchmarks into ./data/benchmarks
    python evaluate.py --model Qwen/Qwen2-0.5B-Instruct --tasks gsm8k,mmlu --out runs/eval
    python evaluate.py --model base --model runs/sft --model runs/merged --tasks gsm8k,mmlu,cmmlu,ceval \\
        --shots mmlu=5,cmmlu=5,ceval=5 --limit 200 --out runs/eval
    python evaluate.py --model runs/tiny --tasks mmlu --shots 5 --mode generate --limit 20 --out runs/eval_tiny

GSM8K: 4-shot chain of thought in one user turn, generation stopped at a next "Question:", the
last number of the reply against '#### N'. MMLU (test), CMMLU (test), C-Eval (val): zero-shot by
default, scored by the next-token log-probs of the option letters after the assistant header
(--mode generate: generate a reply and extract the letter), each question in its benchmark's own
layout; MMLU's accuracy pools its questions, CMMLU's and C-Eval's (overall and per category) is
the mean of their subjects' accuracies, as their own scripts report them. HumanEval: greedy completion, pass@1,
each program run in a sandboxed subprocess (see nanopost/tasks/humaneval.py for what that sandbox
does not protect against). --shots and --max-new-tokens take TASK=N pairs (--shots mmlu=5,gsm8k=0);
a bare N is refused when it would apply to several of --tasks. Each task has its own default
new-token budget (HumanEval 768, the others 256), and every generated prediction records whether
its reply hit that limit ("hit_limit").

Writes OUT/results.json (every prediction, so any score can be audited), OUT/results.md, and
caches predictions in OUT/cache/ so an interrupted run resumes where it stopped. A cache file is
keyed on the checkpoint (name, size and mtime of each file the loader reads, and a hash of its
small files: config, index, tokenizer), a hash of the examples as loaded from --data-dir (prompts,
answers, tests), every setting, the scoring-protocol version (nanopost.tasks.PROTOCOL) and, for
HumanEval, the Python version that runs its programs, so a retrained model, changed benchmark files,
a changed scorer or another Python never reuse old rows. An --out that
has results from earlier runs keeps them beside this run's (kept cells are marked * in
results.md, and † where their settings or questions differ from this run's in that column); a
checkpoint folder (one holding config.json) is refused as --out.
--perplexity F.jsonl adds each model's perplexity on the assistant tokens of a chat JSONL file
(for checking training runs); with matplotlib installed, OUT/results.png is a bar chart.

--download first fetches the requested benchmarks that are missing from --data-dir, from their
original public sources (see nanopost/tasks/download.py); without --model it only downloads.
Offline machines: put the original files in a folder (or on an internal web server) and add
--mirror DIR_OR_URL."""
import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import signal
import sys
import time

import torch
from tqdm import tqdm

import nanopost
from nanopost import tasks
from nanopost.checkpoint import CheckpointError, closing_named, folder_lock, resolve, unwritable, whole_file, writing
from nanopost.data import DataError, collate, load_sft, whole_lines
from nanopost.losses import sft_loss_sum, target_counts
from nanopost.engine import Engine, Sampling, cache_dtype, cut_at_stop, graphs_switch, resolve_dtype
from nanopost.tasks.choice import LETTERS, OVER_SUBJECTS


INTERRUPTED = "interrupted"  # main() names the cache folder once the predictions begin


def letter_logprobs(engine: Engine, prompts: list[list[int]], letter_ids: list[int], batch_size: int = 8) -> list[list[float]]:
    """Log-probs of each option letter as the next token after each prompt: one packed prefill per
    batch_size prompts, a few-shot block shared by them computed once (Engine.next_logprobs)."""
    return engine.next_logprobs(prompts, letter_ids, batch_size)


SEGMENT_BATCHES = 16  # letter-scoring batches computed as one unit (see segments)


def segments(examples, prompts, batch_size) -> list[list[int]]:
    """The units letter scoring computes, as lists of example indices: the task's questions in prompt
    order (shared few-shot blocks side by side), cut every SEGMENT_BATCHES batches. A segment starts
    with no kept prefix (Engine.forget_prefixes), and a row's float rounding follows its batch and the
    prefixes computed before it, so a segment's numbers depend on its own questions only: a resumed
    run computes a partly done segment whole and writes exactly an uninterrupted run's."""
    order = sorted(range(len(examples)), key=lambda i: prompts[i])
    size = SEGMENT_BATCHES * batch_size
    return [order[k:k + size] for k in range(0, len(order), size)]


PPL_MAX_LEN = 4096  # tokens of a perplexity example; longer ones are cut


@torch.inference_mode()
def perplexity(model, tok, path, max_len=PPL_MAX_LEN, batch_size=8, skip_bad_lines=False, log=print) -> float:
    """exp(mean NLL) over the trained (assistant) tokens of a chat JSONL file."""
    examples = load_sft([path], tok, max_len, skip_bad_lines=skip_bad_lines, log=log)[0][0]
    nll = n = 0.0
    for i in range(0, len(examples), batch_size):
        ids, labels, pos = collate([[j] for j in range(i, min(i + batch_size, len(examples)))], examples, tok.pad_id)
        dev = model.lm_head.weight.device
        nll += sft_loss_sum(model, ids.to(dev), labels.to(dev), pos.to(dev)).item()
        n += target_counts(labels).sum().item()
    if not math.isfinite(nll) or nll / n > 700:  # results.json holds numbers only: NaN and inf are not JSON
        raise ValueError(f"{path}: mean NLL {nll / n:.4g} nats per token; the model computes NaN/inf or absurd "
                         f"logits (diverged training, a bad merge?): no perplexity reported")
    return math.exp(nll / n)


def chart(results, columns, path) -> bool:
    """A grouped bar chart of the table (needs matplotlib; returns False without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(columns), 4))
    width = 0.8 / max(len(results), 1)
    short = [os.path.basename(m.rstrip("/")) or m for m in results]
    for i, (model, r) in enumerate(results.items()):  # a folder's name, or its path where two share one (step-200)
        label = short[i] if short.count(short[i]) == 1 else model
        ax.bar([c + i * width for c in range(len(columns))], [math.nan if (r.get(t) or {}).get("accuracy") is None else r[t]["accuracy"] for t in columns], width,
               label=label)
    ax.set_xticks([c + width * (len(results) - 1) / 2 for c in range(len(columns))], columns)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with whole_file(path) as tmp:  # a full disk keeps the earlier chart
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return True


def subset(examples, limit):
    """A deterministic subset (seeded sample, kept in file order) so --limit mixes subjects."""
    if not limit or limit >= len(examples):
        return examples
    keep = sorted(random.Random(0).sample(range(len(examples)), limit))
    return [examples[i] for i in keep]


def summarize(preds, over_subjects=False):
    """Accuracy in % overall, by category and by subject. MMLU's (and every other task's) is the
    share of questions answered right, as Hendrycks' code pools them; with over_subjects (CMMLU,
    C-Eval) the overall and category figures are the mean of their subjects' accuracies, as CMMLU's
    and C-Eval's own scripts report them (a subject of 50 questions counts as one of 500 does)."""
    def groups(rows, key):
        out = {}
        for r in rows:
            for k in ([r[key]] if key in r else []) + (r.get("also", []) if key == "category" else []):
                out.setdefault(k, []).append(r)  # (a CMMLU question can be in two categories: its own scripts')
        return out

    def acc(rows):
        if not rows:
            return None
        if over_subjects:
            subjects = groups(rows, "subject").values()
            return round(sum(100 * sum(r["correct"] for r in s) / len(s) for s in subjects) / len(subjects), 2)
        return round(100 * sum(r["correct"] for r in rows) / len(rows), 2)

    out = {"accuracy": acc(preds), "n": len(preds)}
    for key in ("category", "subject"):
        if found := groups(preds, key):
            out[f"by_{key}"] = {k: acc(v) for k, v in sorted(found.items())}
    return out


def read_earlier(path) -> dict:
    """The results.json an earlier run left in --out (empty without one); one that is not ours stops
    the run before any work, rather than being overwritten."""
    if not os.path.exists(path):
        return {}
    try:
        return tasks.read_results(path)
    except ValueError as e:
        sys.exit(f"error: {e}; move it away or choose another --out")


def same_model(a: str, b: str) -> bool:
    """Two --model values naming one checkpoint: equal, or one local folder spelled two ways."""
    return a == b or (os.path.isdir(a) and os.path.isdir(b) and os.path.realpath(a) == os.path.realpath(b))


def merge_earlier(earlier: dict, results: dict, stamps: dict) -> tuple[dict, dict, dict]:
    """Evaluating into a folder that has results adds to them: models evaluated one run at a time
    (the base today, the fine-tune tomorrow) end in one table. This run's entries win. An earlier
    entry is kept only if it still describes its checkpoint: for a model evaluated now (the same
    name, or the same local folder spelled another way), only tasks not run now and made from the
    same checkpoint (stamps: model -> stamp); for another model that is a local folder, only if its
    stamp is unchanged (a retrained model's old scores are dropped); a hub id's are kept as
    recorded. -> (merged, {model: [kept]}, {model: [dropped]})."""
    merged, carried, dropped = {}, {}, {}
    for m, r in earlier.items():
        folder = tasks.entry_folder(m, r)  # (a relative key from another directory: the path it records)
        same = (lambda n: os.path.isdir(n) and os.path.realpath(n) == folder) if folder else (lambda n: n == m)
        now = next((n for n in results if same(n)), None)
        if now is not None:
            keep = {t: v for t, v in r.items() if t not in results[now] and v.get("checkpoint") == stamps[now]}
        else:
            current = tasks.stamp(tasks.fingerprint(folder)) if folder else None
            keep = {t: v for t, v in r.items() if current is None or v.get("checkpoint") in (None, current)}
        # a folder whose key names another folder, or none, from here (runs/b evaluated in another
        # directory): keyed by its own absolute path, so that no row of results.md names another folder
        name = now or (folder if folder and (m in results or not same(m)) else m)
        gone = [t for t in r if t not in keep and (now is None or t not in results[now])]
        if keep:
            carried.setdefault(name, []).extend(keep)
        if gone:
            dropped[m] = gone
        merged[name] = {**merged.get(name, {}), **keep}
    for n, r in results.items():
        merged[n] = {**merged.get(n, {}), **r}
    return {m: r for m, r in merged.items() if r}, carried, dropped


def per_task(p, flag, value, names, applies, minimum=0) -> dict:
    """'mmlu=5,gsm8k=0' -> {"mmlu": 5, "gsm8k": 0}. A bare number stands for the one task of
    --tasks that the flag applies to; with several, it is refused rather than applied to all."""
    if value is None:
        return {}
    if not applies:
        p.error(f"{flag} applies to none of --tasks {','.join(names)}")
    if "=" not in value:
        if len(applies) > 1:
            p.error(f"{flag} {value} is ambiguous with --tasks {','.join(names)}: it applies to "
                    f"{', '.join(applies)}; name the task, e.g. {flag} {applies[-1]}={value}")
        value = f"{applies[0]}={value}"
    out = {}
    for item in value.split(","):
        task, _, n = (x.strip() for x in item.partition("="))
        if task not in applies:
            p.error(f"{flag} {item!r}: expected TASK=N with TASK one of {', '.join(applies)}")
        if not (n.isascii() and n.isdigit()):  # "²" is a digit to str.isdigit, not to int()
            p.error(f"{flag} {item!r}: N must be a whole number >= {minimum}")
        if task in out:
            p.error(f"{flag} names {task} twice")
        if int(n) < minimum:
            p.error(f"{flag} {item!r}: must be at least {minimum}")
        out[task] = int(n)
    return out


@nanopost.exits_when_disk_full("rerun the same command: the questions it finished are kept")
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=nanopost.HelpFormatter)
    # ---- what ----
    p.add_argument("--model", action="append", default=[], help="checkpoint dir or hub id (repeat for several)")
    p.add_argument("--tasks", default="gsm8k,mmlu,cmmlu,ceval", help=f"comma-separated, from {','.join(tasks.NAMES)}")
    p.add_argument("--data-dir", default=os.environ.get("NANOPOST_DATA", "./data/benchmarks"),
                   help="benchmark files (default: $NANOPOST_DATA, else ./data/benchmarks)")
    p.add_argument("--out", help="output directory: results.json, results.md, cache/ (required with --model)")
    p.add_argument("--download", action="store_true", help="first fetch missing benchmarks from their original sources")
    p.add_argument("--mirror", default=None, metavar="DIR_OR_URL",
                   help="with --download: fetch the original files by name from this folder or URL instead")
    # ---- protocol ----
    p.add_argument("--shots", default=None, metavar="TASK=N,...",
                   help="exemplars per prompt, per task (default: gsm8k 4, others 0); a bare N only for one task")
    p.add_argument("--mode", choices=["logprob", "generate"], default="logprob",
                   help="multiple choice: option-letter log-probs (default) or generate + extract")
    p.add_argument("--humaneval-mode", choices=["chat", "raw"], default="chat",
                   help="humaneval: chat template + code block (default) or raw completion of the prompt")
    p.add_argument("--limit", type=int, default=None, help="at most N questions per task (a fixed seeded subset)")
    p.add_argument("--perplexity", nargs="+", default=[], metavar="F.jsonl",
                   help="also report perplexity on the assistant tokens of these chat JSONL files")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="--perplexity: drop malformed lines with a warning instead of stopping")
    p.add_argument("--max-new-tokens", default=None, metavar="TASK=N,...",
                   help="reply budget of generated tasks, per task (default: humaneval 768, others 256); "
                        "a bare N only for one task")
    # ---- speed ----
    p.add_argument("--batch-size", type=int, default=16,
                   help="rows decoded concurrently (a finished row's slot takes the next prompt at once); "
                        "letter scoring: prompts per prefill")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype; auto: bfloat16 where the hardware runs it natively (CPU with "
                        "AVX512-BF16 or AMX, CUDA with bf16), else float32 (printed with the reason)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=nanopost.device_arg,
                   help="cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    try:
        graphs_switch()  # a bad NANOPOST_CUDA_GRAPHS before any work
    except ValueError as e:
        p.error(str(e))

    names = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))  # gsm8k,gsm8k: once
    shots = per_task(p, "--shots", args.shots, names, [t for t in names if t in tasks.SHOTS])
    generated = [t for t in names if t in tasks.NEW_TOKENS and (t not in tasks.CHOICE or args.mode == "generate")]
    new_tokens = {t: tasks.NEW_TOKENS[t] for t in generated}
    new_tokens.update(per_task(p, "--max-new-tokens", args.max_new_tokens, names, generated, minimum=1))
    shots = {t: shots.get(t, tasks.SHOTS.get(t, 0)) for t in names}
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be at least 1 (got {args.limit}); leave it out for every question")
    if not args.model and not args.download:
        p.error("give at least one --model (or --download to only fetch the benchmarks)")
    if args.model and not args.out:
        p.error("--out is required with --model")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; give a folder")
    if args.out and os.path.isfile(os.path.join(args.out, "config.json")):  # results.json there joins the stamp
        p.error(f"--out {args.out} is a checkpoint folder (it holds config.json): a results.json written there "
                f"would change its files' stamp, so every number of it would read as stale; choose another --out")
    same = [m for i, m in enumerate(args.model or []) if any(same_model(m, n) for n in args.model[:i])]
    if same:  # results key models by --model: ./runs/sft and runs/sft would be one row evaluated twice
        p.error(f"--model {same[0]} is given twice (the same checkpoint)")
    if args.model and not names and not args.perplexity:
        p.error("--tasks names no task (and no --perplexity file given): nothing to evaluate")
    bases = [os.path.basename(f) for f in args.perplexity]
    if len(set(bases)) < len(bases):  # results key perplexity by file name
        p.error(f"--perplexity: two files share a name ({', '.join(dict.fromkeys(b for b in bases if bases.count(b) > 1))}); "
                "rename or copy one")
    if args.download:
        from nanopost.tasks.download import DownloadError, download
        for t in names:
            try:
                print(download(t, args.data_dir, args.mirror), flush=True)
            except DownloadError as e:
                sys.exit(f"error: {e}")
        if not args.model:
            return
    global INTERRUPTED  # what Ctrl-C says from here on, when predictions are being made and cached
    INTERRUPTED = (f"interrupted: every prediction made so far is cached in {os.path.join(args.out, 'cache')}; "
                   "the same command resumes")
    try:
        loaded = {t: tasks.load(t, args.data_dir, shots[t], args.humaneval_mode) for t in names}
    except OSError as e:  # a missing file or folder
        sys.exit(f"error: {e} (benchmarks are looked for in --data-dir {args.data_dir}; "
                 f"--download fetches missing ones)")
    except ValueError as e:  # a file that is there but malformed, an unknown task, too few exemplars
        sys.exit(f"error: {e}")
    for f in args.perplexity:
        if not os.path.exists(f):
            sys.exit(f"error: --perplexity {f}: no such file")
    for m in args.model:  # a typo in the last --model is found before the first model's work
        if not os.path.isdir(m):
            try:
                resolve(m)
            except CheckpointError as e:
                sys.exit(f"error: {e}")
    read_earlier(os.path.join(args.out, "results.json"))  # one we cannot add to stops us before any work
    ours = [n for n in ("results.md", "results.png") if os.path.exists(os.path.join(args.out, n))]
    if ours and not os.path.exists(os.path.join(args.out, "results.json")):  # someone else's files: kept
        sys.exit(f"error: --out {args.out} holds {', '.join(ours)} but no results.json: not an evaluate.py folder "
                 f"(they would be replaced); choose another --out")
    if os.path.exists(os.path.join(args.out, "cache")) and not os.path.isdir(os.path.join(args.out, "cache")):
        sys.exit(f"error: --out {args.out} holds a file named cache, where evaluate.py keeps its predictions; "
                 f"choose another --out")
    if why := unwritable(args.out, os.path.join(args.out, "cache")):  # now, not once the first model is loaded
        sys.exit(f"error: {why}")
    dtype = resolve_dtype(args.dtype, args.device)
    dtype_name = str(dtype).removeprefix("torch.")
    results, stamps = {}, {}
    for model_name in args.model:
        try:
            ckpt = resolve(model_name)
            checkpoint_print = tasks.fingerprint(ckpt)
            stamps[model_name] = tasks.stamp(checkpoint_print)  # the folder is read once, for both
            # a local folder's numbers say where it is: results are keyed by --model as given
            where = {"path": os.path.abspath(model_name)} if os.path.isdir(model_name) else {}
            model, tok = nanopost.load(ckpt, dtype=dtype, device=args.device)
        except (CheckpointError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        engine = Engine(model, tok)
        letter_ids = [tok.encode(L) for L in LETTERS]
        if any(len(t) != 1 for t in letter_ids):
            sys.exit(f"error: {model_name}: the option letters are not single tokens; use --mode generate")
        letter_ids = [t[0] for t in letter_ids]
        results[model_name] = {}
        for f in args.perplexity:  # first: a bad file stops the run before any task's work
            try:
                ppl = perplexity(model, tok, f, skip_bad_lines=args.skip_bad_lines)
            except ValueError as e:  # DataError, or a model that computes NaN
                sys.exit(f"error: {model_name}: {e}" if not isinstance(e, DataError) else f"error: {e}")
            with open(f, "rb") as fh:  # the file's content: another chat.jsonl is another column's number
                data = hashlib.sha256(fh.read()).hexdigest()[:16]
            results[model_name][f"ppl:{os.path.basename(f)}"] = {
                "perplexity": round(ppl, 4), "checkpoint": stamps[model_name], **where, "data": data,
                "settings": {"task": "perplexity", "max_len": PPL_MAX_LEN, "skip_bad_lines": args.skip_bad_lines,
                             "dtype": dtype_name, "device": args.device}}
        for task in names:
            examples, score, kind = loaded[task]
            examples = subset(examples, args.limit)
            mode = "generate" if kind == "generate" else args.mode
            settings = {"task": task, "shots": shots[task], "mode": mode, "max_new_tokens": new_tokens.get(task),
                        "limit": args.limit, "dtype": dtype_name, "device": args.device, "batch_size": args.batch_size,
                        "protocol": tasks.PROTOCOL}
            if task == "humaneval":  # its verdicts are what this interpreter's Python makes of the programs
                settings["humaneval_mode"] = args.humaneval_mode
                settings["python"] = ".".join(platform.python_version_tuple()[:2])
            if mode == "logprob":  # 2: option logits in float32 (Engine.next_logprobs); bf16 ones tied near options
                settings["letter_scoring"] = 2
            if cache_dtype(model) != dtype:  # 2: a half-precision model on CPU attends from a float32 cache, and its
                settings["cpu_half"] = 2  # greedy tokens are the float32 argmax (engine.cache_dtype, GreedyScreen)
            # the key covers everything a prediction depends on; a changed key starts a new file
            asked = hashlib.sha256(json.dumps(examples, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
            key = hashlib.sha256(json.dumps([checkpoint_print, asked, settings], sort_keys=True).encode()).hexdigest()
            os.makedirs(os.path.join(args.out, "cache"), exist_ok=True)  # not before: a bad --perplexity file leaves nothing
            cache_file = os.path.join(args.out, "cache", f"{task}-{key[:16]}.jsonl")
            done = {}
            if os.path.exists(cache_file):
                # a last line cut by a crash goes (that question is redone), so the next row starts a line of its own
                for line in whole_lines(cache_file)[0].decode("utf-8", "replace").split("\n"):
                    try:
                        r = json.loads(line)
                        done[r["id"]] = r
                    except (json.JSONDecodeError, TypeError, KeyError):
                        pass  # an empty or damaged line: that question is simply redone
            todo = [e for e in examples if e["id"] not in done]
            t0 = time.time()
            with closing_named(open(cache_file, "a", encoding="utf-8")) as cache, \
                    tqdm(total=len(examples), initial=len(examples) - len(todo), desc=f"{task} {model_name}") as bar:
                def encode(e):
                    return tok.encode(e["raw"]) if "raw" in e else tok.render(e["messages"], add_generation_prompt=True)[0]

                def record(e, o, correct):  # one finished question: into the cache file at once, so a crash loses little
                    row = {"id": e["id"], "answer": e["answer"], "correct": bool(correct), **o,
                           **{k: e[k] for k in ("subject", "category", "also") if k in e}}
                    with writing(cache_file):
                        cache.write(json.dumps(row, ensure_ascii=False) + "\n")
                        cache.flush()
                    done[e["id"]] = row
                    bar.update(1)

                if mode == "logprob" and todo:
                    prompts = [encode(e) for e in examples]
                    for seg in segments(examples, prompts, args.batch_size):
                        if all(examples[j]["id"] in done for j in seg):
                            continue
                        engine.forget_prefixes()
                        for i in range(0, len(seg), args.batch_size):
                            batch = seg[i:i + args.batch_size]
                            for j, lp in zip(batch, letter_logprobs(engine, [prompts[j] for j in batch], letter_ids,
                                                                    args.batch_size)):
                                if examples[j]["id"] in done:  # (computed again: its segment's others need it)
                                    continue
                                if not all(map(math.isfinite, lp)):  # max() would pick A: a broken model scoring ~25%
                                    sys.exit(f"error: {model_name}: {task} {examples[j]['id']}: option log-probs {lp}; "
                                             f"the model computes NaN/inf (diverged training, a bad merge?): no score "
                                             f"reported")
                                pred = LETTERS[max(range(4), key=lambda k: lp[k])]
                                record(examples[j], {"logprobs": lp, "pred": pred}, pred == examples[j]["answer"])
                elif todo:
                    prompts = [encode(e) for e in todo]
                    stop, budget = todo[0].get("stop", []), new_tokens[task]

                    def finished(j, ids):
                        text = tok.decode(ids)
                        reply = cut_at_stop(text, stop)
                        hit = reply == text and len(ids) == budget  # no eos or stop string ended it
                        # the scorer's verdict, never pred == answer: a failed program's status is its own text
                        pred, correct = score(todo[j], reply, cut=hit)
                        record(todo[j], {"reply": reply, "hit_limit": hit, "pred": pred}, correct)

                    engine.generate_ids(prompts, Sampling(max_new_tokens=budget, stop=stop), batch_size=args.batch_size,
                                        on_done=finished)
            preds = [done[e["id"]] for e in examples]
            results[model_name][task] = {**summarize(preds, task in OVER_SUBJECTS), "settings": settings,
                                         "seconds": round(time.time() - t0, 1), "checkpoint": stamps[model_name],
                                         **where, "data": asked[:16], "predictions": preds}
            print(f"{model_name} {task}: {results[model_name][task]['accuracy']}% of {len(preds)}", flush=True)
        del model, engine

    this_run = results
    os.makedirs(args.out, exist_ok=True)
    with contextlib.ExitStack() as held:  # runs of other models into this folder finishing now: one at a time
        try:
            held.enter_context(folder_lock(args.out))
        except TimeoutError:
            sys.exit(f"error: --out {args.out} is held by another process (a training run or build_data.py writing "
                     f"there?); every prediction is cached in {args.out}/cache: rerun once it is done, or choose another --out")
        # read again: another run may have written its results into this folder since we started
        results, carried, dropped = merge_earlier(read_earlier(os.path.join(args.out, "results.json")), results, stamps)
        if carried:
            print(f"note: {args.out}/results.json keeps earlier results: " +
                  "; ".join(f"{m} ({', '.join(ts)})" for m, ts in carried.items()), flush=True)
        if dropped:
            print(f"note: dropped earlier results whose checkpoint changed since (or unrecorded) from {args.out}/results.json: " +
                  "; ".join(f"{m} ({', '.join(ts)})" for m, ts in dropped.items()), flush=True)
        with whole_file(os.path.join(args.out, "results.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1, ensure_ascii=False)
        ppl = [f"ppl:{os.path.basename(f)}" for f in args.perplexity]
        every = [c for r in results.values() for c in r]  # this run's columns first, then earlier runs'
        columns = list(dict.fromkeys(names + [c for c in every if not c.startswith("ppl:")] +
                                     ppl + [c for c in every if c.startswith("ppl:")]))

        def differs(m, c):
            """A kept cell made with other settings or questions than this run's cell of its column; in a
            column this run has no cell of, every cell when the cells were not all made alike."""
            if c not in carried.get(m, ()):
                return False
            ours = next((r[c] for r in this_run.values() if c in r and "settings" in r[c]), None)
            if ours is not None:
                return tasks.protocol(results[m][c]) != tasks.protocol(ours)
            made = {json.dumps(tasks.protocol(r[c])) for r in results.values() if c in r and "settings" in r[c]}
            return len(made) > 1

        mixed = [f"{m} {c}" for m in results for c in columns if differs(m, c)]
        if mixed:
            print(f"note: kept results made with other settings or questions than this run's: {', '.join(mixed)} "
                  f"(marked † in results.md; compare their settings in results.json)", flush=True)

        def cell(m, c):
            v = results[m].get(c)
            if v is None:
                return "–"
            return (f"{v.get('accuracy', v.get('perplexity'))}" + ("*" if c in carried.get(m, ()) else "")
                    + ("†" if differs(m, c) else ""))

        lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        lines += [f"| {m} | " + " | ".join(cell(m, c) for c in columns) + " |" for m in results]
        table = "\n".join(lines) + "\n"
        if carried:
            table += ("\n\\* kept from an earlier run into this folder (the same model and checkpoint, or a model "
                      "not evaluated this time); its settings are in results.json\n")
        if mixed:
            table += ("\n† made with other settings (shots, mode, token budget, dtype, protocol, HumanEval's Python) or "
                      "other questions than this run's column (in a column this run did not evaluate: its cells were "
                      "not all made alike)\n")
        with whole_file(os.path.join(args.out, "results.md")) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(f"# Evaluation\n\naccuracy in %, perplexity on assistant tokens; settings per task in "
                    f"results.json\n\n{table}")
        tasks_done = [c for c in columns if not c.startswith("ppl:")]
        if tasks_done and not chart(results, tasks_done, os.path.join(args.out, "results.png")):
            print("note: no chart (pip install matplotlib for OUT/results.png)")
    print(table)
    print(json.dumps({m: {t: v.get("accuracy", v.get("perplexity")) for t, v in r.items()} for m, r in results.items()}))


if __name__ == "__main__":
    # Ctrl-C stops us even when started with SIGINT ignored (a shell's background job, nohup)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # (paper.py passes its SIGTERM on): the same unwinding,
    try:  # so a HumanEval program running in its own session is killed, not left behind
        main()
    except KeyboardInterrupt:
        print(f"\n{INTERRUPTED}", file=sys.stderr, flush=True)
        sys.exit(130)
