"""Evaluation speed: nanopost's runner pieces against a transformers-based loop, side by side on
the same machine, the same prompts and greedy decoding, with the predictions compared.

    python bench/evaluate.py                                     # issue 5's slice: 64 GSM8K, 256 MMLU
    python bench/evaluate.py --gsm8k 16 --new-tokens 128 --mmlu 64 --batch-size 8   # a quicker CPU slice

GSM8K: 4-shot chain of thought, `--new-tokens` new tokens, batches of --batch-size; nanopost uses
Engine.generate, transformers uses model.generate(do_sample=False) on left-padded batches.
MMLU: zero-shot letter scoring, one forward pass per batch for both (transformers: the logits at
each row's last prompt token; right padding). Each implementation runs in its own process."""
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
    g_ex = subset(tasks.load("gsm8k", args.data_dir)[0], args.gsm8k)
    m_ex = subset(tasks.load("mmlu", args.data_dir)[0], args.mmlu)
    g_prompts = [tok.render(e["messages"], add_generation_prompt=True)[0] for e in g_ex]
    m_prompts = [tok.render(e["messages"], add_generation_prompt=True)[0] for e in m_ex]
    letters = [tok.encode(L)[0] for L in "ABCD"]
    B = args.batch_size
    if impl == "nanopost":
        from evaluate import letter_logprobs
        from nanopost.engine import Engine, Sampling
        model, _ = nanopost.load(args.model)
        eng = Engine(model, tok)
        generate = lambda ps: [tok.decode(r) for r in eng.generate_ids(ps, Sampling(max_new_tokens=args.new_tokens))]  # noqa: E731
        letter = lambda ps: [max(range(4), key=lambda j: lp[j]) for lp in letter_logprobs(eng, ps, letters)]  # noqa: E731
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

        @torch.inference_mode()
        def generate(ps):
            w = max(map(len, ps))
            ids = torch.tensor([[tok.pad_id] * (w - len(p)) + p for p in ps])
            mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in ps])
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                                 repetition_penalty=1.0, eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
            return [tok.decode([t for t in row[w:].tolist() if t not in tok.eos_ids]) for row in out]

        @torch.inference_mode()
        def letter(ps):
            w = max(map(len, ps))
            ids = torch.tensor([p + [tok.pad_id] * (w - len(p)) for p in ps])
            mask = torch.tensor([[1] * len(p) + [0] * (w - len(p)) for p in ps])
            logits = model(input_ids=ids, attention_mask=mask).logits
            return [int(logits[b, len(p) - 1, letters].argmax()) for b, p in enumerate(ps)]
    out = {}
    for name, prompts, fn in (("gsm8k", g_prompts, generate), ("mmlu", m_prompts, letter)):
        if not prompts:
            continue
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        preds = [None] * len(prompts)
        fn([prompts[order[0]]])  # warm-up
        t = time.perf_counter()
        for s in range(0, len(order), B):
            idx = order[s:s + B]
            for i, r in zip(idx, fn([prompts[i] for i in idx])):
                preds[i] = r
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
    p.add_argument("--gsm8k", type=int, default=64, help="GSM8K questions")
    p.add_argument("--mmlu", type=int, default=256, help="MMLU questions")
    p.add_argument("--new-tokens", type=int, default=256, help="GSM8K new tokens")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    import torch
    print(f"model {args.model}; torch {torch.__version__}; {os.cpu_count()} CPUs; gsm8k {args.gsm8k} x "
          f"{args.new_tokens} new tokens, mmlu {args.mmlu}, batch {args.batch_size}, float32")
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
