"""Fused linear log-prob: log softmax(hidden @ weight.T)[label] per row, in float32 (float64 for
float64 inputs), never holding more than chunk_rows rows of logits.

Unlike the SFT loss, the gradient reaching each token differs (it depends on its sequence's
log-prob through the loss), so it cannot be folded into the forward: backward recomputes each
chunk's logits (four lm_head-sized matmuls instead of three). The forward keeps each row's lse
(N floats), so backward reads each recomputed row once:
    d logp / d x = onehot(y) - exp(x - lse)
As in linear_ce.py, the matmuls are torch's in both paths and only the per-chunk steps differ;
the Triton steps keep the logits in hidden's dtype (see there) and do their math in float32."""
import torch

from nanopost.kernels._triton import first_order, tl, triton
from nanopost.kernels.linear_ce import (
    BLOCK_V,
    _logsumexp,
    _mm_operands,
    add_matmul_,
    check_inputs,
)

_empty = torch.empty  # tests swap in a NaN-filled allocator, so an element never written fails


class FusedLinearLogProb(torch.autograd.Function):
    """The chunk loop shared by both paths. steps = (forward(logits, labels) -> (logp, lse),
    backward(logits, labels, grad, lse) -> d logp / d logits * grad in hidden's dtype)."""

    @staticmethod
    def forward(ctx, hidden_NC, weight_VC, labels_N, chunk_rows, steps):
        acc = torch.promote_types(hidden_NC.dtype, torch.float32)
        hidden, w = _mm_operands(hidden_NC, weight_VC)
        logp = _empty(hidden_NC.shape[0], dtype=acc, device=hidden_NC.device)
        lse = _empty(hidden_NC.shape[0], dtype=acc, device=hidden_NC.device)
        with torch.autocast(hidden_NC.device.type, enabled=False):  # the operands are cast already
            for a in range(0, hidden_NC.shape[0], chunk_rows):
                logits = hidden[a:a + chunk_rows] @ w.T
                logp[a:a + chunk_rows], lse[a:a + chunk_rows] = steps[0](logits, labels_N[a:a + chunk_rows])
        ctx.save_for_backward(hidden_NC, weight_VC, labels_N, lse)
        ctx.chunk_rows, ctx.steps = chunk_rows, steps
        # backward must recompute the logits in the dtype the forward used (bf16 under autocast), else
        # they do not match the saved lse; autocast is often off by then (backward outside its block)
        ctx.mm_dtype = w.dtype
        return logp

    @staticmethod
    @first_order
    def backward(ctx, grad_N):
        hidden_NC, weight_VC, labels_N, lse = ctx.saved_tensors
        acc, w, n = lse.dtype, weight_VC.to(ctx.mm_dtype), ctx.chunk_rows
        grad_h = _empty(hidden_NC.shape, dtype=hidden_NC.dtype, device=hidden_NC.device) \
            if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden_NC.device.type, enabled=False):
            for a in range(0, hidden_NC.shape[0], n):
                h = hidden_NC[a:a + n].to(ctx.mm_dtype)
                g = ctx.steps[1](h @ w.T, labels_N[a:a + n], grad_N[a:a + n].to(acc), lse[a:a + n])
                if grad_h is not None:
                    grad_h[a:a + n] = g @ w
                if grad_w is not None:
                    add_matmul_(grad_w, g.T, h)
        return grad_h, None if grad_w is None else grad_w.to(weight_VC.dtype), None, None, None


# ---- PyTorch reference ----

def _reference_forward(logits, y):
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = x.logsumexp(-1)
    return x.gather(1, y[:, None]).squeeze(1) - lse, lse


def _reference_backward(logits, y, grad, lse):
    x = logits.to(grad.dtype)
    g = x.sub_(lse[:, None]).exp_().neg_()  # onehot - softmax, in place of the logits
    g[torch.arange(len(y), device=y.device), y] += 1
    return g.mul_(grad[:, None]).to(logits.dtype)


def linear_logprob_reference(hidden_NC, weight_VC, labels_N, chunk_rows: int = 1024):
    """-> (N,) log-probs of the labels (all in [0, V)), float32, or float64 for float64 inputs."""
    check_inputs(hidden_NC, weight_VC, labels_N, chunk_rows)
    return FusedLinearLogProb.apply(hidden_NC, weight_VC, labels_N, chunk_rows, (_reference_forward, _reference_backward))


# ---- Triton ----

@triton.jit
def _forward_kernel(logits_ptr, stride, labels_ptr, logp_ptr, lse_ptr, V, BLOCK: tl.constexpr):
    """One program per row: lse and the target's logit in one read of the row."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    lse, _ = _logsumexp(row_ptr, V, BLOCK)
    x_y = tl.load(row_ptr + tl.load(labels_ptr + row)).to(tl.float32)
    tl.store(logp_ptr + row, x_y - lse)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _backward_kernel(logits_ptr, stride, labels_ptr, grad_ptr, lse_ptr, V, BLOCK: tl.constexpr):
    """One program per row: grad * (onehot - softmax) written over the row's logits."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride
    y = tl.load(labels_ptr + row)
    grad = tl.load(grad_ptr + row)
    lse = tl.load(lse_ptr + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
        g = grad * (tl.where(cols == y, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)


def _launch(kernel, logits, *args):
    rows, V = logits.shape
    kernel[(rows,)](logits, logits.stride(0), *args, V, BLOCK=min(BLOCK_V, triton.next_power_of_2(V)), num_warps=16)


def _triton_forward(logits, y):
    logp = _empty(len(y), dtype=torch.float32, device=logits.device)
    lse = _empty(len(y), dtype=torch.float32, device=logits.device)
    _launch(_forward_kernel, logits, y.contiguous(), logp, lse)
    return logp, lse


def _triton_backward(logits, y, grad, lse):
    _launch(_backward_kernel, logits, y.contiguous(), grad.contiguous(), lse)  # grad of a sum has stride 0
    return logits


def linear_logprob_triton(hidden_NC, weight_VC, labels_N, chunk_rows: int = 1024):
    """The reference's result with the Triton per-chunk kernels; float32 math (float64 inputs are
    for the reference: the kernels would round them to float32)."""
    if hidden_NC.dtype == torch.float64:
        raise ValueError("linear_logprob_triton: float64 hidden states; the kernels compute in float32 "
                         "(use linear_logprob_reference, or NANOPOST_KERNELS=torch)")
    check_inputs(hidden_NC, weight_VC, labels_N, chunk_rows)
    return FusedLinearLogProb.apply(hidden_NC, weight_VC, labels_N, chunk_rows, (_triton_forward, _triton_backward))
