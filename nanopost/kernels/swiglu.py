"""SwiGLU, the Qwen2 MLP's activation: silu(gate) * up, silu(g) = g * sigmoid(g).
Why a kernel: eager autograd keeps silu(gate) alive until backward, one more (B, T, 4864)
tensor per layer beside gate and up, and each op is its own pass over memory. Here the forward
saves only its inputs and backward recomputes s = sigmoid(gate), a few flops per element read.
The pitfall is silu's derivative: s * (1 + g * (1 - s)), not sigmoid's s * (1 - s), so
d gate = dy * up * s * (1 + g * (1 - s)) and d up = dy * g * s. Float32 inside (as PyTorch's
silu does for bf16), stored in the input dtype."""
import torch

from nanopost.kernels._triton import tl, triton

_empty = torch.empty  # tests swap in a NaN-filled allocator, so an element never written fails
BLOCK = 1024


def swiglu_reference(gate, up):
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _fwd_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    tl.store(y_ptr + offs, g * s * u, mask=mask)


@triton.jit
def _bwd_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))  # recomputed: the forward stored no activation
    tl.store(dg_ptr + offs, dy * u * s * (1.0 + g * (1.0 - s)), mask=mask)
    tl.store(du_ptr + offs, dy * g * s, mask=mask)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype}"
                             " differ")
        gate, up = gate.contiguous(), up.contiguous()
        y = _empty(gate.shape, dtype=gate.dtype, device=gate.device)
        _fwd_kernel[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, y, gate.numel(), BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = (_empty(gate.shape, dtype=gate.dtype, device=gate.device) for _ in range(2))
        _bwd_kernel[(triton.cdiv(gate.numel(), BLOCK),)](dy, gate, up, dg, du, gate.numel(), BLOCK=BLOCK)
        return dg, du


def swiglu_triton(gate, up):
    return _SwiGLU.apply(gate, up)
