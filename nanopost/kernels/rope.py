"""Rotate-half RoPE on q (B, H, T, D) and k (B, K, T, D) with cos, sin (B, T, D): every row b
has its own angles, so packed sequences and KV-cache offsets need nothing special.
out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) of the two halves of D.
The pitfall: q and k arrive as non-contiguous views (q_proj(x).view(B, T, H, D).transpose(1, 2)), so
the kernel addresses them through their strides, and writes its outputs in that same layout
((B, T, H, D) storage seen as (B, H, T, D)), the one the projections' backward wants back.
Why a kernel: eager PyTorch builds rotate_half and two products as new (B, H, T, D) tensors and
saves cos and sin per use; here one launch reads q and k once and writes them rotated once, float32
inside. Backward applies the inverse rotation (sin negated), also one launch, one read, one write.
Out of place on purpose: rotating a view in place makes autograd wrap the projection's output in
CopySlices, which clones the whole gradient in backward (it measured 4x slower on an H200)."""
import torch

from nanopost.kernels._triton import first_order, tl, triton

_empty = torch.empty  # tests swap in a NaN-filled allocator, so an element never written fails


def rope_reference(q_BHTD, k_BKTD, cos_BTD, sin_BTD):
    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos_BTD[:, None] + torch.cat((-x2, x1), dim=-1) * sin_BTD[:, None]
    return rotate(q_BHTD), rotate(k_BKTD)


@triton.jit
def _rotate_heads(x_ptr, o_ptr, n_heads, sx_h, sx_d, so_h, so_d, c1, c2, s1, s2,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """All heads of one (row, position): x1' = x1 c - x2 s, x2' = x2 c + x1 s."""
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < n_heads) & (d < HALF)
    xp = x_ptr + h * sx_h + d * sx_d
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF * sx_d, mask=mask, other=0.0).to(tl.float32)
    op = o_ptr + h * so_h + d * so_d
    tl.store(op, x1 * c1 - x2 * s1, mask=mask)
    tl.store(op + HALF * so_d, x2 * c2 + x1 * s2, mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, T, n_q, n_k, sign,
                 sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sqo_b, sqo_h, sqo_t, sqo_d,
                 sko_b, sko_h, sko_t, sko_d, sc_b, sc_t, sc_d,
                 HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)  # one (row, position): q's and k's heads, angles loaded once
    b = bt // T
    t = bt % T
    d = tl.arange(0, BLOCK_HALF)[None, :]
    cs = b * sc_b + t * sc_t + d * sc_d  # sc_b is 0 for angles shared by every row
    c1 = tl.load(cos_ptr + cs, mask=d < HALF, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + HALF * sc_d, mask=d < HALF, other=0.0).to(tl.float32)
    s1 = sign * tl.load(sin_ptr + cs, mask=d < HALF, other=0.0).to(tl.float32)
    s2 = sign * tl.load(sin_ptr + cs + HALF * sc_d, mask=d < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + b * sq_b + t * sq_t, qo_ptr + b * sqo_b + t * sqo_t, n_q, sq_h, sq_d, sqo_h, sqo_d,
                  c1, c2, s1, s2, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + b * sk_b + t * sk_t, ko_ptr + b * sko_b + t * sko_t, n_k, sk_h, sk_d, sko_h, sko_d,
                  c1, c2, s1, s2, HALF, BLOCK_HK, BLOCK_HALF)


def _like_projection(x):
    """An empty (B, H, T, D) tensor stored as (B, T, H, D): the layout q_proj(x).view().transpose() has."""
    B, H, T, D = x.shape
    return _empty((B, T, H, D), dtype=x.dtype, device=x.device).transpose(1, 2)


def _rotate(q, k, cos, sin, sign: float):
    qo, ko = _like_projection(q), _like_projection(k)
    B, H, T, D = q.shape
    _rope_kernel[(B * T,)](q, k, qo, ko, cos, sin, T, H, k.shape[1], sign, *q.stride(), *k.stride(),
                           *qo.stride(), *ko.stride(), *cos.stride(), HALF=D // 2,
                           BLOCK_HQ=triton.next_power_of_2(H), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
                           BLOCK_HALF=triton.next_power_of_2(D // 2))
    return qo, ko


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, 1.0)

    @staticmethod
    @first_order
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # the inverse of a rotation is its transpose: sin negated (cos, sin have duplicated halves)
        dq, dk = _rotate(dq, dk, cos, sin, -1.0)
        return dq, dk, None, None


def rope_triton(q_BHTD, k_BKTD, cos_BTD, sin_BTD):
    """-> rotated (q, k), new tensors; q and k are left as they were. cos and sin must have
    duplicated halves (cos[..., :D/2] == cos[..., D/2:], as model.rope_cos_sin builds them): the
    backward's inverse rotation (sin negated) is exact only then. The results keep q's and k's dtypes
    (the reference promotes with cos's: float32 for bf16 q under autocast, which attention then casts
    back to bf16, so the values attention sees are the same)."""
    B, _, T, D = q_BHTD.shape
    if D % 2 or k_BKTD.shape[0] != B or k_BKTD.shape[2:] != (T, D) or cos_BTD.shape[-2:] != (T, D) \
            or cos_BTD.shape != sin_BTD.shape:
        raise ValueError(f"rope: q {tuple(q_BHTD.shape)}, k {tuple(k_BKTD.shape)}, cos {tuple(cos_BTD.shape)}, "
                         f"sin {tuple(sin_BTD.shape)} do not fit (B, H, T, D), (B, K, T, D), (B, T, D) with D even")
    cos, sin = (c.expand(B, T, D) for c in (cos_BTD, sin_BTD))  # a view: stride 0 where shared
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return _RoPE.apply(q_BHTD, k_BKTD, cos, sin)
