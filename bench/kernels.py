"""Each fused op against its eager PyTorch reference, torch.compile of that reference and
Liger-Kernel (where it has the op), at Qwen2-0.5B's shapes on a CUDA GPU: median milliseconds of
forward + backward, twice: wall time (triton.testing.do_bench: Python, autograd and launches
included, which is what a small op costs when the GPU waits for the CPU) and GPU time (the same
call captured once in a CUDA graph and replayed: what it costs inside a training step, where the
CPU runs ahead of the GPU); and the peak memory a call allocates above its inputs. Ops that sync
with the CPU (the linear ones check their labels) cannot be captured: their GPU column is "-"
(they are GPU-bound anyway: their wall time is their GPU time).

    python bench/kernels.py                                  # every op, bf16, 8192 rows
    python bench/kernels.py --ops linear_ce --rows 4096 16384 --no-compile

Rows are tokens (8192 = 8 x 1024). linear_ce: the loss summed over the rows and its gradients for
hidden and lm_head; "eager" is the full-logits path transformers takes (bf16 logits upcast to
float32, F.cross_entropy). linear_logprob: per-token log-probs with a random upstream gradient
(the KTO policy pass), and without gradient (the reference model pass). On a CPU the numbers mean
nothing (Triton runs through its interpreter there): the script refuses."""
import argparse
import statistics

import torch
import torch.nn.functional as F

from nanopost.kernels import linear_ce, linear_logprob, rmsnorm, rope, swiglu

H, D, N_HEAD, N_KV, INTER, VOCAB = 896, 64, 14, 2, 4864, 151936


def liger(name, accum_dtype=torch.float32):
    """A Liger-Kernel autograd function, or None when it is not installed."""
    try:
        if name == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
        if name == "rope":
            from liger_kernel.ops.rope import LigerRopeFunction
            return lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin)
        if name == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            return LigerSiLUMulFunction.apply
        if name == "linear_ce":
            from liger_kernel.ops.fused_linear_cross_entropy import (
                LigerFusedLinearCrossEntropyFunction,
            )
            # accum_dtype float32: the weight gradient accumulated in float32, as ours is; None: Liger's default
            # (accumulated in the weight's dtype: faster, less exact)
            return lambda h, w, y: LigerFusedLinearCrossEntropyFunction.apply(
                h, w, y, None, None, -100, 0.0, 0.0, "sum", None, False, accum_dtype)[0]
    except ImportError:
        return None


def measure(step, reps: int, graph: bool) -> tuple[float, float, float | None]:
    """step() runs one call (forward + backward) -> (median wall ms, peak MB allocated above what was
    live, GPU ms replaying it as a CUDA graph, or None without graph)."""
    from triton.testing import do_bench, do_bench_cudagraph
    step()  # warm-up / compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = statistics.median(do_bench(step, return_mode="all", rep=reps))
    # never try a capture that syncs (the linear ops check their labels): a failed capture leaves
    # the CUDA generator refusing every later torch.randn
    return ms, peak, do_bench_cudagraph(step, rep=reps) if graph else None


