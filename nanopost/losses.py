"""Losses on top of the model's final hidden states, never materialising the B*T*V logits:
lm_head + log-softmax run over chunks of rows (kernels.linear_cross_entropy and
kernels.linear_logprobs; V = 151936 makes full logits the largest tensor of a step).

Reference semantics: the SFT loss is the token NLL *summed* over the trained tokens
of the whole accumulated batch, divided by that batch's number of trained tokens; callers pass
the divisor so k accumulated micro-batches equal one batch k times larger."""
import torch

from nanopost import kernels
from nanopost.model import PromptKV, packed_causal_mask
from nanopost.tokenizer import IGNORE


def target_counts(labels):
    """Per row of a (B, T) label batch, how many of its tokens are trained targets: labels[:, 1:]
    that are not IGNORE (a row's token 0 is predicted by nothing). Summed: the SFT loss's divisor."""
    return (labels[:, 1:] != IGNORE).sum(1)


def trained_positions(model, input_ids, labels, position_ids=None, cache=None):
    """The model's final hidden states at the positions whose *target* is trained (labels are
    aligned with input_ids: labels[t] is the label of token t, so position t-1 predicts it) ->
    (hidden (N, C), lm_head weight, targets (N,), flat indices into the B x (T-1) positions).
    Only these rows go through the lm_head. cache: a model.PromptKV to keep the keys/values in."""
    mask = packed_causal_mask(position_ids) if cache is not None and position_ids is not None else None  # (as cache=None)
    hidden = model(input_ids, position_ids=position_ids, cache=cache, mask=mask, return_hidden=True)
    y = labels[:, 1:].reshape(-1)
    keep = (y != IGNORE).nonzero().squeeze(1)
    w = model.lm_head.weight
    if not torch.is_grad_enabled():  # evaluation: needs_input_grad would still say True for the
        w = w.detach()  # weight under no_grad, and the forward would build its V x C gradient
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, keep), w, y[keep], keep


def sft_loss_sum(model, input_ids, labels, position_ids=None, chunk_rows: int = 1024):
    """Summed next-token NLL over the positions whose target is trained."""
    h, w, y, _ = trained_positions(model, input_ids, labels, position_ids)
    return kernels.linear_cross_entropy(h, w, y, IGNORE, chunk_rows=chunk_rows)


def reference_sft_loss_sum(model, input_ids, labels, position_ids=None):
    """The same loss the plain way (full logits): for tests."""
    logits = model(input_ids, position_ids=position_ids)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")


# ---- sequence log-probs (KTO, preference losses) ----

def sequence_logps(model, input_ids, labels, position_ids=None, kl=None, chunk_rows: int = 1024):
    """log p(completion | prompt) per row: token log-probs *summed* over the positions whose
    target is trained (trained_positions) -> (B,) float32.
    kl: the rows' KTO KL pairs as their continuation (data.collate_kl) -> (the rows' log-probs,
    the pairs' without gradient): a second forward of the pairs' completions only, attending the
    prompts' keys/values kept from the first (model.PromptKV), so each prompt is computed once."""
    kept = PromptKV() if kl is not None else None
    h, w, y, keep = trained_positions(model, input_ids, labels, position_ids, cache=kept)
    logps = row_sums(kernels.linear_logprobs(h, w, y, chunk_rows), keep // (input_ids.shape[1] - 1), len(input_ids))
    if kl is None:
        return logps
    ids, pos, mask, src, targets, rows = kl
    with torch.no_grad():
        hidden = model(ids, position_ids=pos, mask=mask, cache=kept.continued(), return_hidden=True)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, src)
        return logps, row_sums(kernels.linear_logprobs(h, w.detach(), targets, chunk_rows), rows, len(input_ids))


def row_sums(values, rows, n_rows: int):
    """values[k] summed into row rows[k] -> (n_rows,)."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


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
