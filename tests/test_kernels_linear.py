"""Fused linear cross-entropy and log-prob: each Triton function against its PyTorch reference and
against a float64 re-derivation from full logits, forward and backward (grads of hidden and weight
under a random upstream gradient). Fresh random inputs every run (the seed is in every failure
message); N = 37 rows in chunks of 16 (the last one short), one chunk with every row ignored; every
buffer the modules allocate starts as NaN, so an element never written fails.
Tolerance is ‖got − ref‖ / ‖ref‖: 1e-5 in float32, 1e-2 in bf16, where logits and d loss / d logits
are bf16 tensors. On CPU, Triton's interpreter rounds float32 -> bf16 toward zero where the GPU
rounds to nearest: a bias of up to one bf16 ulp (2^-7 relative) on every gradient element, so bf16
gradients land at 0.3-0.7 of the tolerance here (about 1e-5 from the reference on an H200)."""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import poison_allocations
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")
from nanopost.kernels import linear_ce, linear_logprob

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
N, CHUNK = 37, 16  # chunks [0, 16), [16, 32), [32, 37)


@pytest.fixture
def rng():
    """A generator seeded from os.urandom (rng.initial_seed() to report)."""
    return torch.Generator(device=DEVICE).manual_seed(int.from_bytes(os.urandom(8), "little") % 2**63)


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the two modules allocate starts as NaN; returns the list of them."""
    return poison_allocations(monkeypatch, linear_ce, linear_logprob)


def inputs(rng, n, C, V, dtype):
    """hidden (n, C) and weight (V, C) leaves, logits of standard deviation about 2 (lse about
    log V + 2: far from 0, as z-loss expects)."""
    h = torch.randn(n, C, generator=rng, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.randn(V, C, generator=rng, device=DEVICE) * 2 / C ** 0.5).to(dtype).requires_grad_()
    return h, w


def leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]


def rel_err(got, ref) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def check(name, got, ref, dtype, seed, tol=None):
    assert got.shape == ref.shape, f"{name}: shape {got.shape} vs {ref.shape}"
    assert torch.isfinite(got).all(), f"{name}: {(~torch.isfinite(got)).sum()} elements unwritten or not finite (seed {seed})"
    err, tol = rel_err(got, ref), tol or TOL[dtype]
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.1e} ({dtype}, seed {seed})"


def check_all(what, got, grads, ref, ref_grads, full, full_grads, dtype, seed):
    """The kernel against its PyTorch reference (TOL), then against float64: within TOL, or within
    twice the reference's own distance from float64 where that is larger (at V = 151936 a float32
    computation of the gradient is ~1e-5 from float64 whoever does it)."""
    for name, a, r, f in ((what, got, ref, full), ("grad hidden", grads[0], ref_grads[0], full_grads[0]),
                          ("grad weight", grads[1], ref_grads[1], full_grads[1])):
        check(f"{name} vs reference", a, r, dtype, seed)
        check(f"{name} vs float64", a, f, dtype, seed, max(TOL[dtype], 2 * rel_err(r, f)))


def logprob_float64(h, w, y):
    return (h @ w.T).log_softmax(-1).gather(1, y[:, None]).squeeze(1)


def ce_float64(h, w, y, ignore_index, z_loss, smoothing):
    logits = h @ w.T
    loss = F.cross_entropy(logits, y, ignore_index=ignore_index, label_smoothing=smoothing, reduction="sum")
    return loss + z_loss * (logits.logsumexp(-1)[y != ignore_index] ** 2).sum()


def compare_ce(h, w, y, ignore_index, z_loss, smoothing, dtype, rng, poisoned):
    """Triton vs reference vs float64: the loss, then grads of (loss * s) for a scalar s != 1."""
    s, seed = 0.5 + torch.rand((), generator=rng, device=DEVICE).item(), rng.initial_seed()
    n0 = len(poisoned)
    got = linear_ce.linear_cross_entropy_triton(h, w, y, ignore_index, z_loss, smoothing, CHUNK)
    assert len(poisoned) - n0 == -(-len(y) // CHUNK) + 1  # a loss buffer per chunk, grad hidden
    grads = torch.autograd.grad(got, (h, w), torch.tensor(s, device=DEVICE))
    hr, wr = leaves(h, w)
    ref = linear_ce.linear_cross_entropy_reference(hr, wr, y, ignore_index, z_loss, smoothing, CHUNK)
    ref_grads = torch.autograd.grad(ref, (hr, wr), torch.tensor(s, device=DEVICE))
    h64, w64 = leaves(h, w, dtype=torch.float64)
    full = ce_float64(h64, w64, y, ignore_index, z_loss, smoothing)
    full_grads = torch.autograd.grad(full * s, (h64, w64))
    check_all("loss", got, grads, ref, ref_grads, full, full_grads, dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("z_loss,smoothing,ignore_index", [(0.0, 0.0, -100), (0.05, 0.0, -100), (0.0, 0.1, -100),
                                                           (0.05, 0.1, 5)])
def test_linear_cross_entropy(dtype, z_loss, smoothing, ignore_index, rng, poisoned):
    h, w = inputs(rng, N, 96, 1000, dtype)
    y = torch.randint(0, 1000, (N,), generator=rng, device=DEVICE)
    y[16:32] = ignore_index  # the second chunk has no trained row
    y[[3, 35]] = ignore_index
    compare_ce(h, w, y, ignore_index, z_loss, smoothing, dtype, rng, poisoned)


def test_linear_cross_entropy_real_vocab(rng, poisoned):
    """V = 151936 (Qwen2's), the last label in the final, partial block of the row loop."""
    h, w = inputs(rng, 3, 32, 151936, torch.float32)
    y = torch.tensor([151935, -100, 77777], device=DEVICE)
    compare_ce(h, w, y, -100, 1e-2, 0.1, torch.float32, rng, poisoned)


def compare_logprob(h, w, y, dtype, rng, poisoned):
    seed = rng.initial_seed()
    n0 = len(poisoned)
    got = linear_logprob.linear_logprob_triton(h, w, y, CHUNK)
    chunks = -(-len(y) // CHUNK)
    assert got.dtype == torch.float32 and len(poisoned) - n0 == 2 + 2 * chunks  # logp, lse: whole and per chunk
    upstream = torch.randn(len(y), 2, generator=rng, device=DEVICE)[:, 0]  # strided, as a kernel must take
    grads = torch.autograd.grad(got, (h, w), upstream)
    hr, wr = leaves(h, w)
    ref = linear_logprob.linear_logprob_reference(hr, wr, y, CHUNK)
    ref_grads = torch.autograd.grad(ref, (hr, wr), upstream)
    h64, w64 = leaves(h, w, dtype=torch.float64)
    full = logprob_float64(h64, w64, y)
    full_grads = torch.autograd.grad(full, (h64, w64), upstream.double())
    check_all("log-probs", got, grads, ref, ref_grads, full, full_grads, dtype, seed)


@pytest.mark.parametrize("dtype,C", [(torch.float32, 64), (torch.bfloat16, 96)], ids=["float32", "bf16"])
def test_linear_logprob(dtype, C, rng, poisoned):
    h, w = inputs(rng, N, C, 1000, dtype)
    y = torch.randint(0, 1000, (N,), generator=rng, device=DEVICE)
    y[0], y[1] = 0, 999
    compare_logprob(h, w, y, dtype, rng, poisoned)


def test_linear_logprob_real_vocab(rng, poisoned):
    h, w = inputs(rng, 3, 32, 151936, torch.float32)
    compare_logprob(h, w, torch.tensor([151935, 0, 77777], device=DEVICE), torch.float32, rng, poisoned)


class Ops(TorchDispatchMode):
    """The shapes of every matmul run inside it, and of every output in new memory."""

    def __init__(self):
        super().__init__()
        self.matmuls, self.allocated = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in args if isinstance(t, torch.Tensor)]
        if func.overloadpacket.__name__ in ("mm", "addmm", "addmm_", "bmm", "matmul"):
            self.matmuls.append([tuple(t.shape) for t in tensors])
        if isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in \
                [t.untyped_storage().data_ptr() for t in tensors]:
            self.allocated.append(tuple(out.shape))
        return out


def lm_head_matmuls(ops, V):
    return sum(any(V in s for s in shapes) for shapes in ops.matmuls)


@pytest.mark.parametrize("off", ["no_grad", "inference_mode", "inputs without grad"])
def test_cross_entropy_without_grad_does_no_gradient_work(off, rng):
    V, C = 1000, 64
    h, w = inputs(rng, N, C, V, torch.float32)
    y = torch.randint(0, V, (N,), generator=rng, device=DEVICE)
    chunks = -(-N // CHUNK)
    with Ops() as training:
        with_grad = linear_ce.linear_cross_entropy_triton(h, w, y, chunk_rows=CHUNK)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(off, torch.enable_grad)
    args = (h.detach(), w.detach()) if off == "inputs without grad" else (h, w)
    with context(), Ops() as plain:
        value = linear_ce.linear_cross_entropy_triton(*args, y, chunk_rows=CHUNK)
    assert torch.equal(value, with_grad.detach()), f"value differs (seed {rng.initial_seed()})"
    assert lm_head_matmuls(training, V) == 3 * chunks  # logits, grad hidden, grad weight
    assert lm_head_matmuls(plain, V) == chunks  # the logits only
    assert (V, C) in training.allocated and (N, C) in training.allocated  # the grad buffers
    assert (V, C) not in plain.allocated and (N, C) not in plain.allocated


def test_logprob_without_grad_does_no_backward_work(rng):
    V, C = 1000, 64
    h, w = inputs(rng, N, C, V, torch.float32)
    y = torch.randint(0, V, (N,), generator=rng, device=DEVICE)
    chunks = -(-N // CHUNK)
    with Ops() as training:
        with_grad = linear_logprob.linear_logprob_triton(h, w, y, CHUNK)
        with_grad.sum().backward()  # the gradient of a sum reaches the kernel with stride 0
    with torch.no_grad(), Ops() as plain:
        value = linear_logprob.linear_logprob_triton(h, w, y, CHUNK)
    assert not value.requires_grad and torch.equal(value, with_grad.detach()), f"seed {rng.initial_seed()}"
    assert lm_head_matmuls(training, V) == 4 * chunks  # logits; in backward logits again, grad hidden, grad weight
    assert lm_head_matmuls(plain, V) == chunks
    hr, wr = leaves(h, w)
    linear_logprob.linear_logprob_reference(hr, wr, y, CHUNK).sum().backward()
    check("grad hidden of a sum", h.grad, hr.grad, torch.float32, rng.initial_seed())
    check("grad weight of a sum", w.grad, wr.grad, torch.float32, rng.initial_seed())


def test_float64_is_refused():
    h, w, y = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(5, 4, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="reference"):
        linear_ce.linear_cross_entropy_triton(h, w, y)
    with pytest.raises(ValueError, match="reference"):
        linear_logprob.linear_logprob_triton(h, w, y)


def test_label_smoothing_with_shifted_logits(rng, poisoned):
    """Label smoothing's mean-logit term matters only where a row's logits do not average to ~0:
    give every row its own offset (a shared vector added to every lm_head row), then every row the
    same one (+5: offsets of both signs let a wrong mean's errors cancel in the summed loss)."""
    h, w = inputs(rng, N, 64, 1000, torch.float32)
    with torch.no_grad():
        w += torch.randn(64, generator=rng, device=DEVICE)  # logits of row i shift by h_i . c
    y = torch.randint(0, 1000, (N,), generator=rng, device=DEVICE)
    compare_ce(h, w, y, -100, 0.0, 0.2, torch.float32, rng, poisoned)
    h, w = inputs(rng, N, 64, 1000, torch.float32)
    with torch.no_grad():
        h[:, 0], w[:, 0] = 1.0, 5.0  # a constant feature: every logit of every row 5 higher
    compare_ce(h, w, y, -100, 0.0, 0.2, torch.float32, rng, poisoned)


@pytest.mark.parametrize("what", ["ce", "logprob"])
def test_the_weight_gradient_is_summed_over_chunks_in_float32(what, rng):
    """bf16 inputs in 64 chunks: the weight gradient gathered across chunks in float32 is as close to
    float64 as one chunk's (rounded to bf16 once, at the end); summed in bf16 it was ~2-3x further."""
    n, V = 256, 1000
    h, w = inputs(rng, n, 64, V, torch.bfloat16)
    y = torch.randint(0, V, (n,), generator=rng, device=DEVICE)
    up = torch.randn(n, generator=rng, device=DEVICE)
    h64, w64 = leaves(h, w, dtype=torch.float64)
    if what == "ce":
        fn = lambda h, w, chunk: linear_ce.linear_cross_entropy_reference(h, w, y, -100, 0.0, 0.0, chunk)  # noqa: E731
        want = torch.autograd.grad(ce_float64(h64, w64, y, -100, 0.0, 0.0), w64)[0]
    else:
        fn = lambda h, w, chunk: (linear_logprob.linear_logprob_reference(h, w, y, chunk) * up).sum()  # noqa: E731
        want = torch.autograd.grad((logprob_float64(h64, w64, y) * up).sum(), w64)[0]
    err = {chunk: rel_err(torch.autograd.grad(fn(h, w, chunk), w)[0], want) for chunk in (n, 4)}
    assert err[4] <= 1.5 * err[n], f"{what}: {err[4]:.2e} in 64 chunks, {err[n]:.2e} in one (seed {rng.initial_seed()})"


PATHS = {"ce": (linear_ce.linear_cross_entropy_triton, linear_ce.linear_cross_entropy_reference),
         "logprob": (linear_logprob.linear_logprob_triton, linear_logprob.linear_logprob_reference)}


@pytest.mark.parametrize("fn", [f for pair in PATHS.values() for f in pair], ids=lambda f: f.__name__)
def test_labels_out_of_range_are_refused(fn):
    """Both paths: torch's indexing counted -1 from the end (the reference trained class V-1)."""
    h, w = torch.randn(3, 8, device=DEVICE), torch.randn(50, 8, device=DEVICE)
    for bad in ([0, 50, 1], [0, -1, 1]):  # -1: a common "ignore" that is not this call's ignore_index
        y = torch.tensor(bad, device=DEVICE)
        with pytest.raises(IndexError, match=r"\[0, 50\)"):
            fn(h, w, y)


@pytest.mark.parametrize("fn", [f for pair in PATHS.values() for f in pair], ids=lambda f: f.__name__)
def test_shapes_and_chunk_rows_are_checked(fn):
    """A kernel reads one label per row: 4 labels for 6 rows read past the labels (a segfault in the
    interpreter), 8 dropped two; chunk_rows -1 ran no chunk (a loss of 0, gradients never written)."""
    h, w = torch.randn(6, 8, device=DEVICE, requires_grad=True), torch.randn(40, 8, device=DEVICE)
    for n in (4, 8):
        with pytest.raises(ValueError, match=r"do not fit \(N, C\), \(V, C\), \(N,\)"):
            fn(h, w, torch.zeros(n, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="do not fit"):
        fn(h, torch.randn(40, 7, device=DEVICE), torch.zeros(6, dtype=torch.long, device=DEVICE))
    for chunk in (0, -1):
        with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
            fn(h, w, torch.zeros(6, dtype=torch.long, device=DEVICE), chunk_rows=chunk)


@pytest.mark.parametrize("fn", [f for pair in PATHS.values() for f in pair], ids=lambda f: f.__name__)
def test_second_order_gradients_are_an_error(fn):
    """The backward is kernels or gradients made in the forward: a graph for a second backward
    (create_graph=True) would silently lack its second-order terms (its gradient had no graph), so it
    is refused."""
    h, w = torch.randn(3, 8, device=DEVICE, requires_grad=True), torch.randn(40, 8, device=DEVICE)
    loss = fn(h, w, torch.tensor([1, 2, 3], device=DEVICE)).sum()
    with pytest.raises(RuntimeError, match="no second-order gradients"):
        torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("fn", PATHS["ce"], ids=lambda f: f.__name__)
def test_an_ignored_row_that_is_not_finite_stays_out(fn):
    """As F.cross_entropy: an ignored row's inf hidden state changes neither the loss nor the other
    rows' gradients (the reference multiplied by the mask: NaN * 0 = NaN)."""
    h, w = torch.randn(4, 8, device=DEVICE), torch.randn(37, 8, device=DEVICE)
    h[2] = float("inf")
    h.requires_grad_()
    y = torch.tensor([1, 2, -100, 3], device=DEVICE)
    loss = fn(h, w, y)
    loss.backward()
    keep = torch.tensor([0, 1, 3], device=DEVICE)
    hr = h.detach()[keep].double().requires_grad_()
    ref = F.cross_entropy(hr @ w.double().T, y[keep], reduction="sum")
    ref.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    assert torch.equal(h.grad[2], torch.zeros(8, device=DEVICE))
    assert rel_err(h.grad[keep], hr.grad) <= 1e-5


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_logprob_backward_outside_autocast(impl, rng):
    """The usual AMP pattern: forward under bf16 autocast, backward after leaving it. Backward must
    recompute the logits in bf16 as the forward did (else they disagree with the saved lse and the
    softmax no longer sums to 1): equal to eager autocast through full logits."""
    dev = DEVICE if DEVICE == "cuda" else "cpu"
    h, w = inputs(rng, N, 64, 1000, torch.float32)
    with torch.no_grad():
        w *= 4  # logits of standard deviation ~8: recomputed in float32 instead, the softmax moves by more than bf16's TOL
    y = torch.randint(0, 1000, (N,), generator=rng, device=DEVICE)
    up = torch.randn(N, generator=rng, device=DEVICE)
    fn = getattr(linear_logprob, f"linear_logprob_{impl}")
    grads = {}
    for name, f in (("eager", lambda: (h @ w.T).float().log_softmax(-1).gather(1, y[:, None]).squeeze(1)),
                    (impl, lambda: fn(h, w, y, CHUNK))):
        with torch.autocast(dev, dtype=torch.bfloat16):
            out = f()
        grads[name] = torch.autograd.grad(out, (h, w), up)
    for i, what in enumerate(("hidden", "weight")):
        check(f"grad {what} ({impl}) vs eager autocast", grads[impl][i], grads["eager"][i], torch.bfloat16,
              rng.initial_seed())


@pytest.mark.parametrize("fn", [linear_ce.linear_cross_entropy_triton, linear_ce.linear_cross_entropy_reference])
def test_cross_entropy_scales_its_gradients_by_each_backward(fn, rng):
    """The gradients are made in the forward and scaled by backward's incoming gradient (not 1
    here); a second backward through the same graph (retain_graph, gradcheck) scales them afresh."""
    V, C = 300, 32
    h, w = inputs(rng, N, C, V, torch.float32)
    y = torch.randint(0, V, (N,), generator=rng, device=DEVICE)
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = 0.25 * fn(h, w, y, chunk_rows=CHUNK)
    loss.backward(retain_graph=True)
    (0.25 * torch.nn.functional.cross_entropy(hr @ wr.T, y, reduction="sum")).backward()
    for name, got, ref in (("hidden", h.grad, hr.grad), ("weight", w.grad, wr.grad)):
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err <= 1e-5, f"grad {name}: relative error {err:.2e} (seed {rng.initial_seed()})"
    first = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss.backward()
    assert torch.equal(h.grad, first[0]) and torch.equal(w.grad, first[1])
