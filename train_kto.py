"""KTO (Kahneman-Tversky Optimisation) of a Qwen2 checkpoint on desirable / undesirable completions,
with TRL's KTOTrainer semantics; also the second stage of the paper's SFT->KTO run.

    # CPU, the tiny offline demo (python -m nanopost.testing runs/tiny first)
    python train_kto.py --model runs/tiny --data tests/data/kto.jsonl --out runs/kto --max-steps 20 --lr 1e-4
    # the paper's two stages: SFT, then KTO from the SFT model (the reference is that model too)
    python train_sft.py --model Qwen/Qwen2-0.5B-Instruct --data sft.jsonl --out runs/sft
    python train_kto.py --model runs/sft --data kto.jsonl --out runs/sft-kto --device cuda
    # reference log-probs computed once, then trained without the reference model in memory
    python train_kto.py --model runs/sft --data kto.jsonl --out runs/sft-kto --precompute-ref
    # several processes (DDP; gloo on CPU, nccl on GPUs); --fsdp shards weights, grads and AdamW
    torchrun --nproc_per_node 2 train_kto.py --model runs/tiny --data kto.jsonl --out runs/kto-ddp --max-steps 10

Data (JSONL, TRL's formats): {"prompt", "completion", "label": true|false} or {"prompt", "chosen",
"rejected"} (one desirable + one undesirable example); a prompt is a string (one user turn) or a
list of messages. Per example, r = log pi(y|x) - log pi_ref(y|x) summed over the completion tokens
(the assistant content + <|im_end|>, exactly what SFT trains); the loss is nanopost.losses.kto_loss
averaged over each micro-batch, with z0 from the KL pairs (prompt i, completion i-1) formed inside
each micro-batch, averaged over the step's micro-batches and ranks (TRL averages over ranks only:
the same with --grad-accum 1; ours makes grad-accum k equal k processes). A KL pair is scored as a
continuation of its example's forward (its completion attends the prompt's kept keys/values:
data.collate_kl), so each prompt is computed once per model; with --grad-accum 1 the policy's
pairs ride on its training forward (z0 is known before the backward). The lm_head runs in row
chunks and never holds the full logits.
Micro-batches are fixed groups of --batch-size examples (a seeded shuffle); epochs reshuffle the
groups. The loop, checkpoints, exact --resume, Ctrl-C and metrics.jsonl are train_sft.py's
(nanopost/training.py)."""
import argparse
import gc
import hashlib
import json
import math
import os
import random
import sys

import torch
from safetensors.torch import load_file

import nanopost
from nanopost.checkpoint import CheckpointError, load_tokenizer, resolve, save_tensors, whole_file
from nanopost.data import DataError, collate_kl, collate_kto, kto_groups, load_kto
from nanopost.losses import kl_estimate, kto_loss, sequence_logps
from nanopost.training import (StateError, add_training_args, all_reduce_sum, check_resume, cut_note, data_hash,
                               frozen_for_autocast, grad_sync, load_policy, micro_batches_each, parse_training_args,
                               plan_steps, split_validation, start_meta, start_run, train)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=nanopost.HelpFormatter)
    add_training_args(p, "KTO JSONL files: prompt/completion/label or prompt/chosen/rejected", row="examples")
    # ---- KTO ----
    p.add_argument("--ref", default=None, help="reference model (default: --model, the initial policy)")
    p.add_argument("--beta", type=float, default=0.1, help="KTO beta: how far the policy may move from the reference")
    p.add_argument("--desirable-weight", type=float, default=1.0, help="lambda_D: weight of desirable examples")
    p.add_argument("--undesirable-weight", type=float, default=1.0, help="lambda_U: weight of undesirable examples")
    p.add_argument("--loss-type", choices=["kto", "apo_zero_unpaired"], default="kto",
                   help="kto: with the KL term z0; apo_zero_unpaired: APO-zero, no KL pass")
    p.add_argument("--precompute-ref", action="store_true",
                   help="compute the reference log-probs once (cached in OUT/ref_logps/, keyed by data, reference "
                        "weights and settings), then train without the reference model in memory")
    p.set_defaults(lr=1e-6)  # TRL's KTOConfig default
    args = parse_training_args(p, argv, {})
    if not all(0 < x < math.inf for x in (args.beta, args.desirable_weight, args.undesirable_weight)):  # (nan too)
        p.error("--beta, --desirable-weight and --undesirable-weight must be positive numbers")
    if args.loss_type == "kto" and args.batch_size < 2:  # its one KL pair would be the example itself
        p.error("--batch-size 1: KTO pairs each prompt with another example's completion of the same micro-batch "
                "for its KL estimate, so it needs --batch-size 2 or more (the loss type apo_zero_unpaired has no KL term)")
    return args


