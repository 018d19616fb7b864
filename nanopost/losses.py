"""Losses on top of the model's final hidden states, never materialising the B*T*V logits:
lm_head + log-softmax run over chunks of rows, and the backward pass recomputes each chunk's
logits instead of keeping them (V = 151936 makes full logits the largest tensor of a step).

Reference semantics (DESIGN.md): the SFT loss is the token NLL *summed* over the trained tokens
of the whole accumulated batch, divided by that batch's number of trained tokens; callers pass
the divisor so k accumulated micro-batches equal one batch k times larger."""
import torch

from nanopost.tokenizer import IGNORE


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows with label != IGNORE of -log softmax(h @ W.T)[label], accumulated in float32.

    The gradients are computed in the forward pass, chunk by chunk, while each chunk's logits
    exist anyway (d loss / d logits = softmax - onehot); backward only scales them by the
    incoming gradient. That is three lm_head-sized matmuls per step, as with full logits, instead
    of four for a recompute-in-backward design, and never more than one chunk of logits."""

    @staticmethod
    def forward(ctx, hidden_NC, weight_VC, labels_N, chunk_rows: int):
        acc = torch.promote_types(hidden_NC.dtype, torch.float32)  # float32, or float64 in tests
        w = weight_VC.to(hidden_NC.dtype)  # autocast's cast, made explicit
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden_NC) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if want_w else None
        total = torch.zeros((), dtype=acc, device=hidden_NC.device)
        for a in range(0, hidden_NC.shape[0], chunk_rows):
            h, y = hidden_NC[a:a + chunk_rows], labels_N[a:a + chunk_rows]
            valid = y != IGNORE
            rows = torch.arange(len(y), device=y.device)
            logits = (h @ w.T).to(acc)
            lse = logits.logsumexp(-1)
            total += ((lse - logits[rows, y.clamp(min=0)]) * valid).sum()
            if want_h or want_w:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[rows, y.clamp(min=0)] -= 1
                g.mul_(valid.to(acc)[:, None])
                g = g.to(h.dtype)
                if want_h:
                    grad_h[a:a + chunk_rows] = g @ w
                if want_w:
                    grad_w += (g.T @ h).to(acc)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight_VC.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_total.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_total.to(grad_w.dtype), None, None)


def trained_positions(model, input_ids, labels, position_ids=None):
    """The model's final hidden states at the positions whose *target* is trained (labels are
    aligned with input_ids: labels[t] is the label of token t, so position t-1 predicts it) ->
    (hidden (N, C), lm_head weight, targets (N,), flat indices into the B x (T-1) positions).
    Only these rows go through the lm_head."""
    hidden = model(input_ids, position_ids=position_ids, return_hidden=True)
    y = labels[:, 1:].reshape(-1)
    keep = (y != IGNORE).nonzero().squeeze(1)
    w = model.lm_head.weight
    if not torch.is_grad_enabled():  # evaluation: needs_input_grad would still say True for the
        w = w.detach()  # weight under no_grad, and the forward would build its V x C gradient
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep), w, y[keep], keep


def sft_loss_sum(model, input_ids, labels, position_ids=None, chunk_rows: int = 1024):
    """Summed next-token NLL over the positions whose target is trained."""
    h, w, y, _ = trained_positions(model, input_ids, labels, position_ids)
    return FusedLinearCrossEntropy.apply(h, w, y, chunk_rows)


def reference_sft_loss_sum(model, input_ids, labels, position_ids=None):
    """The same loss the plain way (full logits): for tests."""
    logits = model(input_ids, position_ids=position_ids)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")


# ---- sequence log-probs (KTO, preference losses) ----

class FusedLinearLogProb(torch.autograd.Function):
    """log softmax(h @ W.T)[label] per row, in float32, chunk by chunk. Unlike the SFT loss, the
    gradient reaching each token differs (it depends on its sequence's log-prob through the
    loss), so it cannot be folded into the forward: backward recomputes each chunk's logits
    (four lm_head-sized matmuls instead of three, and never more than one chunk of logits)."""

    @staticmethod
    def forward(ctx, hidden_NC, weight_VC, labels_N, chunk_rows: int):
        acc = torch.promote_types(hidden_NC.dtype, torch.float32)
        w = weight_VC.to(hidden_NC.dtype)
        out = torch.empty(hidden_NC.shape[0], dtype=acc, device=hidden_NC.device)
        for a in range(0, hidden_NC.shape[0], chunk_rows):
            logits = (hidden_NC[a:a + chunk_rows] @ w.T).to(acc)
            y = labels_N[a:a + chunk_rows]
            out[a:a + chunk_rows] = logits.gather(1, y[:, None]).squeeze(1) - logits.logsumexp(-1)
        ctx.save_for_backward(hidden_NC, weight_VC, labels_N)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_N):
        hidden_NC, weight_VC, labels_N = ctx.saved_tensors
        acc, w = grad_N.dtype, weight_VC.to(hidden_NC.dtype)
        grad_h = torch.empty_like(hidden_NC) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if ctx.needs_input_grad[1] else None
        for a in range(0, hidden_NC.shape[0], ctx.chunk_rows):
            h, y = hidden_NC[a:a + ctx.chunk_rows], labels_N[a:a + ctx.chunk_rows]
            logits = (h @ w.T).to(acc)
            g = logits.sub_(logits.logsumexp(-1, keepdim=True)).exp_().neg_()  # d logp / d logits = onehot - softmax
            g[torch.arange(len(y), device=y.device), y] += 1
            g = g.mul_(grad_N[a:a + ctx.chunk_rows, None]).to(h.dtype)
            if grad_h is not None:
                grad_h[a:a + ctx.chunk_rows] = g @ w
            if grad_w is not None:
                grad_w += (g.T @ h).to(acc)
        return grad_h, None if grad_w is None else grad_w.to(weight_VC.dtype), None, None


def sequence_logps(model, input_ids, labels, position_ids=None, chunk_rows: int = 1024):
    """log p(completion | prompt) per row: token log-probs *summed* over the positions whose
    target is trained (trained_positions) -> (B,) float32."""
    h, w, y, keep = trained_positions(model, input_ids, labels, position_ids)
    token_logps = FusedLinearLogProb.apply(h, w, y, chunk_rows)
    rows = keep // (input_ids.shape[1] - 1)
    return torch.zeros(len(input_ids), dtype=token_logps.dtype, device=h.device).index_add(0, rows, token_logps)


def reference_sequence_logps(model, input_ids, labels, position_ids=None):
    """The same the plain way (full logits): for tests."""
    logits = model(input_ids, position_ids=position_ids)[:, :-1]
    logps = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    y = labels[:, 1:]
    token = logps.gather(2, y.clamp(min=0)[..., None]).squeeze(2)
    return (token * (y != IGNORE)).sum(1)


def kto_loss(policy_logps, ref_logps, desirable, z0, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
             loss_type="kto"):
    """KTO (Ethayarajh et al. 2024, eq. 7, as TRL's KTOTrainer computes it), per example:
        r = log pi(y|x) - log pi_ref(y|x)
        desirable:   lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable: lambda_U * (1 - sigmoid(beta * (z0 - r)))
    z0 = max(0, mean over the KL pairs (prompt i, completion i-1) of the policy - reference
    log-probs), averaged over ranks and detached: the caller computes it (kl_estimate).
    apo_zero_unpaired: desirable 1 - sigmoid(beta r), undesirable sigmoid(beta r), no z0.
    -> (the mean over the micro-batch's examples, rewards beta * r detached). A micro-batch with
    only one kind of example is fine: every example has a loss, so the mean is never empty."""
    r = policy_logps - ref_logps
    if loss_type == "kto":
        losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                             undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    elif loss_type == "apo_zero_unpaired":
        losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * r)),
                             undesirable_weight * torch.sigmoid(beta * r))
    else:
        raise ValueError(f"unknown KTO loss type {loss_type!r} (kto or apo_zero_unpaired)")
    return losses.mean(), (beta * r).detach()


def kl_estimate(policy_kl_logps, ref_kl_logps, all_reduce_mean=lambda x: x):
    """z0 of KTO: the mean KL-pair log-ratio, averaged over ranks (pass the collective), clamped
    at 0, without gradient."""
    return all_reduce_mean((policy_kl_logps - ref_kl_logps).detach().mean()).clamp(min=0)
