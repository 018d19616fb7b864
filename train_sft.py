"""Full-parameter supervised fine-tuning of a Qwen2 checkpoint on chat JSONL.

    # CPU, the tiny offline demo (python -m nanopost.testing runs/tiny first)
    python train_sft.py --model runs/tiny --data tests/data/chat.jsonl --out runs/sft --max-len 64 --batch-size 8 \\
        --lr 3e-3 --max-steps 20
    # one GPU, the real model
    python train_sft.py --model Qwen/Qwen2-0.5B-Instruct --data sft.jsonl --out runs/sft --device cuda
    # the paper's LLaMA-Factory settings (full FT, cutoff 1024, bs 4 x accum 250, lr 5e-8, 3 epochs, bf16), rows
    # packed as every run (LLaMA-Factory's SFT is not: add --no-packing for its examples per step)
    python train_sft.py --model Qwen/Qwen2-0.5B-Instruct --data sft.jsonl --out runs/sft --preset paper
    # several processes (DDP; gloo on CPU, nccl on GPUs); --fsdp shards weights, grads and AdamW
    torchrun --nproc_per_node 2 train_sft.py --model runs/tiny --data a.jsonl --out runs/ddp --max-steps 10
    torchrun --nproc_per_node 8 train_sft.py --model Qwen/Qwen2-0.5B-Instruct --data sft.jsonl --out runs/fsdp --fsdp

The loss is the next-token NLL of the trained tokens (assistant content + its <|im_end|>),
summed over the whole accumulated batch (all micro-batches, all ranks) and divided by its number
of trained tokens, so k accumulated micro-batches equal one batch k times larger. Rows are packed
(best-fit decreasing) with attention that never crosses a conversation; the lm_head + cross-entropy
run in row chunks and never hold the full logits. Resumable: --resume continues from the latest
checkpoint in --out exactly (same data order, optimizer and RNG state); Ctrl-C finishes the step,
saves one and exits. Checkpoints are safetensors + JSON (nothing executable) with whole tensors
keyed by name, so a run may resume with a different number of processes or with/without --fsdp
while batch-size x grad-accum x processes stays the same. A non-empty --out needs --resume or
--overwrite."""
import argparse
import random
import sys

import torch

import nanopost
from nanopost.checkpoint import CheckpointError
from nanopost.data import DataError, collate, load_sft, mix, pack
from nanopost.losses import sft_loss_sum, target_counts
from nanopost.tokenizer import IGNORE
from nanopost.training import (PAPER_PRESET, StateError, add_training_args, all_reduce_sum, cut_note, data_hash,
                               grad_sync, load_policy, micro_batches_each, parse_training_args, plan_steps,
                               split_validation, start_meta, start_run, train)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=nanopost.HelpFormatter)
    add_training_args(p, "training JSONL files (messages or prompt/completion)")
    # ---- SFT only ----
    p.add_argument("--preset", choices=["paper"], default=None,
                   help="paper: the paper's LLaMA-Factory settings, rows packed (add --no-packing for its examples per step)")
    p.add_argument("--data-weights", nargs="+", type=float, default=None,
                   help="per file: how many times its examples appear per epoch (1 = once, 0.5 = a seeded half)")
    p.add_argument("--no-packing", action="store_true", help="padded batches sorted by length instead of packed rows")
    p.add_argument("--train-on-prompt", action="store_true", help="train on every token, not only assistant turns")
    args = parse_training_args(p, argv, {"paper": PAPER_PRESET})
    if args.data_weights is not None and len(args.data_weights) != len(args.data):
        p.error(f"--data-weights has {len(args.data_weights)} values for {len(args.data)} --data files")
    return args


def make_rows(examples, args):
    """The rows (lists of example indices), the same every epoch: packed best-fit decreasing, or
    with --no-packing one example per row, sorted by length so that batches are of similar length."""
    if args.no_packing:
        return [[i] for i in sorted(range(len(examples)), key=lambda i: len(examples[i].ids))]
    return pack(examples, args.max_len)


def rows_for_epoch(rows, args, epoch):
    """Deterministic: the rows of an epoch, shuffled by (seed, epoch)."""
    rng = random.Random(args.seed * 1000 + epoch)
    if args.no_packing:
        groups = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
        rng.shuffle(groups)  # batches of similar length, in random order
        rows = [r for g in groups for r in g]
    else:
        rows = rows[:]
        rng.shuffle(rows)
    return rows


