"""What the training scripts share: torchrun setup and DDP / FSDP2 wrapping, AdamW with the usual
no-decay groups, warmup + cosine schedule, checkpoint + exact resume, the progress line and
metrics.jsonl."""
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor, distribute_tensor

import nanopost
from nanopost.checkpoint import (hold_folder, load, recover, remove_model_files, remove_unfinished, same_folder, save, save_tensors,
                                 unwritable, whole_file, within, writing)

# (packed rows: LLaMA-Factory packs only for pre-training, so its SFT batch of 4 x 250 counts examples;
# --no-packing gives that exactly, at the cost of the padding)
PAPER_PRESET = dict(max_len=1024, batch_size=4, grad_accum=250, lr=5e-8, epochs=3, warmup_steps=10,
                    max_grad_norm=1.0, lr_schedule="cosine", precision="bf16-autocast")


# ---- distributed ----

def setup_distributed(device_arg: str):
    """-> (rank, world, device). Under torchrun: one process per device, gloo on CPU, nccl on CUDA."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_arg)
    backend = "nccl" if device_arg.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


class WithLoss(torch.nn.Module):
    """The model and its loss in one forward: the unit that DDP or FSDP2 wraps. Under FSDP2 the
    root's parameters (embeddings, final norm, lm_head) are gathered only during the root's
    forward, and the fused loss reads lm_head.weight directly, so the loss has to run in there."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *args, **kwargs):
        return self.loss_fn(self.model, *args, **kwargs)


def distribute(module: WithLoss, world: int, device, fsdp: bool = False):
    """-> what to call for the loss: the module itself (one process), DDP, or FSDP2 (every decoder
    block sharded on its own, then the root). FSDP2 replaces the parameters by their shards, so
    make the optimizer after this."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for block in module.model.model.layers:
            fully_shard(block)
        fully_shard(module)
        return module
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return module


@contextlib.contextmanager
def grad_sync(wrapped, sync: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) unless sync (the last micro-batch)."""
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and not sync:
        with wrapped.no_sync():
            yield
    elif hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def full_tensor(t):
    """A DTensor shard gathered into the whole tensor (a collective: every rank calls it)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full, param):
    """A whole tensor cut like param (its shard under FSDP2), on param's device."""
    if isinstance(param, DTensor) and full.dim() > 0:
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    return full.to(param.device)


def full_model_state(module: WithLoss, rank: int) -> dict | None:
    """The model's weights as whole CPU tensors, named as in the checkpoint (no WithLoss prefix);
    on rank 0, None elsewhere. Every rank must call it (under FSDP2 it gathers the shards)."""
    out = {}
    for k, v in module.state_dict().items():
        v = full_tensor(v.detach())
        if rank == 0:
            out[k.removeprefix("model.")] = v.cpu()
    return out if rank == 0 else None


