"""One SFT optimizer step, nanopost against transformers, side by side on the same machine:
tokens/s and peak RSS (or peak CUDA memory) for B=1 and T in --seq-lens on the real checkpoint.

    python bench/train_step.py                                   # CPU, float32 (see BENCHMARKS.md)
    python bench/train_step.py --precision bf16-autocast --seq-lens 512 1024
    python bench/train_step.py --device cuda --precision bf16-autocast

nanopost: packed-row forward to hidden states, chunked fused linear cross-entropy (no B*T*V
logits), fused AdamW (no decay on norms/biases). transformers: Qwen2ForCausalLM(labels=...) with
its own loss and torch.optim.AdamW (fused where supported, as ours). Every token is trained.
Each (implementation, T) runs in its own process; the table prints the median step time of
--steps timed steps after one warm-up step."""
import argparse
import json
import os

from sides import DEFAULT_MODEL, run_side, timed_train_steps  # bench/sides.py


def worker(impl, model_dir, T, precision, steps, device):
    import torch
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-autocast")
    if impl == "nanopost":
        import nanopost
        from nanopost.losses import sft_loss_sum
        from nanopost.training import make_optimizer
        model, _ = nanopost.load(model_dir, dtype=dtype, device=device)
        model.train()
        opt = make_optimizer(model, 1e-6, 0.0)

        def loss_fn(ids):
            return sft_loss_sum(model, ids, ids, torch.arange(T, device=device)[None]) / (T - 1)
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
            return loss_fn(torch.randint(0, 150000, (1, T), device=device))
    out = timed_train_steps(fresh_batch_loss, model, opt, steps, device)
    return {**out, "tokens_per_s": T / out["step_s"]}

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory")
    p.add_argument("--seq-lens", nargs="+", type=int, default=[512, 1024], help="tokens per step (B=1)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16-autocast", "bf16"], help="precision policy")
    p.add_argument("--steps", type=int, default=2, help="timed steps (median) after one warm-up step")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "T"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.model, int(args.worker[1]), args.precision, args.steps, args.device)))
        return
    import torch
    print(f"model {args.model}; torch {torch.__version__}; {os.cpu_count()} CPUs; device {args.device}; {args.precision}")
    mem = "peak CUDA GB" if args.device == "cuda" else "peak RSS GB"
    print(f"| T | nanopost tok/s | transformers tok/s | speed ratio | {mem} nanopost / transformers | memory ratio |")
    print("|---|---|---|---|---|---|")
    for T in args.seq_lens:
        res = {}
        for impl in ("nanopost", "transformers"):
            res[impl] = run_side(__file__, ["--worker", impl, T, "--model", args.model, "--precision", args.precision,
                                            "--steps", args.steps, "--device", args.device], f"{impl} T={T}")
        a, b = res["nanopost"], res["transformers"]
        print(f"| {T} | {a['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}x | "
              f"{a['peak_gb']:.2f} / {b['peak_gb']:.2f} | {a['peak_gb'] / b['peak_gb']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