@torch.no_grad()
def eval_loss(model, val_examples, args, device, pad_id, autocast):
    """Mean NLL per trained token of the validation rows (model: the wrapped WithLoss)."""
    if not val_examples:
        return None
    model.eval()
    rows = pack(val_examples, args.max_len)
    nll, n = torch.zeros((), device=device), torch.zeros((), device=device)
    for i in range(0, len(rows), args.batch_size):
        ids, labels, pos = (t.to(device) for t in collate(rows[i:i + args.batch_size], val_examples, pad_id))
        with autocast():
            nll += model(ids, labels, pos)
        n += target_counts(labels).sum()
    model.train()
    return (all_reduce_sum(nll) / all_reduce_sum(n)).item()


@nanopost.exits_when_disk_full("rerun the same command with --resume")
def main(argv=None):
    args = parse_args(argv)
    try:
        rank, world, device, log = start_run(args)

        # ---- data (all checks before anything is written) ----
        tok = nanopost.checkpoint.load_tokenizer(nanopost.checkpoint.resolve(args.model))
        per_file, stats = load_sft(args.data, tok, args.max_len, args.train_on_prompt, args.skip_bad_lines, log)
        val_examples = []
        if args.val:
            val_examples = [e for f in load_sft([args.val], tok, args.max_len, args.train_on_prompt,
                                                 args.skip_bad_lines, log)[0] for e in f]
        split_validation(per_file, args, val_examples, log=log)
        log(f"data: {sum(map(len, per_file))} examples, {len(val_examples)} validation; of the {stats['examples']} "
            f"read, {stats['truncated']} truncated to {args.max_len} tokens ({stats['cut_trained']} of them losing "
            f"trained tokens); {stats['bad_lines']} bad lines skipped")
        if note := cut_note(stats["cut_trained"], stats["examples"], args.max_len):
            log(note)
        train_examples = mix(per_file, args.data_weights or [1.0] * len(per_file), args.seed)
        if args.data_weights:
            log(f"--data-weights {' '.join(map(str, args.data_weights))}: {len(train_examples)} examples an epoch")
        all_rows = make_rows(train_examples, args)
        rows_per_step = args.batch_size * args.grad_accum * world
        steps_per_epoch, total = plan_steps(len(all_rows), rows_per_step, args)

        # ---- model (from the latest checkpoint with --resume), optimizer ----
        run = load_policy(args, sft_loss_sum, world, device, log)
    except (DataError, CheckpointError, StateError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

    # ---- one optimizer step: this rank's micro-batches, forward and backward ----
    epoch_rows = {}

    def step_fn(step, epoch, k):
        if epoch not in epoch_rows:  # same rows every epoch, reshuffled by (seed, epoch)
            epoch_rows.clear()
            epoch_rows[epoch] = rows_for_epoch(all_rows, args, epoch)
        step_rows = epoch_rows[epoch][k * rows_per_step:(k + 1) * rows_per_step]  # an epoch's last may be fewer
        mine = step_rows[rank::world]  # this process's share, in micro-batches
        micro = [collate(mine[i:i + args.batch_size], train_examples, tok.pad_id) for i in range(0, len(mine), args.batch_size)]
        n_trained = all_reduce_sum(torch.tensor(float(sum(target_counts(m[1]).sum() for m in micro)), device=device))
        n_tokens = all_reduce_sum(torch.tensor(float(sum(m[0].numel() for m in micro)), device=device)).item()
        while len(micro) < micro_batches_each(len(step_rows), world, args.batch_size):  # a stand-in: no label, no loss
            ids, labels, pos = collate(step_rows[:1], train_examples, tok.pad_id)
            micro.append((ids, torch.full_like(labels, IGNORE), pos))
        loss_sum = 0.0
        for j, (ids, labels, pos) in enumerate(micro):
            ids, labels, pos = ids.to(device), labels.to(device), pos.to(device)
            with grad_sync(run.wrapped, sync=j == len(micro) - 1), run.autocast():
                s = run.wrapped(ids, labels, pos)
                # DDP and FSDP2 average gradients over ranks; x world turns that into the global sum / n_trained
                (s * world / n_trained).backward()
            loss_sum += s.item()
        return {"loss": all_reduce_sum(torch.tensor(loss_sum, device=device)).item() / n_trained.item(),
                "trained_tokens": int(n_trained.item()),
                "tokens": n_tokens}

    try:
        meta = {"steps_per_epoch": steps_per_epoch, "data": data_hash(s for e in train_examples for s in (e.ids, e.labels)),
                **start_meta(args, world),
                **({"batch_size": args.batch_size} if args.no_packing else {})}  # it groups the rows (rows_for_epoch)
        train(args, run, tok, total, steps_per_epoch, meta,
              step_fn, lambda: eval_loss(run.wrapped, val_examples, args, device, tok.pad_id, run.autocast),
              rank, world, device, log)
    except StateError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
