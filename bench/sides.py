"""What the benchmark scripts share: each side (nanopost, transformers) runs in a fresh process,
so its time and peak memory are its own, and hands back one JSON line."""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_MODEL = os.environ.get("NANOPOST_REAL_MODEL", os.path.expanduser("~/.cache/nanopost/qwen2.5-coder-0.5b-instruct"))


def check_args(p, args, positive=("steps", "batch")):
    """p.error before any side starts: a count below 1 among `positive` (a traceback in a worker, or
    a median of nothing, otherwise), or a CUDA device this torch does not see."""
    for name in positive:
        if getattr(args, name, 1) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if getattr(args, "device", "cpu").startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            p.error(f"--device {args.device}: this torch sees no CUDA device")


def run_side(script: str, argv: list[str], what: str) -> dict:
    """python SCRIPT ARGV (the script's hidden --worker mode) -> the JSON of its last stdout line;
    exits naming `what` with the tail of stderr if it failed."""
    out = subprocess.run([sys.executable, script, *map(str, argv)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_train_steps(loss_fn, model, opt, steps: int, device: str, clip=None) -> dict:
    """Optimizer steps (loss_fn() -> loss, backward, clip to 1.0, opt.step) -> {"step_s": the median of
    `steps` timed steps after one warm-up step, "peak_gb": CUDA memory allocated or, on a CPU, the
    process's peak RSS, "loss": the first step's loss}. clip(params, max_norm): torch's
    clip_grad_norm_ unless given (nanopost's sides pass nanopost.training.clip_grad_norm)."""
    import torch
    clip = clip or torch.nn.utils.clip_grad_norm_
    times, losses = [], []
    for i in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        clip(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {"step_s": statistics.median(times), "peak_gb": peak, "loss": losses[0]}
