"""The benchmark scripts refuse what they cannot run before any side starts (a side is a subprocess
that would fail with a traceback, or leave a median of nothing), naming the flag."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("argv,message", [
    (["train_step.py", "--steps", "0"], "--steps must be at least 1"),
    (["train_step.py", "--seq-lens", "1"], "--seq-lens must be at least 2"),
    (["kto_step.py", "--batch", "0"], "--batch must be at least 1"),
    (["kto_reference.py", "--steps", "0"], "--steps must be at least 1"),
    (["generate.py", "--chat", "70"], "--chat in 0..64"),
    (["generate.py", "--repeats", "0"], "--repeats must be at least 1"),
    (["dedup.py", "--n", "1"], "--n must be at least 20"),
    (["evaluate.py", "--data-dir", "/no/such/folder"], "has no gsm8k/"),
] + ([(["train_step.py", "--device", "cuda"], "sees no CUDA device"),
      (["kto_step.py", "--device", "cuda"], "sees no CUDA device")] if not torch.cuda.is_available() else []))
def test_bad_arguments_are_refused_before_any_side_runs(argv, message, tmp_path):
    model = [] if argv[0] == "dedup.py" else ["--model", str(tmp_path)]  # (never loaded: refused first)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", argv[0]), *argv[1:], *model],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
