"""Triton where it is installed; else a stand-in, so the PyTorch references beside each kernel import
on a CPU-only install without triton (the kernels never run there: dispatch picks the references).
And first_order, for the backwards of the fused ops."""
import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    class _Missing:
        constexpr = None  # only ever an annotation

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _Missing()


def first_order(backward):
    """A backward made of kernels, or of gradients the forward already computed, builds no graph: a
    second backward through it (create_graph=True, grad of a gradient) would silently lack the
    second-order terms. Refused instead. (Grad mode is on inside backward only under create_graph.)"""
    @functools.wraps(backward)
    def checked(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(f"{type(ctx).__name__}: no second-order gradients (create_graph=True) through this "
                               "fused op; the PyTorch reference of a pointwise op (NANOPOST_KERNELS=torch) has them")
        return backward(ctx, *grads)
    return checked
