"""Triton RMSNorm, RoPE and SwiGLU against their PyTorch references, forward and backward.
Fresh random inputs every run (the seed is in every failure message), shapes that are not powers
of two, and every buffer a kernel writes into starts as NaN, so an element it never writes
fails. On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1).
Tolerance is ‖got − ref‖ / ‖ref‖: 1e-5 in float32; 1e-2 in bf16, where the reference is run in bf16
on the same inputs (what the CPU path computes and the kernel replaces): the kernel rounds once, the
reference after every op, each rounding off by up to 2^-8 relative (bf16 keeps 8 significant bits)."""
import os

import pytest
import torch
from conftest import poison_allocations

pytest.importorskip("triton")
from nanopost.kernels import rmsnorm, rope, swiglu
from nanopost.model import rope_cos_sin

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture
def randn():
    """randn(*shape, dtype=...) from a generator seeded from os.urandom; randn.seed to report."""
    seed = int.from_bytes(os.urandom(8), "little") % 2**63
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def draw(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    draw.gen, draw.seed = gen, seed
    return draw


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernel modules allocate starts as NaN; returns the list of them."""
    return poison_allocations(monkeypatch, rmsnorm, rope, swiglu)


def check(name, got, ref, dtype, seed):
    assert (got.shape, got.dtype) == (ref.shape, ref.dtype), f"{name}: {got.shape} {got.dtype}, want {ref.shape} {ref.dtype}"
    bad = (~torch.isfinite(got)).sum().item()
    assert bad == 0, f"{name}: {bad} elements unwritten (still NaN) or not finite (seed {seed})"
    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err <= TOL[dtype], f"{name}: relative error {err:.2e} > {TOL[dtype]:.0e} ({dtype}, seed {seed})"


@pytest.mark.parametrize("shape,dtype,w_dtype", [((37, 64), torch.float32, torch.float32),
                                                 ((37, 64), torch.bfloat16, torch.bfloat16),
                                                 ((37, 64), torch.bfloat16, torch.float32),  # float32 weights
                                                 ((3, 13, 896), torch.float32, torch.float32),
                                                 ((3, 13, 896), torch.bfloat16, torch.bfloat16)])
def test_rms_norm(shape, dtype, w_dtype, randn, poisoned):
    C = shape[-1]
    # a non-contiguous x (every row padded by 3) and weight (every other element), as the wrapper must accept
    x = randn(*shape[:-1], C + 3, dtype=dtype)[..., :C].requires_grad_()
    w = (1 + 0.5 * randn(2 * C)).to(w_dtype)[::2].requires_grad_()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y, yr = rmsnorm.rms_norm_triton(x, w, 1e-6), rmsnorm.rms_norm_reference(xr, wr, 1e-6)
    check("rms_norm y", y, yr, dtype, randn.seed)
    # rounded to bf16 before the weight, as the reference does: then y has the reference's bits. Only
    # compiled: Triton's CPU interpreter truncates float32 -> bf16 casts (the GPU rounds to nearest even)
    if dtype == torch.bfloat16 and DEVICE == "cuda":
        same = (y == yr).float().mean().item()
        assert same > 0.99, f"rms_norm y: only {same:.1%} bit-identical to the reference (seed {randn.seed})"
    dy = randn(*shape, dtype=yr.dtype)
    y.backward(dy)
    yr.backward(dy)
    check("rms_norm grad x", x.grad, xr.grad, dtype, randn.seed)
    check("rms_norm grad weight", w.grad, wr.grad, dtype, randn.seed)
    assert len(poisoned) == 4  # y, rstd, grad x, grad weight partials: all came from the poisoned allocator
    # grad weight is reduced over fixed blocks of rows, without atomics: a second run is bit-identical
    first, w.grad = w.grad, None
    rmsnorm.rms_norm_triton(x, w, 1e-6).backward(dy)
    assert torch.equal(first, w.grad), f"rms_norm grad weight differs between two runs (seed {randn.seed})"


def test_rms_norm_under_autocast_writes_what_the_next_matmul_reads(randn, poisoned):
    """Under autocast a float32 x gives bf16 out: float32 math rounded once, the value the next
    matmul would read after autocast's own cast of a float32 result; the bf16 gradient that comes
    back is read as float32 (x's gradient stays float32)."""
    x = randn(37, 896).requires_grad_()
    w = (1 + 0.5 * randn(896)).requires_grad_()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = rmsnorm.rms_norm_triton(x, w, 1e-6, torch.bfloat16)
    yr = rmsnorm.rms_norm_reference(xr, wr, 1e-6).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    check("rms_norm y (bf16 out)", y, yr, torch.bfloat16, randn.seed)
    dy = randn(37, 896, dtype=torch.bfloat16)
    y.backward(dy)
    yr.backward(dy)
    check("rms_norm grad x (bf16 out)", x.grad, xr.grad, torch.float32, randn.seed)
    check("rms_norm grad weight (bf16 out)", w.grad, wr.grad, torch.float32, randn.seed)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # the dispatcher picks autocast's dtype
        from nanopost import kernels
        assert kernels.rms_norm(x, w, 1e-6).dtype == torch.bfloat16
    assert kernels.rms_norm(x, w, 1e-6).dtype == torch.float32


def _views(store, pad, D):
    """(B, heads, T, D) view of a (B, T, heads, D + 2 pad) storage, strided like the model's q and k."""
    return store[..., pad:pad + D].transpose(1, 2)


# D=48: halves of 24 in blocks of 32, so the masks matter
@pytest.mark.parametrize("dtype,D", [(torch.float32, 64), (torch.bfloat16, 64), (torch.float32, 48)])
def test_rope(dtype, D, randn, poisoned):
    B, T, H, K, pad = 3, 13, 14, 2, 4
    # each row its own positions, and the last row packs a second sequence with another offset;
    # all positions >= 1, so no element is rotated by the identity and an unwritten one shows
    start = torch.randint(1, 4096, (B, 2), generator=randn.gen, device=DEVICE)
    pos = start[:, :1] + torch.arange(T, device=DEVICE)
    pos[-1, 7:] = start[-1, 1] + torch.arange(T - 7, device=DEVICE)
    cos, sin = (c.reshape(B, T, D) for c in rope_cos_sin(pos, D, 1e6, dtype))  # the model's angles, no head axis
    leaves = [randn(B, T, n, D + 2 * pad, dtype=dtype).requires_grad_() for n in (H, K)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    stores = [t.clone() for t in leaves]  # non-leaf storage, read through padded views
    before = [s.detach().clone() for s in stores]
    q, k = rope.rope_triton(_views(stores[0], pad, D), _views(stores[1], pad, D), cos, sin)
    qr, kr = rope.rope_reference(_views(ref_leaves[0], pad, D), _views(ref_leaves[1], pad, D), cos, sin)
    for name, got, ref, store, old, n in zip("qk", (q, k), (qr, kr), stores, before, (H, K)):
        check(f"rope {name}", got, ref, dtype, randn.seed)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(store.detach().view(bits), old.view(bits)), f"rope {name}: its input changed (seed {randn.seed})"
        # the projections' layout, (B, T, n, D) storage: their backward takes the gradient without a copy
        assert got.transpose(1, 2).is_contiguous(), f"rope {name}: output strides {got.stride()}"
    dq, dk = randn(B, H, T, D, dtype=dtype), randn(B, K, T, D, dtype=dtype)
    ((q.float() * dq).sum() + (k.float() * dk).sum()).backward()
    ((qr.float() * dq).sum() + (kr.float() * dk).sum()).backward()
    for name, leaf, ref_leaf in zip(("q", "k"), leaves, ref_leaves):
        check(f"rope grad {name}", leaf.grad, ref_leaf.grad, dtype, randn.seed)
    assert len(poisoned) == 4  # q, k out; grad q, grad k: the incoming gradient is not ours to overwrite


def test_rope_with_cos_and_sin_laid_out_apart(randn, poisoned):
    """The kernel reads cos and sin through one set of strides: cos shared by every row (expanded
    from one row, stride 0) beside a sin of its own per row is made alike first."""
    B, T, H, K, D = 3, 5, 4, 2, 16
    pos = torch.arange(1, T + 1, device=DEVICE) + 7 * torch.arange(B, device=DEVICE)[:, None]  # each row its own
    cos, sin = (c.reshape(B, T, D) for c in rope_cos_sin(pos, D, 1e4, torch.float32))
    q, k = randn(B, H, T, D), randn(B, K, T, D)
    for c, s in ((cos[:1].expand(B, T, D), sin), (cos, sin[:1].expand(B, T, D))):
        got = rope.rope_triton(q, k, c, s)
        ref = rope.rope_reference(q, k, c, s)
        for name, a, r in zip("qk", got, ref):
            check(f"rope {name}", a, r, torch.float32, randn.seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu(dtype, randn, poisoned):
    N, F = 37, 301  # 11137 elements: 11 blocks of 1024, the last one partial
    gate = (3 * randn(N, F + 5, dtype=dtype))[:, :F].requires_grad_()  # non-contiguous; tails of silu
    up = randn(N, F, dtype=dtype).requires_grad_()
    gr, ur = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    y, yr = swiglu.swiglu_triton(gate, up), swiglu.swiglu_reference(gr, ur)
    check("swiglu y", y, yr, dtype, randn.seed)
    dy = randn(N, F, dtype=dtype)
    y.backward(dy)
    yr.backward(dy)
    check("swiglu grad gate", gate.grad, gr.grad, dtype, randn.seed)
    check("swiglu grad up", up.grad, ur.grad, dtype, randn.seed)
    assert len(poisoned) == 2  # y; grad gate and grad up, the two halves of one buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_on_the_halves_of_one_matmul_output(dtype, randn, poisoned):
    """The fused gate/up projection's output (B, T, 2F), gate its left half: read in place (here
    through rows padded by 3, as a slice of a wider output would be), and its gradient one
    (B, T, 2F) tensor."""
    B, T, F = 3, 7, 301
    gu = (2 * randn(B, T, 2 * F + 3, dtype=dtype))[..., :2 * F].requires_grad_()
    ref = gu.detach().clone().requires_grad_()
    y, yr = swiglu.swiglu_halves_triton(gu), swiglu.swiglu_halves_reference(ref)
    check("swiglu halves y", y, yr, dtype, randn.seed)
    dy = randn(B, T, F, dtype=dtype)
    y.backward(dy)
    yr.backward(dy)
    check("swiglu halves grad", gu.grad, ref.grad, dtype, randn.seed)
    assert len(poisoned) == 2  # y, grad
    with pytest.raises(ValueError, match="odd"):
        swiglu.swiglu_halves_triton(gu[..., 1:])


def test_rms_norm_rounds_before_the_weight(randn, poisoned):
    """Qwen2 rounds the normalised x to x's dtype before the weight multiply, in y and so in
    grad weight. float16 x with float32 weights makes that rounding visible at float32 precision
    (the interpreter rounds float32 -> float16 to nearest, unlike its bf16 casts)."""
    x = randn(37, 64, dtype=torch.float16).requires_grad_()
    w = (1 + 0.5 * randn(64)).requires_grad_()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y, yr = rmsnorm.rms_norm_triton(x, w, 1e-6), rmsnorm.rms_norm_reference(xr, wr, 1e-6)
    dy = randn(37, 64)
    y.backward(dy)
    yr.backward(dy)
    # the float32 rstd may differ in its last bit from torch's, which flips the float16 rounding of a
    # rare element by one ulp (~1.2e-5 relative each; worst of 300 seeds 4.2e-5); skipping the rounding
    # moves every element (1.8e-4 to 2.2e-4)
    for name, got, ref in (("y", y, yr), ("grad weight", w.grad, wr.grad)):
        err = ((got - ref).norm() / ref.norm()).item()
        assert err <= 8e-5, f"rms_norm {name} (float16 x, float32 weight): relative error {err:.2e} (seed {randn.seed})"


def test_rope_leaves_q_and_k_alone(randn):
    """q and k are read, never written: a graph that saved them unrotated still backpropagates, and
    angles shared by every row (a (1, T, D) view expanded, stride 0) give the per-row result."""
    B, T, H, D = 2, 5, 4, 16
    pos = torch.arange(1, T + 1, device=DEVICE)[None]
    cos, sin = rope_cos_sin(pos, D, 1e6, torch.float32)  # (1, T, D): broadcast over rows
    leaf = randn(B, H, T, D).requires_grad_()
    ref_leaf = leaf.detach().clone().requires_grad_()
    outs = []
    for x, fn in ((leaf, rope.rope_triton), (ref_leaf, rope.rope_reference)):
        q, k = x * 1, x[:, :1] * 1
        saved = (q * q).sum()  # mul saves q as it is now
        qr, kr = fn(q, k, cos.expand(B, T, D), sin.expand(B, T, D))
        (saved + (qr * qr.detach()).sum() + kr.sum()).backward()
        outs.append((qr, kr))
    check("rope q, shared angles", outs[0][0], outs[1][0], torch.float32, randn.seed)
    check("rope k, shared angles", outs[0][1], outs[1][1], torch.float32, randn.seed)
    check("rope grad through a saved q", leaf.grad, ref_leaf.grad, torch.float32, randn.seed)


def test_rms_norm_weight_shape_is_checked(randn):
    """The kernels read C weights whatever the tensor holds: 16 used its first 8, 4 read past its end."""
    x = randn(3, 8)
    for w in (randn(16), randn(4), randn(1, 8)):
        with pytest.raises(ValueError, match=r"expected \(8,\)"):
            rmsnorm.rms_norm_triton(x, w, 1e-6)


@pytest.mark.parametrize("op", ["rms_norm", "rope", "swiglu", "swiglu_halves"])
def test_second_order_gradients_are_an_error(op, randn):
    """Each backward is a kernel: a graph for a second backward (create_graph=True) would lack the
    second-order terms (the references keep them), so it is refused rather than silently wrong."""
    x = randn(3, 2, 5, 8).requires_grad_()
    if op == "rms_norm":
        out = rmsnorm.rms_norm_triton(x, randn(8), 1e-6)
    elif op == "rope":
        cos, sin = rope_cos_sin(torch.arange(5, device=DEVICE)[None], 8, 1e4, torch.float32)
        out = rope.rope_triton(x, randn(3, 1, 5, 8), cos, sin)[0]
    elif op == "swiglu":
        out = swiglu.swiglu_triton(x, randn(3, 2, 5, 8))
    else:
        out = swiglu.swiglu_halves_triton(x)
    with pytest.raises(RuntimeError, match="no second-order gradients"):
        torch.autograd.grad((out * randn(*out.shape)).sum(), x, create_graph=True)