def balance_note(n_d, n_u, args) -> str | None:
    """KTO's paper: (lambda_D n_D) / (lambda_U n_U) should lie in [1, 4/3]; else suggest weights."""
    if n_d == 0 or n_u == 0:
        return f"warning: only {'undesirable' if n_d == 0 else 'desirable'} examples; KTO trains, but has nothing to contrast"
    ratio = lambda w_d, w_u: w_d * n_d / (w_u * n_u)  # noqa: E731
    balanced = lambda w_d, w_u: 1 <= ratio(w_d, w_u) <= 4 / 3  # noqa: E731
    if balanced(args.desirable_weight, args.undesirable_weight):
        return None
    d = args.undesirable_weight * n_u / n_d
    u = args.desirable_weight * n_d / n_u
    return (f"warning: (desirable-weight x {n_d} desirable) / (undesirable-weight x {n_u} undesirable) = "
            f"{ratio(args.desirable_weight, args.undesirable_weight):.2f}, outside [1, 4/3]: use "
            f"--desirable-weight in {inward(d, 4 / 3 * d, lambda x: balanced(x, args.undesirable_weight))} or "
            f"--undesirable-weight in {inward(3 / 4 * u, u, lambda x: balanced(args.desirable_weight, x))} (not both)")


def inward(lo, hi, ok) -> str:
    """[lo, hi] with 2 decimals (more where that would leave one value), each end moved inward until
    `ok` (the balance check itself) accepts it as printed: either end, given as the flag, is in range."""
    for digits in range(2, 40):
        f = 10.0 ** digits
        if not hi * f < 2 ** 52:  # (a step of 1 / f must still move a float)
            break
        a, b = max(1, math.floor(lo * f)), math.ceil(hi * f)  # (a / f: the float "0.21" parses to; never 0)
        a = next((x for x in range(a, a + 10) if ok(x / f)), None)  # (the ends are the range's own: a step
        b = next((x for x in range(b, max(0, b - 10), -1) if ok(x / f)), None)  # or two from them at most)
        if a is not None and b is not None and a < b:
            return f"[{a / f:.{digits}f}, {b / f:.{digits}f}]"
    return f"[{lo:.3g}, {hi:.3g}]"  # (weights past 1e300, or under 1e-38: three significant digits)


