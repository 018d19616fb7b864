"""Whole training steps with the Triton kernels on against off (NANOPOST_KERNELS=triton vs torch):
the same loss and the same gradient for every parameter. On CPU the kernels run in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1); on a GPU natively, also in bfloat16."""
import os
import subprocess
import sys

import pytest
import torch

import nanopost
from nanopost import kernels
from nanopost.losses import kl_estimate, kto_loss, sequence_logps, sft_loss_sum

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def batch(vocab, g):
    """Three rows of 13 tokens; row 0 packs two sequences (positions restart), prompts untrained."""
    ids = torch.randint(0, vocab, (3, 13), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[0, 6:8] = -100  # the second packed sequence's prompt
    pos = torch.arange(13).repeat(3, 1)
    pos[0, 6:] = torch.arange(7)
    return ids.to(DEV), labels.to(DEV), pos.to(DEV)


def sft_step(model, ids, labels, pos):
    return sft_loss_sum(model, ids, labels, pos, chunk_rows=5) / (labels[:, 1:] != -100).sum()


def kto_step(model, ids, labels, pos):
    logps = sequence_logps(model, ids, labels, pos, chunk_rows=5)
    ref = logps.detach() + torch.linspace(-0.3, 0.4, len(logps), device=DEV)  # a reference that differs
    kl_ids = ids.roll(1, 0)  # prompt i with completion i-1, cyclic, as train_kto.py pairs them
    with torch.no_grad():
        z0 = kl_estimate(sequence_logps(model, kl_ids, labels.roll(1, 0), pos.roll(1, 0)), ref.roll(1, 0))
    loss, _ = kto_loss(logps, ref, torch.tensor([True, False, True], device=DEV), z0, beta=0.5)
    return loss


@pytest.mark.parametrize("grad_checkpoint", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("step", [sft_step, kto_step], ids=["sft", "kto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_step_kernels_on_equals_off(tiny, step, dtype, grad_checkpoint, monkeypatch):
    pytest.importorskip("triton")
    seed = int.from_bytes(os.urandom(4), "little")
    model, _ = nanopost.load(tiny, dtype=dtype, device=DEV)
    model.train()
    model.grad_checkpointing = grad_checkpoint
    inputs = batch(model.config.vocab_size, torch.Generator().manual_seed(seed))
    out = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("NANOPOST_KERNELS", mode)
        model.zero_grad(set_to_none=True)
        loss = step(model, *inputs)
        loss.backward()
        out[mode] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    # float32: only the summation order differs. bf16: two bf16 computations that round differently,
    # compounded through backprop, and on CPU the interpreter truncates float32 -> bf16 (a GPU rounds
    # to nearest): measured 2.5e-2 on the whole gradient and up to 5e-2 on single small tensors
    loss_tol, whole_tol, tensor_tol = (1e-5, 1e-5, 2e-5) if dtype == torch.float32 else (1e-2, 5e-2, 0.15)
    (loss_ref, g_ref), (loss_tri, g_tri) = out["torch"], out["triton"]
    assert rel(loss_tri, loss_ref) <= loss_tol, f"seed {seed}: loss {loss_tri} vs {loss_ref}"
    for name in g_ref:
        assert torch.isfinite(g_tri[name]).all(), f"seed {seed}: {name} gradient has NaN/inf"
        assert rel(g_tri[name], g_ref[name]) <= tensor_tol, f"seed {seed}: {name} {rel(g_tri[name], g_ref[name]):.2e}"
    whole = rel(torch.cat([g.flatten() for g in g_tri.values()]), torch.cat([g.flatten() for g in g_ref.values()]))
    assert whole <= whole_tol, f"seed {seed}: whole gradient {whole:.2e}"


def test_dispatch_rules(monkeypatch):
    pytest.importorskip("triton")
    x = torch.zeros(2, device=DEV)
    monkeypatch.delenv("NANOPOST_KERNELS", raising=False)
    assert kernels.use_triton(x) == x.is_cuda
    assert not kernels.use_triton(x.double())  # the kernels compute in float32: float64 stays on the references
    monkeypatch.setenv("NANOPOST_KERNELS", "torch")
    assert not kernels.use_triton(x)
    monkeypatch.setenv("NANOPOST_KERNELS", "cuda")
    with pytest.raises(ValueError, match="auto, torch or triton"):
        kernels.use_triton(x)
    monkeypatch.setenv("NANOPOST_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if DEV == "cpu":
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            kernels.use_triton(x)


def test_model_imports_and_runs_without_triton(tiny):
    """A CPU-only install has no triton: nanopost must import and run on the references."""
    code = ("import sys; sys.modules['triton'] = None; import torch, nanopost; "
            "m, _ = nanopost.load(sys.argv[1]); print(tuple(m(torch.tensor([[1, 2, 3]])).shape))")
    env = {k: v for k, v in os.environ.items() if k not in ("NANOPOST_KERNELS", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code, tiny], capture_output=True, text=True, env=env, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    vocab = nanopost.load(tiny)[0].config.vocab_size
    assert out.stdout.strip() == f"(1, 3, {vocab})", out.stdout
