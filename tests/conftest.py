import os
import signal
import tempfile

import pytest

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `pytest -n N` (pytest-xdist): N worker processes
    # share the cores out (N workers each taking every core run slower than one), and put Ctrl-C back:
    # a worker ignores SIGINT, and the scripts the tests start would inherit that and never see one
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
    signal.signal(signal.SIGINT, signal.default_int_handler)
import torch  # noqa: E402

if not torch.cuda.is_available():  # kernel tests run the Triton kernels through its CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nanopost.testing import make_tiny_checkpoint

REAL_DEFAULT = os.path.expanduser("~/.cache/nanopost/qwen2.5-coder-0.5b-instruct")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under `pytest -n N` a test on the real checkpoint waits for any other worker's to finish: one
    such test peaks near 10 GB (our 0.5B model, transformers' copy, a batch of 5-shot prompts), and two
    at once would crowd a 24 GiB machine. (Its fixtures are set up and torn down inside the lock:
    test_real.py's models are per test under -n, not per module.)"""
    if "PYTEST_XDIST_WORKER" not in os.environ or not item.get_closest_marker("real"):
        return (yield)
    import fcntl
    with open(os.path.join(tempfile.gettempdir(), f"nanopost-real-tests-{os.getuid()}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return (yield)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random Qwen2 checkpoint (tied lm_head, GQA 2) with a Qwen2-style chat template."""
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="session")
def real_model_dir():
    """A real Qwen2-architecture checkpoint (see the README's test section), or skip."""
    d = os.environ.get("NANOPOST_REAL_MODEL", REAL_DEFAULT)
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        pytest.skip(f"real checkpoint not found at {d} (hf download Qwen/Qwen2.5-Coder-0.5B-Instruct --local-dir {d}, "
                    f"or set NANOPOST_REAL_MODEL)")
    return d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def poison_allocations(monkeypatch, *modules):
    """Make every buffer the kernel modules allocate (through their module-level `_empty`) start
    as NaN, so an element a kernel never writes fails its test; returns the list of those buffers."""
    allocated = []

    def nan_empty(*args, **kwargs):
        allocated.append(torch.empty(*args, **kwargs).fill_(float("nan")))
        return allocated[-1]
    for module in modules:
        monkeypatch.setattr(module, "_empty", nan_empty)
    return allocated
