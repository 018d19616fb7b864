"""The fused loss without gradients (evaluation loss, perplexity): the same value, no gradient work."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nanopost
from nanopost.losses import sft_loss_sum


class OutputShapes(TorchDispatchMode):
    """Records every aten op run inside it: its name, its tensors' shapes (inputs, then output),
    and the shape of the output where that is new memory (not a view or an input returned)."""

    def __init__(self):
        super().__init__()
        self.ops, self.allocated = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in args if isinstance(t, torch.Tensor)]
        if isinstance(out, torch.Tensor):
            self.ops.append((func.__name__, [tuple(t.shape) for t in (*tensors, out)]))
            if out.untyped_storage().data_ptr() not in [t.untyped_storage().data_ptr() for t in tensors]:
                self.allocated.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("off", [torch.no_grad, torch.inference_mode])
def test_fused_loss_without_grad_does_no_gradient_work(tiny, off):
    model, _ = nanopost.load(tiny)
    V, C = model.lm_head.weight.shape
    ids = torch.randint(0, V - 5, (2, 41))
    chunks = -(-2 * 40 // 16)  # 80 trained rows in chunks of 16
    with OutputShapes() as grad_path:
        with_grad = sft_loss_sum(model, ids, ids, chunk_rows=16)
    with off(), OutputShapes() as plain:
        value = sft_loss_sum(model, ids, ids, chunk_rows=16)
    def lm_head_matmuls(rec):
        return [s for name, s in rec.ops if ("mm" in name or "matmul" in name) and any(V in x for x in s)]

    assert len(lm_head_matmuls(grad_path)) == 3 * chunks  # the training path is unchanged: logits, grad_h, grad_w
    assert len(lm_head_matmuls(plain)) == chunks  # the logits only
    assert (V, C) in grad_path.allocated and (V, C) not in plain.allocated  # no float32 grad_w buffer
    assert torch.equal(value, with_grad.detach())
