"""Batched generation and next-token scoring with a shared-prefix KV cache and continuous batching.

Shared prefix: prompts that start with the same tokens (a few-shot block, a system prompt and
chat header) have that prefix's keys/values computed once, with batch 1, and copied into every
row that starts with it. Prompts are taken in token order, so prompts that share a prefix are
neighbours; a prompt's prefix is the longest common *token* prefix with a neighbour (never a
text prefix: BPE merges across a text boundary). Computed prefixes are kept (the few
most recently used, per model state), so a prefix that recurs across calls — the few-shot block
of a whole task — is computed once; the keys/values of a kept prefix also serve any shorter
prefix of it (attention is causal). Each prompt's remaining tokens (its suffix) are prefilled
packed into one row with a block-diagonal mask, no padding. While decoding, the prompt tokens that
every running row starts with are attended once a step for all rows (cascade attention,
KVCache.share; on CPU, where a bf16 model's cache is float32 too: cache_dtype), not once per row.

Continuous batching: a cache of `batch_size` slots (rows) × max_len. A row that finishes (eos,
stop string, max_new_tokens) frees its slot for the next waiting prompt at once: that prompt's
prefix K/V are copied into the slot and only its suffix is prefilled. Every slot holds its own
row from cache position 0, so positions and cache lengths are per row, a decode step masks each
row's keys past its own length, and a row's tokens are those it would get alone (exact up to
float rounding: token-identical to one-at-a-time greedy decoding in float32, tests/test_engine.py).

Greedy or sampled (temperature, top-k, top-p, repetition penalty, seeded); per-row stop on eos
ids, stop strings and max_new_tokens; streaming and per-row completion callbacks. Plain greedy
decoding of a float32 or bf16 model on CPU picks tokens through GreedyScreen (an int8 lm_head with
an error bound; only tokens that could win are scored in float32): the float32 full logits'
argmax, for a bf16 model that of its bf16 numbers in float32 (its own bf16 logits tie more)."""
import bisect
import os
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn as nn

from nanopost.model import KVCache, Qwen2, Segments
from nanopost.tokenizer import Tokenizer

MAX_PREFIXES = 8  # computed prefixes kept (least recently used dropped first)
MIN_EXTEND = 32  # a new prefix must share this many more tokens than a kept one: a separate forward costs a full read of the weights
MIN_CASCADE = 64  # a prefix every running row shares is attended once for all (KVCache.share) from this length
PACK_TOKENS = 512  # suffix tokens per packed prefill forward (packing makes attention quadratic in the pack)


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

    def __post_init__(self):  # a value outside these ranges would fail later, or sample something else silently
        for name, ok, want in (("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
                               ("temperature", self.temperature >= 0, ">= 0"), ("top_k", self.top_k >= 0, ">= 0"),
                               ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                               ("repetition_penalty", self.repetition_penalty > 0, "> 0")):
            if not ok:
                raise ValueError(f"{name} = {getattr(self, name)}: must be {want}")


def sample_next(logits_BV, seen_BV, s: Sampling, gen: torch.Generator | list | None):
    """Next token per row, in transformers' processor order: penalty, temperature, top-k, top-p.
    A temperature below 1e-5 is greedy (as in vLLM): dividing by it overflows float32. gen: one
    generator for the batch, or one per row (each row then draws as it would alone)."""
    logits_BV = logits_BV.float()
    if s.repetition_penalty != 1.0:  # an extreme penalty (1e-300) would make logits inf: kept finite
        penalised = torch.where(logits_BV < 0, logits_BV * s.repetition_penalty, logits_BV / s.repetition_penalty)
        big = torch.finfo(torch.float32).max
        logits_BV = torch.where(seen_BV, penalised.clamp(-big, big), logits_BV)
    if s.temperature < 1e-5:
        return logits_BV.argmax(-1)
    logits_BV = (logits_BV - logits_BV.amax(-1, keepdim=True)) / s.temperature  # <= 0: no overflow to +inf
    if s.top_k > 0:
        kth = logits_BV.topk(min(s.top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, idx = logits_BV.sort(dim=-1)  # ascending: drop the low tail whose mass <= 1 - top_p
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - s.top_p
        drop[:, -1] = False  # always keep the most likely token
        logits_BV = logits_BV.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    probs = logits_BV.softmax(-1)
    if isinstance(gen, list):
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, gen)])
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)


def _packed_linear(packed, bias, x):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class Int8Matmul:
    """h_q @ q.T for int8 h_q (M, C) and int8 q (N, C), times a float32 scale per output column ->
    float32 (M, N), the integer sums exact: oneDNN's int8 linear (VNNI on x86; 8 ms at 16 x 896 x
    151936 here), else torch._int_mm (12 ms). backend: "onednn" or "int_mm" (int8_matmul says
    which this machine computes exactly)."""

    def __init__(self, q_NC, scale_N, backend: str):
        self.backend, self.scale = backend, scale_N
        if backend == "onednn":
            self.q = torch.ops.onednn.qlinear_prepack(q_NC, [16, q_NC.shape[1]])
            self.zero = torch.zeros(q_NC.shape[0], dtype=torch.long)
        else:
            self.q = q_NC

    def __call__(self, h_q):
        if self.backend == "onednn":  # activations as uint8 with zero point 128: the same integers
            x = (h_q.to(torch.int16) + 128).to(torch.uint8)
            return torch.ops.onednn.qlinear_pointwise(x, 1.0, 128, self.q, self.scale, self.zero, None, 1.0, 0,
                                                      torch.float32, "none", [], "")
        return torch._int_mm(h_q, self.q.t()) * self.scale


