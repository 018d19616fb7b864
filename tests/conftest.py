import os

import pytest
import torch

if not torch.cuda.is_available():  # kernel tests run the Triton kernels through its CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nanopost.testing import make_tiny_checkpoint

REAL_DEFAULT = os.path.expanduser("~/.cache/nanopost/qwen2.5-coder-0.5b-instruct")


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
