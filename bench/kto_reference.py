"""KTO's KL pairs scored as a continuation of each model's forward of the examples (data.collate_kl:
the pairs' completions attend the prompts' kept keys/values; the policy's ride on its training
forward), against a forward of their own on each model (the prompt computed again: TRL's way, and
nanopost's before), inside whole KTO steps that alternate between the two in one process, so that
a machine's drift (which moves separate processes' figures by ±10% on a 2-core CPU) falls on both
alike. Real checkpoint, B rows of T tokens, the last quarter of each row the completion.

    python bench/kto_reference.py --batch 4 --seq-len 512 --steps 2                   # float32, live reference
    python bench/kto_reference.py --batch 4 --seq-len 512 --steps 2 --precomputed     # the reference from a table
    python bench/kto_reference.py --precision bf16-autocast                           # B=8, T=128

Prints each step's time and the part of it the reference took, then the medians and the ratio;
the log-probs of both forms are checked equal (to float rounding) first."""
import argparse
import statistics
import time

import torch

import nanopost
from nanopost.data import KTOExample, collate_kl, collate_kto
from nanopost.losses import kl_estimate, kto_loss, sequence_logps
from nanopost.training import clip_grad_norm, frozen_for_autocast, make_optimizer
from sides import DEFAULT_MODEL, check_args  # bench/sides.py


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16-autocast"], help="precision policy")
    p.add_argument("--precomputed", action="store_true", help="reference log-probs from a table (--precompute-ref)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each form, after one warm-up of each")
    args = p.parse_args()
    check_args(p, args, ("steps", "batch", "seq_len"))
    B, T, P = args.batch, args.seq_len, 3 * args.seq_len // 4
    autocast = args.precision == "bf16-autocast"
    print(f"model {args.model}; torch {torch.__version__}; CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{args.precision}; B={B} T={T}{'; precomputed reference' if args.precomputed else ''}", flush=True)
    ref, model = nanopost.load(args.model)[0], nanopost.load(args.model)[0]
    if autocast:
        frozen_for_autocast(ref)  # as train_kto.py holds it
    model.train()
    opt = make_optimizer(model, 1e-6, 0.0)
    torch.manual_seed(0)
    ids = torch.randint(0, min(model.config.vocab_size, 150000), (B, T))
    examples = [KTOExample(r[:P].tolist(), r[P:].tolist(), True) for r in ids]
    main_batch, kl_batch = collate_kto(list(range(B)), examples, 0, T), collate_kl(list(range(B)), examples, 0, T)
    pairs = collate_kto(list(range(B)), examples, 0, T, kl=True)
    desirable = torch.arange(B) % 2 == 0

    def both(m, continued):  # (examples' log-probs, with gradient where enabled; KL pairs', without)
        if continued:
            return sequence_logps(m, *main_batch, kl=kl_batch)
        out = sequence_logps(m, *main_batch)
        with torch.no_grad():
            return out, sequence_logps(m, *pairs)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        one, two = torch.cat(both(ref, True)), torch.cat(both(ref, False))
        table = both(ref, True)
    print(f"log-probs, continued vs own forward: max |diff| {(one - two).abs().max().item():.2e} "
          f"(of values up to {two.abs().max().item():.0f})")

    def step(continued):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                ref_main, ref_kl = table if args.precomputed else both(ref, continued)
            t1 = time.perf_counter()
            policy, kl_policy = both(model, continued)
            loss = kto_loss(policy, ref_main, desirable, kl_estimate(kl_policy, ref_kl))[0]
        loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, t1 - t0

    times = {True: [], False: []}
    for k in range(args.steps + 1):
        for continued in (False, True):
            total, ref_s = step(continued)
            print(f"{'continued    ' if continued else 'own forward  '}  step {total:6.2f} s  reference {ref_s:5.2f} s"
                  + ("  (warm-up)" if k == 0 else ""), flush=True)
            if k:
                times[continued].append((total, ref_s))
    med = {s: [statistics.median(x[i] for x in v) for i in (0, 1)] for s, v in times.items()}
    print("| KL pairs | step s | reference s | tok/s |\n|---|---|---|---|")
    for continued, name in ((False, "a forward of their own"), (True, "continuing the examples' forward")):
        print(f"| {name} | {med[continued][0]:.2f} | {med[continued][1]:.2f} | {B * T / med[continued][0]:.1f} |")
    print(f"step {med[False][0] / med[True][0]:.2f}x faster"
          + ("" if args.precomputed else f", reference {med[False][1] / med[True][1]:.2f}x"))


if __name__ == "__main__":
    main()
