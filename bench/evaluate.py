"""Evaluation speed: nanopost's runner pieces against a transformers-based loop, side by side on
the same machine, the same prompts and greedy decoding, with the predictions compared.

    python bench/evaluate.py                                     # issue 11's slice: 64 GSM8K, 256 MMLU 0- and 5-shot
    python bench/evaluate.py --gsm8k 16 --new-tokens 128 --mmlu 64 --batch-size 8   # a quicker CPU slice
    python bench/evaluate.py --dtype bfloat16                    # both sides in bf16

GSM8K: 4-shot chain of thought, `--new-tokens` new tokens (eos respected), --batch-size rows at a
time: nanopost's continuous batching with the shared 4-shot prefix (Engine.generate_ids), against
transformers' model.generate(do_sample=False) on left-padded batches of the same size.
MMLU (--mmlu-shots): letter scoring; nanopost: Engine.next_logprobs (shared exemplar blocks, packed
prefill); transformers: one forward per batch, left-padded, lm_head on the last position only
(logits_to_keep=1). Each implementation runs in its own process."""
import argparse
import json
import os
import sys
import time

from sides import DEFAULT_MODEL, run_side  # bench/sides.py


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(impl, args):
    import torch
    import nanopost
    from evaluate import subset
    from nanopost import tasks
    from nanopost.tasks import gsm8k
    tok = nanopost.Tokenizer(args.model)
    render = lambda examples: [tok.render(e["messages"], add_generation_prompt=True)[0] for e in examples]  # noqa: E731
    work = [("gsm8k", render(subset(tasks.load("gsm8k", args.data_dir)[0], args.gsm8k)), "generate")] if args.gsm8k > 0 else []
    work += [(f"mmlu {k}-shot", render(subset(tasks.load("mmlu", args.data_dir, k)[0], args.mmlu)), "letter")
             for k in args.mmlu_shots if args.mmlu > 0]
    letters = [tok.encode(L)[0] for L in "ABCD"]
    B, dtype = args.batch_size, getattr(torch, args.dtype)
    if impl == "nanopost":
        from nanopost.engine import Engine, Sampling
        model, _ = nanopost.load(args.model, dtype=dtype)
        eng = Engine(model, tok)
        # all prompts at once: B rows decode concurrently, the 4-shot prefix computed once
        generate_all = lambda ps: [tok.decode(r) for r in eng.generate_ids(ps, Sampling(max_new_tokens=args.new_tokens), batch_size=B)]  # noqa: E731
        letter_all = lambda ps: [max(range(4), key=lambda j: lp[j]) for lp in eng.next_logprobs(ps, letters, B)]  # noqa: E731
        warm_up = lambda: eng.generate_ids([[1, 2, 3]], Sampling(max_new_tokens=2))  # noqa: E731  (packs the weights)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()

        @torch.inference_mode()
        def generate(ps):
            w = max(map(len, ps))
            ids = torch.tensor([[tok.pad_id] * (w - len(p)) + p for p in ps])
            mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in ps])
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                                 repetition_penalty=1.0, eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
            return [tok.decode([t for t in row[w:].tolist() if t not in tok.eos_ids]) for row in out]

        @torch.inference_mode()
        def letter(ps):  # left padding, so every row's last prompt token is the last position: the
            w = max(map(len, ps))  # lm_head runs on it alone (full logits of a 5-shot batch of 16: 29 GB)
            ids = torch.tensor([[tok.pad_id] * (w - len(p)) + p for p in ps])
            mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in ps])
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
            return [int(logits[b, -1, letters].argmax()) for b in range(len(ps))]

        def batched(fn):  # longest first, batches of B
            def run_all(ps):
                order, preds = sorted(range(len(ps)), key=lambda i: -len(ps[i])), [None] * len(ps)
                for s in range(0, len(order), B):
                    for i, r in zip(order[s:s + B], fn([ps[i] for i in order[s:s + B]])):
                        preds[i] = r
                return preds
            return run_all
        generate_all, letter_all = batched(generate), batched(letter)
        warm_up = lambda: generate([[1, 2, 3]])  # noqa: E731
    out = {}
    for name, prompts, kind in work:
        if not prompts:
            continue
        fn = generate_all if kind == "generate" else letter_all
        warm_up()  # not on these prompts: nanopost keeps no prefix from it
        t = time.perf_counter()
        preds = fn(prompts)
        secs = time.perf_counter() - t
        if name == "gsm8k":
            preds = [gsm8k.extract(r) for r in preds]
        out[name] = {"seconds": secs, "per_question": secs / len(prompts), "preds": preds}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory")
    p.add_argument("--data-dir", default=os.environ.get("NANOPOST_DATA", "./data/benchmarks"),
                   help="benchmark files (default: $NANOPOST_DATA, else ./data/benchmarks; evaluate.py --download)")
    p.add_argument("--gsm8k", type=int, default=64, help="GSM8K questions (0: none)")
    p.add_argument("--mmlu", type=int, default=256, help="MMLU questions (0: none)")
    p.add_argument("--new-tokens", type=int, default=256, help="GSM8K new tokens")
    p.add_argument("--mmlu-shots", type=int, nargs="+", default=[0, 5], help="MMLU exemplars per prompt (each a row)")
    p.add_argument("--batch-size", type=int, default=16, help="rows at a time (nanopost: concurrent rows)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides' weights")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.gsm8k < 0 or args.mmlu < 0:
        p.error("--gsm8k and --mmlu take a number of questions >= 0 (0: none)")
    if args.gsm8k == 0 and args.mmlu == 0:
        p.error("nothing to measure: --gsm8k 0 and --mmlu 0")
    for task, n in (("gsm8k", args.gsm8k), ("mmlu", args.mmlu)):
        if n and not os.path.isdir(os.path.join(args.data_dir, task)):
            p.error(f"--data-dir {args.data_dir} has no {task}/ (evaluate.py --download fetches the benchmarks into "
                    f"./data/benchmarks; or set NANOPOST_DATA)")
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    import torch
    print(f"model {args.model}; torch {torch.__version__}; {os.cpu_count()} CPUs; gsm8k {args.gsm8k} x "
          f"{args.new_tokens} new tokens, mmlu {args.mmlu} x {args.mmlu_shots}-shot, batch {args.batch_size}, {args.dtype}; "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    res = {}
    for impl in ("nanopost", "transformers"):
        res[impl] = run_side(__file__, ["--worker", impl, *sys.argv[1:]], impl)
    print("| task | nanopost s/question | transformers s/question | speed ratio | identical predictions |")
    print("|---|---|---|---|---|")
    for task in res["nanopost"]:
        a, b = res["nanopost"][task], res["transformers"][task]
        same = sum(x == y for x, y in zip(a["preds"], b["preds"]))
        print(f"| {task} | {a['per_question']:.3f} | {b['per_question']:.3f} | {b['seconds'] / a['seconds']:.2f}x | "
              f"{same}/{len(a['preds'])} |")


if __name__ == "__main__":
    main()
