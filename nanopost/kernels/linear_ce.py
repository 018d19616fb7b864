"""Fused linear cross-entropy: the sum over rows with label != ignore_index of the cross-entropy of
hidden @ weight.T, never holding more than chunk_rows rows of logits (V = 151936 makes full logits
the largest tensor of a training step). Per row, with x its logits, lse = log sum_j exp(x_j):

    loss = (1 - eps) (lse - x_y) + eps (lse - mean_j x_j) + z lse²
    d loss / d x = softmax(x) (1 + 2 z lse) - (1 - eps) onehot(y) - eps / V

eps is label smoothing as torch.nn.functional.cross_entropy defines it; z lse² is PaLM's auxiliary
z-loss (Chowdhery et al. 2022, section 5), which keeps lse near 0.

The gradients are computed in the forward pass, chunk by chunk, while each chunk's logits exist
anyway; backward only scales them by the incoming gradient. That is three lm_head-sized matmuls
per step, as with full logits, instead of four for a recompute-in-backward design. The matmuls are
torch's (cuBLAS on the GPU) in both paths; the reference and the Triton path differ only in the
per-chunk step: logits -> per-row losses, and d loss / d logits written over the logits. The
Triton step is one kernel reading each row twice and writing it once, where eager PyTorch writes
several float32 copies of the chunk."""
import torch

from nanopost.kernels._triton import first_order, tl, triton

_empty = torch.empty  # tests swap in a NaN-filled allocator, so an element never written fails
BLOCK_V = 8192  # logits per iteration of a row's loop


class FusedLinearCrossEntropy(torch.autograd.Function):
    """The chunk loop shared by both paths; step(logits, labels, ignore_index, z_loss,
    label_smoothing, want_grad) -> (per-row losses, d loss / d logits in hidden's dtype or None)."""

    @staticmethod
    def forward(ctx, hidden_NC, weight_VC, labels_N, ignore_index, z_loss, label_smoothing, chunk_rows, step):
        acc = torch.promote_types(hidden_NC.dtype, torch.float32)  # float32, or float64 in tests
        hidden, w = _mm_operands(hidden_NC, weight_VC)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = _empty(hidden_NC.shape, dtype=hidden_NC.dtype, device=hidden_NC.device) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if want_w else None
        total = torch.zeros((), dtype=acc, device=hidden_NC.device)
        with torch.autocast(hidden_NC.device.type, enabled=False):  # the operands are cast already
            for a in range(0, hidden_NC.shape[0], chunk_rows):
                h, y = hidden[a:a + chunk_rows], labels_N[a:a + chunk_rows]
                loss_rows, g = step(h @ w.T, y, ignore_index, z_loss, label_smoothing, want_grad=want_h or want_w)
                total += loss_rows.sum()
                if want_h:
                    grad_h[a:a + chunk_rows] = g @ w
                if want_w:
                    add_matmul_(grad_w, g.T, h)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight_VC.dtype))
        return total

    @staticmethod
    @first_order
    def backward(ctx, grad_total):
        # out of place: gradcheck and retain_graph run backward more than once through one forward
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_total.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_total.to(grad_w.dtype), None, None, None, None, None, None)


def _mm_operands(hidden_NC, weight_VC):
    """hidden and weight cast once to the matmuls' dtype: autocast's (bf16) when it is on, as it would
    cast them, else hidden's. Casting per chunk instead would convert the whole weight each time."""
    dev = hidden_NC.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden_NC.dtype
    return hidden_NC.to(dtype), weight_VC.to(dtype)


_ADDMM_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()