def full_optimizer_state(module: WithLoss, optimizer, rank: int) -> dict | None:
    """AdamW state keyed by parameter name with whole tensors, so a checkpoint does not depend
    on the number of processes or on DDP vs FSDP2; rank 0 gets it. Every rank must call it."""
    out = {}
    for name, p in module.named_parameters():
        state = {k: full_tensor(v) for k, v in optimizer.state.get(p, {}).items()}  # every rank: the gather
        if rank == 0:
            out[name] = {k: v.cpu() for k, v in state.items()}
    return {"state": out, "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]} \
        if rank == 0 else None


def load_optimizer_state(module: WithLoss, optimizer, saved: dict) -> None:
    """The inverse of full_optimizer_state, on every rank (each keeps its own shard)."""
    params = dict(module.named_parameters())
    if set(saved["state"]) != set(params):
        raise ValueError(f"optimizer state names differ from the model's: {sorted(set(saved['state']) ^ set(params))[:5]}")
    for name, state in saved["state"].items():
        if state:
            optimizer.state[params[name]] = {k: _like(v, params[name]) for k, v in state.items()}
    for group, g in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(g)


# ---- optimisation ----

NORM_ROW = 1024  # elements normed together in float32 on a CPU (clip_grad_norm): ~1e-9 relative, as fast as 2^16


def clip_grad_norm(params, max_norm: float) -> float:
    """The gradients' global L2 norm before clipping, and every gradient scaled by
    max_norm / (norm + 1e-6) where that is below 1: torch.nn.utils.clip_grad_norm_'s rule with a norm
    that is right on a CPU too. torch's CPU norm adds a tensor up in a few float32 lanes: on Qwen2's
    151936 x 896 lm_head gradient it came out 1.2e-4 low (1.5% on random numbers) — enough to change
    every clipped update and to tell an FSDP2 run (each rank norming half the rows) from one process.
    So on a CPU each gradient is normed in rows of NORM_ROW elements and the rows' squares are added in
    float64. On CUDA torch's fused norm is kept (its reductions are trees; tests/test_sft.py checks it
    there when a GPU is lent, in bench/gpu_check.sh). Under FSDP2 a gradient
    is a DTensor: the squares of this rank's shards are summed over the ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if local[0].is_cuda:
        squares = torch.nn.utils.get_total_norm(local, foreach=True).double() ** 2
    else:
        squares = torch.zeros((), dtype=torch.float64)
        for g in local:
            flat = g.detach().reshape(-1)
            whole = flat.numel() // NORM_ROW * NORM_ROW
            rows = torch.linalg.vector_norm(flat[:whole].view(-1, NORM_ROW), dim=1, dtype=torch.float32)
            squares += rows.double().square().sum() + torch.linalg.vector_norm(flat[whole:], dtype=torch.float32).double() ** 2
    if isinstance(grads[0], DTensor):
        dist.all_reduce(squares, group=grads[0].device_mesh.get_group())
    norm = math.sqrt(squares.item())
    if math.isfinite(norm) and max_norm / (norm + 1e-6) < 1:  # (not finite: the caller stops the run)
        torch._foreach_mul_(local, max_norm / (norm + 1e-6))
    return norm


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """AdamW; no weight decay on norms and biases (1-D parameters). fused=True where supported:
    on a CPU it is ~5x faster than foreach at this size, and at small batches the optimizer
    decides the step time."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(step: int, total: int, warmup: int, base_lr: float, schedule="cosine", min_ratio=0.0) -> float:
    """Linear warmup over `warmup` steps, then cosine (or constant) down to min_ratio * base_lr.
    step counts from 0 (the first optimizer step uses lr_at(0) = base_lr / warmup: no step is spent at
    lr 0, where transformers' get_scheduler starts, a step behind this)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ---- model FLOPs utilisation (GPU) ----

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters (the embedding lookup is free, lm_head is
    not) + attention scores and values, 12 x layers x hidden x seq_len (PaLM's appendix B)."""
    per_layer = (cfg.hidden_size * cfg.head_dim * (cfg.num_attention_heads * 2 + cfg.num_key_value_heads * 2)
                 + 3 * cfg.hidden_size * cfg.intermediate_size)
    matmul_params = cfg.num_hidden_layers * per_layer + cfg.vocab_size * cfg.hidden_size
    return 6 * matmul_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def peak_flops(device) -> float | None:
    """bf16 dense peak of a known GPU, or None (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ---- checkpoints: weights in the Hugging Face layout, trainer state as safetensors + JSON ----
# Nothing in a checkpoint is executable: resuming from a folder someone else wrote runs no code of theirs.

class StateError(ValueError):
    """A run that cannot go on as asked: a used --out, an old torch.save state, a resume with
    other settings, no rows to train on."""


def _rng_state():
    """-> (tensors, scalars): torch CPU/CUDA, NumPy and Python RNG states, as tensors and JSON."""
    py_version, py_words, py_gauss = random.getstate()
    np_kind, np_words, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"rng.python": torch.tensor(py_words, dtype=torch.int64),
               "rng.numpy": torch.from_numpy(np_words.astype(np.int64)), "rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return tensors, {"python": [py_version, py_gauss], "numpy": [np_kind, np_pos, np_has_gauss, np_gauss]}


def set_rng_state(rng):
    tensors, scalars = rng
    py_version, py_gauss = scalars["python"]
    random.setstate((py_version, tuple(tensors["rng.python"].tolist()), py_gauss))
    np_kind, np_pos, np_has_gauss, np_gauss = scalars["numpy"]
    np.random.set_state((np_kind, tensors["rng.numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(out_dir, step, model, tok, weights, optimizer_state, args, keep_last: int = 2, meta=None):
    """out_dir/checkpoints/step-XXXXXXX: the weights (from full_model_state) in the Hugging Face
    layout, plus trainer_state.safetensors (AdamW moments and steps as optimizer.NAME.KEY, RNG
    states as rng.*) and trainer_state.json (step, param groups, parameter names, RNG scalars,
    meta: what a resume must agree on), all in one atomic write; older ones beyond keep_last
    are removed."""
    ckpt_root = os.path.join(out_dir, "checkpoints")
    path = os.path.join(ckpt_root, f"step-{step:07d}")
    tensors, rng_scalars = _rng_state()
    for name, state in optimizer_state["state"].items():
        tensors.update({f"optimizer.{name}.{k}": v.contiguous() for k, v in state.items()})
    info = {"step": step, "meta": meta or {}, "param_names": list(optimizer_state["state"]),
            "param_groups": optimizer_state["param_groups"], "rng": rng_scalars}
    save(model, tok, path, state_dict=weights, extra_files={
        "args.json": json.dumps(vars(args), indent=2),
        "trainer_state.safetensors": lambda p: save_tensors(tensors, p),
        "trainer_state.json": json.dumps(info, indent=2)})  # last: its presence marks a complete checkpoint
    for old in _checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_trainer_state(ckpt) -> dict:
    """-> {"step", "meta", "rng" (for set_rng_state), "optimizer": {"state": {name: {key: tensor}},
    "param_groups"}}. Reads JSON and safetensors only; an old trainer_state.pt (torch.save,
    whose loading can run code) is refused, never opened."""
    json_path = os.path.join(ckpt, "trainer_state.json")
    if not os.path.exists(json_path):
        raise StateError(
            f"{os.path.join(ckpt, 'trainer_state.pt')}: a trainer state written by an older nanopost with "
            f"torch.save. Loading that format can run any code stored in it, so nanopost never does. Its weights are plain "
            f"safetensors: start a new run from them with --model {ckpt} (the optimizer state and data "
            f"position are not carried over), or finish the run with the nanopost version that wrote it.")
    with open(json_path, encoding="utf-8") as f:
        info = json.load(f)
    tensors = load_file(os.path.join(ckpt, "trainer_state.safetensors"))
    state = {name: {} for name in info["param_names"]}
    for key, v in tensors.items():
        if key.startswith("optimizer."):
            name, k = key[len("optimizer."):].rsplit(".", 1)
            state[name][k] = v
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in info["param_groups"]]
    rng = ({k: v for k, v in tensors.items() if k.startswith("rng.")}, info["rng"])
    return {"step": info["step"], "meta": info["meta"], "rng": rng, "optimizer": {"state": state, "param_groups": groups}}


def latest_checkpoint(out_dir):
    """The newest complete checkpoint in out_dir/checkpoints (an old torch.save one included, so
    that resuming refuses it instead of silently starting over), or None."""
    root = os.path.join(out_dir, "checkpoints")
    return (_checkpoints(root) or [None])[-1]


def _checkpoints(root) -> list[str]:
    """The complete step-* checkpoints in root, oldest first; a replace that a crash cut short is
    finished first (checkpoint.recover), and temporary .tmp-* / .old-* folders are never listed."""
    if not os.path.isdir(root):
        return []
    for d in os.listdir(root):
        if d.startswith(".old-"):
            recover(os.path.join(root, d[len(".old-"):]))
        elif d.startswith(".tmp-"):  # a save a kill cut short: a whole model and optimizer state
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return [os.path.join(root, d) for d in sorted(os.listdir(root)) if d.startswith("step-") and any(
        os.path.exists(os.path.join(root, d, f)) for f in ("trainer_state.json", "trainer_state.pt"))]


def check_resume(meta: dict, saved: dict, ckpt: str) -> None:
    """Resume continues the run only when every optimizer step sees what it would have seen: the
    same rows per step and per epoch, seed, data, precision, optimizer settings (lr, its schedule
    and warmup, weight decay, clipping) and for KTO micro-batch size, reference and
    loss settings as the checkpoint was written with; anything else is a StateError (a changed lr
    would otherwise train on silently, and args.json would record the new one)."""
    whats = {"model": "--model (the run started from another model)",  # causes first, then what they change
             "max_len": "--max-len (it cuts the examples, and SFT packs rows to it)",
             "packing": "packing",
             "rows_per_step": "rows per optimizer step (batch-size x grad-accum x processes)",
             "steps_per_epoch": "optimizer steps per epoch (the data, --max-len or packing changed? or the run began "
                                "under a nanopost that left an epoch's last, smaller step out)",
             "batch_size": "examples per micro-batch (KTO forms its KL pairs inside each; SFT without packing "
                           "batches rows of similar length by it)",
             "micro_batches": "KTO's micro-batches (which examples form each: a nanopost that left the last example "
                              "alone, its own KL pair, wrote the checkpoint?)",
             "seed": "--seed (it orders the data and splits validation)",
             "data": "training data (a hash of its tokens and of which are trained: a data file, --max-len, "
                     "--train-on-prompt or the tokenizer changed)",
             "precision": "--precision (the optimizer state is kept in its dtype)",
             "reference": "reference model",
             "reference_weights": "reference model weights (a hash of its files: retrained in place?)",
             "schedule": "optimizer settings",
             "loss": "loss settings"}

    def flags(settings, keys):  # {"warmup_ratio": None} -> "--warmup-ratio (not given)"
        return ", ".join(f"--{k.replace('_', '-')} {'(not given)' if settings[k] is None else settings[k]}" for k in keys)

    schedule = saved.get("schedule")
    if isinstance(schedule, dict) and schedule.get("warmup_steps") == 0:  # as recorded before --warmup-steps 0
        saved = dict(saved, schedule={**{k: v for k, v in schedule.items() if k != "warmup_steps"},  # became the
                                      "warmup_ratio": 0.0})  # default ratio 0 (no warmup either way)

    found = []
    for key, what in whats.items():
        if key not in saved or key not in meta:
            continue
        then, now = saved[key], meta[key]
        # a folder by where it really is (a symlink to it, or a path written before)
        if key in ("model", "reference") and isinstance(then, str) and isinstance(now, str) and same_folder(then, now):
            continue
        what += " ="
        if key == "packing":
            then, now = (("packed rows" if v else "--no-packing") for v in (then, now))
        if isinstance(now, dict) and isinstance(then, dict):  # the settings both record; only what differs,
            diff = [k for k in now if k in then and then[k] != now[k]]  # named by their flags, and what this
            given = [k for k in now if k not in then and now[k] is not None] if diff else []  # run gives instead
            then, now, what = flags(then, diff), flags(now, diff + given), whats[key] + ":"
        if then != now:
            found.append((key, f"written with {what} {then}, this run has {now}"))
    if found:  # every difference at once (fixing one to meet the next is a slow way to learn them)
        hint = "resume with what the run started with, or start a new run"
        if "rows_per_step" in dict(found):  # the numbers to use: in one process, the checkpoint's micro-batch if it fits
            rows, b = saved["rows_per_step"], saved.get("batch_size")
            b = b if isinstance(b, int) and b > 0 and rows % b == 0 else rows
            hint = f"keep batch-size x grad-accum x processes = {rows} (e.g. in one process --batch-size {b} --grad-accum {rows // b})"
        raise StateError(f"{ckpt}: {'; '.join(m for _, m in found)}; resuming would not continue that run: {hint}")


RUN_FILES = {"checkpoints", "metrics.jsonl", "args.json", "ref_logps"}  # what a run writes before its final model


def check_out_dir(out_dir, resume: bool, overwrite: bool, model: str | None = None, ref: str | None = None) -> None:
    """A new run never mixes with an old one: without --resume or --overwrite a non-empty out_dir
    is refused (its checkpoints would be pruned by name against ours, and --resume would later
    load them); out_dir is never the --model or --ref folder (the final model, or --overwrite, would
    replace it), nor, with --overwrite, a folder holding one (OUT/checkpoints/step-N); and it can be
    written (found now, not after the data and the models are loaded)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise StateError(f"--out {out_dir} is a file, not a directory")
    for flag, m in (("--model", model), ("--ref", ref)):
        if m is None or not os.path.isdir(m):
            continue
        if os.path.realpath(m) == os.path.realpath(out_dir):
            raise StateError(f"--out {out_dir} is the {flag} folder: the run would replace the model it starts "
                             f"from; choose another --out")
        if overwrite and within(m, os.path.join(out_dir, "checkpoints")):  # what --overwrite deletes (prepare_out_dir)
            raise StateError(f"{flag} {m} lies inside --out {out_dir}/checkpoints, which --overwrite deletes first: "
                             f"choose another --out (or copy the model elsewhere)")
    if why := unwritable(out_dir, os.path.join(out_dir, "checkpoints")):  # (rank 0 writes them; a resume's too)
        raise StateError(why)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not (resume or overwrite):
        raise StateError(f"{out_dir} already holds {', '.join(sorted(os.listdir(out_dir))[:4])}: continue that run "
                         f"with --resume, choose another --out, or pass --overwrite to start afresh there")


def hold_out_dir(out_dir, busy: bool | None = None) -> None:
    """Lock --out for this run (checkpoint.hold_folder), or refuse it: a second run writing into the same
    folder at once (the same command twice, a --resume while the first still runs) overwrote the
    first's metrics and checkpoints, or removed its temporary saves under it. busy: already asked."""
    if busy is None:
        busy = os.path.isdir(out_dir) and not hold_folder(out_dir)
    if busy:
        raise StateError(f"--out {out_dir}: another process is writing there now (a training run or build_data.py "
                         f"still going?): wait for it to end, or choose another --out")


def prepare_out_dir(out_dir, resume: bool, overwrite: bool) -> None:
    """Create out_dir; with --overwrite (and no --resume) the old run's checkpoints, metrics and
    final model go first (that model would otherwise pass for ours). Call it on rank 0 once
    check_out_dir and every other check have passed: it is the first write."""
    os.makedirs(out_dir, exist_ok=True)
    hold_out_dir(out_dir)  # (held since start_run where it existed then): before anything of another run's goes
    remove_unfinished(out_dir)  # a final save a kill cut short (checkpoint.save writes beside out_dir)
    if overwrite and not resume:
        shutil.rmtree(os.path.join(out_dir, "checkpoints"), ignore_errors=True)
        remove_model_files(out_dir)
        for name in ("metrics.jsonl", "args.json"):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))


