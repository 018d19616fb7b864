"""Greedy generation throughput: the nanopost engine against transformers `generate`, side by
side on the same machine, same checkpoint, same prompts, same number of new tokens.

    python bench/generate.py                                  # real checkpoint at the default path
    python bench/generate.py --model DIR --dtypes float32 --batch-sizes 1 8 --new-tokens 128

Each (implementation, dtype) runs in its own process so its peak RSS is its own; the table
prints new tokens/s (median of --repeats runs after a warm-up), the ratio, and peak RSS."""
import argparse
import json
import os
import resource
import statistics
import time

from sides import DEFAULT_MODEL, run_side  # bench/sides.py


QUESTIONS = ["Write a Python function that returns the n-th Fibonacci number.",
             "Explain the difference between a list and a tuple in Python, with examples.",
             "What is 17 * 23? Show your work.",
             "Write a haiku about compilers.",
             "Give three tips for writing readable code, one sentence each, and explain why each matters in practice.",
             "Translate 'good morning' into French, German and Spanish.",
             "Write a SQL query that counts orders per customer.",
             "Summarise what a hash map is."]


def worker(impl, model_dir, dtype_name, batch_sizes, new_tokens, repeats):
    import torch
    import nanopost
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    if impl == "nanopost":
        from nanopost.engine import Engine, Sampling
        model, tok = nanopost.load(model_dir, dtype=dtype)
        eng = Engine(model, tok)

        def run(prompts, n):
            return eng.generate_ids(prompts, Sampling(max_new_tokens=n, ignore_eos=True))
    else:
        from transformers import AutoModelForCausalLM
        tok = nanopost.Tokenizer(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

        def run(prompts, n):
            width = max(map(len, prompts))  # left padding, as transformers expects for generation
            ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, repetition_penalty=1.0, pad_token_id=tok.pad_id)
            return [row[width:].tolist() for row in out]
    prompts = [tok.render([{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in QUESTIONS]
    result = {}
    for B in batch_sizes:
        batch = (prompts * B)[:B]
        run(batch, 8)  # warm-up
        times, outs = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            outs = run(batch, new_tokens)
            times.append(time.perf_counter() - t)
        assert all(len(o) == new_tokens for o in outs)
        result[B] = {"tokens_per_s": B * new_tokens / statistics.median(times), "first_row": outs[0]}
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="weight dtypes to measure")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="batch sizes")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per row")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (median)")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker[:1], args.model, args.worker[1], args.batch_sizes, args.new_tokens, args.repeats)))
        return
    import torch
    print(f"model {args.model}; torch {torch.__version__}; {os.cpu_count()} CPUs; "
          f"threads {torch.get_num_threads()}; cuda {torch.cuda.is_available()}")
    print("| dtype | batch | nanopost tok/s | transformers tok/s | ratio | same tokens (row 0) | peak RSS nanopost / transformers |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        res = {}
        for impl in ("nanopost", "transformers"):
            res[impl] = run_side(__file__, ["--worker", impl, dtype, "--model", args.model, "--new-tokens", args.new_tokens,
                                            "--repeats", args.repeats, "--batch-sizes", *args.batch_sizes], f"{impl} {dtype}")
        a, b = res["nanopost"], res["transformers"]
        for B in map(str, args.batch_sizes):
            print(f"| {dtype} | {B} | {a[B]['tokens_per_s']:.1f} | {b[B]['tokens_per_s']:.1f} | "
                  f"{a[B]['tokens_per_s'] / b[B]['tokens_per_s']:.2f}x | {a[B]['first_row'] == b[B]['first_row']} | "
                  f"{a['peak_rss_gb']:.2f} / {b['peak_rss_gb']:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