def fingerprint(model_dir: str) -> str:
    """A hash of the reference checkpoint's config and weight files (their bytes)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name == "config.json" or name.endswith(".safetensors"):
            h.update(name.encode())
            with open(os.path.join(model_dir, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


@nanopost.exits_when_disk_full("rerun the same command with --resume")
def main(argv=None):
    args = parse_args(argv)
    try:
        rank, world, device, log = start_run(args)

        # ---- data (all checks before anything is written) ----
        tok = load_tokenizer(resolve(args.model))
        examples, stats = load_kto(args.data, tok, args.max_len, args.skip_bad_lines, log)
        read = len(examples)  # (the cut counts are of these, before --val-fraction moves some to validation)
        val = load_kto([args.val], tok, args.max_len, args.skip_bad_lines, log)[0] if args.val else []
        split_validation([examples], args, val, key=lambda e: e.source, log=log)  # a prompt's completions together
        n_d = sum(e.label for e in examples)
        log(f"data: {len(examples)} examples ({n_d} desirable, {len(examples) - n_d} undesirable), {len(val)} validation; "
            f"of the {read} read, {stats['prompts_cut']} prompts and {stats['completions_cut']} completions cut to "
            f"{args.max_len} tokens; {stats['bad_lines']} bad lines skipped")
        for note in (cut_note(stats["completions_cut"], read, args.max_len, "completions"),
                     balance_note(n_d, len(examples) - n_d, args)):
            if note:
                log(note)
        for name, exs in (("--data", examples), ("the validation set", val)):
            if args.loss_type == "kto" and len(exs) == 1:  # its KL pair would be itself
                raise DataError(f"{name} holds one example: KTO pairs each prompt with another example's completion "
                                f"for its KL estimate, so it needs two or more (the loss type apo_zero_unpaired has no KL term)")
        groups, val_groups = kto_groups(len(examples), args.batch_size, args.seed), kto_groups(len(val), args.batch_size, args.seed)
        groups_per_step = args.grad_accum * world
        steps_per_epoch, total = plan_steps(len(groups), groups_per_step, args)

        # ---- the policy (from the latest checkpoint with --resume), optimizer; the reference ----
        run = load_policy(args, sequence_logps, world, device, log)
        ref_dir = resolve(args.ref or args.model)  # the initial policy, also when resuming
        ref_model, _ = nanopost.load(ref_dir, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32,
                                     device=device)
        ref_model.requires_grad_(False)
        if args.precision == "bf16-autocast":  # its Linears in bf16: the same results, ~40% less memory
            frozen_for_autocast(ref_model)
    except (DataError, CheckpointError, StateError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    use_kl = args.loss_type == "kto"
    mean_over_ranks = lambda x: all_reduce_sum(x.clone()) / world  # noqa: E731

    def batch(data, group):
        """-> the micro-batch's examples (collate_kto), and (kto) their KL pairs as the examples'
        continuation (collate_kl), on the device."""
        kl = collate_kl(group, data, tok.pad_id, args.max_len) if use_kl else None
        return ([t.to(device) for t in collate_kto(group, data, tok.pad_id, args.max_len)],
                {"kl": [t.to(device) for t in kl]} if use_kl else {})

    # The policy and the reference score the KL pairs the same way (one forward of the examples,
    # then the pairs' completions attending the kept prompts), so their rounding is the same: a
    # policy equal to its reference scores exactly 0 in bf16 too, as in TRL.
    @torch.no_grad()
    def live_reference(data, group):
        """The reference log-probs of a micro-batch's examples and (kto) of its KL pairs."""
        main, kl = batch(data, group)
        with run.autocast():
            out = sequence_logps(ref_model, *main, **kl)
        return out if use_kl else (out, None)

    # ---- what a resume must agree on, checked before the reference pass below is spent ----
    ref_print = fingerprint(ref_dir)
    meta = {"steps_per_epoch": steps_per_epoch, "batch_size": args.batch_size, **start_meta(args, world),
            "reference": os.path.abspath(ref_dir), "reference_weights": ref_print,
            "loss": {"beta": args.beta, "desirable_weight": args.desirable_weight,
                     "undesirable_weight": args.undesirable_weight, "loss_type": args.loss_type},
            "data": data_hash(s for e in examples for s in (e.prompt, e.completion, [int(e.label)])),
            "micro_batches": data_hash(groups)}
    if run.saved is not None:
        if "micro_batches" not in run.saved["meta"] and len(examples) % args.batch_size == 1:  # written before a
            run.saved["meta"]["micro_batches"] = "an example alone at the end"  # lone last example joined the group before
        try:
            check_resume(meta, run.saved["meta"], run.ckpt)  # train() checks the rest (the schedule)
        except StateError as e:
            sys.exit(f"error: {e}")

    # ---- --precompute-ref: the reference log-probs of every example and KL pair, once ----
    table = {}
    if args.precompute_ref:
        key = hashlib.sha256(json.dumps({
            "version": 4, "ref": ref_print, "max_len": args.max_len, "precision": args.precision,
            "device": device.type, "kl": use_kl,  # version: bump when live_reference's computation changes
            "data": [[[(e.prompt, e.completion) for e in (data[i] for i in g)] for g in gs]
                     for data, gs in ((examples, groups), (val, val_groups))]}).encode()).hexdigest()[:20]
        path = os.path.join(args.out, "ref_logps", f"{key}.safetensors")
        if os.path.exists(path):
            table = load_file(path, device=str(device))
            log(f"reference log-probs: {path}")
        else:
            try:
                for name, data, gs in (("train", examples, groups), ("val", val, val_groups)):
                    t = torch.zeros(2, len(data), device=device)  # ref, ref_kl
                    for gi, g in enumerate(gs):  # each rank its share, then summed: every rank has all
                        if gi % world == rank:
                            for k, logps in enumerate(live_reference(data, g)):
                                if logps is not None:
                                    t[k, g] = logps.to(t.dtype)
                    t = all_reduce_sum(t)
                    table[f"{name}.ref"] = t[0]
                    if use_kl:
                        table[f"{name}.ref_kl"] = t[1]
            except KeyboardInterrupt:
                log("interrupted during the reference pass: nothing of it was written; the same command starts it again")
                sys.exit(130)
            if rank == 0:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with whole_file(path) as tmp:
                    save_tensors({k: v.cpu() for k, v in table.items()}, tmp)
                log(f"reference log-probs computed once: {path}")
        del ref_model
        gc.collect()

    def reference(name, data, group):
        """-> (the examples' reference log-probs, the KL pairs' or None)."""
        if table:
            return table[f"{name}.ref"][group], table[f"{name}.ref_kl"][group] if use_kl else None
        return live_reference(data, group)

    @torch.no_grad()
    def kl_ratios(data, group, ref_kl):
        """The KL pairs' policy - reference log-probs of one micro-batch (no gradient)."""
        main, kl = batch(data, group)
        with run.autocast():
            return run.wrapped(*main, **kl)[1] - ref_kl

    def micro_batch(data, group, ref, ref_kl, z0=None, sync=True, accum=1, over_ranks=mean_over_ranks):
        """The policy pass -> (loss, rewards, policy logps, desirable, z0); with gradients on,
        backward runs here (scaled for accumulation: accum None, a stand-in that counts for nothing).
        z0 None (kto): from the KL pairs scored by this same forward (averaged with over_ranks),
        before the backward."""
        desirable = torch.tensor([data[i].label for i in group], device=device)
        main, kl = batch(data, group)
        with grad_sync(run.wrapped, sync), run.autocast():
            if z0 is None:
                logps, kl_logps = run.wrapped(*main, **kl)
                z0 = kl_estimate(kl_logps, ref_kl, over_ranks)
            else:
                logps = run.wrapped(*main)
            loss, rewards = kto_loss(logps, ref, desirable, z0, args.beta,
                                     args.desirable_weight, args.undesirable_weight, args.loss_type)
            if torch.is_grad_enabled():  # a mean of micro-batch means; DDP/FSDP2 average over ranks
                (loss / accum if accum else loss * 0).backward()
        return loss.detach(), rewards, logps.detach(), desirable, z0

    # ---- one optimizer step: this rank's micro-batches ----
    epoch_groups = {}

    def step_fn(step, epoch, k):
        if epoch not in epoch_groups:  # same groups every epoch, in an order shuffled by (seed, epoch)
            epoch_groups.clear()
            epoch_groups[epoch] = groups[:]
            random.Random(args.seed * 1000 + epoch).shuffle(epoch_groups[epoch])
        step_groups = epoch_groups[epoch][k * groups_per_step:(k + 1) * groups_per_step]  # an epoch's last may be fewer
        mine = step_groups[rank::world]
        n_real, each = len(mine), micro_batches_each(len(step_groups), world)
        mine += step_groups[:1] * (each - n_real)  # stand-ins (as many micro-batches on every process), weighted 0
        # z0 of the step: the KL pairs of all its micro-batches on all ranks (one estimate, so that
        # grad-accum k equals k processes; with grad-accum 1 it is TRL's: the ranks' mean)
        refs = [reference("train", examples, g) for g in mine]  # (examples', KL pairs') of each micro-batch
        z0 = None if use_kl else torch.zeros((), device=device)  # None: from the policy's forward (one micro-batch)
        smaller = len(step_groups) < groups_per_step  # an epoch's last step, with stand-ins
        if use_kl and (len(mine) > 1 or smaller):  # every micro-batch's pairs before the first backward
            ratios = [kl_ratios(examples, g, r[1]).mean() for g, r in zip(mine, refs)]  # (every process, as many)
            if smaller:  # the mean of the real micro-batches' only
                z0 = (all_reduce_sum(sum(ratios[:n_real], torch.zeros((), device=device))) / len(step_groups)).clamp(min=0)
            else:
                z0 = kl_estimate(torch.stack(ratios), 0, mean_over_ranks)
        sums = torch.zeros(8, dtype=torch.float64, device=device)  # loss, tokens, n_d, n_u, rewards d/u, logps d/u
        for j, (g, r) in enumerate(zip(mine, refs)):
            real = j < n_real
            loss, rewards, logps, d, z0 = micro_batch(examples, g, *r, z0, sync=j == len(mine) - 1,
                                                      accum=len(step_groups) / world if real else None)
            if real:
                u, n_tokens = ~d, sum(len(examples[i].prompt) + len(examples[i].completion) for i in g)
                sums += torch.stack([t.to(sums) for t in (loss, torch.tensor(n_tokens), d.sum(), u.sum(), rewards[d].sum(),
                                                          rewards[u].sum(), logps[d].sum(), logps[u].sum())])
        loss, tokens, n_d, n_u, r_d, r_u, l_d, l_u = all_reduce_sum(sums).tolist()
        per = lambda s, n: s / n if n else None  # noqa: E731  (null in metrics.jsonl: no such example this step)
        m = {"loss": loss / len(step_groups), "kl": z0.item() if use_kl else None, "rewards/chosen": per(r_d, n_d),
             "rewards/rejected": per(r_u, n_u), "logps/chosen": per(l_d, n_d), "logps/rejected": per(l_u, n_u),
             "n_desirable": int(n_d), "n_undesirable": int(n_u), "tokens": tokens}
        m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"] if n_d and n_u else None
        return m

    @torch.no_grad()
    def val_loss():
        if not val_groups:
            return None
        run.model.eval()
        # every rank the whole (small) validation set, z0 per micro-batch: no collective to pair up
        total = 0.0
        for g in val_groups:
            z0 = None if use_kl else 0.0
            total += micro_batch(val, g, *reference("val", val, g), z0, over_ranks=lambda x: x)[0].item() * len(g)
        run.model.train()
        return total / len(val)  # per example, as transformers' evaluation loop weights each batch by its size

    try:
        train(args, run, tok, total, steps_per_epoch, meta, step_fn, val_loss, rank, world, device, log)
    except StateError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