def save_final(model, tok, out_dir, args, weights=None):
    """The final model goes into out_dir itself, next to metrics.jsonl and checkpoints/ (file by
    file, an earlier save's weight files removed, config.json last: checkpoint.commit_files)."""
    save(model, tok, out_dir, state_dict=weights, extra_files={"args.json": json.dumps(vars(args), indent=2)},
         keep_other_files=True)


class StopAtStepEnd:
    """Ctrl-C (SIGINT) and SIGTERM only set a flag while training; the loop calls
    requested() at each step boundary, where it saves and stops. So a checkpoint never holds half
    an optimizer step (an interrupt inside optimizer.step() would otherwise save weights one
    update ahead of the step they are named after), and under torchrun every rank stops at the
    same step: the flag is summed over ranks, and any rank's signal stops them all, so no rank
    waits in a collective the others never reach. Repeated signals (a terminal's Ctrl-C reaches
    every rank, then torchrun forwards its own) change nothing; Ctrl-\\ (SIGQUIT) still quits at once."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.flag, self.old = False, {s: signal.getsignal(s) for s in self.SIGNALS}
        for s in self.SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.flag:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step "
                  f"(Ctrl-\\ quits without saving)", flush=True)
        self.flag = True

    def requested(self, device) -> bool:
        return all_reduce_sum(torch.tensor(float(self.flag), device=device)).item() > 0  # every rank, every step

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


# ---- progress ----

class Progress:
    """One line per log step (rank 0) and one JSON object per line in out_dir/metrics.jsonl."""

    def __init__(self, out_dir, total_steps, start_step, rank):
        """A resumed run keeps the lines up to start_step and drops any the interrupted run wrote later."""
        self.total, self.start, self.rank, self.t0 = total_steps, start_step, rank, time.time()
        self.file, self.last = None, {}  # last: the newest kept line (a run resumed at its end logs no step)
        if rank == 0:
            path = os.path.join(out_dir, "metrics.jsonl")
            kept = []
            if start_step > 0 and os.path.exists(path):
                damaged = 0
                for line in open(path, encoding="utf-8", errors="replace"):
                    try:
                        row = json.loads(line)
                        step = row["step"]
                    except (ValueError, TypeError, KeyError):  # a line a full disk or a power cut left half written
                        damaged += bool(line.strip())
                        continue
                    if isinstance(step, int) and step <= start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                        self.last = row
                if damaged:
                    print(f"warning: {path}: dropped {damaged} damaged line(s)", file=sys.stderr)
            with whole_file(path) as tmp, open(tmp, "w") as f:  # replaced whole: a kill here loses no kept line
                f.writelines(kept)
            self.file = open(path, "a")

    def log(self, step, **metrics):
        if self.rank:
            return
        with writing(self.file.name):
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()
        elapsed = time.time() - self.t0
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        parts = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        print(f"step {step}/{self.total} | {parts} | elapsed {elapsed:.0f}s | eta {eta:.0f}s", flush=True)

    def close(self):
        if self.file:
            self.file.close()


def window_metrics(window: list[dict]) -> dict:
    """What one log line says for the steps since the last (as transformers and TRL log): losses and
    KL the mean of the steps', rewards and log-probs the mean over the window's examples of their
    kind, counts summed, tokens/s over the window's time; lr, grad_norm, epoch and val_loss the last
    step's."""
    out = dict(window[-1])
    for key in ("loss", "kl"):
        if key in out:
            values = [m[key] for m in window if m.get(key) is not None]
            out[key] = sum(values) / len(values) if values else None
    for kind, count in (("chosen", "n_desirable"), ("rejected", "n_undesirable")):
        n = sum(m.get(count) or 0 for m in window)
        for key in (f"rewards/{kind}", f"logps/{kind}"):
            if key in out:  # a step without such examples has None and a count of 0
                out[key] = sum(m[key] * m[count] for m in window if m.get(key) is not None) / n if n else None
    if "rewards/margins" in out:
        both = out["rewards/chosen"] is not None and out["rewards/rejected"] is not None
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"] if both else None
    for key in ("n_desirable", "n_undesirable", "trained_tokens"):
        if key in out:
            out[key] = sum(m[key] for m in window)
    del out["seconds"], out["tokens"]
    out["tokens_per_s"] = sum(m["tokens"] for m in window) / sum(m["seconds"] for m in window)
    return out


