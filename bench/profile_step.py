"""Where a training step's GPU time goes: one nanopost SFT step (bf16 autocast over float32
weights, fused AdamW, clipping) under torch.profiler, its CUDA kernels grouped and summed.

    python -m nanopost.testing /tmp/r05 --shape 0.5b       # random weights at Qwen2-0.5B's shapes
    python bench/profile_step.py --model /tmp/r05 --batch 16 --seq-len 1024

Prints the step time (median of 3 after 2 warm-ups) and the kernels with the most GPU time, and
the same time by group (matmuls, attention, copies/casts, elementwise, our Triton kernels, optimizer)
-- the list to work down when chasing MFU.

    python bench/profile_step.py --model /tmp/r05 --decode 1      # one engine decode step instead
      (bf16 weights, CUDA graphs on, --decode rows): wall time per step, GPU kernel time per step
      and kernels per step -- where batch-1 decode's time goes against the weights' read time."""
import argparse
import collections
import statistics
import time

import torch

GROUPS = [("matmul (cuBLAS)", ("nvjet", "gemm", "cutlass", "sm90_xmma", "ampere_", "splitKreduce")),
          ("attention", ("flash", "sdpa", "cudnn", "fmha", "attention")),
          ("optimizer", ("adam", "multi_tensor", "foreach")),
          ("copies / casts", ("copy", "Memcpy", "cast")),
          ("float adds", ("CUDAFunctor_add",)),
          ("reductions", ("reduce",)),
          ("elementwise", ("elementwise",))]


def group_of(name: str) -> str:
    if name.startswith("_"):  # Triton kernels are named after their Python functions: ours all start with _
        return "ours (Triton)"
    return next((g for g, keys in GROUPS if any(k.lower() in name.lower() for k in keys)), "other")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--top", type=int, default=30, help="kernels listed")
    p.add_argument("--decode", type=int, default=0, metavar="ROWS", help="profile an engine decode step of ROWS rows instead")
    args = p.parse_args()
    if args.decode < 0 or args.batch < 1 or args.seq_len < 2 or args.top < 1:
        p.error("--decode must be >= 0, --batch and --top >= 1, --seq-len >= 2")
    if not torch.cuda.is_available():
        raise SystemExit("bench/profile_step.py profiles CUDA kernels: no CUDA device here")
    if args.decode:
        return profile_decode(args)
    import nanopost
    from nanopost.losses import sft_loss_sum
    from nanopost.training import clip_grad_norm, make_optimizer
    model, _ = nanopost.load(args.model, dtype=torch.float32, device="cuda")
    model.train()
    opt = make_optimizer(model, 1e-6, 0.0)
    B, T = args.batch, args.seq_len
    pos = torch.arange(T, device="cuda").expand(B, T)

    def step():
        ids = torch.randint(0, min(150000, model.config.vocab_size), (B, T), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = sft_loss_sum(model, ids, ids, pos) / (B * (T - 1))
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    print(f"{torch.cuda.get_device_name()}; B={B} T={T}; step {1000 * statistics.median(times):.1f} ms")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    report(prof, args.top)


def profile_decode(args):
    import nanopost
    from nanopost.engine import Engine, Sampling
    model, tok = nanopost.load(args.model, dtype=torch.bfloat16, device="cuda")
    engine = Engine(model, tok)
    V = model.config.vocab_size
    prompts = torch.randint(V // 4, V // 2, (args.decode, 64)).tolist()  # ordinary tokens of any vocabulary
    n = 64
    run = lambda: engine.generate_ids(prompts, Sampling(max_new_tokens=n, ignore_eos=True), batch_size=args.decode)
    run()
    torch.cuda.synchronize()
    t = time.perf_counter()
    run()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / n
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.time_range.elapsed_us() for e in kernels) / n
    print(f"{torch.cuda.get_device_name()}; decode, {args.decode} rows, bf16, CUDA graphs; {n} steps: "
          f"{1000 * wall:.2f} ms wall per step, {gpu / 1000:.2f} ms of GPU kernels per step, "
          f"{len(kernels) / n:.0f} kernels per step (prefill included, spread over the steps)")
    report(prof, args.top)


def report(prof, top):
    # kernel events only (device time of their own); aten ops' totals would count them twice
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = collections.Counter()
    calls = collections.Counter()
    for e in kernels:
        by_name[e.name] += e.time_range.elapsed_us()
        calls[e.name] += 1
    total = sum(by_name.values())
    groups = collections.Counter()
    for name, us in by_name.items():
        groups[group_of(name)] += us
    print(f"GPU kernel time {total / 1000:.1f} ms\n\n| group | ms | share |\n|---|---|---|")
    for g, us in groups.most_common():
        print(f"| {g} | {us / 1000:.2f} | {100 * us / total:.0f}% |")
    print("\n| kernel | calls | ms |\n|---|---|---|")
    for name, us in by_name.most_common(top):
        print(f"| {name[:100]} | {calls[name]} | {us / 1000:.2f} |")


if __name__ == "__main__":
    main()
