"""Batched generation: many prompts of different lengths, one prefill, then one decode step per
new token over a preallocated KV cache. Prompts are left-padded; padded key slots are masked
and positions start at 0 on each row's first real token, so a row's tokens are those it would
get alone. Greedy or sampled (temperature, top-k, top-p, repetition penalty, seeded); per-row
stop on eos ids, stop strings and max_new_tokens; an optional streaming callback."""
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn

from nanopost.model import KVCache, Qwen2
from nanopost.tokenizer import Tokenizer


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in prompt or output
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings (the text is cut before them)
    ignore_eos: bool = False  # always generate max_new_tokens (benchmarks)


def sample_next(logits_BV, seen_BV, s: Sampling, gen: torch.Generator | None):
    """Next token per row, in transformers' processor order: penalty, temperature, top-k, top-p."""
    logits_BV = logits_BV.float()
    if s.repetition_penalty != 1.0:
        penalised = torch.where(logits_BV < 0, logits_BV * s.repetition_penalty, logits_BV / s.repetition_penalty)
        logits_BV = torch.where(seen_BV, penalised, logits_BV)
    if s.temperature <= 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / s.temperature
    if s.top_k > 0:
        kth = logits_BV.topk(min(s.top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, idx = logits_BV.sort(dim=-1)  # ascending: drop the low tail whose mass <= 1 - top_p
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - s.top_p
        drop[:, -1] = False  # always keep the most likely token
        logits_BV = logits_BV.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    probs = logits_BV.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


def _packed_linear(packed, bias, x):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def can_pack(model) -> bool:
    """oneDNN packing pays off for CPU matmuls in float32, and in bfloat16 where the CPU has
    native bf16 (AVX512-BF16 / AMX): oneDNN refuses to pack bf16 elsewhere, and we then keep
    torch's path rather than silently computing in another precision."""
    w = model.lm_head.weight
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=w.dtype), 8)
        return True
    except RuntimeError:
        return False


class Engine:
    def __init__(self, model: Qwen2, tokenizer: Tokenizer, pack_weights: bool | None = None):
        """pack_weights (CPU float32, or bfloat16 with native bf16; default on there): decode through a copy of every Linear
        weight reordered once into oneDNN's blocked layout. Small-batch matmuls run 1.5-3x faster
        than torch's default path on CPU (see BENCHMARKS.md), at the cost of a second copy of the
        weights. The copy is refreshed when the weights change in place (e.g. training)."""
        self.model, self.tok = model, tokenizer
        self.eos = torch.tensor(tokenizer.eos_ids)
        self.pack = can_pack(model) if pack_weights is None else pack_weights and can_pack(model)
        self._packed = {}  # Linear -> (weight version, packed weight)

    @contextmanager
    def fast_linears(self):
        if not self.pack:
            yield
            return
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        try:
            for lin in linears:
                version, packed = self._packed.get(lin, (None, None))
                if version != lin.weight._version:
                    packed = torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), 8)
                    self._packed[lin] = (lin.weight._version, packed)
                lin.forward = partial(_packed_linear, packed, lin.bias)
            yield
        finally:
            for lin in linears:
                lin.__dict__.pop("forward", None)  # back to nn.Linear.forward

    def generate_ids(self, prompts: list[list[int]], s: Sampling = Sampling(), on_token=None) -> list[list[int]]:
        """prompts: token id lists -> the new token ids of each row (eos and stop strings cut).
        on_token(step, tokens: list[int], done: list[bool]) is called after every decode step."""
        with torch.inference_mode(), self.fast_linears():
            return self._generate_ids(prompts, s, on_token)

    def _generate_ids(self, prompts, s, on_token):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        model, dev = self.model, self.model.lm_head.weight.device
        B, P, N = len(prompts), max(map(len, prompts)), s.max_new_tokens
        pad = torch.tensor([P - len(p) for p in prompts], device=dev)
        ids = torch.tensor([[self.tok.pad_id] * (P - len(p)) + list(p) for p in prompts], device=dev)
        slots = torch.arange(P + N, device=dev)
        key_ok = slots[None, :] >= pad[:, None]  # (B, P+N): False on left padding
        padded = bool((pad > 0).any())
        cache = KVCache(model.config, B, P + N, model.lm_head.weight.dtype, dev)
        mask = None
        if padded:  # causal over real keys; a pad query sees itself so its softmax is never empty
            causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
            mask = (causal & key_ok[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=dev)
            mask = mask[:, None]
        positions = (slots[None, :P] - pad[:, None]).clamp(min=0)
        logits = model(ids, position_ids=positions, cache=cache, mask=mask, last_only=True)[:, -1]
        seen = None
        if s.repetition_penalty != 1.0:
            seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=dev)
            seen.scatter_(1, ids, key_ok[:, :P])
        gen = torch.Generator(dev).manual_seed(s.seed) if s.seed is not None else None
        out = torch.full((B, N), self.tok.pad_id, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        lengths = torch.full((B,), N, dtype=torch.long, device=dev)
        eos = self.eos.to(dev) if not s.ignore_eos else torch.tensor([], dtype=torch.long, device=dev)
        stop_tail = max((len(self.tok.encode(x)) for x in s.stop), default=0) + 8
        for t in range(N):
            nxt = sample_next(logits, seen, s, gen)
            nxt = torch.where(done, self.tok.pad_id, nxt)
            out[:, t] = nxt
            hit = ~done & torch.isin(nxt, eos)
            lengths = torch.where(hit, t, lengths)  # the eos itself is not part of the output
            done |= hit
            if s.stop:  # decode only a short tail per row: cost does not grow with the output
                for b in (~done).nonzero().flatten().tolist():
                    tail = self.tok.decode(out[b, max(0, t + 1 - stop_tail):t + 1].tolist())
                    if any(x in tail for x in s.stop):
                        done[b], lengths[b] = True, t + 1
            if on_token is not None:
                on_token(t, nxt.tolist(), done.tolist())
            if bool(done.all()) or t == N - 1:
                break
            if seen is not None:
                seen.scatter_(1, nxt[:, None], True)
            step_mask = key_ok[:, None, None, :P + t + 1] if padded else None
            logits = model(nxt[:, None], position_ids=(P + t - pad)[:, None], cache=cache, mask=step_mask)[:, -1]
        return [out[b, :lengths[b]].tolist() for b in range(B)]

    def generate(self, prompts, s: Sampling = Sampling(), batch_size: int = 16, progress=None) -> list[str]:
        """prompts: strings (one user turn), chat message lists, or token id lists -> reply texts.
        Prompts are run longest first in batches (less padding), results in the input order."""
        ids = [self.encode_prompt(p) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        texts = [None] * len(ids)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            for i, new in zip(batch, self.generate_ids([ids[i] for i in batch], s)):
                texts[i] = cut_at_stop(self.tok.decode(new), s.stop)
            if progress is not None:
                progress.update(len(batch))
        return texts

    def encode_prompt(self, p) -> list[int]:
        if isinstance(p, str):
            p = [{"role": "user", "content": p}]
        if p and isinstance(p[0], dict):
            return self.tok.render(p, add_generation_prompt=True)[0]
        return list(p)


def cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(x) for x in stop if x in text), default=-1)
    return text if cut < 0 else text[:cut]