def add_matmul_(acc, a, b):
    """acc += a @ b in acc's dtype (float32) for a, b in bf16: on CUDA cuBLAS accumulates the product
    into acc itself (beta = 1, a float32 output; torch >= 2.8), so the product is neither rounded to
    bf16 nor written as a temporary the size of the weight (545 MB at Qwen2's vocab) once per chunk:
    0.55 ms a chunk instead of 1.17 ms on an H200, and 780 MB less."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _ADDMM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # CPU bf16 (torch has no float32-output matmul there), or an older torch
        acc += (a @ b).to(acc.dtype)


def _apply(step, hidden_NC, weight_VC, labels_N, ignore_index, z_loss, label_smoothing, chunk_rows):
    check_inputs(hidden_NC, weight_VC, labels_N, chunk_rows, ignore_index)
    if not torch.is_grad_enabled():  # needs_input_grad would still say True for a parameter under
        hidden_NC, weight_VC = hidden_NC.detach(), weight_VC.detach()  # no_grad: no gradient work then
    return FusedLinearCrossEntropy.apply(hidden_NC, weight_VC, labels_N, ignore_index, float(z_loss),
                                         float(label_smoothing), chunk_rows, step)


# ---- PyTorch reference ----

def _reference_step(logits, y, ignore_index, z_loss, label_smoothing, want_grad):
    acc = torch.promote_types(logits.dtype, torch.float32)
    x = logits.to(acc)
    valid = y != ignore_index
    rows, y = torch.arange(len(y), device=y.device), torch.where(valid, y, 0)
    lse = x.logsumexp(-1)
    loss = lse - x[rows, y]
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - x.mean(-1))
    if z_loss:
        loss = loss + z_loss * lse ** 2
    loss = torch.where(valid, loss, 0.0)  # not loss * valid: an ignored row's inf or NaN stays out
    if not want_grad:
        return loss, None
    g = x.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
    if z_loss:
        g.mul_(1 + 2 * z_loss * lse[:, None])
    g[rows, y] -= 1 - label_smoothing
    if label_smoothing:
        g.sub_(label_smoothing / x.shape[1])
    g.masked_fill_(~valid[:, None], 0)  # (not g * valid: NaN * 0 is NaN)
    return loss, g.to(logits.dtype)


def linear_cross_entropy_reference(hidden_NC, weight_VC, labels_N, ignore_index: int = -100, z_loss: float = 0.0,
                                   label_smoothing: float = 0.0, chunk_rows: int = 1024):
    """-> scalar in promote_types(hidden's dtype, float32): the summed row losses (module docstring)."""
    return _apply(_reference_step, hidden_NC, weight_VC, labels_N, ignore_index, z_loss, label_smoothing, chunk_rows)


# ---- Triton ----
# The logits chunk stays in hidden's dtype (bf16 in training): cuBLAS writes it so, the reference
# rounds it so before upcasting (the same values), and the gradient goes back into bf16 matmuls
# anyway. A float32 copy would add a chunk-sized write and read and double the chunk's memory for
# nothing; the kernel does its math in float32 on the loaded values.

@triton.jit
def _logsumexp(row_ptr, V, BLOCK: tl.constexpr):
    """lse and sum of one row of V logits, in float32, in one read of the row: the online softmax
    (Milakov & Gimelshein 2018) keeps a running max m and the sum d of exp(x - m), rescaled by
    exp(m_old - m_new) whenever the max grows."""
    m = float("-inf")
    d = 0.0
    s = 0.0
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        s += tl.sum(tl.where(cols < V, x, 0.0), axis=0)
        m = m_new
    return m + tl.log(d), s


@triton.jit
def _cross_entropy_kernel(logits_ptr, stride, labels_ptr, loss_ptr, V, ignore_index, z_loss, smoothing,
                          WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: its loss (0 where ignored) and, with WRITE_GRAD, its d loss / d logits
    written over its logits (0 where ignored)."""
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 for a chunk of 16k rows
    row_ptr = logits_ptr + row * stride
    y = tl.load(labels_ptr + row)
    valid = y != ignore_index
    lse, sum_x = _logsumexp(row_ptr, V, BLOCK)
    x_y = tl.load(row_ptr + y, mask=valid, other=0.0).to(tl.float32)
    loss = (1 - smoothing) * (lse - x_y) + smoothing * (lse - sum_x / V) + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    if WRITE_GRAD:
        scale = tl.where(valid, 1 + 2 * z_loss * lse, 0.0)
        target = tl.where(valid, 1 - smoothing, 0.0)
        uniform = tl.where(valid, smoothing / V, 0.0)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.where(valid, tl.exp(x - lse) * scale - uniform - tl.where(cols == y, target, 0.0), 0.0)
            tl.store(row_ptr + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)


def _triton_step(logits, y, ignore_index, z_loss, label_smoothing, want_grad):
    rows, V = logits.shape
    loss = _empty(rows, dtype=torch.float32, device=logits.device)
    _cross_entropy_kernel[(rows,)](logits, logits.stride(0), y.contiguous(), loss, V, ignore_index, z_loss,
                                   label_smoothing, WRITE_GRAD=want_grad,
                                   BLOCK=min(BLOCK_V, triton.next_power_of_2(V)), num_warps=16)
    return loss, logits if want_grad else None


def check_inputs(hidden_NC, weight_VC, labels_N, chunk_rows, ignore_index: int | None = None):
    """Shapes, chunk_rows and label values, for both paths: a kernel reads a label per row of logits
    and would read past the labels, or ignore extra ones; range(0, N, chunk_rows) with chunk_rows < 1
    runs no chunk (a loss of 0 and gradients never written)."""
    if hidden_NC.dim() != 2 or weight_VC.dim() != 2 or hidden_NC.shape[1] != weight_VC.shape[1] \
            or labels_N.shape != hidden_NC.shape[:1]:
        raise ValueError(f"hidden {tuple(hidden_NC.shape)}, weight {tuple(weight_VC.shape)}, labels "
                         f"{tuple(labels_N.shape)} do not fit (N, C), (V, C), (N,)")
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, not {chunk_rows!r}")
    check_labels(labels_N, weight_VC.shape[0], ignore_index)


def check_labels(labels_N, V: int, ignore_index: int | None = None):
    """Torch's indexing refuses a label outside [0, V) -- except a negative one, which it counts from
    the end (-1 meant as "ignore" would train class V-1); a kernel would read out of bounds instead.
    One device sync per call."""
    valid = labels_N if ignore_index is None else labels_N[labels_N != ignore_index]
    if bool(((valid < 0) | (valid >= V)).any()):
        raise IndexError(f"labels must lie in [0, {V})" + ("" if ignore_index is None else f" or equal "
                         f"ignore_index={ignore_index}") + f"; got values from {int(valid.min())} to {int(valid.max())}")


def linear_cross_entropy_triton(hidden_NC, weight_VC, labels_N, ignore_index: int = -100, z_loss: float = 0.0,
                                label_smoothing: float = 0.0, chunk_rows: int = 1024):
    """The reference's result with the Triton per-chunk kernel; float32 math (float64 inputs are
    for the reference: the kernel would round them to float32)."""
    if hidden_NC.dtype == torch.float64:
        raise ValueError("linear_cross_entropy_triton: float64 hidden states; the kernel computes in float32 "
                         "(use linear_cross_entropy_reference, or NANOPOST_KERNELS=torch)")
    return _apply(_triton_step, hidden_NC, weight_VC, labels_N, ignore_index, z_loss, label_smoothing, chunk_rows)