def cases(op, rows, dtype, dev, compile_ok):
    """-> (name, step) pairs for one op; each step owns fresh gradient buffers per call."""
    g = torch.Generator(dev).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype).requires_grad_()

    def fwd_bwd(fn, inputs, upstream):
        def step():  # the gradients are made and dropped inside, so measure() sees them in the peak
            out = fn()
            torch.autograd.backward(out, upstream)
            for t in inputs:
                t.grad = None
        return step

    impls = []
    if op == "rms_norm":
        x, w = rand(rows, H), rand(H)
        gy = torch.randn(rows, H, device=dev, dtype=dtype)
        impls = [("eager", rmsnorm.rms_norm_reference), ("ours (triton)", rmsnorm.rms_norm_triton),
                 ("liger", liger("rms_norm"))]
        if compile_ok:
            impls.insert(1, ("torch.compile", torch.compile(rmsnorm.rms_norm_reference)))
        return [(n, fwd_bwd(lambda f=f: f(x, w, 1e-6), (x, w), gy)) for n, f in impls if f]
    if op == "rope":
        B, T = rows // 1024, 1024
        q0, k0 = rand(B, T, N_HEAD, D), rand(B, T, N_KV, D)  # the model's layout: (B, T, heads, D) storage
        angles = torch.arange(T, device=dev)[:, None].float() * 1e6 ** (-torch.arange(0, D, 2, device=dev) / D)
        emb = torch.cat([angles, angles], -1)[None].expand(B, T, D)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        gq, gk = torch.randn_like(q0).transpose(1, 2), torch.randn_like(k0).transpose(1, 2)
        impls = [("eager", rope.rope_reference), ("ours (triton)", rope.rope_triton), ("liger", liger("rope"))]
        if compile_ok:
            impls.insert(1, ("torch.compile", torch.compile(rope.rope_reference)))
        # (q0 + 0).transpose(1, 2): a non-leaf (B, H, T, D) view, as q_proj's output is in the model
        # (Liger rotates it in place, which a leaf forbids; the copy costs every side the same)
        return [(n, fwd_bwd(lambda f=f: f((q0 + 0).transpose(1, 2), (k0 + 0).transpose(1, 2), cos, sin),
                            (q0, k0), (gq, gk))) for n, f in impls if f]
    if op == "swiglu":
        a, b = rand(rows, INTER), rand(rows, INTER)
        gy = torch.randn(rows, INTER, device=dev, dtype=dtype)
        impls = [("eager", swiglu.swiglu_reference), ("ours (triton)", swiglu.swiglu_triton), ("liger", liger("swiglu"))]
        if compile_ok:
            impls.insert(1, ("torch.compile", torch.compile(swiglu.swiglu_reference)))
        return [(n, fwd_bwd(lambda f=f: f(a, b), (a, b), gy)) for n, f in impls if f]
    h, w = rand(rows, H), rand(VOCAB, H, scale=0.02)
    y = torch.randint(0, VOCAB, (rows,), device=dev, generator=g)
    if op == "linear_ce":
        def full_logits(h, w, y):
            return F.cross_entropy((h @ w.T).float(), y, reduction="sum")
        impls = [("eager (full logits)", full_logits),
                 ("ours, torch chunks", lambda h, w, y: linear_ce.linear_cross_entropy_reference(h, w, y)),
                 ("ours (triton)", lambda h, w, y: linear_ce.linear_cross_entropy_triton(h, w, y)),
                 ("liger (float32 weight-grad accumulation, as ours)", liger("linear_ce")),
                 ("liger (its default: accumulated in bf16)", liger("linear_ce", None))]
        if compile_ok:
            impls.insert(1, ("torch.compile", torch.compile(full_logits)))
        one = torch.ones((), device=dev)
        return [(n, fwd_bwd(lambda f=f: f(h, w, y), (h, w), one)) for n, f in impls if f]
    if op in ("linear_logprob", "linear_logprob_nograd"):
        def full_logits(h, w, y):
            return (h @ w.T).float().log_softmax(-1).gather(1, y[:, None]).squeeze(1)
        impls = [("eager (full logits)", full_logits),
                 ("ours, torch chunks", linear_logprob.linear_logprob_reference),
                 ("ours (triton)", linear_logprob.linear_logprob_triton)]
        if compile_ok:
            impls.insert(1, ("torch.compile", torch.compile(full_logits)))
        if op == "linear_logprob_nograd":
            def nograd(f):
                def step():
                    with torch.no_grad():
                        f(h, w, y)
                return step
            return [(n, nograd(f)) for n, f in impls]
        gy = torch.randn(rows, device=dev)
        return [(n, fwd_bwd(lambda f=f: f(h, w, y), (h, w), gy)) for n, f in impls]
    raise SystemExit(f"unknown op {op!r}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", default=["rms_norm", "rope", "swiglu", "linear_ce", "linear_logprob",
                                                 "linear_logprob_nograd"], help="which ops")
    p.add_argument("--rows", nargs="+", type=int, default=[8192], help="tokens (rope: multiples of 1024)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="activations and weights")
    p.add_argument("--reps", type=int, default=200, help="do_bench's rep: milliseconds of timed calls")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (it compiles for ~30 s per op)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py times GPU kernels: no CUDA device here (on CPU the kernels run in "
                         "Triton's interpreter, for tests only)")
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {args.dtype}")
    print("| op | rows | implementation | wall ms (fwd+bwd) | GPU ms (CUDA graph) | peak MB above inputs | "
          "wall speed vs eager | GPU speed vs eager | memory vs eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for op in args.ops:
        for rows in args.rows:
            base = None
            for name, step in cases(op, rows, dtype, "cuda", not args.no_compile):
                try:
                    ms, mb, gpu = measure(step, args.reps, graph=op in ("rms_norm", "rope", "swiglu"))
                except Exception as e:  # noqa: BLE001  one failing baseline (e.g. an old Liger) must not lose the rest
                    print(f"| {op} | {rows} | {name} | failed: {type(e).__name__}: {str(e)[:80]} | | | | | |", flush=True)
                    continue
                base = base or (ms, mb, gpu)
                gpu_ratio = f"{base[2] / gpu:.2f}x" if gpu and base[2] else "-"
                print(f"| {op} | {rows} | {name} | {ms:.3f} | {f'{gpu:.3f}' if gpu else '-'} | {mb:.0f} | "
                      f"{base[0] / ms:.2f}x | {gpu_ratio} | {mb / base[1] if base[1] else float('nan'):.2f}x |",
                      flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