# ---- what a training script does the same way: flags, setup, the loop ----

def add_training_args(p, data_help: str, row: str = "rows"):
    """The flags train_sft.py and train_kto.py share (each adds its own after these)."""
    # ---- model and data ----
    p.add_argument("--model", required=True, help="checkpoint directory or hub id to start from")
    p.add_argument("--data", nargs="+", required=True, help=data_help)
    p.add_argument("--val", default=None, help="validation JSONL (default: --val-fraction of the training data)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="held-out fraction of each file when --val is not given (rounded up; KTO keeps a prompt's "
                        "completions on one side)")
    p.add_argument("--out", required=True, help="output directory: final model, checkpoints/, metrics.jsonl")
    p.add_argument("--max-len", type=int, default=1024,
                   help="tokens per row; a longer example loses whole turns from its end, or is cut at this length "
                        "where its first exchange alone is longer (SFT; KTO cuts the prompt's left, then the "
                        "completion), counted at start")
    p.add_argument("--skip-bad-lines", action="store_true", help="drop malformed lines with a warning instead of stopping")
    # ---- optimisation ----
    p.add_argument("--batch-size", type=int, default=4, help=f"{row} per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine", help="after warmup")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup steps: the k-th trains at lr*k/W (transformers' scheduler: lr*(k-1)/W, from 0)")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="warmup as a fraction of all steps (rounded up)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (never on norms/biases)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--precision", choices=["bf16-autocast", "fp32", "bf16"], default=None,
                   help="bf16-autocast: float32 master weights (default on CUDA); fp32 (default on CPU); bf16: pure "
                        "(weights and AdamW moments in bf16: updates under ~0.4%% of a weight round away)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute each block in backward (less memory)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state (FSDP2 fully_shard per block) "
                        "instead of replicating them (DDP)")
    p.add_argument("--seed", type=int, default=0, help="seeds data order and everything random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=nanopost.device_arg,
                   help="cpu, cuda or cuda:N")
    # ---- checkpoints and logs ----
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = only at the end)")
    p.add_argument("--keep-last", type=int, default=2, help="checkpoints kept in OUT/checkpoints (at least 1)")
    p.add_argument("--eval-every", type=int, default=0, help="validation loss every N steps (0 = at the end)")
    p.add_argument("--log-every", type=int, default=1,
                   help="log line + metrics.jsonl every N steps, for those N steps (losses their mean, as transformers)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a non-empty --out (its checkpoints and metrics are deleted); "
                        "without it a non-empty --out needs --resume")


