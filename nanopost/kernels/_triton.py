"""Triton where it is installed; else a stand-in, so the PyTorch references beside each kernel import
on a CPU-only install without triton (the kernels never run there: dispatch picks the references)."""
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
