"""Losses on top of the model's final hidden states, never materialising the B*T*V logits:
lm_head + log-softmax run over chunks of rows, and the backward pass recomputes each chunk's
logits instead of keeping them (V = 151936 makes full logits the largest tensor of a step).

Reference semantics (DESIGN.md): the SFT loss is the token NLL *summed* over the trained tokens
of the whole accumulated batch, divided by that batch's number of trained tokens; callers pass
the divisor so k accumulated micro-batches equal one batch k times larger."""
import torch

from nanopost.tokenizer import IGNORE


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows with label != IGNORE of -log softmax(h @ W.T)[label], in float32."""

    @staticmethod
    def forward(ctx, hidden_NC, weight_VC, labels_N, chunk_rows: int):
        ctx.weight_dtype = weight_VC.dtype
        weight_VC = weight_VC.to(hidden_NC.dtype)  # autocast's cast, made explicit (backward runs outside it)
        acc = torch.promote_types(hidden_NC.dtype, torch.float32)  # float32, or float64 in tests
        total = torch.zeros((), dtype=acc, device=hidden_NC.device)
        lse_N = torch.zeros(hidden_NC.shape[0], dtype=acc, device=hidden_NC.device)
        for a in range(0, hidden_NC.shape[0], chunk_rows):
            h, y = hidden_NC[a:a + chunk_rows], labels_N[a:a + chunk_rows]
            logits = (h @ weight_VC.T).to(acc)
            lse = logits.logsumexp(-1)
            lse_N[a:a + chunk_rows] = lse
            valid = y != IGNORE
            picked = logits.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
        ctx.save_for_backward(hidden_NC, weight_VC, labels_N, lse_N)
        ctx.chunk_rows = chunk_rows
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden_NC, weight_VC, labels_N, lse_N = ctx.saved_tensors
        out_dtype = ctx.weight_dtype
        grad_h = torch.zeros_like(hidden_NC) if ctx.needs_input_grad[0] else None
        acc = lse_N.dtype
        grad_w = torch.zeros(weight_VC.shape, dtype=acc, device=weight_VC.device) \
            if ctx.needs_input_grad[1] else None
        R = ctx.chunk_rows
        for a in range(0, hidden_NC.shape[0], R):
            h, y = hidden_NC[a:a + R], labels_N[a:a + R]
            valid = (y != IGNORE)
            if not valid.any():
                continue
            # d loss / d logits = softmax - onehot, on trained rows only
            g = (h @ weight_VC.T).to(acc).sub_(lse_N[a:a + R, None]).exp_()
            g[torch.arange(len(y), device=y.device), y.clamp(min=0)] -= 1
            g.mul_((valid.to(acc) * grad_total)[:, None])
            g = g.to(h.dtype)
            if grad_h is not None:
                grad_h[a:a + R] = g @ weight_VC
            if grad_w is not None:
                grad_w += (g.T @ h).to(acc)
        return grad_h, None if grad_w is None else grad_w.to(out_dtype), None, None


def sft_loss_sum(model, input_ids, labels, position_ids=None, chunk_rows: int = 1024):
    """Summed next-token NLL over positions whose *target* is trained (labels are aligned with
    input_ids: labels[t] is the label of token t, so position t-1 predicts it)."""
    hidden = model(input_ids, position_ids=position_ids, return_hidden=True)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = (y != IGNORE).nonzero().squeeze(1)  # only trained rows go through the lm_head
    lm_head = getattr(model, "module", model).lm_head  # under DDP the model is wrapped
    return FusedLinearCrossEntropy.apply(h.index_select(0, keep), lm_head.weight, y[keep], chunk_rows)


def reference_sft_loss_sum(model, input_ids, labels, position_ids=None):
    """The same loss the plain way (full logits): for tests."""
    logits = model(input_ids, position_ids=position_ids)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
