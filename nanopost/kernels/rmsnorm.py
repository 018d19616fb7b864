"""RMSNorm as Qwen2 computes it: y = weight * (x in float32 * rsqrt(mean(x²) + eps), cast back to
x's dtype). The pitfall is the order: the normalized value is rounded to x's dtype *before* the
weight multiply, in the forward and so in grad_weight (grad_out * that rounded value).
Why a kernel: eager PyTorch writes the float32 copy, its square, the normalized tensor and the
cast as separate (rows, C) tensors and saves some for backward; here one pass reads x once and
saves one float32 rstd per row. grad_weight sums float32 partials over fixed blocks of rows,
then torch .sum(0): no atomics, so two backward passes give bit-identical gradients.
out_dtype (kernels.rms_norm passes autocast's dtype for a float32 x under autocast): the result is
written in that dtype, rounded once from float32 -- exactly what the next matmul would read after
autocast's own cast, without a float32 copy written and read back; its gradient arrives in that
dtype and is read as float32."""
import torch

from nanopost.kernels._triton import first_order, tl, triton

_empty = torch.empty  # tests swap in a NaN-filled allocator, so an element never written fails


def rms_norm_reference(x, weight, eps: float, out_dtype=None):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * xf.to(x.dtype)
    return y if out_dtype is None else y.to(out_dtype)


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, C, eps, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (row * C passes 2**31 at 2.4M rows of 896)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    xn = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # cast back before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * C + cols, w * xn, mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, n_rows, C, rows_per_program,
                BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    for row in range(row_start, tl.minimum(row_start + rows_per_program, n_rows)):
        x = tl.load(x_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * C + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xn = x * rstd
        dw += dy * xn.to(x_ptr.dtype.element_ty).to(tl.float32)  # the rounded value the weight saw
        g = dy * w  # the cast back is the identity for gradients
        dx = rstd * (g - xn * (tl.sum(g * xn, axis=0) / C))
        tl.store(dx_ptr + row * C + cols, dx, mask=mask)
    tl.store(dw_part_ptr + pid * C + cols, dw, mask=mask)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        C = x.shape[-1]
        x2, weight = x.contiguous().view(-1, C), weight.contiguous()  # the kernels read both as unit-stride
        y = _empty(x2.shape, dtype=out_dtype or torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = _empty(x2.shape[0], dtype=torch.float32, device=x.device)
        _fwd_kernel[(x2.shape[0],)](x2, weight, y, rstd, C, eps, BLOCK_C=triton.next_power_of_2(C))
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    @first_order
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, C = x2.shape
        dy2 = dy.contiguous().view(-1, C)
        # a fixed partition of rows (given the device): each program owns one float32 partial row
        n_sm = torch.cuda.get_device_properties(x2.device).multi_processor_count if x2.is_cuda else 4
        rows_per_program = max(1, triton.cdiv(n_rows, 4 * n_sm))
        n_programs = triton.cdiv(n_rows, rows_per_program)
        dx = _empty(x2.shape, dtype=x2.dtype, device=x2.device)
        dw_part = _empty((n_programs, C), dtype=torch.float32, device=x2.device)
        _bwd_kernel[(n_programs,)](dy2, x2, weight, rstd, dx, dw_part, n_rows, C, rows_per_program,
                                   BLOCK_C=triton.next_power_of_2(C))
        return dx.view(dy.shape), dw_part.sum(0).to(weight.dtype), None, None


def rms_norm_triton(x, weight, eps: float, out_dtype=None):
    if weight.shape != x.shape[-1:]:  # the kernels read C weights whatever the tensor holds
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} for x {tuple(x.shape)}: expected ({x.shape[-1]},)")
    return _RMSNorm.apply(x, weight, eps, out_dtype)