def parse_training_args(p, argv, presets: dict):
    """Parse; a --preset replaces the defaults (so a flag given in any spelling still wins)."""
    args, _ = p.parse_known_args(argv)
    if getattr(args, "preset", None):
        p.set_defaults(**presets[args.preset])
    args = p.parse_args(argv)
    for flag in ("batch_size", "grad_accum", "keep_last", "max_len", "log_every"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:  # (0 trained a whole epoch, -3 saved the model untrained)
        p.error("--max-steps must be at least 1 (leave it out to train --epochs)")
    if not 0 < args.epochs < math.inf:
        p.error("--epochs must be a number more than 0")
    if any(not 0 < w <= 10_000 for w in getattr(args, "data_weights", None) or []):  # (inf, 1e20: a traceback)
        p.error("--data-weights must all be more than 0 and at most 10000 (times a file's examples appear)")
    if not (args.lr > 0 and math.isfinite(args.lr)):  # (nan or 0 reached torch's optimizer as a traceback)
        p.error(f"--lr must be a positive number, not {args.lr}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        p.error("--warmup-steps must be 0 or more")
    if not 0 <= args.warmup_ratio < 1:
        p.error("--warmup-ratio must be in [0, 1)")
    if not 0 <= args.min_lr_ratio <= 1:
        p.error("--min-lr-ratio must be in [0, 1]")
    if not 0 <= args.weight_decay < math.inf:
        p.error("--weight-decay must be a number, 0 or more")
    if not args.max_grad_norm >= 0:
        p.error("--max-grad-norm must be 0 (no clipping) or more")
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    if not -2**63 <= args.seed < 2**64:  # what torch.manual_seed takes (past it: an overflow traceback)
        p.error(f"--seed must be in [-2**63, 2**64), not {args.seed}")
    if args.resume and args.overwrite:  # (the two are alternatives: --overwrite was silently ignored)
        p.error("give --resume (continue the run in --out) or --overwrite (start afresh there), not both")
    for flag in ("save_every", "eval_every"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be 0 or more")
    if args.warmup_ratio > 0 and args.warmup_steps is not None:
        p.set_defaults(warmup_steps=p)  # parsed again: was --warmup-steps given (even equal to the preset's)?
        if p.parse_args(argv).warmup_steps is not p:
            p.error("give --warmup-steps or --warmup-ratio, not both")
        args.warmup_steps = None  # the preset's warmup steps yield to an explicit ratio
    if args.precision is None:
        args.precision = "bf16-autocast" if args.device.startswith("cuda") else "fp32"
    return args


def start_run(args):
    """-> (rank, world, device, log): torchrun setup, seeds, and a print that only rank 0 does.
    Refuses a used --out before any work (StateError)."""
    rank, world, device = setup_distributed(args.device)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    check_out_dir(args.out, args.resume, args.overwrite, args.model, getattr(args, "ref", None))
    busy = rank == 0 and os.path.isdir(args.out) and not hold_folder(args.out)  # rank 0 writes for them all
    hold_out_dir(args.out, all_reduce_sum(torch.tensor(float(busy), device=device)).item() > 0)  # every rank stops
    if args.resume and (ckpt := latest_checkpoint(args.out)) and os.path.exists(os.path.join(ckpt, "trainer_state.json")):
        with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
            check_resume(start_meta(args, world), json.load(f)["meta"], ckpt)  # before the data: it depends on them
    out = args.out  # --resume continues a training run's folder (or starts one), never another's files
    if args.resume and not args.overwrite and os.path.isdir(out) and not os.path.isdir(os.path.join(out, "checkpoints")) \
            and not set(os.listdir(out)) <= RUN_FILES:
        raise StateError(f"--resume: {out} holds {', '.join(sorted(os.listdir(out))[:4])} but no checkpoints/: "
                         f"it is not a run to continue; choose another --out")
    return rank, world, device, (print if rank == 0 else (lambda *a, **k: None))


def data_hash(sequences) -> str:
    """A short hash of token sequences (what a resume must find unchanged)."""
    h = hashlib.sha256()
    for seq in sequences:
        h.update(np.asarray(seq, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def schedule_meta(args) -> dict:
    """The optimizer settings a resume must find unchanged."""
    return {"lr": args.lr, "lr_schedule": args.lr_schedule, "min_lr_ratio": args.min_lr_ratio,
            "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm,
            # as given: a ratio's steps follow a new run length, like the schedule's (the ratio, None with
            # --warmup-steps, is always there: a switch of forms differs; --warmup-steps 0 is the default
            # ratio 0, no warmup either way)
            **({"warmup_steps": args.warmup_steps} if args.warmup_steps else {}),
            "warmup_ratio": None if args.warmup_steps else args.warmup_ratio}


def start_meta(args, world: int) -> dict:
    """What a resume must find that the flags alone decide, in both scripts: --model (a folder by
    its real path, a hub id as itself: its snapshot path changes with any upstream commit),
    --max-len, (SFT) packing, rows per step, seed, precision and the optimizer settings. start_run
    checks them before the data is read, so that one message names every such difference; each
    script adds what the data decide (steps per epoch, the data hash, ...) for train()'s check."""
    return {"model": os.path.realpath(args.model) if os.path.isdir(args.model) else args.model, "max_len": args.max_len,
            **({"packing": not args.no_packing} if hasattr(args, "no_packing") else {}),
            "rows_per_step": args.batch_size * args.grad_accum * world, "seed": args.seed, "precision": args.precision,
            "schedule": schedule_meta(args)}


def cut_note(n_cut: int, n: int, max_len: int, what: str = "examples") -> str | None:
    """A warning when most examples lose trained tokens to --max-len (a --max-len of 2 trains on
    one token each, and says so only in a count)."""
    if n and n_cut > n / 2:
        return (f"warning: {n_cut} of {n} {what} were cut to --max-len {max_len} tokens: most lose part of what "
                f"is trained on; is --max-len meant to be this small?")
    return None


def plan_steps(units: int, units_per_step: int, args):
    """-> (steps per epoch, total steps) for `units` rows or micro-batches an epoch. As transformers'
    Trainer, nothing is dropped: an epoch's last step may be smaller (its loss is still the mean over
    what it holds; micro_batches_each() keeps the processes in step)."""
    steps_per_epoch = math.ceil(units / units_per_step)
    if steps_per_epoch == 0:
        raise StateError("no training data left to make a step of" + ("; --data-weights below 1 keep only that "
                         "share of a file's examples" if any(w < 1 for w in getattr(args, "data_weights", None) or []) else ""))
    return steps_per_epoch, args.max_steps or math.ceil(args.epochs * steps_per_epoch)


def micro_batches_each(step_units: int, world: int, per_micro: int = 1) -> int:
    """How many micro-batches every process runs in a step of step_units rows (per_micro a
    micro-batch) or KTO micro-batches (per_micro 1), shared out as units[rank::world]: the most any
    process gets. Under DDP and FSDP2 each forward or backward is a collective, so in an epoch's
    smaller last step a process with fewer runs stand-ins that count for nothing (a process with
    fewer micro-batches would wait for the others forever)."""
    return math.ceil(math.ceil(step_units / world) / per_micro)


def split_validation(per_file, args, val_examples, key=None, log=print):
    """--val-fraction: a seeded share of every training file moves to validation (in place), rounded
    up as datasets' train_test_split does (0.05 of 16 is 1, never 0), one example always left to
    train. key: examples with the same key move together (KTO: one prompt's completions, a pair's
    two halves, so validation never scores a prompt that trains): whole groups move until the share
    is reached, so it can come out larger, or, with a single prompt, empty (said so)."""
    if not args.val and args.val_fraction > 0:
        rng = random.Random(args.seed)
        for examples in per_file:
            groups = {}
            for e in examples:
                groups.setdefault(key(e) if key else id(e), []).append(e)
            groups = list(groups.values())
            rng.shuffle(groups)
            want, k, held = math.ceil(len(examples) * args.val_fraction), 0, 0
            while held < want and k < len(groups) - 1:
                held, k = held + len(groups[k]), k + 1
            val_examples += [e for g in groups[:k] for e in g]
            examples[:] = [e for g in groups[k:] for e in g]
            if held != want:  # short: the last group stays to train; over: whole groups moved
                log(f"note: --val-fraction {args.val_fraction} of {held + len(examples)} examples holds out {held}, "
                    f"not {want}: " + ("what is left must stay to train" if held < want else
                                       "one prompt's completions stay together"))
    return val_examples


def frozen_for_autocast(model, dtype=torch.bfloat16):
    """A frozen model (KTO's reference) that only ever runs under autocast to `dtype` can hold its
    Linear weights and biases in that dtype already: autocast casts them to it before every matmul
    anyway, so the results are the same bit for bit (tests/test_kto.py), with half their memory and
    no cast at each forward. The embedding and the norms stay as loaded (they are read in float32);
    a tied lm_head is the embedding, so it stays too."""
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not (tied and m is model.lm_head):
            m.to(dtype)
    return model


def load_policy(args, loss_fn, world, device, log):
    """The model to train (from --model, or the latest checkpoint with --resume), wrapped with
    its loss for DDP/FSDP2, and AdamW -> namespace(model, module, wrapped, optimizer, autocast,
    ckpt, saved). The trainer state is read here, before anything is written."""
    ckpt = latest_checkpoint(args.out) if args.resume else None
    if args.resume and ckpt is None:
        log(f"--resume: no checkpoint in {args.out}/checkpoints, starting from step 0")
    saved = load_trainer_state(ckpt) if ckpt else None
    fsdp = args.fsdp and world > 1
    if args.fsdp and not fsdp:
        log("--fsdp with one process: nothing to shard, running as usual")
    model, _ = load(ckpt or args.model, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32, device=device)
    model.grad_checkpointing = args.grad_checkpoint
    model.train()
    module = WithLoss(model, loss_fn)  # named parameters, optimizer state and checkpoints go through this
    wrapped = distribute(module, world, device, fsdp=fsdp)  # what the loop calls
    use_autocast = args.precision == "bf16-autocast"
    return SimpleNamespace(model=model, module=module, wrapped=wrapped, fsdp=fsdp, ckpt=ckpt, saved=saved,
                           optimizer=make_optimizer(module, args.lr, args.weight_decay),
                           autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast))


def train(args, run, tok, total, steps_per_epoch, meta, step_fn, val_fn, rank, world, device, log):
    """The loop both scripts run: resume (optimizer, RNG, step), then per optimizer step the lr,
    step_fn(step, epoch, k) (forward + backward of this rank's micro-batches -> metrics, with
    "tokens" summed over ranks), clipping, AdamW, the log line, validation (val_fn -> loss or
    None), checkpoints and Ctrl-C; at the end the validation loss and the final model in --out.
    meta: what a resume must agree on (rows per step, steps per epoch, ...)."""
    warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * total)
    if warmup > total:  # every step below the lr asked for (step s runs at (s + 1) / warmup of it)
        log(f"warning: a warmup of {warmup} steps is longer than the run's {total}: the lr never reaches --lr {args.lr}")
    start = 0
    meta = dict(meta, total_steps=total)
    if run.saved is not None:
        check_resume(meta, run.saved["meta"], run.ckpt)
        then = run.saved["meta"].get("total_steps", total)
        if total < run.saved["step"]:
            raise StateError(f"{run.ckpt}: already at step {run.saved['step']}, this run asks for {total} steps in all")
        if then != total:  # a longer or shorter run is a choice, but not the same schedule
            log(f"note: the run started as {then} steps, now {total}: the lr schedule follows the new length")
        load_optimizer_state(run.module, run.optimizer, run.saved["optimizer"])
        set_rng_state(run.saved["rng"])
        start = run.saved["step"]
        log(f"resumed from {run.ckpt} at step {start}")

    def checkpoint(step, final=False):
        """Every rank gathers (a collective under FSDP2); rank 0 writes."""
        weights = full_model_state(run.module, rank)
        opt_state = full_optimizer_state(run.module, run.optimizer, rank)
        if rank == 0:
            path = save_checkpoint(args.out, step, run.model, tok, weights, opt_state, args, args.keep_last, meta)
            if final:
                save_final(run.model, tok, args.out, args, weights)
            return path

    if world > 1:
        dist.barrier()  # every rank has checked --out (start_run) before rank 0 writes into it
    if rank == 0:
        prepare_out_dir(args.out, args.resume, args.overwrite)  # the first write: every check is behind us
        with whole_file(os.path.join(args.out, "args.json")) as tmp, open(tmp, "w") as f:
            json.dump(vars(args), f, indent=2)
    progress = Progress(args.out, total, start, rank)
    peak = peak_flops(device)  # MFU is logged on known GPUs
    log(f"training {total} steps ({steps_per_epoch}/epoch), {meta['rows_per_step']} rows x {args.max_len} tokens per "
        f"step, {world} process(es){' (FSDP2)' if run.fsdp else ' (DDP)' if world > 1 else ''}, {args.precision}, "
        f"lr {args.lr}, warmup {warmup}")
    if args.precision == "bf16" and args.lr < 1e-4:  # a weight's bf16 rounding step is ~0.4% of it
        log(f"note: --precision bf16 keeps the weights and AdamW moments in bf16; at --lr {args.lr} many updates are "
            f"smaller than a weight's rounding step and are lost (bf16-autocast keeps float32 master weights)")
    step, metrics, window = start, {}, []
    with StopAtStepEnd() as stop:  # Ctrl-C: finish the step, save, exit (every rank at the same step)
        while step < total:
            epoch, k = divmod(step, steps_per_epoch)
            lr = lr_at(step, total, warmup, args.lr, args.lr_schedule, args.min_lr_ratio)
            for g in run.optimizer.param_groups:
                g["lr"] = lr
            t0 = time.time()
            metrics = step_fn(step, epoch, k)
            # the norm before clipping; --max-grad-norm 0 measures it and clips nothing
            grad_norm = clip_grad_norm(run.module.parameters(), args.max_grad_norm or math.inf)
            if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):  # the same on every rank
                progress.close()  # (a diverged run trained on: NaN weights were saved as its final model)
                kept = latest_checkpoint(args.out)
                raise StateError(f"step {step + 1}: loss {metrics['loss']}, gradient norm {grad_norm}: training "
                                 f"diverged (too high a --lr, or an extreme loss setting?) and stops before the optimizer "
                                 f"applies it; no final model is written" + (
                                     f"; {kept} is the last checkpoint (train on from it with --model {kept} and another --out)" if kept
                                     else " and no checkpoint was saved"))
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            step += 1
            metrics.update(lr=lr, grad_norm=grad_norm, epoch=epoch + (k + 1) / steps_per_epoch, seconds=time.time() - t0)
            if (args.eval_every and step % args.eval_every == 0) or step == total:  # the last: in metrics.jsonl too
                if (val := val_fn()) is not None:
                    metrics["val_loss"] = val
            window.append(metrics)
            if step % args.log_every == 0 or step == total or "val_loss" in metrics:
                metrics, window = window_metrics(window), []
                if peak:
                    metrics["mfu"] = metrics["tokens_per_s"] * flops_per_token(run.model.config, args.max_len) / (peak * world)
                progress.log(step, **metrics)
            saved_now = args.save_every and step % args.save_every == 0 and step < total
            if saved_now:
                checkpoint(step)
            if step < total and stop.requested(device):  # the last step goes on to the final save
                path = os.path.join(args.out, "checkpoints", f"step-{step:07d}") if saved_now else checkpoint(step)
                log(f"interrupted: saved {path}; continue with --resume", flush=True)
                sys.exit(130)
        if step == start:  # resumed at the end: no step ran, the last logged one is the run's
            metrics = {"loss": progress.last.get("loss"), "val_loss": val_fn()}
        val = metrics.get("val_loss")
        checkpoint(step, final=True)  # a Ctrl-C from here on waits for the final model: the run is complete then
    progress.close()
    log(json.dumps({"out": args.out, "steps": step, "final_loss": metrics.get("loss"), "val_loss": val}))
    if world > 1:  # tear the group down together: a rank leaving while rank 0 still writes can abort gloo
        dist.barrier()
        dist.destroy_process_group()
