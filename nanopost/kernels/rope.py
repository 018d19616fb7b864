"""Rotate-half RoPE on q (B, H, T, D) and k (B, K, T, D) with cos, sin (B, T, D): every row b
has its own angles, so packed sequences and KV-cache offsets need nothing special.
out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1) of the two halves of D.
The pitfall: q and k are non-contiguous views (q_proj(x).view(B, T, H, D).transpose(1, 2)), so the
kernel addresses them through their strides and writes only inside the view.
Why a kernel: eager PyTorch builds rotate_half and two products as new (B, H, T, D) tensors and
saves cos and sin per use; here q and k are rotated in place in one read and one write, float32
inside. Backward applies the inverse rotation (sin negated), also one read and one write."""
import torch

from nanopost.kernels._triton import tl, triton

_empty = torch.empty  # tests swap in a NaN-filled allocator, so an element never written fails


def rope_reference(q_BHTD, k_BKTD, cos_BTD, sin_BTD):
    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos_BTD[:, None] + torch.cat((-x2, x1), dim=-1) * sin_BTD[:, None]
    return rotate(q_BHTD), rotate(k_BKTD)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, T, n_heads, sx_b, sx_h, sx_t, sx_d,
                 so_b, so_h, so_t, so_d, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    bt = tl.program_id(0)  # one (row, position): all heads at once, angles loaded once
    b = bt // T
    t = bt % T
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (h < n_heads) & (d < HALF)
    cs = bt * 2 * HALF + d  # cos, sin are contiguous (B, T, D)
    c1 = tl.load(cos_ptr + cs, mask=d < HALF, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + HALF, mask=d < HALF, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs, mask=d < HALF, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + HALF, mask=d < HALF, other=0.0).to(tl.float32)
    xp = x_ptr + b * sx_b + t * sx_t + h * sx_h + d * sx_d
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF * sx_d, mask=mask, other=0.0).to(tl.float32)
    op = out_ptr + b * so_b + t * so_t + h * so_h + d * so_d
    tl.store(op, x1 * c1 - x2 * s1, mask=mask)
    tl.store(op + HALF * so_d, x2 * c2 + x1 * s2, mask=mask)


def _rotate(x, cos, sin, out):
    B, H, T, D = x.shape
    _rope_kernel[(B * T,)](x, cos, sin, out, T, H, *x.stride(), *out.stride(), HALF=D // 2,
                           BLOCK_H=triton.next_power_of_2(H), BLOCK_HALF=triton.next_power_of_2(D // 2))
    return out


class _RoPE(torch.autograd.Function):
    # one tensor per call: autograd refuses a Function that modifies a view in place and returns two
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, x)

    @staticmethod
    def backward(ctx, dx):
        cos, sin = ctx.saved_tensors
        # the inverse of a rotation is its transpose: sin negated (cos, sin have duplicated halves)
        return _rotate(dx, cos, -sin, _empty(dx.shape, dtype=dx.dtype, device=dx.device)), None, None


def rope_triton(q_BHTD, k_BKTD, cos_BTD, sin_BTD):
    """Rotates q and k in place (they must not be needed unrotated afterwards) and returns them.
    cos and sin must have duplicated halves (cos[..., :D/2] == cos[..., D/2:], as model.rope_cos_sin
    builds them): the backward's inverse rotation (sin negated) is exact only then."""
    B, _, T, D = q_BHTD.shape
    if D % 2 or k_BKTD.shape[0] != B or k_BKTD.shape[2:] != (T, D) or cos_BTD.shape[-2:] != (T, D):
        raise ValueError(f"rope: q {tuple(q_BHTD.shape)}, k {tuple(k_BKTD.shape)}, cos {tuple(cos_BTD.shape)}"
                         " do not fit (B, H, T, D), (B, K, T, D), (B, T, D) with D even")
    cos, sin = (c.expand(B, T, D).contiguous() for c in (cos_BTD, sin_BTD))
    return _RoPE.apply(q_BHTD, cos, sin), _RoPE.apply(k_BKTD, cos, sin)
