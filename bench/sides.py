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


def run_side(script: str, argv: list[str], what: str) -> dict:
    """python SCRIPT ARGV (the script's hidden --worker mode) -> the JSON of its last stdout line;
    exits naming `what` with the tail of stderr if it failed."""
    out = subprocess.run([sys.executable, script, *map(str, argv)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_steps(step, steps: int, device: str) -> tuple[float, float]:
    """-> (median seconds of `steps` calls of step() after one warm-up call, peak GB: CUDA memory
    allocated, or the process's peak RSS on a CPU)."""
    import torch
    times = []
    for i in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return statistics.median(times), peak
