"""KTO's live reference pass: examples and KL pairs in one forward that computes each prompt once
(data.collate_kto_pairs + losses.gathered_logps, what train_kto.py runs under --precision fp32; in
bf16 it runs the two, whose rounding is the policy's) against two forwards (one per batch), inside whole KTO steps that alternate between the two in one process, so
that a machine's drift (which moves separate processes' figures by ±10% on a 2-core CPU) falls on
both alike. Real checkpoint, B rows of T tokens, the last quarter of each row the completion.

    python bench/kto_reference.py --batch 4 --seq-len 512 --steps 2     # float32, as in BENCHMARKS.md
    python bench/kto_reference.py --precision bf16-autocast             # B=8, T=128: what the one pass would give in bf16

Prints each step's time split into the policy's KL pass, the reference pass(es) and the policy
forward + backward + AdamW, then the medians and the ratio; the reference log-probs of both forms
are checked equal (to float rounding) first."""
import argparse
import statistics
import time

import torch

import nanopost
from nanopost.data import KTOExample, collate_kto_pairs
from nanopost.losses import gathered_logps, kl_estimate, kto_loss, sequence_logps
from nanopost.training import frozen_for_autocast, make_optimizer
from sides import DEFAULT_MODEL  # bench/sides.py


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16-autocast"], help="precision policy")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each form, after one warm-up of each")
    args = p.parse_args()
    B, T, P = args.batch, args.seq_len, 3 * args.seq_len // 4
    autocast = args.precision == "bf16-autocast"
    print(f"model {args.model}; torch {torch.__version__}; CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{args.precision}; B={B} T={T}", flush=True)
    ref, model = nanopost.load(args.model)[0], nanopost.load(args.model)[0]
    if autocast:
        frozen_for_autocast(ref)  # as train_kto.py holds it
    model.train()
    opt = make_optimizer(model, 1e-6, 0.0)
    torch.manual_seed(0)
    ids = torch.randint(0, min(model.config.vocab_size, 150000), (B, T))
    labels = ids.clone()
    labels[:, :P] = -100  # the prompt
    kl_ids, kl_labels = ids.roll(1, 0).clone(), labels.roll(1, 0).clone()
    kl_ids[:, :P] = ids[:, :P]  # prompt i with completion i-1
    pairs = collate_kto_pairs(list(range(B)), [KTOExample(r[:P].tolist(), r[P:].tolist(), True) for r in ids], 0, T)
    desirable = torch.arange(B) % 2 == 0

    def reference(shared):
        if shared:
            return gathered_logps(ref, *pairs, n_rows=2 * B).split(B)
        return sequence_logps(ref, ids, labels), sequence_logps(ref, kl_ids, kl_labels)

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        one, two = torch.cat(reference(True)), torch.cat(reference(False))
    print(f"reference log-probs, one pass vs two: max |diff| {(one - two).abs().max().item():.2e} "
          f"(of values up to {two.abs().max().item():.0f})")

    def step(shared):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                kl_policy = sequence_logps(model, kl_ids, kl_labels)
                t1 = time.perf_counter()
                ref_main, ref_kl = reference(shared)
                t2 = time.perf_counter()
            loss = kto_loss(sequence_logps(model, ids, labels), ref_main, desirable, kl_estimate(kl_policy, ref_kl))[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t3 - t0, t2 - t1

    times = {True: [], False: []}
    for k in range(args.steps + 1):
        for shared in (False, True):
            total, ref_s = step(shared)
            print(f"{'one pass ' if shared else 'two passes'}  step {total:6.2f} s  reference {ref_s:5.2f} s"
                  + ("  (warm-up)" if k == 0 else ""), flush=True)
            if k:
                times[shared].append((total, ref_s))
    med = {s: [statistics.median(x[i] for x in v) for i in (0, 1)] for s, v in times.items()}
    print("| reference | step s | reference s | tok/s |\n|---|---|---|---|")
    for shared, name in ((False, "two passes"), (True, "one pass, prompts once")):
        print(f"| {name} | {med[shared][0]:.2f} | {med[shared][1]:.2f} | {B * T / med[shared][0]:.1f} |")
    print(f"step {med[False][0] / med[True][0]:.2f}x faster, reference pass {med[False][1] / med[True][1]:.2f}x")


if __name__ == "__main__":
    main()
