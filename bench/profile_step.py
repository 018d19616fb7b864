"""Where a training step's GPU time goes: one nanopost SFT step (bf16 autocast over float32
weights, fused AdamW, clipping) under torch.profiler, its CUDA kernels grouped and summed.

    python -m nanopost.testing /tmp/r05 --shape 0.5b       # random weights at Qwen2-0.5B's shapes
    python bench/profile_step.py --model /tmp/r05 --batch 16 --seq-len 1024

Prints the step time (median of 3 after 2 warm-ups) and the kernels with the most GPU time, and
the same time by group (matmuls, attention, copies/casts, elementwise, our Triton kernels, optimizer)
-- the list to work down when chasing MFU."""
import argparse
import collections
import statistics
import time

import torch

GROUPS = [("matmul (cuBLAS)", ("nvjet", "gemm", "cutlass", "sm90_xmma", "ampere_")),
          ("attention", ("flash", "sdpa", "cudnn", "fmha", "attention")),
          ("copies / casts", ("copy", "Memcpy", "cast")),
          ("ours (Triton)", ("_kernel",)),
          ("optimizer", ("adam", "multi_tensor", "foreach")),
          ("reductions", ("reduce",)),
          ("elementwise", ("elementwise",))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--top", type=int, default=30, help="kernels listed")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/profile_step.py profiles CUDA kernels: no CUDA device here")
    import nanopost
    from nanopost.losses import sft_loss_sum
    from nanopost.training import make_optimizer
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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
        group = next((g for g, keys in GROUPS if any(k.lower() in name.lower() for k in keys)), "other")
        groups[group] += us
    print(f"GPU kernel time {total / 1000:.1f} ms\n\n| group | ms | share |\n|---|---|---|")
    for g, us in groups.most_common():
        print(f"| {g} | {us / 1000:.2f} | {100 * us / total:.0f}% |")
    print("\n| kernel | calls | ms |\n|---|---|---|")
    for name, us in by_name.most_common(args.top):
        print(f"| {name[:100]} | {calls[name]} | {us / 1000:.2f} |")


if __name__ == "__main__":
    main()
