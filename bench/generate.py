"""Greedy generation throughput: the nanopost engine against transformers `generate`, side by
side on the same machine, same checkpoint, same prompts, same number of new tokens.

    python bench/generate.py                                  # real checkpoint at the default path
    python bench/generate.py --model DIR --dtypes float32 --batch-sizes 1 8 --new-tokens 128
    python bench/generate.py --chat 64 --new-tokens 256 --batch-sizes 16   # the teacher's workload

Each (implementation, dtype) runs in its own process so its peak RSS is its own; the table
prints new tokens/s (median of --repeats runs after a warm-up), the ratio, and peak RSS.

--chat N: N chat instructions whose replies have mixed lengths, eos respected, at most
--new-tokens each, rows at a time = the first --batch-sizes: nanopost's continuous batching against
transformers `generate` on left-padded batches of the same size (longest prompts first), a
one-at-a-time transformers loop (--loop-sample of the instructions, one per template, its time
scaled to the N replies by their token count), and the same
instructions over HTTP: `python -m nanopost.serve` started as its own process (--batch-size rows)
and build_data.py's HTTP teacher backend sending them from --http-clients concurrent clients
(issue 12's goals: in-process >= 8x the loop; HTTP with 8 clients >= 0.8x in-process)."""
import argparse
import json
import os
import resource
import statistics
import time

from sides import DEFAULT_MODEL, check_args, run_side  # bench/sides.py


QUESTIONS = ["Write a Python function that returns the n-th Fibonacci number.",
             "Explain the difference between a list and a tuple in Python, with examples.",
             "What is 17 * 23? Show your work.",
             "Write a haiku about compilers.",
             "Give three tips for writing readable code, one sentence each, and explain why each matters in practice.",
             "Translate 'good morning' into French, German and Spanish.",
             "Write a SQL query that counts orders per customer.",
             "Summarise what a hash map is."]


TOPICS = ["the moon", "binary search", "coffee", "the French revolution", "photosynthesis", "a hash map",
          "volcanoes", "recursion"]
TEMPLATES = ["Write a haiku about {}.", "Explain {} in one detailed paragraph.", "Give one word that describes {}.",
             "List five facts about {}, one line each.", "Is {} older than 100 years? Answer yes or no.",
             "Write a short story of about 150 words involving {}.", "Summarise {} in one sentence.",
             "Write a Python function related to {}, with a docstring and two usage examples."]
INSTRUCTIONS = [t.format(x) for x in TOPICS for t in TEMPLATES]  # 64, replies from one word to ~250 tokens
SIDES = ("transformers", "transformers-loop", "nanopost-http")  # --chat: what nanopost in-process is compared with


