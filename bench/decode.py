"""Decode speed of the engine, and how close batch-1 decode comes to the memory bandwidth: every
decode step reads all the weights once (embedding rows aside), so bytes per step / step time is
the bandwidth a step achieves; gpt-fast's anchor is the fraction of the card's peak.

    python -m nanopost.testing /tmp/r05 --shape 0.5b          # random 0.5B weights (no hub needed)
    python bench/decode.py --model /tmp/r05 --device cuda --batch-sizes 1 16 --peak-gbps 4800

Every row decodes --new-tokens tokens (eos ignored) after a --prompt-len-token prompt; the time of
a run is from the call to the last token, the prompt's prefill included (one forward, small next
to the decode steps). Each side runs in its own process: nanopost-graphs (the engine's default on
CUDA: each decode step replayed from a CUDA graph), nanopost-eager (the same engine, graphs off),
transformers (`generate`, greedy, the same dtype). Median of --repeats runs after one warm-up.
A run's time includes, for nanopost-graphs, its warm-up forward and the graph's capture (each
generate call captures its own, and again when its batch shrinks at the tail), so the per-step
figure is a whole call's average, not the steady replay alone."""
import argparse
import json
import os
import statistics
import time

from sides import DEFAULT_MODEL, run_side  # bench/sides.py

IMPLS = ("nanopost-graphs", "nanopost-eager", "transformers")


def worker(impl, model_dir, device, dtype_name, batch, prompt_len, new_tokens, repeats):
    import torch
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    with open(os.path.join(model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    prompts = torch.randint(vocab // 4, vocab // 2, (batch, prompt_len)).tolist()  # no special tokens
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if impl.startswith("nanopost"):
        import nanopost
        from nanopost.engine import Engine, Sampling
        model, tok = nanopost.load(model_dir, dtype=dtype, device=device)
        engine = Engine(model, tok, cuda_graphs=impl == "nanopost-graphs")
        s = Sampling(max_new_tokens=new_tokens, ignore_eos=True)

        def run():
            return sum(map(len, engine.generate_ids(prompts, s, batch_size=batch)))
        params = model.parameters()
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        ids = torch.tensor(prompts, device=device)

        def run():
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, pad_token_id=0)
            return (out.shape[1] - prompt_len) * batch
        params = model.parameters()
    times = []
    for i in range(repeats + 1):
        sync()
        t = time.perf_counter()
        n = run()
        sync()
        if i:
            times.append(time.perf_counter() - t)
    if n != batch * new_tokens:
        raise SystemExit(f"{impl}: {n} tokens, expected {batch * new_tokens}")
    # bytes a decode step reads: every weight, except the embedding (one row per token) unless tied to lm_head
    cfg = model.config
    embed = cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    weight_bytes = sum(p.numel() for p in set(params)) * dtype.itemsize - embed * dtype.itemsize
    return {"s": statistics.median(times), "tokens": n, "weight_bytes": weight_bytes}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median) after one warm-up")
    p.add_argument("--impls", nargs="+", default=None, choices=IMPLS,
                   help="sides to run (default: all three on CUDA; nanopost-eager and transformers elsewhere)")
    p.add_argument("--peak-gbps", type=float, default=0.0,
                   help="the device's memory bandwidth in GB/s for the fraction column (H200: 4800, H100 SXM: 3350)")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "B"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if min(a.batch_sizes) < 1 or a.prompt_len < 1 or a.new_tokens < 2 or a.repeats < 1:
        p.error("batch sizes, --prompt-len and --repeats must be >= 1, --new-tokens >= 2")
    cuda = a.device.startswith("cuda")
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        p.error(f"--model {a.model}: not a checkpoint directory (python -m nanopost.testing DIR --shape 0.5b makes one)")
    if cuda:
        import torch
        if not torch.cuda.is_available():
            p.error(f"--device {a.device}: this torch sees no CUDA device")
    if a.impls is None:
        a.impls = [i for i in IMPLS if cuda or i != "nanopost-graphs"]
    elif "nanopost-graphs" in a.impls and not cuda:
        p.error(f"nanopost-graphs needs --device cuda (CUDA graphs), not {a.device}")
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.model, a.device, a.dtype, int(a.worker[1]), a.prompt_len,
                                a.new_tokens, a.repeats)))
        return
    print(f"{a.device}, {a.dtype}, prompt {a.prompt_len} tokens, {a.new_tokens} new tokens per row, {a.model}\n")
    print("| impl | batch | tokens/s | ms/step | weight GB/s | of peak | speed vs transformers |\n|---|---|---|---|---|---|---|")
    for B in a.batch_sizes:
        rows = {}
        for impl in a.impls:
            r = run_side(__file__, ["--model", a.model, "--device", a.device, "--dtype", a.dtype, "--prompt-len",
                                     a.prompt_len, "--new-tokens", a.new_tokens, "--repeats", a.repeats,
                                     "--worker", impl, B], impl)
            rows[impl] = r
        base = rows.get("transformers")
        for impl, r in rows.items():
            step = r["s"] / a.new_tokens
            gbps = r["weight_bytes"] / step / 1e9
            frac = f"{100 * gbps / a.peak_gbps:.0f}%" if a.peak_gbps else "-"
            ratio = f"{base['s'] / r['s']:.2f}x" if base else "-"
            print(f"| {impl} | {B} | {r['tokens'] / r['s']:.0f} | {1000 * step:.2f} | {gbps:.0f} | {frac} | {ratio} |",
                  flush=True)


if __name__ == "__main__":
    main()