def int8_matmul(C: int, backends=("onednn", "int_mm")) -> str | None:
    """The first Int8Matmul backend whose integer sums are exact on this machine for int8 (M, C)
    activations, checked on the extreme values (every product ±127², every sum at its largest that
    float32 holds exactly), or None. x86 kernels without VNNI sum pairs of products into int16
    with saturation: refused, and the screen is off there."""
    k = min(C, 1040)  # C·127² < 2²⁴: a wrong sum shows, rather than rounding away in float32
    a = torch.zeros(3, C, dtype=torch.int8)
    a[0, :k], a[1, :k], a[2, 0::2], a[2, 1::2] = 127, -127, 127, -127
    b = torch.full((8, C), 127, dtype=torch.int8)
    b[1::2] = -127
    for backend in backends:
        try:
            got = Int8Matmul(b, torch.ones(8), backend)(a)
        except (RuntimeError, AttributeError):  # not in this torch build, or not for this shape
            continue
        if torch.equal(got.double(), (a.long() @ b.long().T).double()):
            return backend
    return None


class GreedyScreen:
    """Greedy next tokens from final hidden states without a float32 pass over the whole lm_head
    (151936 x 896: 545 MB read at every decode step, ~20% of a CPU step at 16 rows). An int8 copy
    of the weight scores every token (a quarter of the bytes, VNNI int8 matmuls) together with a
    proven bound on its error; only the tokens that could still be the argmax are scored again in
    float32 (for the real 0.5B model a few hundred of the 151936 for a batch of 16 rows), and the
    argmax is taken over them. One caller at a time (its buffers are reused), as an engine is.

    Why it is exact. With h = s_h·ĥ + r (ĥ int8) and each weight row w = s_w·q + e (q int8), the
    screened logit S = s_h·s_w·(ĥ·q) differs from h·w by at most ‖h‖‖e‖ + ‖r‖‖s_w·q‖
    (Cauchy-Schwarz), and float32 rounding of a C-term dot product (the full matmul's, and ours)
    by at most C·2⁻²⁴·‖h‖‖w‖ each. A token u with S_u + bound_u below some token's S_v - bound_v
    has a float32 logit below that token's, so it is not the argmax. The int8 products are summed
    exactly (checked on this machine: int8_matmul); C·127² < 2²⁴ for C <= 1040 keeps their float32
    copy exact (a larger C rounds it relatively by 2⁻²⁴, as the scaling and the bound's own
    arithmetic do: a margin of 8·2⁻²⁴·‖h‖‖w‖ covers them). Ties and float32 rounding aside, the
    chosen token is the full logits' argmax: the same tokens as float32 decoding
    (tests/test_engine.py), as any batch composition is.

    A bf16 lm_head is screened the same way, its weights and the hidden states being bf16 numbers
    held exactly in float32: the token is the argmax of the float32 logits of those numbers (the
    int8 copy is half the bf16 head's bytes). Without the screen a bf16 model's
    logits are rounded to bf16 (steps of 1/8 at logits of 16-32), where near tokens tie and the
    first index wins; the screen decides such ties by the float32 logits instead."""

    def __init__(self, lm_head: nn.Linear, backend: str):
        self.head, self.w = lm_head, lm_head.weight.detach()  # float32, or bf16: its values, exactly, in float32
        self._buf = None
        self.rescored = 0  # tokens scored in float32 at the last call (all: the full logits)
        w = self.w.float()
        self.s_w = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # (V,)
        q = torch.round(w / self.s_w[:, None])
        self.int8 = Int8Matmul(q.to(torch.int8), self.s_w, backend)
        rounding = (2 * w.shape[1] + 8) * 2.0 ** -24  # two C-term sums, and the few roundings of S and the bound
        ws = w / self.s_w[:, None]  # norms taken where entries are <= 127: no float32 underflow (1e-25 weights)
        self.norms = torch.stack([(ws - q).norm(dim=1) + rounding * ws.norm(dim=1), q.norm(dim=1)]) * self.s_w  # (2, V)

    def screened(self, h_BC):
        """-> (S (B, V), hr (B, 2)): the int8 scores divided by each row's activation scale s_h (no
        token's order changes), and the error bound's factors, also divided by s_h: |h·w_v -
        s_h·S_v| <= s_h·(hr @ norms)_v."""
        s_h = (h_BC.abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        hs = h_BC / s_h  # |hs| <= 127: its norms neither underflow nor overflow
        h_q = torch.round(hs)
        hr = torch.stack([hs.norm(dim=1), (hs - h_q).norm(dim=1)], 1)
        return self.int8(h_q.to(torch.int8)), hr

    def full(self, h_BC):
        """The argmax of every token's float32 logit: the float32 head itself, or a bf16 head's
        weights cast to float32 16384 rows at a time (never a float32 copy of the whole head). The
        same numbers the screen rescores (up to float32 rounding order), row by row: no row's token
        depends on the other rows beyond that rounding. Slow for bf16 (~8x the bf16 head): rare rows only."""
        self.rescored = self.w.shape[0]
        if self.w.dtype == torch.float32:
            return self.head(h_BC).argmax(1)
        logits = torch.empty(h_BC.shape[0], self.w.shape[0])
        for a in range(0, self.w.shape[0], 16384):
            logits[:, a:a + 16384] = h_BC @ self.w[a:a + 16384].float().T
        return logits.argmax(1)

    def __call__(self, h_BC):
        """(B, C) float32 final hidden states (a bf16 model's, exactly) -> (B,) argmax token ids of
        h @ weight.T in float32."""
        S, hr = self.screened(h_BC)
        if not torch.isfinite(hr).all():  # a NaN or inf hidden state (a diverged model): no bound holds
            return self.full(h_BC)
        B = h_BC.shape[0]
        if self._buf is None or self._buf[0].shape[0] != B or self._buf[0].is_inference() != torch.is_inference_mode_enabled():
            self._buf = (torch.empty(B, self.w.shape[0]), torch.empty(B, self.w.shape[0], dtype=torch.bool))  # reused: a
            # fresh (B, V) tensor costs its page faults at every step
        upper, cand = self._buf
        hi, best = S.max(1)
        lo = hi[:, None] - (hr * self.norms[:, best].T).sum(1, keepdim=True)  # the top one's lower bound <= max logit
        torch.ge(torch.addmm(S, hr, self.norms, out=upper), lo, out=cand)  # could be the argmax
        U = cand.view(torch.uint8).amax(0).nonzero().squeeze(1)  # ascending: argmax's first-index rule among ties holds
        self.rescored = len(U)
        if len(U) > self.w.shape[0] // 8 or len(U) == 0:  # a flat distribution: the full logits
            return self.full(h_BC)
        exact = (h_BC @ self.w[U].float().T).masked_fill_(~cand[:, U], float("-inf"))
        return U[exact.argmax(1)]


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


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def auto_dtype(device: str = "cpu") -> tuple[torch.dtype, str]:
    """The fastest exact-enough weights dtype for this hardware, and why: bfloat16 where matmuls
    run it natively (a CUDA card with bf16; a CPU with AVX512-BF16 or AMX: 2.9x float32 measured
    on an EPYC), else float32 (without them torch emulates bf16, slower than float32)."""
    if str(device).startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, f"{torch.cuda.get_device_name()} runs bf16 natively"
        return torch.float32, f"{torch.cuda.get_device_name()} has no bf16"
    native = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    cap = torch.backends.cpu.get_cpu_capability()
    if native:
        return torch.bfloat16, f"CPU has {' and '.join(native)} (capability {cap}): bf16 matmuls are native"
    return torch.float32, f"CPU has neither avx512_bf16 nor amx_bf16 (capability {cap}): bf16 would be emulated, slower than float32"


def resolve_dtype(name: str, device: str = "cpu", log=print) -> torch.dtype:
    """--dtype auto|float32|bfloat16|float16 -> a dtype; auto says which and why."""
    if name != "auto":
        return getattr(torch, name)
    dtype, why = auto_dtype(device)
    log(f"--dtype auto: {str(dtype).removeprefix('torch.')} ({why})")
    return dtype


def cache_dtype(model) -> torch.dtype:
    """The KV cache's dtype: the model's, except float32 for a bf16/fp16 model on CPU. Its keys and
    values are the same half-precision numbers, held exactly, and attention runs in float32
    (model.attention casts q up and the output back): torch's CPU SDPA kernel in bf16 takes 4.0 ms
    a layer at 16 rows x 300 keys where the float32 matmul path takes 0.26 (AMD EPYC with
    AVX512-BF16; at 24 layers a bf16 decode step spent most of its time there). The cache takes
    twice the memory (24 KB a position at the 0.5B shape: 16 rows x 1024 positions, 400 MB)."""
    dtype, dev = model.lm_head.weight.dtype, model.lm_head.weight.device
    return torch.float32 if dev.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype


def weights_state(params) -> list:
    """What a copy made from these tensors depends on: each one's storage (held, so its address
    is never reused while this is kept: after model.to() the old weights live until the copy is
    next refreshed), dtype, device, shape and version. A version moves with in-place updates (an
    optimizer step, a merge); model.to() swaps the storage instead."""
    return [(p.detach(), p._version) for p in params]


def unchanged(state, params) -> bool:
    params = list(params)
    return state is not None and len(state) == len(params) and all(
        d.data_ptr() == p.data_ptr() and d.dtype == p.dtype and d.device == p.device and d.shape == p.shape
        and v == p._version for (d, v), p in zip(state, params))


def lcp(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def graphs_switch() -> bool:
    """NANOPOST_CUDA_GRAPHS: 1 (the default) or 0, which turns CUDA graphs off for every engine."""
    env = os.environ.get("NANOPOST_CUDA_GRAPHS", "1")
    if env not in ("0", "1"):
        raise ValueError(f"NANOPOST_CUDA_GRAPHS={env!r}: use 1 (the default on CUDA) or 0")
    return env == "1"


_CAPTURE = threading.Lock()  # CUDA allows one graph capture at a time in a process


class DecodeGraph:
    """One decode step of one KV cache (per-row lengths, static: see KVCache) captured in a CUDA
    graph, replayed every step: a 0.5B model's eager step is ~400 kernel launches whose Python and
    launch cost is far longer than their GPU time at small batches (gpt-fast's reason for
    torch.compile's CUDA graphs). While a graph is captured no other thread may run CUDA work: one
    engine per process, or several run one at a time (serve turns graphs off for several models).
    Each generate_ids call captures its own (a warm-up forward and the capture, tens of ms), and again
    when its batch's cache changes shape. The graph reads the token ids from its own buffer and the cache's
    per-row lengths from cache.pos (updated in place by the caller and by the step itself), and
    writes the float32 next-token logits into its own output buffer."""

    def __init__(self, model: Qwen2, cache: KVCache):
        self.k, self.v, self.pos = cache.k, cache.v, cache.pos  # the tensors the graph was captured on
        self.device = cache.k.device
        cache.static = True
        self.ids = torch.zeros(cache.k.shape[1], 1, dtype=torch.long, device=self.device)
        pos0 = cache.pos.clone()
        # the model's device made current: streams and the capture belong to the current device, and a
        # model on another one (cuda:1) would run eagerly outside an empty capture
        with torch.cuda.device(self.device), _CAPTURE:  # one capture at a time in a process (CUDA's rule)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (Triton compiles, cuBLAS picks kernels): writes one slot
                model(self.ids, cache=cache)  # per row at its own length, which the real step overwrites
            torch.cuda.current_stream().wait_stream(side)
            cache.pos.copy_(pos0)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = model(self.ids, cache=cache)[:, -1].float()

    def captured_on(self, cache: KVCache) -> bool:
        return cache.k is self.k and cache.v is self.v and cache.pos is self.pos

    def __call__(self, ids_B):
        with torch.cuda.device(self.device):
            self.ids[:, 0].copy_(ids_B)
            self.graph.replay()
        return self.logits


class Engine:
    def __init__(self, model: Qwen2, tokenizer: Tokenizer, pack_weights: bool | None = None,
                 cuda_graphs: bool | None = None, greedy_screen: bool = True):
        """pack_weights (CPU float32, or bfloat16 with native bf16; default on there): run every Linear
        through a copy of its weight reordered once into oneDNN's blocked layout. Small-batch matmuls run 1.5-3x faster
        than torch's default path on CPU (see BENCHMARKS.md), at the cost of a second copy of the
        weights. The copy (and the kept prefix, and the greedy screen) is refreshed when the weights
        change in place (an optimizer step, `with torch.no_grad(): p.copy_(...)`): a tensor's version
        counts those. A write through `p.data` does not move it: make a new Engine after one.
        cuda_graphs (default: on for a model on CUDA, unless NANOPOST_CUDA_GRAPHS=0): decode steps
        replayed from a CUDA graph (DecodeGraph), captured again whenever the batch's cache changes shape.
        greedy_screen: plain greedy decoding (no repetition penalty) of a float32 or bf16 model on
        CPU picks each token through GreedyScreen (an int8 copy of the lm_head with an error bound,
        exact candidates rescored in float32) instead of computing every logit."""
        self.model, self.tok = model, tokenizer
        self.eos = torch.tensor(tokenizer.eos_ids)
        self.pack = can_pack(model) if pack_weights is None else pack_weights and can_pack(model)
        if cuda_graphs and not model.lm_head.weight.is_cuda:
            raise ValueError("cuda_graphs needs a model on a CUDA device")
        self.cuda_graphs = cuda_graphs  # None: wherever the model is on CUDA (checked at each call: it may move)
        if cuda_graphs is None:
            graphs_switch()  # a bad NANOPOST_CUDA_GRAPHS is said now, not at the first decode step
        self._graph = None
        self.greedy_screen = greedy_screen
        self._screen = (None, None)  # (weights_state of the lm_head weight, GreedyScreen or None)
        self._packed = {}  # Linear -> (weights_state of its weight, packed weight)
        self._prefixes = []  # [(tokens, KVCache of one row)], least recently used first
        self._prefix_state = None  # weights_state of the parameters the kept prefixes were computed with

    def forget_prefixes(self):
        """Drop the prompt prefixes kept across calls (a benchmark times each call as if it were the first)."""
        self._prefixes = []

    @contextmanager
    def fast_linears(self):
        if not (self.pack and can_pack(self.model)):  # (the model may have moved since: model.to())
            yield
            return
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        try:
            for lin in linears:
                kept = self._packed.pop(lin, None)
                if kept is None or not unchanged(kept[0], [lin.weight]):  # updated in place, or model.to()
                    kept = None  # the stale copy freed before the new one is made
                    kept = (weights_state([lin.weight]), torch.ops.mkldnn._reorder_linear_weight(lin.weight.detach(), 8))
                self._packed[lin] = kept
                lin.forward = partial(_packed_linear, kept[1], lin.bias)
            yield
        finally:
            for lin in linears:
                lin.__dict__.pop("forward", None)  # back to nn.Linear.forward

    def _screen_for(self, s: Sampling):
        """The GreedyScreen for this call, or None: sampling, a repetition penalty (it needs every
        logit), weights neither float32 nor bf16 on CPU, or no exact int8 matmul here. Rebuilt when
        the lm_head weight changes (training, a merge)."""
        w = self.model.lm_head.weight
        if (not self.greedy_screen or s.temperature > 0 or s.repetition_penalty != 1.0
                or w.dtype not in (torch.float32, torch.bfloat16) or w.device.type != "cpu"):
            return None
        if not unchanged(self._screen[0], [w]):
            self._screen = (None, None)  # the stale copy freed before the new one is made
            backend = int8_matmul(w.shape[1])  # none (no VNNI): full logits, for bf16 its own bf16 ones
            self._screen = (weights_state([w]), GreedyScreen(self.model.lm_head, backend) if backend else None)
        return self._screen[1]

    # ---- shared prefixes ----

    def _plan(self, prompts, known: list | None = None) -> tuple[list[int], list[int]]:
        """-> (prompt indices in token order, each prompt's shared length: its longest common
        prefix with a neighbour in that order, which is its longest with any other prompt).
        known: the prompts seen before, sorted (a server's earlier requests, which arrive one at a
        time); a prompt's shared length counts them too, and the new prompts are added to it."""
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])
        shared = [0] * len(prompts)
        for a, b in zip(order, order[1:]):
            n = lcp(prompts[a], prompts[b])
            shared[a], shared[b] = max(shared[a], n), max(shared[b], n)
        for i in order if known else ():  # the longest with an earlier prompt: one of its neighbours among them
            j = bisect.bisect(known, prompts[i])
            shared[i] = max([shared[i]] + [lcp(prompts[i], known[k]) for k in (j - 1, j) if 0 <= k < len(known)])
        if known is not None:
            known[:] = sorted(known + [prompts[i] for i in order])  # two sorted runs: a linear merge
        return order, [min(n, len(p) - 1) for n, p in zip(shared, prompts)]  # every row keeps >= 1 token to run

    def _prefix(self, p, shared: int):
        """-> (kept prefix KVCache or None, m): the first m tokens of p have their K/V in it. A
        prefix `shared` tokens long is computed (extending the best kept one) when it adds at
        least MIN_EXTEND tokens to what is kept."""
        if not unchanged(self._prefix_state, self.model.parameters()):  # other weights (training, a merge,
            self._prefixes, self._prefix_state = [], weights_state(self.model.parameters())  # model.to): stale K/V
        best, m = None, 0
        for entry in self._prefixes:
            n = min(lcp(entry[0], p), len(p) - 1)
            if n > m:
                best, m = entry, n
        if shared - m >= MIN_EXTEND:
            cache, _ = self._prefill(best[1] if best else None, m, [p[m:shared]])
            if best is not None and m == len(best[0]):
                self._prefixes.remove(best)  # the new prefix holds all of it
            best, m = (tuple(p[:shared]), cache), shared
            self._prefixes.append(best)
            del self._prefixes[:-MAX_PREFIXES]
        if best is not None:  # most recently used last
            self._prefixes.remove(best)
            self._prefixes.append(best)
        return (best[1] if best else None), m

    def _groups(self, prompts, rows, shared):
        """rows (in token order) -> [(prefix KVCache or None, m, rows)]: consecutive rows on the same
        kept prefix, m the shortest of their shared lengths, at most PACK_TOKENS suffix tokens each."""
        groups = []
        for i in rows:
            prefix, m = self._prefix(prompts[i], shared[i])
            g = groups[-1] if groups else None
            if g is not None and g[0] is prefix and sum(len(prompts[j]) - min(g[1], m) for j in g[2] + [i]) <= PACK_TOKENS:
                g[1] = min(g[1], m)
                g[2].append(i)
            else:
                groups.append([prefix, m, [i]])
        return groups

    def _prefill(self, prefix: KVCache | None, m: int, suffixes: list[list[int]]):
        """Run the suffixes after the first m positions of `prefix`, packed into one row: each
        suffix sees the prefix and itself (block-diagonal causal), at positions m, m+1, ...
        -> (KVCache of that row: prefix, then the suffixes one after the other; the final hidden
        state (n, C) at each suffix's last token, in the model's dtype: lm_head gives its logits)."""
        model, dev = self.model, self.model.lm_head.weight.device
        sizes = [len(x) for x in suffixes]
        lens, T = torch.tensor(sizes, device=dev), sum(sizes)
        cache = KVCache(model.config, 1, m + T, cache_dtype(model), dev)
        if m:
            cache.k[:, :, :, :m], cache.v[:, :, :, :m] = prefix.k[:, :, :, :m], prefix.v[:, :, :, :m]
            cache.pos = m
        seg = torch.repeat_interleave(torch.arange(len(suffixes), device=dev), lens)  # suffix of each token
        first = torch.cumsum(lens, 0) - lens
        positions = m + torch.arange(T, device=dev) - first[seg]
        # one suffix: causal (the model's default, after the cache's m slots)
        mask = Segments(m, sizes) if len(suffixes) > 1 else None
        ids = torch.tensor([t for x in suffixes for t in x], device=dev)[None]
        return cache, model(ids, position_ids=positions[None], cache=cache, mask=mask, return_hidden=True,
                            keep=first + lens - 1)[0]

    # ---- scoring ----

    def next_logprobs(self, prompts: list[list[int]], token_ids: list[int], batch_size: int = 8) -> list[list[float]]:
        """Log-probs of token_ids as the next token after each prompt (letter scoring), with the
        shared prefixes computed once; batch_size: prompts per packed prefill at most.
        The scored tokens' logits are computed in float32 from the final hidden state: in bf16 the
        lm_head's output is rounded to steps of 1/8 at typical logit sizes, which ties or flips
        close options (a tie goes to the first letter, A). The log-softmax normaliser, shared by
        every option, comes from the full logits in the model's dtype."""
        if empty := [i for i, p in enumerate(prompts) if len(p) == 0]:
            raise ValueError(f"next_logprobs: prompt {empty[0]} is empty: no position to score the next token at")
        out = [None] * len(prompts)
        with torch.inference_mode(), self.fast_linears():
            dt = torch.promote_types(self.model.lm_head.weight.dtype, torch.float32)  # float64 stays float64
            w = self.model.lm_head.weight[token_ids].to(dt)  # (n_options, C)
            order, shared = self._plan(prompts)
            for start in range(0, len(order), batch_size):
                for prefix, m, rows in self._groups(prompts, order[start:start + batch_size], shared):
                    _, hidden = self._prefill(prefix, m, [prompts[i][m:] for i in rows])
                    norm = self.model.lm_head(hidden).to(dt).logsumexp(-1, keepdim=True)
                    for i, lp in zip(rows, (hidden.to(dt) @ w.T - norm).tolist()):
                        out[i] = lp
        return out

    # ---- generation ----

    def generate_ids(self, prompts: list[list[int]], s: Sampling = Sampling(), on_token=None,
                     batch_size: int | None = None, on_done=None, limits: list[int] | None = None,
                     more=None) -> list[list[int]]:
        """prompts: token id lists -> the new token ids of each row (eos and stop strings cut).
        batch_size: rows decoded concurrently (default: all prompts); the others wait for a free slot.
        limits: each prompt's max_new_tokens (default s.max_new_tokens for every one).
        more(n): asked for at most n more prompts whenever slots are free (a server's requests that
        arrive mid-run) -> a list of (ids, max_new_tokens); they take the next prompt indices and
        the call returns when every prompt, first or added, is done.
        on_token(step, tokens, done): after every step, lists over the prompts (None for a prompt
        not running this step); it may return prompt indices to end now (a client went away).
        on_done(i, ids): as soon as prompt i is finished."""
        if not prompts and more is None:
            raise ValueError("no prompts")
        limits = [s.max_new_tokens] * len(prompts) if limits is None else list(limits)
        if len(limits) != len(prompts):
            raise ValueError(f"{len(limits)} limits for {len(prompts)} prompts")
        try:
            with torch.inference_mode(), self.fast_linears():
                return self._generate_ids(list(zip(prompts, limits)), s, on_token, batch_size or max(len(prompts), 1),
                                          on_done, more)
        finally:
            self._graph = None  # a captured step holds its cache and its own memory: freed with the call, even on error

    def _generate_ids(self, first, s, on_token, batch_size, on_done, more):
        """first: (prompt ids, max_new_tokens) pairs; the rest as generate_ids."""
        model, dev, dtype = self.model, self.model.lm_head.weight.device, cache_dtype(self.model)
        V = model.config.vocab_size
        prompts, limits, shared, waiting = [], [], [], deque()  # per prompt index, first or added
        known = []  # every prompt so far, sorted: one added later shares a prefix with the earlier ones
        out, done = [], []

        def enqueue(new):  # (ids, limit) pairs -> waiting, in token order (neighbours share prefixes)
            for p, n in new:
                if len(p) == 0 or n < 1:
                    raise ValueError(f"every prompt needs at least one token and a limit >= 1, got {len(p)} tokens, limit {n}")
            base = len(prompts)
            prompts.extend(list(p) for p, _ in new)
            limits.extend(n for _, n in new)
            order, sh = self._plan(prompts[base:], known)
            shared.extend(sh)
            waiting.extend(base + i for i in order)
            out.extend([] for _ in new)
            done.extend(False for _ in new)

        enqueue(first)
        n = min(batch_size, len(prompts))
        cache = KVCache(model.config, n, max((len(p) + m for p, m in first), default=1), dtype, dev)
        cache.pos = torch.zeros(n, dtype=torch.long, device=dev)  # per-row lengths
        slot = [None] * n  # the prompt each slot runs
        graphs = self._graphs_for(cache)  # the device and the switch: the same for the whole call
        screen = None if graphs else self._screen_for(s)
        # each running row's next-token logits, or with the screen its final hidden state (float32)
        last = torch.zeros(n, V if screen is None else model.config.hidden_size, device=dev)
        seen = torch.zeros(n, V, dtype=torch.bool, device=dev) if s.repetition_penalty != 1.0 else None
        # seeded: a generator per prompt, so its tokens do not depend on what else runs (or ran) in the call
        gens = {} if s.seed is not None and s.temperature >= 1e-5 else None
        eos = set() if s.ignore_eos else set(self.eos.tolist())
        # the tokens whose text can hold a stop string: each gives at least one byte, however the
        # model spells it ("\n" * 30 is 15 tokens to encode, but may come one newline a token)
        stop_tail = max((len(x.encode("utf-8")) for x in s.stop), default=0) + 8
        # cascade attention where a decode step's attention is matmul-softmax-matmul (model.attention);
        # never in a captured step, whose shapes are fixed
        cascade = dev.type == "cpu" and dtype == torch.float32 and not graphs

        def grow(B, T):  # room for B slots of T positions; only rows added mid-run (more) need it
            nonlocal cache, last, seen, slot
            B0, T0 = cache.k.shape[1], cache.k.shape[3]
            if B <= B0 and T <= T0:
                return
            bigger = KVCache(model.config, max(B, B0), max(T, T0), dtype, dev)
            bigger.k[:, :B0, :, :T0], bigger.v[:, :B0, :, :T0] = cache.k, cache.v
            extra = max(B, B0) - B0
            bigger.pos = torch.cat([cache.pos, cache.pos.new_zeros(extra)])
            cache, slot = bigger, slot + [None] * extra
            last = torch.cat([last, last.new_zeros(extra, last.shape[1])])
            seen = torch.cat([seen, seen.new_zeros(extra, V)]) if seen is not None else None

        def admit():  # the next waiting prompts into the free slots: prefix K/V copied, suffix prefilled
            running = sum(b is not None for b in slot)
            if more is not None and len(waiting) < batch_size - running:
                enqueue(more(batch_size - running - len(waiting)))
            rows = [waiting.popleft() for _ in range(min(len(waiting), batch_size - running))]
            if not rows:
                return
            grow(running + len(rows), max(len(prompts[i]) + limits[i] for i in rows))
            where = dict(zip(rows, [b for b in range(len(slot)) if slot[b] is None]))
            for prefix, m, group in self._groups(prompts, rows, shared):
                packed, hidden = self._prefill(prefix, m, [prompts[i][m:] for i in group])
                nexts = hidden.float() if screen is not None else model.lm_head(hidden).float()
                start = m
                for j, i in enumerate(group):
                    b, T = where[i], len(prompts[i]) - m
                    for dst, src in ((cache.k, packed.k), (cache.v, packed.v)):
                        dst[:, b, :, :m] = src[:, 0, :, :m]
                        dst[:, b, :, m:m + T] = src[:, 0, :, start:start + T]
                    start += T
                    slot[b], cache.pos[b], last[b] = i, len(prompts[i]), nexts[j]
                    if seen is not None:
                        seen[b] = False
                        seen[b, prompts[i]] = True
            share()

        def share():  # the prompt tokens every running row starts with: attended once a step for all rows
            live = [b for b in range(len(slot)) if slot[b] is not None]
            if not cascade or not live:
                return
            first = prompts[slot[live[0]]]
            P = min(lcp(first, prompts[slot[b]]) for b in live)
            cache.share(live[0], first[:P] if P >= MIN_CASCADE else ())

        admit()
        step = 0
        while any(i is not None for i in slot):
            running = [b for b in range(len(slot)) if slot[b] is not None]
            full = len(running) == len(slot)  # every slot runs: no gather (nor its host-to-device copy)
            idx = None if full else torch.tensor(running, device=dev)
            rows = last if full else last[idx]
            if gens is not None:  # (made once per prompt: seeding one costs more than the draw)
                gens.update({slot[b]: torch.Generator(dev).manual_seed(s.seed) for b in running if slot[b] not in gens})
            gen = None if gens is None else [gens[slot[b]] for b in running]
            nxt_t = screen(rows) if screen is not None else sample_next(rows, seen if full or seen is None else seen[idx], s, gen)
            nxt = nxt_t.tolist()
            tokens = [None] * len(prompts)
            for b, t in zip(running, nxt):
                i = slot[b]
                tokens[i] = t
                if t in eos:  # the eos itself is not part of the output
                    done[i] = True
                    continue
                out[i].append(t)
                if seen is not None:
                    seen[b, t] = True
                if len(out[i]) >= limits[i]:
                    done[i] = True
                elif s.stop:
                    done[i] = stop_in_tail(self.tok, out[i], s.stop, stop_tail)
            for b in running:
                if done[slot[b]]:
                    if on_done is not None:
                        on_done(slot[b], out[slot[b]])
                    slot[b] = None
            if on_token is not None:
                ended = set(on_token(step, tokens, list(done)) or ())
                if ended:  # the caller no longer wants these rows: free their slots, drop them from the queue
                    for i in ended:
                        done[i] = True
                    slot = [None if i in ended else i for i in slot]
                    waiting = deque(i for i in waiting if i not in ended)
            step += 1
            live = [b for b in range(len(slot)) if slot[b] is not None]
            carry_on = full and len(live) == len(slot)  # the same rows run on: their new tokens are the next input
            if live and not waiting and len(live) <= len(slot) // 2:  # the tail: drop the idle slots
                keep = torch.tensor(live, device=dev)
                cache.k, cache.v, cache.pos, last = cache.k[:, keep], cache.v[:, keep], cache.pos[keep], last[keep]
                seen = seen[keep] if seen is not None else None
                slot = [slot[b] for b in live]
                live = list(range(len(live)))
                share()  # the rows left may share more
            if carry_on:
                ids = nxt_t
            elif live:  # an idle slot runs a pad token at position 0
                ids = torch.full((len(slot),), self.tok.pad_id, dtype=torch.long, device=dev)
                ids[live] = torch.tensor([out[slot[b]][-1] for b in live], device=dev)
                idle = torch.tensor([slot[b] is None for b in range(len(slot))], device=dev)
                cache.pos.masked_fill_(idle, 0)
            if live:  # one decode step for every slot
                # per-row lengths: the model places each row at its own position and masks its keys
                # past its own length (Qwen2.forward, KVCache.begin)
                last[:] = self._decode(ids, cache, hidden=screen is not None)
            admit()
        return out

    def _graphs_for(self, cache: KVCache) -> bool:
        """CUDA graphs for this cache's decode steps: the engine's cuda_graphs, or by default on CUDA
        unless NANOPOST_CUDA_GRAPHS=0 (one switch for every script: to compare, or to debug)."""
        if self.cuda_graphs is not None:
            return self.cuda_graphs and cache.k.is_cuda
        return graphs_switch() and cache.k.is_cuda

    def _decode(self, ids_B, cache: KVCache, hidden: bool = False):
        """One decode step, each row at its own length -> float32 next-token logits (B, V), or with
        hidden the final hidden states (B, C) (for a GreedyScreen: CPU only, never a graph)."""
        if hidden or not self._graphs_for(cache):
            return self.model(ids_B[:, None], cache=cache, return_hidden=hidden)[:, -1].float()
        if self._graph is None or not self._graph.captured_on(cache):  # a new batch, grown or shrunk
            self._graph = None
            self._graph = DecodeGraph(self.model, cache)
        return self._graph(ids_B)

    def generate(self, prompts, s: Sampling = Sampling(), batch_size: int = 16, progress=None,
                 return_truncated: bool = False):
        """prompts: strings (one user turn), chat message lists, or token id lists -> reply texts,
        batch_size rows at a time (continuous batching), results in the input order. With
        return_truncated: (text, truncated) pairs, truncated when the reply used all of
        s.max_new_tokens without an eos or stop string (an API's finish_reason "length")."""
        ids = [self.encode_prompt(p) for p in prompts]
        on_done = (lambda i, new: progress.update(1)) if progress is not None else None
        replies = [self.reply(new, s) for new in self.generate_ids(ids, s, batch_size=batch_size, on_done=on_done)]
        return replies if return_truncated else [text for text, _ in replies]

    def reply(self, new: list[int], s: Sampling) -> tuple[str, bool]:
        """A row's new tokens -> (its text, cut at the first stop string; truncated: it used all of
        s.max_new_tokens without an eos or stop string, an API's finish_reason "length")."""
        text = self.tok.decode(new)
        reply = cut_at_stop(text, s.stop)
        return reply, len(new) >= s.max_new_tokens and reply == text

    def encode_prompt(self, p) -> list[int]:
        if isinstance(p, str):
            p = [{"role": "user", "content": p}]
        if p and isinstance(p[0], dict):
            return self.tok.render(p, add_generation_prompt=True)[0]
        return list(p)


def stop_in_tail(tok, ids, stop, tail: int) -> bool:
    """Whether the last `tail` tokens hold a stop string, decoding only those (cost does not grow
    with the output). The window's ends may cut a character (U+FFFD there): stripped, as a stop
    matches whole characters only ("\ufffd" as a stop matched a character still arriving)."""
    window = tok.decode(ids[-tail:]).strip("\ufffd")
    return any(x in window for x in stop)


def cut_at_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(x) for x in stop if x in text), default=-1)
    return text if cut < 0 else text[:cut]