def http_side(model_dir, dtype_name, n, B, new_tokens, clients):
    """nanopost.serve in its own process; the instructions sent by build_data's HTTP teacher backend."""
    import signal
    import subprocess
    import sys
    from nanopost.teacher import HTTPBackend
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    srv = subprocess.Popen([sys.executable, "-m", "nanopost.serve", "--model", f"teacher={model_dir}", "--dtype", dtype_name,
                            "--port", "0", "--quiet", "--batch-size", str(B)], cwd=root, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("serving"):
            lines.append(srv.stdout.readline())
            if not lines[-1]:
                raise RuntimeError("nanopost.serve did not start: " + "".join(lines))
        url = lines[-1].split(" at ")[1].split()[0]
        backend = HTTPBackend([url], concurrency=clients, timeout=3600, retries=0)
        sampling = {"max_tokens": new_tokens, "temperature": 0.0, "top_p": 1.0, "seed": 0}
        messages = [[{"role": "user", "content": q}] for q in INSTRUCTIONS[:n]]
        backend.complete(messages[:2], dict(sampling, max_tokens=4), lambda i, r: None)  # warm-up
        outs = [None] * n

        def keep(i, r):
            outs[i] = r.text if r.text is not None else f"<{r.error}>"
        t = time.perf_counter()
        backend.complete(messages, sampling, keep)
        secs = time.perf_counter() - t
    finally:
        srv.send_signal(signal.SIGINT)
        srv.wait(60)
    return {"seconds": secs, "texts": outs}


def chat_worker(impl, model_dir, dtype_name, n, B, new_tokens, loop_sample, clients):
    import torch
    import nanopost
    if impl == "nanopost-http":
        return http_side(model_dir, dtype_name, n, B, new_tokens, clients)
    dtype = getattr(torch, dtype_name)
    tok = nanopost.Tokenizer(model_dir)
    prompts = [tok.render([{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in INSTRUCTIONS[:n]]
    if impl == "nanopost":
        from nanopost.engine import Engine, Sampling
        model, _ = nanopost.load(model_dir, dtype=dtype)
        eng = Engine(model, tok)
        eng.generate_ids(prompts[:2], Sampling(max_new_tokens=4))  # warm-up
        t = time.perf_counter()
        outs = eng.generate_ids(prompts, Sampling(max_new_tokens=new_tokens), batch_size=B)
        secs = time.perf_counter() - t
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()

        @torch.inference_mode()
        def run(ps):
            w = max(map(len, ps))
            ids = torch.tensor([[tok.pad_id] * (w - len(p)) + p for p in ps])
            mask = torch.tensor([[0] * (w - len(p)) + [1] * len(p) for p in ps])
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                 repetition_penalty=1.0, eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
            rows = []
            for row in out[:, w:].tolist():
                cut = next((j for j, x in enumerate(row) if x in tok.eos_ids), len(row))
                rows.append(row[:cut])
            return rows
        run(prompts[:2])  # warm-up
        if impl == "transformers-loop":  # one prompt at a time, on a sample of the instructions
            # every 9th: one of each template (INSTRUCTIONS runs topic by topic through the 8 templates),
            # so short and long replies are both in it; main() scales its time to all n by tokens
            idx = sorted({k * (len(TEMPLATES) + 1) % n for k in range(loop_sample)})
            t = time.perf_counter()
            outs = {i: run([prompts[i]])[0] for i in idx}
            secs = time.perf_counter() - t
            outs = [outs.get(i) for i in range(n)]
        else:
            order = sorted(range(n), key=lambda i: -len(prompts[i]))
            outs = [None] * n
            t = time.perf_counter()
            for s in range(0, n, B):
                for i, r in zip(order[s:s + B], run([prompts[i] for i in order[s:s + B]])):
                    outs[i] = r
            secs = time.perf_counter() - t
    return {"seconds": secs, "outs": outs, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


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
            eng.forget_prefixes()  # the warm-up's (and the last repeat's) prefill is not reused: transformers redoes it
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
    result = {}
    for B in batch_sizes:
        # past the 8 questions, the repeats are numbered at their start: a repeated prompt would be prefilled once
        # by nanopost's prefix sharing and B times by transformers
        qs = [q if i < len(QUESTIONS) else f"({i // len(QUESTIONS) + 1}) {q}" for i, q in enumerate((QUESTIONS * B)[:B])]
        batch = [tok.render([{"role": "user", "content": q}], add_generation_prompt=True)[0] for q in qs]
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
    p.add_argument("--chat", type=int, default=0, metavar="N", help="the chat workload: N instructions (at most 64)")
    p.add_argument("--loop-sample", type=int, default=8, help="--chat: instructions timed in the one-at-a-time loop")
    p.add_argument("--http-clients", type=int, default=8, help="--chat: concurrent HTTP clients (0: skip the HTTP side)")
    p.add_argument("--loop-dtype", default=None, choices=["float32", "bfloat16"],
                   help="--chat: the one-at-a-time loop's dtype (default: each row's; one prompt at a time is memory-bound, "
                        "where bf16 is fastest on any CPU that has it)")
    p.add_argument("--sides", nargs="*", default=list(SIDES),
                   help="--chat: the sides to run beside nanopost in-process (none: nanopost alone; nanopost-http needs --http-clients > 0)")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    check_args(p, args, ("repeats", "new_tokens", "loop_sample"))
    if min(args.batch_sizes) < 1 or not 0 <= args.chat <= len(INSTRUCTIONS):
        p.error(f"--batch-sizes must be at least 1 and --chat in 0..{len(INSTRUCTIONS)} (the instructions there are)")
    unknown = set(args.sides) - set(SIDES)
    if unknown:
        p.error(f"--sides: unknown {', '.join(sorted(unknown))} (choose from {', '.join(SIDES)})")
    if args.worker and args.chat:
        print(json.dumps(chat_worker(args.worker[0], args.model, args.worker[1], args.chat, args.batch_sizes[0], args.new_tokens, args.loop_sample,
                                     args.http_clients)))
        return
    if args.worker:
        print(json.dumps(worker(*args.worker[:1], args.model, args.worker[1], args.batch_sizes, args.new_tokens, args.repeats)))
        return
    import torch
    print(f"model {args.model}; torch {torch.__version__}; {os.cpu_count()} CPUs; "
          f"threads {torch.get_num_threads()}; cuda {torch.cuda.is_available()}")
    if args.chat:
        print(f"chat workload: {args.chat} instructions, <= {args.new_tokens} new tokens, eos respected, "
              f"{args.batch_sizes[0]} rows at a time; one-at-a-time loop timed on {args.loop_sample} (one per template), scaled by tokens"
              + (f", in {args.loop_dtype}" if args.loop_dtype and "transformers-loop" in args.sides else ""))
        if args.http_clients and "nanopost-http" in args.sides:
            print(f"HTTP: nanopost.serve in its own process (--batch-size {args.batch_sizes[0]}), "
                  f"{args.http_clients} concurrent clients (build_data's HTTP teacher backend)")
        print("| dtype | nanopost in-process s (responses/min) | transformers batched s | one-at-a-time loop s | vs batched | "
              "vs loop | HTTP s (responses/min) | HTTP / in-process | identical replies (batched / loop / HTTP) | "
              "reply lengths min-median-max |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        impls = ("nanopost",) + tuple(x for x in SIDES if x in args.sides
                                      and (x != "nanopost-http" or args.http_clients))
        for dtype in args.dtypes:
            res = {impl: run_side(__file__, ["--worker", impl, args.loop_dtype if impl == "transformers-loop" and args.loop_dtype
                                             else dtype, "--model", args.model, "--new-tokens", args.new_tokens,
                                             "--chat", args.chat, "--loop-sample", args.loop_sample,
                                             "--http-clients", args.http_clients,
                                             "--batch-sizes", args.batch_sizes[0]], f"{impl} {dtype}")
                   for impl in impls}
            a, lens = res["nanopost"], sorted(map(len, res["nanopost"]["outs"]))
            cells = {k: "-" for k in ("b", "c", "vs_b", "vs_c", "same_b", "same_c")}
            if "transformers" in res:
                b = res["transformers"]
                cells.update(b=f"{b['seconds']:.1f}", vs_b=f"{b['seconds'] / a['seconds']:.2f}x",
                             same_b=f"{sum(x == y for x, y in zip(a['outs'], b['outs']))}/{args.chat}")
            if "transformers-loop" in res:  # its sample's time, scaled to all n replies by tokens (+1 each: the prefill)
                c = res["transformers-loop"]
                sample = [i for i, y in enumerate(c["outs"]) if y is not None]
                est = c["seconds"] * sum(len(x) + 1 for x in a["outs"]) / sum(len(c["outs"][i]) + 1 for i in sample)
                cells.update(c=f"{est:.1f}", vs_c=f"{est / a['seconds']:.2f}x",
                             same_c=f"{sum(a['outs'][i] == c['outs'][i] for i in sample)}/{len(sample)}")
            hf, same = " | ".join(cells[k] for k in ("b", "c", "vs_b", "vs_c")), f"{cells['same_b']} / {cells['same_c']}"
            http, same_h = "- | -", "-"
            if "nanopost-http" in res:
                import nanopost
                tok, h = nanopost.Tokenizer(args.model), res["nanopost-http"]
                same_h = f"{sum(tok.decode(x) == y for x, y in zip(a['outs'], h['texts']))}/{args.chat}"
                http = f"{h['seconds']:.1f} ({args.chat * 60 / h['seconds']:.1f}) | {a['seconds'] / h['seconds']:.2f}x"
            print(f"| {dtype} | {a['seconds']:.1f} ({args.chat * 60 / a['seconds']:.1f}) | {hf} | {http} | "
                  f"{same} / {same_h} | {lens[0]}-{lens[len(lens) // 2]}-{lens[-1]} |", flush=True)
        return
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
