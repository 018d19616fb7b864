"""What the training scripts share: torchrun setup and DDP / FSDP2 wrapping, AdamW with the usual
no-decay groups, warmup + cosine schedule, checkpoint + exact resume, the progress line and
metrics.jsonl."""
import contextlib
import json
import math
import os
import random
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from nanopost.checkpoint import save

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
    step counts from 0 (the first optimizer step uses lr_at(0))."""
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


# ---- checkpoints ----

def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out_dir, step, model, tok, weights, optimizer_state, args, keep_last: int = 2):
    """out_dir/checkpoints/step-XXXXXXX: the weights (from full_model_state) in the Hugging Face
    layout plus the trainer state (optimizer from full_optimizer_state, RNG, step), written
    atomically; older ones beyond keep_last are removed."""
    ckpt_root = os.path.join(out_dir, "checkpoints")
    path = os.path.join(ckpt_root, f"step-{step:07d}")
    state = {"step": step, "optimizer": optimizer_state, "rng": rng_state()}
    save(model, tok, path, state_dict=weights, extra_files={"args.json": json.dumps(vars(args), indent=2),
                                                            "trainer_state.pt": lambda p: torch.save(state, p)})
    for old in sorted(os.listdir(ckpt_root))[:-keep_last]:
        shutil.rmtree(os.path.join(ckpt_root, old), ignore_errors=True)
    return path


def latest_checkpoint(out_dir):
    root = os.path.join(out_dir, "checkpoints")
    done = [d for d in sorted(os.listdir(root)) if os.path.exists(os.path.join(root, d, "trainer_state.pt"))] \
        if os.path.isdir(root) else []
    return os.path.join(root, done[-1]) if done else None


def save_final(model, tok, out_dir, args, weights=None):
    """The final model goes into out_dir itself (next to metrics.jsonl and checkpoints/): written
    to a temporary directory first, then moved in file by file, config.json last, so out_dir
    only looks like a checkpoint once every weight file is in place."""
    tmp = os.path.join(out_dir, ".final-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(model, tok, tmp, state_dict=weights, extra_files={"args.json": json.dumps(vars(args), indent=2)})
    names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
    for n in names:
        os.replace(os.path.join(tmp, n), os.path.join(out_dir, n))
    os.rmdir(tmp)


# ---- progress ----

class Progress:
    """One line per log step (rank 0) and one JSON object per line in out_dir/metrics.jsonl."""

    def __init__(self, out_dir, total_steps, start_step, rank):
        """A resumed run keeps the lines up to start_step and drops any the interrupted run wrote later."""
        self.total, self.start, self.rank, self.t0 = total_steps, start_step, rank, time.time()
        self.file = None
        if rank == 0:
            path = os.path.join(out_dir, "metrics.jsonl")
            kept = []
            if start_step > 0 and os.path.exists(path):
                kept = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= start_step]
            self.file = open(path, "w")
            self.file.writelines(kept)

    def log(self, step, **metrics):
        if self.rank:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        elapsed = time.time() - self.t0
        eta = elapsed / max(step - self.start, 1) * (self.total - step)
        parts = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        print(f"step {step}/{self.total} | {parts} | elapsed {elapsed:.0f}s | eta {eta:.0f}s", flush=True)

    def close(self):
        if self.file:
            self.file.close()
