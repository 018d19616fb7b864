"""One function per fused op. Each file beside this one holds a PyTorch reference, a Triton kernel
and the autograd.Function that runs it; model.py and losses.py call only the functions below (named
apart from the files, so that importing a file never shadows a function of this package).

Dispatch: CUDA tensors take the Triton kernels, CPU tensors the references. NANOPOST_KERNELS=torch
forces the references everywhere; NANOPOST_KERNELS=triton forces Triton everywhere (on CPU only
under TRITON_INTERPRET=1, the interpreter the tests use to check the kernels without a GPU)."""
import importlib.util
import os

import torch

from nanopost.kernels import linear_ce as _ce
from nanopost.kernels import linear_logprob as _logprob
from nanopost.kernels import rmsnorm as _rmsnorm
from nanopost.kernels import rope as _rope
from nanopost.kernels import swiglu as _swiglu

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(x: torch.Tensor) -> bool:
    mode = os.environ.get("NANOPOST_KERNELS", "auto")
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"NANOPOST_KERNELS={mode!r}: use auto, torch or triton")
    if mode == "auto":  # the kernels compute in float32: float64 (tests, re-derivations) stays exact
        return x.is_cuda and HAVE_TRITON and x.dtype != torch.float64
    if mode == "triton" and not HAVE_TRITON:
        raise RuntimeError("NANOPOST_KERNELS=triton but triton is not installed (pip install triton)")
    if mode == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("NANOPOST_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter), "
                           "set before nanopost is imported")
    return mode == "triton"


def rms_norm(x, weight, eps: float):
    """Qwen2's RMSNorm: weight * (x in float32 / rms, cast back to x's dtype). Under autocast a
    float32 x gives autocast's dtype, the one the matmul that reads it would cast to (rmsnorm.py)."""
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) and x.dtype == torch.float32 else None
    return (_rmsnorm.rms_norm_triton if use_triton(x) else _rmsnorm.rms_norm_reference)(x, weight, eps, out_dtype)


def apply_rope(q_BHTD, k_BKTD, cos_BTD, sin_BTD):
    """Rotate-half RoPE on q and k, angles per row and position (packed rows, KV-cache offsets)."""
    return (_rope.rope_triton if use_triton(q_BHTD) else _rope.rope_reference)(q_BHTD, k_BKTD, cos_BTD, sin_BTD)


def silu_mul(gate, up):
    """silu(gate) * up, the Qwen2 MLP's activation."""
    return (_swiglu.swiglu_triton if use_triton(gate) else _swiglu.swiglu_reference)(gate, up)


def silu_mul_halves(gate_up):
    """silu(gate) * up for gate, up the two halves of gate_up's last dimension (one matmul's output)."""
    return (_swiglu.swiglu_halves_triton if use_triton(gate_up) else _swiglu.swiglu_halves_reference)(gate_up)


def linear_cross_entropy(hidden_NC, weight_VC, labels_N, ignore_index: int = -100, z_loss: float = 0.0,
                         label_smoothing: float = 0.0, chunk_rows: int = 1024):
    """sum over rows with label != ignore_index of the cross-entropy of hidden @ weight.T, never
    holding more than chunk_rows rows of logits (see linear_ce.py)."""
    fn = _ce.linear_cross_entropy_triton if use_triton(hidden_NC) else _ce.linear_cross_entropy_reference
    return fn(hidden_NC, weight_VC, labels_N, ignore_index, z_loss, label_smoothing, chunk_rows)


def linear_logprobs(hidden_NC, weight_VC, labels_N, chunk_rows: int = 1024):
    """log softmax(hidden @ weight.T)[label] per row, float32 (see linear_logprob.py)."""
    fn = _logprob.linear_logprob_triton if use_triton(hidden_NC) else _logprob.linear_logprob_reference
    return fn(hidden_NC, weight_VC, labels_N, chunk_rows)
