"""Full-parameter supervised fine-tuning of a Qwen2 checkpoint on chat JSONL.

    # CPU, the tiny offline demo (python -m nanopost.testing runs/tiny first)
    python train_sft.py --model runs/tiny --data tests/data/chat.jsonl --out runs/sft --max-steps 20 --lr 1e-3
    # one GPU, the real model
    python train_sft.py --model Qwen/Qwen2-0.5B-Instruct --data sft.jsonl --out runs/sft --device cuda
    # the paper's LLaMA-Factory run (full FT, cutoff 1024, bs 4 x accum 250, lr 5e-8, 3 epochs, bf16)
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
import json
import math
import os
import random
import sys
import time

import torch

import nanopost
from nanopost.checkpoint import CheckpointError
from nanopost.data import DataError, collate, load_sft, mix, pack
from nanopost.losses import sft_loss_sum
from nanopost.tokenizer import IGNORE
from nanopost.training import (PAPER_PRESET, Progress, StateError, StopAtStepEnd, WithLoss, all_reduce_sum,
                               check_out_dir, check_resume, distribute, flops_per_token, full_model_state, full_optimizer_state,
                               full_tensor, grad_sync, latest_checkpoint, load_optimizer_state, load_trainer_state,
                               lr_at, make_optimizer, peak_flops, prepare_out_dir, save_checkpoint, save_final,
                               set_rng_state, setup_distributed)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ---- model and data ----
    p.add_argument("--model", required=True, help="checkpoint directory or hub id to start from")
    p.add_argument("--data", nargs="+", required=True, help="training JSONL files (messages or prompt/completion)")
    p.add_argument("--data-weights", nargs="+", type=float, default=None,
                   help="per file: how many times its examples appear per epoch (1 = once, 0.5 = a seeded half)")
    p.add_argument("--val", default=None, help="validation JSONL (default: --val-fraction of the training data)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="held-out fraction when --val is not given")
    p.add_argument("--out", required=True, help="output directory: final model, checkpoints/, metrics.jsonl")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per row; longer conversations are truncated")
    p.add_argument("--no-packing", action="store_true", help="padded batches sorted by length instead of packed rows")
    p.add_argument("--train-on-prompt", action="store_true", help="train on every token, not only assistant turns")
    p.add_argument("--skip-bad-lines", action="store_true", help="drop malformed lines with a warning instead of stopping")
    # ---- optimisation ----
    p.add_argument("--preset", choices=["paper"], default=None, help="paper: the paper's LLaMA-Factory settings")
    p.add_argument("--batch-size", type=int, default=4, help="rows per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine", help="after warmup")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="warmup as a fraction of all steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (never on norms/biases)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--precision", choices=["bf16-autocast", "fp32", "bf16"], default=None,
                   help="bf16-autocast: float32 master weights (default on CUDA); fp32 (default on CPU); bf16: pure")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute each block in backward (less memory)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state (FSDP2 fully_shard per block) "
                        "instead of replicating them (DDP)")
    p.add_argument("--seed", type=int, default=0, help="seeds data order and everything random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    # ---- checkpoints and logs ----
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept in OUT/checkpoints")
    p.add_argument("--eval-every", type=int, default=0, help="validation loss every N steps (0 = at the end)")
    p.add_argument("--log-every", type=int, default=1, help="log line + metrics.jsonl every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a non-empty --out (its checkpoints and metrics are deleted); "
                        "without it a non-empty --out needs --resume")
    args, _ = p.parse_known_args(argv)
    if args.preset == "paper":  # the preset replaces the defaults, so a flag given in any spelling still wins
        p.set_defaults(**PAPER_PRESET)
    args = p.parse_args(argv)
    if args.data_weights is not None and len(args.data_weights) != len(args.data):
        p.error(f"--data-weights has {len(args.data_weights)} values for {len(args.data)} --data files")
    if args.precision is None:
        args.precision = "bf16-autocast" if args.device.startswith("cuda") else "fp32"
    return args


def make_rows(examples, args):
    """The rows (lists of example indices), the same every epoch: packed best-fit decreasing, or
    with --no-packing one example per row, sorted by length so that batches are of similar length."""
    if args.no_packing:
        return [[i] for i in sorted(range(len(examples)), key=lambda i: len(examples[i].ids))]
    return pack(examples, args.max_len)


def rows_for_epoch(rows, args, epoch, rows_per_step):
    """Deterministic: the rows of an epoch, shuffled by (seed, epoch), cut to whole optimizer steps."""
    rng = random.Random(args.seed * 1000 + epoch)
    if args.no_packing:
        groups = [rows[i:i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
        rng.shuffle(groups)  # batches of similar length, in random order
        rows = [r for g in groups for r in g]
    else:
        rows = rows[:]
        rng.shuffle(rows)
    return rows[:len(rows) // rows_per_step * rows_per_step]


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
        n += (labels[:, 1:] != IGNORE).sum()
    model.train()
    return (all_reduce_sum(nll) / all_reduce_sum(n)).item()


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # ---- data (all checks before anything is written) ----
    try:
        check_out_dir(args.out, args.resume, args.overwrite)
        tok = nanopost.Tokenizer(nanopost.checkpoint.resolve(args.model))
        per_file, stats = load_sft(args.data, tok, args.max_len, args.train_on_prompt, args.skip_bad_lines, log)
        val_examples = []
        if args.val:
            val_examples = [e for f in load_sft([args.val], tok, args.max_len, args.train_on_prompt,
                                                 args.skip_bad_lines, log)[0] for e in f]
    except (DataError, CheckpointError, StateError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    weights = args.data_weights or [1.0] * len(per_file)
    if not args.val and args.val_fraction > 0:
        rng = random.Random(args.seed)
        for examples in per_file:
            rng.shuffle(examples)
            k = int(len(examples) * args.val_fraction)
            val_examples += examples[:k]
            del examples[:k]
    log(f"data: {stats['examples']} examples ({stats['truncated']} truncated to {args.max_len} tokens, "
        f"{stats['bad_lines']} bad lines skipped), {len(val_examples)} validation")

    # ---- model (from the latest checkpoint with --resume), optimizer ----
    ckpt = latest_checkpoint(args.out) if args.resume else None
    if args.resume and ckpt is None:
        log(f"--resume: no checkpoint in {args.out}/checkpoints, starting from step 0")
    try:
        saved = load_trainer_state(ckpt) if ckpt else None  # read before anything is written; RNG restored later
    except StateError as e:
        sys.exit(f"error: {e}")
    fsdp = args.fsdp and world > 1
    if args.fsdp and not fsdp:
        log("--fsdp with one process: nothing to shard, running as usual")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model, _ = nanopost.load(ckpt or args.model, dtype=dtype, device=device)
    model.grad_checkpointing = args.grad_checkpoint
    model.train()
    loss_module = WithLoss(model, sft_loss_sum)  # named parameters, optimizer state and checkpoints go through this
    wrapped = distribute(loss_module, world, device, fsdp=fsdp)  # what the loop calls
    optimizer = make_optimizer(loss_module, args.lr, args.weight_decay)
    use_autocast = args.precision == "bf16-autocast"
    peak = peak_flops(device)  # MFU is logged on known GPUs
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast)  # noqa: E731

    rows_per_step = args.batch_size * args.grad_accum * world
    train_examples = mix(per_file, weights, args.seed)
    all_rows = make_rows(train_examples, args)
    steps_per_epoch = len(all_rows) // rows_per_step
    if steps_per_epoch == 0:
        sys.exit(f"error: fewer rows than one optimizer step needs ({rows_per_step} = batch-size x grad-accum x "
                 f"processes); lower --batch-size or --grad-accum")
    total = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * total)

    # ---- resume: the weights came from ckpt above; here the optimizer, RNG and step ----
    start, meta = 0, {"rows_per_step": rows_per_step, "steps_per_epoch": steps_per_epoch}
    if saved is not None:
        try:
            check_resume(meta, saved["meta"], ckpt)
        except StateError as e:
            sys.exit(f"error: {e}")
        load_optimizer_state(loss_module, optimizer, saved["optimizer"])
        set_rng_state(saved["rng"])
        start = saved["step"]
        log(f"resumed from {ckpt} at step {start}")

    def checkpoint(step, final=False):
        """Every rank gathers (a collective under FSDP2); rank 0 writes."""
        weights = full_model_state(loss_module, rank)
        opt_state = full_optimizer_state(loss_module, optimizer, rank)
        if rank == 0:
            path = save_checkpoint(args.out, step, model, tok, weights, opt_state, args, args.keep_last, meta)
            if final:
                save_final(model, tok, args.out, args, weights)
            return path

    if world > 1:
        torch.distributed.barrier()  # every rank has checked --out (above) before rank 0 writes into it
    if rank == 0:
        prepare_out_dir(args.out, args.resume, args.overwrite)  # the first write: every check is behind us
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    progress = Progress(args.out, total, start, rank)
    log(f"training {total} steps ({steps_per_epoch}/epoch), {rows_per_step} rows x {args.max_len} tokens per step, "
        f"{world} process(es){' (FSDP2)' if fsdp else ' (DDP)' if world > 1 else ''}, "
        f"{args.precision}, lr {args.lr}, warmup {warmup}")

    # ---- loop ----
    step, rows_epoch, rows = start, None, None
    with StopAtStepEnd() as stop:  # Ctrl-C: finish the step, save, exit (every rank at the same step)
        while step < total:
            epoch, k = divmod(step, steps_per_epoch)
            if epoch != rows_epoch:  # same rows every epoch, reshuffled by (seed, epoch)
                rows, rows_epoch = rows_for_epoch(all_rows, args, epoch, rows_per_step), epoch
            step_rows = rows[k * rows_per_step:(k + 1) * rows_per_step]
            mine = step_rows[rank::world]  # this process's share, in micro-batches
            micro = [collate(mine[i:i + args.batch_size], train_examples, tok.pad_id) for i in range(0, len(mine), args.batch_size)]
            n_trained = all_reduce_sum(torch.tensor(float(sum((m[1][:, 1:] != IGNORE).sum() for m in micro)), device=device))
            lr = lr_at(step, total, warmup, args.lr, args.lr_schedule, args.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t0, loss_sum = time.time(), 0.0
            for j, (ids, labels, pos) in enumerate(micro):
                ids, labels, pos = ids.to(device), labels.to(device), pos.to(device)
                with grad_sync(wrapped, sync=j == len(micro) - 1), autocast():
                    s = wrapped(ids, labels, pos)
                    # DDP and FSDP2 average gradients over ranks; x world turns that into the global sum / n_trained
                    (s * world / n_trained).backward()
                loss_sum += s.item()
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(loss_module.parameters(), args.max_grad_norm)) \
                if args.max_grad_norm > 0 else torch.zeros(())  # a DTensor under FSDP2
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = all_reduce_sum(torch.tensor(loss_sum, device=device)).item() / n_trained.item()
            tokens = all_reduce_sum(torch.tensor(float(sum(m[0].numel() for m in micro)), device=device)).item()
            tokens_per_s = tokens / (time.time() - t0)
            metrics = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tokens_per_s,
                       "trained_tokens": int(n_trained.item()), "epoch": epoch + (k + 1) / steps_per_epoch}
            if peak:
                metrics["mfu"] = tokens_per_s * flops_per_token(model.config, args.max_len) / (peak * world)
            if args.eval_every and step % args.eval_every == 0:
                metrics["val_loss"] = eval_loss(wrapped, val_examples, args, device, tok.pad_id, autocast)
            if step % args.log_every == 0 or step == total:
                progress.log(step, **metrics)
            saved_now = args.save_every and step % args.save_every == 0 and step < total
            if saved_now:
                checkpoint(step)
            if step < total and stop.requested(device):  # the last step goes on to the final save
                path = os.path.join(args.out, "checkpoints", f"step-{step:07d}") if saved_now else checkpoint(step)
                log(f"interrupted: saved {path}; continue with --resume", flush=True)
                sys.exit(130)
    val = eval_loss(wrapped, val_examples, args, device, tok.pad_id, autocast)
    checkpoint(step, final=True)
    if rank == 0:
        print(json.dumps({"out": args.out, "steps": step, "final_loss": metrics["loss"] if step > start else None,
                          "val_loss": val}))
    progress.close()
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
