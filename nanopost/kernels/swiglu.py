"""SwiGLU, the Qwen2 MLP's activation: silu(gate) * up, silu(g) = g * sigmoid(g).
Why a kernel: eager autograd keeps silu(gate) alive until backward, one more (B, T, 4864)
tensor per layer beside gate and up, and each op is its own pass over memory. Here the forward
saves only its inputs and backward recomputes s = sigmoid(gate), a few flops per element read.
The pitfall is silu's derivative: s * (1 + g * (1 - s)), not sigmoid's s * (1 - s), so
d gate = dy * up * s * (1 + g * (1 - s)) and d up = dy * g * s. Float32 inside (as PyTorch's
silu does for bf16), stored in the input dtype."""
import torch

from nanopost.kernels._triton import first_order, tl, triton

_empty = torch.empty  # tests swap in a NaN-filled allocator, so an element never written fails
BLOCK = 1024


def swiglu_reference(gate, up):
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _fwd_kernel(g_ptr, u_ptr, y_ptr, n, F, sg, su, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row, col = offs // F, offs % F  # gate and up may be column halves of one (N, 2F) matmul output
    g = tl.load(g_ptr + row * sg + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + col, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(y_ptr + offs, g * s * u, mask=mask)


@triton.jit
def _bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, F, sg, su, sd, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row, col = offs // F, offs % F
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * sg + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + col, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))  # recomputed: the forward stored no activation
    tl.store(dg_ptr + row * sd + col, dy * u * s * (1.0 + g * (1.0 - s)), mask=mask)
    tl.store(du_ptr + row * sd + col, dy * g * s, mask=mask)


def _rows(x):
    """x as (rows, F) with unit column stride, without a copy where it already is (a column
    slice of a wider matmul output keeps its row stride)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _forward(g2, u2):
    y = _empty(g2.shape, dtype=g2.dtype, device=g2.device)
    _fwd_kernel[(triton.cdiv(g2.numel(), BLOCK),)](g2, u2, y, g2.numel(), g2.shape[1], g2.stride(0), u2.stride(0),
                                                    BLOCK=BLOCK)
    return y


def _backward(dy, g2, u2):
    """-> (N, 2F) buffer: d gate in its left half, d up in its right half."""
    N, F = g2.shape
    dgu = _empty((N, 2 * F), dtype=g2.dtype, device=g2.device)
    _bwd_kernel[(triton.cdiv(g2.numel(), BLOCK),)](dy.contiguous(), g2, u2, dgu, dgu[:, F:], g2.numel(), F,
                                                    g2.stride(0), u2.stride(0), 2 * F, BLOCK=BLOCK)
    return dgu


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype}"
                             " differ")
        g2, u2 = _rows(gate), _rows(up)
        ctx.save_for_backward(g2, u2)
        return _forward(g2, u2).view(gate.shape)

    @staticmethod
    @first_order
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        dgu = _backward(dy, g2, u2)
        F = g2.shape[1]
        return dgu[:, :F].view(dy.shape), dgu[:, F:].view(dy.shape)


class _SwiGLUHalves(torch.autograd.Function):
    """gate and up as the two halves of one (..., 2F) tensor (the fused gate/up matmul's output):
    read in place, and their gradient returned as one tensor of that shape -- splitting the
    tensor instead would make autograd concatenate the two gradients back, a copy per layer."""
    @staticmethod
    def forward(ctx, gu):
        gu2 = _rows(gu)
        F = gu2.shape[1] // 2
        ctx.save_for_backward(gu2)
        return _forward(gu2[:, :F], gu2[:, F:]).view(*gu.shape[:-1], F)

    @staticmethod
    @first_order
    def backward(ctx, dy):
        gu2, = ctx.saved_tensors
        F = gu2.shape[1] // 2
        return _backward(dy, gu2[:, :F], gu2[:, F:]).view(*dy.shape[:-1], 2 * F)


def swiglu_triton(gate, up):
    return _SwiGLU.apply(gate, up)


def swiglu_halves_reference(gu):
    gate, up = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def swiglu_halves_triton(gu):
    if gu.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension {gu.shape[-1]} of gate|up is odd")
    return _SwiGLUHalves.apply(gu)
