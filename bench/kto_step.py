"""One KTO optimizer step, nanopost against the same computation done the TRL way, side by side:
tokens/s and peak RSS (or peak CUDA memory) on the real checkpoint, B rows of T tokens (the
last quarter of each row is the completion).

    python bench/kto_step.py                                  # B=8, T=512, float32 (see BENCHMARKS.md)
    python bench/kto_step.py --batch 8 --seq-len 128 --precision bf16-autocast
    python bench/kto_step.py --device cuda --precision bf16-autocast

A step: the policy's and the reference's log-probs of the examples and of the KL pairs (prompt i
with completion i-1; the policy's without gradient), the policy's backward, the KTO loss,
clipping and AdamW.
- nanopost, as train_kto.py runs a step of one micro-batch: hidden states -> chunked lm_head
  log-probs (nanopost.losses.sequence_logps), never B*T*V logits; each model scores the KL pairs
  as a continuation of its examples' forward (data.collate_kl: the pairs' completions attend the
  prompts' kept keys/values, each prompt computed once), the policy's riding on its training
  forward; live reference model (under bf16-autocast its Linears held in bf16, as train_kto.py
  holds them; NANOPOST_BENCH_FP32_REF=1 keeps them float32, to measure what that saves).
- nanopost --precompute-ref: the reference log-probs come from a table (train_kto.py computes it
  once before training; that pass is timed separately and printed as "ref pass").
- TRL way: transformers' Qwen2ForCausalLM, full logits -> log_softmax -> gather, a live
  transformers reference model, the KL pairs a forward of their own (prompt computed again) on each
  model; torch AdamW (fused where supported, as ours).
Each side runs in its own process; the median of --steps timed steps after one warm-up step."""
import argparse
import json
import os
import time

from sides import DEFAULT_MODEL, check_args, run_side, timed_train_steps  # bench/sides.py


def worker(impl, model_dir, B, T, precision, steps, device):
    import torch
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-autocast")  # noqa: E731
    vocab = json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]
    ids = torch.randint(0, min(vocab, 150000), (B, T), device=device)
    labels = ids.clone()
    labels[:, :3 * T // 4] = -100  # the prompt
    kl_ids, kl_labels = ids.roll(1, 0).clone(), labels.roll(1, 0).clone()
    kl_ids[:, :3 * T // 4] = ids[:, :3 * T // 4]  # prompt i with completion i-1
    desirable = torch.arange(B, device=device) % 2 == 0
    table = None
    if impl.startswith("nanopost"):
        import nanopost
        from nanopost.data import KTOExample, collate_kl, collate_kto
        from nanopost.losses import kl_estimate, kto_loss, sequence_logps
        from nanopost.training import clip_grad_norm, frozen_for_autocast, make_optimizer
        P, group = 3 * T // 4, list(range(B))
        examples = [KTOExample(r[:P].tolist(), r[P:].tolist(), True) for r in ids.cpu()]
        main = [t.to(device) for t in collate_kto(group, examples, 0, T)]  # = ids, labels (+ positions)
        kl = [t.to(device) for t in collate_kl(group, examples, 0, T)]
        both = lambda m: sequence_logps(m, *main, kl=kl)  # noqa: E731  (examples', KL pairs')
        ref = nanopost.load(model_dir, dtype=dtype, device=device)[0]
        if precision == "bf16-autocast" and not os.environ.get("NANOPOST_BENCH_FP32_REF"):
            frozen_for_autocast(ref)  # as train_kto.py does: its Linears in bf16, the same results
        if impl == "nanopost-precomputed":  # the one-off pass train_kto.py makes before training
            t = time.perf_counter()
            with torch.no_grad(), autocast():
                table = both(ref)
            ref_pass = time.perf_counter() - t
            ref = None
        model, _ = nanopost.load(model_dir, dtype=dtype, device=device)
        opt = make_optimizer(model, 1e-6, 0.0)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        try:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, fused=True)
        except (RuntimeError, TypeError):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
        from nanopost.losses import kl_estimate, kto_loss

        def logps(m, i, y):  # TRL's way before its fused head: full logits, log_softmax, gather
            logits = m(input_ids=i, use_cache=False).logits[:, :-1].float()
            y = y[:, 1:]
            token = logits.log_softmax(-1).gather(2, y.clamp(min=0)[..., None]).squeeze(2)
            return (token * (y != -100)).sum(-1)

        def both(m):  # the examples' log-probs (with gradient where enabled), then the KL pairs' (without)
            out = logps(m, ids, labels)
            with torch.no_grad():
                return out, logps(m, kl_ids, kl_labels)
    model.train()

    def loss_fn():
        with autocast():
            with torch.no_grad():
                ref_main, ref_kl = table if table else both(ref)
            policy, kl_policy = both(model)
            return kto_loss(policy, ref_main, desirable, kl_estimate(kl_policy, ref_kl))[0]
    out = timed_train_steps(loss_fn, model, opt, steps, device, clip_grad_norm if impl.startswith("nanopost") else None)
    out["tokens_per_s"] = B * T / out["step_s"]
    if table:
        out["ref_pass_s"] = ref_pass
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16-autocast", "bf16"], help="precision policy")
    p.add_argument("--steps", type=int, default=2, help="timed steps (median) after one warm-up step")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--worker", metavar="IMPL", help=argparse.SUPPRESS)
    args = p.parse_args()
    check_args(p, args, ("steps", "batch", "seq_len"))
    common = ["--model", args.model, "--batch", args.batch, "--seq-len", args.seq_len, "--precision", args.precision,
              "--steps", args.steps, "--device", args.device]
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.batch, args.seq_len, args.precision, args.steps, args.device)))
        return
    import torch
    print(f"model {args.model}; torch {torch.__version__}; CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{os.cpu_count()} CPUs; device {args.device}; {args.precision}; B={args.batch} T={args.seq_len}", flush=True)
    res = {impl: run_side(__file__, ["--worker", impl, *common], impl)
           for impl in ("trl-way", "nanopost", "nanopost-precomputed")}
    base = res["trl-way"]
    mem = "peak CUDA GB" if args.device == "cuda" else "peak RSS GB"
    print(f"| side | tok/s | speed vs TRL way | {mem} | memory vs TRL way |")
    print("|---|---|---|---|---|")
    for impl, r in res.items():
        print(f"| {impl} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x | "
              f"{r['peak_gb']:.2f} | {r['peak_gb'] / base['peak_gb']:.2f}x |")
    print(f"ref pass (one-off, nanopost-precomputed): {res['nanopost-precomputed']['ref_pass_s']:.1f} s; "
          f"losses {[round(r['loss'], 5) for r in res.values()]}")


if __name__ == "__main__":
    main()
