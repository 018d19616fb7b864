"""One SFT optimizer step, nanopost against transformers, side by side on the same machine:
tokens/s and peak RSS (or peak CUDA memory) for --batch rows of T in --seq-lens tokens.

    python bench/train_step.py                                   # CPU, float32 (see BENCHMARKS.md)
    python bench/train_step.py --precision bf16-autocast --seq-lens 512 1024
    python -m nanopost.testing /tmp/r05 --shape 0.5b             # a GPU with no hub: random 0.5B weights
    python bench/train_step.py --device cuda --precision bf16-autocast --model /tmp/r05 --batch 16 \
        --seq-lens 1024 --impls nanopost nanopost-torch transformers

nanopost-torch is nanopost with NANOPOST_KERNELS=torch (the PyTorch references instead of the
Triton kernels). On CUDA the table adds MFU: (6 N + 6 L C T) flops per token (N = the matmul
parameters, lm_head included; the second term is causal attention's QK and PV) over --peak-tflops.

nanopost: packed-row forward to hidden states, chunked fused linear cross-entropy (no B*T*V
logits), fused AdamW (no decay on norms/biases). transformers: Qwen2ForCausalLM(labels=...) with
its own loss and torch.optim.AdamW (fused where supported, as ours). Every token is trained.
Each (implementation, T) runs in its own process; the table prints the median step time of
--steps timed steps after one warm-up step."""
import argparse
import json
import os

from sides import DEFAULT_MODEL, check_args, run_side, timed_train_steps  # bench/sides.py


def worker(impl, model_dir, T, precision, steps, device, batch):
    if impl == "nanopost-torch":
        os.environ["NANOPOST_KERNELS"] = "torch"
    import torch
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-autocast")
    if impl.startswith("nanopost"):
        import nanopost
        from nanopost.losses import sft_loss_sum
        from nanopost.training import clip_grad_norm, make_optimizer
        model, _ = nanopost.load(model_dir, dtype=dtype, device=device)
        model.train()
        opt = make_optimizer(model, 1e-6, 0.0)

        def loss_fn(ids):
            return sft_loss_sum(model, ids, ids, torch.arange(T, device=device).expand(batch, T)) / (batch * (T - 1))
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        model.train()
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, fused=True)
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)

        def loss_fn(ids):
            return model(input_ids=ids, labels=ids, use_cache=False).loss
    def fresh_batch_loss():
        with autocast:
            return loss_fn(torch.randint(0, min(150000, model.config.vocab_size), (batch, T), device=device))
    out = timed_train_steps(fresh_batch_loss, model, opt, steps, device, clip_grad_norm if impl.startswith("nanopost") else None)
    cfg = model.config
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        n_matmul += cfg.vocab_size * cfg.hidden_size  # the tied lm_head is a matmul all the same
    flops_per_token = 6 * n_matmul + 6 * cfg.num_hidden_layers * cfg.hidden_size * T
    return {**out, "tokens_per_s": batch * T / out["step_s"], "flops_per_token": flops_per_token}

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory")
    p.add_argument("--seq-lens", nargs="+", type=int, default=[512, 1024], help="tokens per row")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16-autocast", "bf16"], help="precision policy")
    p.add_argument("--steps", type=int, default=2, help="timed steps (median) after one warm-up step")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=1, help="rows per step")
    p.add_argument("--impls", nargs="+", default=["nanopost", "transformers"],
                   choices=["nanopost", "nanopost-torch", "transformers"], help="sides to run; ratios are against the last")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    check_args(p, args)
    if min(args.seq_lens) < 2:
        p.error("--seq-lens must be at least 2 (a token and the one it predicts)")
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.model, int(args.worker[1]), args.precision, args.steps, args.device,
                                args.batch)))
        return
    import torch
    print(f"model {args.model}; torch {torch.__version__}; {os.cpu_count()} CPUs; device {args.device}; {args.precision}; "
          f"batch {args.batch}" + (f"; {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    mem = "peak CUDA GB" if args.device == "cuda" else "peak RSS GB"
    ref = args.impls[-1]
    cuda = args.device == "cuda"
    print(f"| T | side | tokens/s | speed vs {ref} | {mem} | memory vs {ref} |" + (" MFU |" if cuda else ""))
    print("|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for T in args.seq_lens:
        res = {impl: run_side(__file__, ["--worker", impl, T, "--model", args.model, "--precision", args.precision,
                                         "--steps", args.steps, "--device", args.device, "--batch", args.batch],
                              f"{impl} T={T}") for impl in args.impls}
        for impl, r in res.items():
            mfu = r["tokens_per_s"] * r["flops_per_token"] / (args.peak_tflops * 1e12)
            print(f"| {T} | {impl} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / res[ref]['tokens_per_s']:.2f}x | "
                  f"{r['peak_gb']:.2f} | {r['peak_gb'] / res[ref]['peak_gb']:.2f}x |" +
                  (f" {100 * mfu:.1f}% |" if cuda else ""), flush=True)


if __name__ == "__main__":
    main()
