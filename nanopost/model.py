"""Qwen2, written out in one file. Parameter names equal the Hugging Face names, so loading a
checkpoint is a plain name check (see checkpoint.py). Shapes: B batch, T query positions,
S key positions, H query heads, K kv heads, D head dim, C hidden size, V vocab."""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from nanopost import kernels


@dataclass
class Qwen2Config:
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False  # a config.json without it is untied, as transformers reads it
    max_position_embeddings: int = 32768
    head_dim: int | None = None  # Qwen2 always uses hidden // heads; kept for forks that set it
    attention_dropout: float = 0.0  # on the attention probabilities in training mode, as transformers' SDPA path
    # special token ids other tools read from config.json (transformers' model.config, vLLM): carried
    # from the checkpoint into every save as they are, not used by the model
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for f in fields(self):  # a value of the wrong kind fails here, naming its key, not in a forward
            v = getattr(self, f.name)
            if f.name in ("rms_norm_eps", "rope_theta"):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                    raise ValueError(f"{f.name} is {v!r}: expected a positive number")
            elif f.name == "attention_dropout":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                    raise ValueError(f"{f.name} is {v!r}: expected a number in [0, 1)")
            elif f.name.endswith("_token_id"):
                continue  # carried as the checkpoint has them, never a reason to refuse it
            elif f.name == "tie_word_embeddings":
                if not isinstance(v, bool):
                    raise ValueError(f"{f.name} is {v!r}: expected true or false")
            elif v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"{f.name} is {v!r}: expected a positive integer")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, d: dict) -> "Qwen2Config":
        """Read a transformers config.json dict as transformers 5 does: the RoPE block is rope_scaling
        if set, else rope_parameters (5.x); rope_theta inside it, else at top level (4.x), else 10000
        (its default). A scaled RoPE in either block is refused."""
        d = dict(d)
        for key in ("rope_parameters", "rope_scaling"):
            rope = d.get(key)
            if rope is None:
                continue
            if not isinstance(rope, dict):
                raise ValueError(f"{key} is {rope!r}: expected an object")
            if any(isinstance(v, dict) for v in rope.values()):  # one block per layer type: read by none of it
                raise ValueError(f"{key}={rope!r:.200}: a RoPE block per layer type is not supported (a Qwen2 config "
                                 f"has one block; transformers' Qwen2 does not read this one either)")
            if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
                raise ValueError(f"unsupported rope scaling {key}={rope!r}: nanopost implements plain RoPE")
        theta = (d.get("rope_scaling") or d.get("rope_parameters") or {}).get("rope_theta", d.get("rope_theta"))
        d["rope_theta"] = 10000.0 if theta is None else theta
        if d.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers' two names for x * sigmoid(x)
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported: Qwen2's MLP is SwiGLU (silu)")
        if d.get("use_sliding_window") and d.get("sliding_window") is not None:  # as transformers' Qwen2Config:
            n, first = d.get("num_hidden_layers", 0), d.get("max_window_layers", 28)  # layers from max_window_layers
            types = d.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
            if "sliding_attention" in types:  # slide; with none of them sliding it is plain attention
                raise ValueError(f"use_sliding_window=true with layers that slide ({types.count('sliding_attention')} of "
                                 f"{len(types)}) is not supported (no Qwen2 release uses it)")
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d["num_attention_heads"]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_hf(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["head_dim"] == self.hidden_size // self.num_attention_heads:  # else the weights need it said
            d.pop("head_dim")
        d = {k: v for k, v in d.items() if not (k.endswith("_token_id") and v is None)}
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
                "use_sliding_window": False, "use_cache": True, **d}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in float32, cast back to the input dtype *before* the weight (as Qwen2 does);
        # the reference is kernels/rmsnorm.py, a Triton kernel on CUDA
        return kernels.rms_norm(x, self.weight, self.eps)


def rope_cos_sin(position_ids_BT, head_dim: int, theta: float, dtype):
    """cos, sin of shape (B, T, D): angles in float32, halves duplicated (rotate-half form)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids_BT.device,
                                            dtype=torch.int64).float() / head_dim)
    angles = position_ids_BT.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class KVCache:
    """Preallocated keys/values for every layer: (L, B, K, S_max, D). `pos` counts filled slots:
    an int shared by every row (the model writes slots [pos, pos+T)), or a LongTensor (B,) of
    per-row lengths for rows at different positions (continuous batching: one token per row per
    forward, written at each row's own pos). The model advances pos by T once per forward.
    static (per-row lengths only): every forward attends over all max_len slots, each row's keys
    past its own length masked, so shapes never change and nothing waits for the device (a CUDA
    graph replays such a step); the caller keeps every row inside max_len."""

    def __init__(self, cfg: Qwen2Config, batch_size: int, max_len: int, dtype, device):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = 0
        self.static = False
        self.shared_tokens = ()  # slots [0, len) hold these tokens in every row: see share()
        self.prefix_k = self.prefix_v = None

    @property
    def shared(self) -> int:
        return len(self.shared_tokens)

    def share(self, row: int, tokens):
        """Cascade attention: every row starts with `tokens` (a few-shot block, a system prompt), so
        slots [0, len(tokens)) hold the same keys/values in every row. They are copied once from
        `row` into (L, K, P, D) and a decode step attends them once for all rows; each row reads
        only its own slots from P on (at 16 rows x ~800 cached positions, a 4-shot GSM8K prefix
        of ~600: ~10 ms less a step on CPU, BENCHMARKS.md). () turns it off. Per-row lengths
        only, never static; the caller keeps every row's length >= P."""
        tokens = tuple(tokens)
        if tokens == self.shared_tokens:
            return
        if tokens and (self.static or not isinstance(self.pos, torch.Tensor)):
            raise ValueError("a shared prefix needs a cache with per-row lengths, not static")
        P = len(tokens)
        self.shared_tokens = tokens
        self.prefix_k = self.k[:, row, :, :P].clone() if P else None
        self.prefix_v = self.v[:, row, :, :P].clone() if P else None

    def prefix(self, layer: int):
        """The shared prefix's (K, P, D) keys and values of a layer, or None."""
        return (self.prefix_k[layer], self.prefix_v[layer]) if self.shared else None

    def begin(self, T: int):
        """Once per forward, before the layers: where this forward's T slots go, checked against
        max_len (per-row lengths: one token per row; one host sync here, not one per layer)."""
        if isinstance(self.pos, torch.Tensor):
            if T != 1:
                raise ValueError(f"KV cache with per-row lengths takes one token per row per forward, got {T}")
            self._rows = torch.arange(self.k.shape[1], device=self.k.device)
            self._end = self.k.shape[3] if self.static else int(self.pos.max()) + 1
        else:
            self._end = self.pos + T
        if self._end > self.k.shape[3]:
            raise ValueError(f"KV cache overflow: {self._end} positions > max_len {self.k.shape[3]}")

    def update(self, layer: int, k_BKTD, v_BKTD):
        end = self._end
        if isinstance(self.pos, torch.Tensor):  # per-row lengths: Qwen2.forward masks each row's keys past its own
            self.k[layer, self._rows, :, self.pos] = k_BKTD[:, :, 0].to(self.k.dtype)
            self.v[layer, self._rows, :, self.pos] = v_BKTD[:, :, 0].to(self.v.dtype)
        else:
            self.k[layer, :, :, self.pos:end] = k_BKTD
            self.v[layer, :, :, self.pos:end] = v_BKTD
        P = self.shared  # a shared prefix is attended from prefix() instead
        return self.k[layer, :, :, P:end], self.v[layer, :, :, P:end]


class PromptKV:
    """Keys and values kept from one forward for a second forward that continues its rows (KTO's
    KL pairs: prompt i, computed once for example i, then attended by completion i-1). Passed as
    the first forward's `cache`, it keeps each layer's keys/values (detached: the second forward
    needs no gradient; under grad checkpointing the recomputation keeps the same again) and
    changes nothing; continued() is the second forward's `cache`: its keys/values follow the kept
    ones, and its mask says which kept slots each row sees."""
    shared = 0  # (what Qwen2.forward reads of a KVCache)

    def __init__(self, k=None, v=None):
        self.first = k is None
        self.k, self.v = (k, v) if k is not None else ({}, {})
        self.pos = 0 if self.first else next(iter(k.values())).shape[2]

    def begin(self, T: int):
        pass

    def prefix(self, layer: int):
        return None

    def update(self, layer: int, k_BKTD, v_BKTD):
        if self.first:
            self.k[layer], self.v[layer] = k_BKTD.detach(), v_BKTD.detach()
            return k_BKTD, v_BKTD
        return torch.cat([self.k[layer], k_BKTD], 2), torch.cat([self.v[layer], v_BKTD], 2)

    def continued(self) -> "PromptKV":
        return PromptKV(self.k, self.v)


class Segments:
    """A packed prefill's mask (Engine._prefill), without building it: after `start` cached slots
    that every query sees, the forward's T tokens are sequences of lens[0], lens[1], ... tokens, each
    causal over itself. attention() runs one SDPA per sequence, its queries against the cached slots
    and its own keys, instead of one SDPA over a dense (T, start + T) mask whose off-diagonal blocks
    are computed and then thrown away (packed 0-shot MMLU on CPU: attention 7% -> 4% of the time)."""

    def __init__(self, start: int, lens: list[int]):
        self.start, self.lens = start, list(lens)

    def rows(self, keep, device):
        """Rows `keep` of the mask as a (len(keep), start + T) boolean tensor, True = attend: every
        cached slot, then its own sequence up to itself."""
        ends = torch.tensor(self.lens, device=device).cumsum(0)
        first = torch.cat([ends.new_zeros(1), ends])[torch.searchsorted(ends, keep, right=True)]  # its sequence's start
        j = torch.arange(self.start + sum(self.lens), device=device) - self.start  # key slot, counted from the first new one
        return (j < 0) | ((j >= first[:, None]) & (j <= keep[:, None]))


def mask_rows(mask, keep, T: int, S: int, device):
    """The rows `keep` of a forward's mask (None: causal over T queries after S - T earlier slots),
    built for those rows only: a long prompt's whole (T, S) mask is T·S booleans (1 GiB at 32k)."""
    if mask is None:  # query t sees every slot up to its own, S - T + t
        return torch.arange(S, device=device) <= (keep + S - T)[:, None]
    if isinstance(mask, Segments):
        return mask.rows(keep, device)
    return mask if mask.shape[-2] == 1 else mask[..., keep, :]  # a key mask (.., 1, S) serves every row


def attention(q_BHTD, k_BKSD, v_BKSD, mask, scale: float, prefix=None, dropout: float = 0.0):
    """softmax(q kᵀ · scale, masked) v. GQA: query head h reads kv head h // (H/K), without copying
    K/V. mask: boolean, broadcastable to (B, H, T, S), True = attend; None = causal (T > 1).
    prefix: (K, P, D) keys and values every row attends before its own (KVCache.share), unmasked.
    One query per row in float32 on CPU (a decode step), with no mask or a boolean key mask per
    row (B or 1, 1, 1, S), is a plain matmul, softmax, matmul, the H/K query heads of a kv head as
    the rows of one matmul: 1.5-1.7x faster than SDPA's CPU kernel at 16 rows x 600-900 keys (a
    16-row GSM8K step 181 -> 170 ms, BENCHMARKS.md), equal up to float rounding; with a prefix,
    its scores are one matmul for all rows' queries and the two parts share one softmax
    (cascade attention). mask: a Segments, one SDPA per packed sequence. All else is SDPA (a
    prefix copied in front of every row's keys). dropout: SDPA's, on the attention probabilities
    (config.attention_dropout in training mode; 0 in every released Qwen2)."""
    if k_BKSD.dtype != q_BHTD.dtype:  # a float32 KV cache under a bf16 model (engine.cache_dtype): float32 math
        return attention(q_BHTD.to(k_BKSD.dtype), k_BKSD, v_BKSD, mask, scale, prefix, dropout).to(q_BHTD.dtype)
    B, H, T, D = q_BHTD.shape
    if isinstance(mask, Segments):  # each sequence: the cached slots, then its own keys, causally
        assert prefix is None, "a packed prefill writes a cache of its own, never a shared one"
        m, a, out = mask.start, 0, []
        for n in mask.lens:
            k, v = (torch.cat([x[:, :, :m], x[:, :, m + a:m + a + n]], 2) for x in (k_BKSD, v_BKSD))
            causal = torch.ones(n, m + n, dtype=torch.bool, device=q_BHTD.device).tril(m) if m else None
            out.append(attention(q_BHTD[:, :, a:a + n], k, v, causal, scale, dropout=dropout))
            a += n
        return torch.cat(out, 2)
    K = k_BKSD.shape[1]
    row_mask = mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == mask.shape[2] == 1
                                and mask.shape[0] in (1, B))
    if T == 1 and row_mask and q_BHTD.dtype == torch.float32 and q_BHTD.device.type == "cpu" and not torch.is_grad_enabled() \
            and not dropout:
        q_BKGD = q_BHTD.view(B, K, H // K, D)
        s_BKGS = q_BKGD @ k_BKSD.transpose(-1, -2) * scale
        if mask is not None:  # (B|1, 1, 1, S): the same keys for every head of a row
            s_BKGS = s_BKGS.masked_fill(~mask.view(mask.shape[0], 1, 1, -1), float("-inf"))
        if prefix is None:
            return (s_BKGS.softmax(-1) @ v_BKSD).view(B, H, 1, D)
        k_KPD, v_KPD = prefix  # every row's queries of kv head k as the rows of one matmul
        q_KRD = q_BKGD.transpose(0, 1).reshape(K, B * (H // K), D)
        s_KRP = q_KRD @ k_KPD.transpose(-1, -2) * scale
        m_BKG = torch.maximum(s_KRP.amax(-1).view(K, B, H // K).transpose(0, 1), s_BKGS.amax(-1))  # finite: P >= 1
        e_KRP = (s_KRP - m_BKG.transpose(0, 1).reshape(K, -1, 1)).exp()
        e_BKGS = (s_BKGS - m_BKG[..., None]).exp()
        num = (e_KRP @ v_KPD).view(K, B, H // K, D).transpose(0, 1) + e_BKGS @ v_BKSD
        den = e_KRP.sum(-1).view(K, B, H // K).transpose(0, 1) + e_BKGS.sum(-1)
        return (num / den[..., None]).reshape(B, H, 1, D)
    if prefix is not None:
        k_KPD, v_KPD = prefix
        P, S = k_KPD.shape[1], k_BKSD.shape[2]
        k_BKSD = torch.cat([k_KPD.expand(B, -1, -1, -1), k_BKSD], 2)
        v_BKSD = torch.cat([v_KPD.expand(B, -1, -1, -1), v_BKSD], 2)
        if mask is None:  # causal over the row's own T queries, after every prefix slot
            mask = torch.ones(T, S, dtype=torch.bool, device=q_BHTD.device).tril(S - T)
        mask = mask if mask.dtype == torch.bool else mask == 0  # additive (0 / -inf) -> boolean
        mask = torch.cat([mask.new_ones(mask.shape[:-1] + (P,)), mask], -1)
    return F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, attn_mask=mask, is_causal=mask is None and T > 1,
                                          scale=scale, enable_gqa=K != H, dropout_p=dropout)


def fuse_projections(x) -> bool:
    """Whether q/k/v and gate/up run as one matmul each (fused_linear): for forwards of several
    tokens a row on CUDA -- training, where it took an H200's SFT step from 35.0% to 40.5% MFU
    (BENCHMARKS.md), and with it every pass that must compute exactly as training does (KTO's
    reference log-probs under no_grad), and prefill. Not a decode step (one token a row), where
    joining the weights would copy them for every token, and not on CPU, where joining them costs
    more than it saves (a float32 SFT step 8% slower) and the engine packs each Linear's weight."""
    return x.is_cuda and x.shape[1] > 1


def fused_linear(x, linears):
    """x through Linears that read the same x as one matmul, their weights (and biases) joined:
    x is read once, and backward computes x's gradient in one matmul instead of one per Linear
    plus their sum. The weights change every training step, so they are joined every forward, a
    copy small next to the activations of a forward of many tokens."""
    w = torch.cat([lin.weight for lin in linears])
    b = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
    return F.linear(x, w, b)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv, self.hd = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.n_head * self.hd, bias=True)
        self.k_proj = nn.Linear(C, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(C, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.hd, C, bias=False)
        self.dropout = cfg.attention_dropout

    def forward(self, x, cos, sin, mask, cache, keep=None):
        B, T, _ = x.shape
        if fuse_projections(x):  # q, k, v as one matmul
            q, k, v = fused_linear(x, (self.q_proj, self.k_proj, self.v_proj)).split(
                [self.n_head * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = kernels.apply_rope(q, k, cos, sin)  # x * cos + rotate_half(x) * sin (kernels/rope.py)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if keep is not None:  # only these positions' outputs are needed (every position's k, v are)
            q, mask = q[:, :, keep], mask_rows(mask, keep, T, k.shape[2], x.device)
            T = len(keep)
        y = attention(q, k, v, mask, 1.0 / math.sqrt(self.hd), cache.prefix(self.layer) if cache is not None else None,
                      dropout=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):  # silu(gate) * up
        if fuse_projections(x):  # gate and up as one matmul, its output's two halves
            return self.down_proj(kernels.silu_mul_halves(fused_linear(x, (self.gate_proj, self.up_proj))))
        return self.down_proj(kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, keep=None):
        """keep: positions whose output is needed (the last layer of a prefill): the result has
        only those; the attention still writes every position's keys and values to the cache."""
        y = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, keep)
        x = (x if keep is None else x[:, keep]) + y
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Body(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def packed_causal_mask(position_ids_BT):
    """Block-diagonal causal mask (B, 1, T, T) for packed rows: a new sequence starts wherever
    the position does not continue by +1 (the rule transformers uses too). None when every row
    is one sequence: plain causal attention then takes SDPA's faster is_causal path."""
    prev = torch.cat([position_ids_BT[:, :1] - 1, position_ids_BT[:, :-1]], dim=1)
    seg = (position_ids_BT != prev + 1).cumsum(-1)  # 0 for the first sequence of a row, 1 for the next...
    if bool((seg[:, -1] == 0).all()):
        return None
    T = position_ids_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    return (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]


class Qwen2(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.config = cfg
        self.grad_checkpointing = False  # recompute each block in backward (training memory)
        self.model = Qwen2Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, position_ids=None, cache: KVCache | None = None, mask=None,
                return_hidden: bool = False, last_only: bool = False, keep=None):
        """input_ids (B, T) -> logits (B, T, V), or the final-norm hidden states (B, T, C) with
        return_hidden (so a loss can apply lm_head in chunks and never hold B*T*V logits).
        position_ids: default 0..T-1 (after the cache's filled slots); when given without a
        mask, packed sequences (positions restarting) get a block-diagonal causal mask.
        mask: boolean (B, 1, T, S), True = attend, or a Segments (packed prefill); overrides the
        default causal mask.
        keep: LongTensor of positions (0..T-1) whose output is needed (each prompt's last token in
        a prefill): the output has those positions only, and the last layer's attention, o_proj
        and MLP run at those only (its q/k/v projections, and the keys/values it caches, still at
        every position): ~4% of a 24-layer prefill's FLOPs. last_only: keep the last position."""
        B, T = input_ids.shape
        start = cache.pos if cache is not None else 0
        if cache is not None:
            cache.begin(T)  # checks the slots; per-row lengths: one token per row
        if isinstance(start, torch.Tensor):  # per-row lengths: row b is at start[b], sees slots <= start[b]
            if position_ids is None:
                position_ids = start[:, None].clone()
            if mask is None:  # (keys of a shared prefix, all visible, are not in it: KVCache.share)
                mask = (torch.arange(cache.shared, cache._end, device=input_ids.device) <= start[:, None])[:, None, None, :]
        elif position_ids is None:
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        elif mask is None and cache is None and T > 1:
            mask = packed_causal_mask(position_ids)
        if mask is None and cache is not None and start > 0 and T > 1:
            # chunked prefill after earlier slots: causal within the chunk, all earlier slots visible
            mask = torch.ones(T, start + T, dtype=torch.bool, device=input_ids.device).tril(start)
        x = self.model.embed_tokens(input_ids)
        if (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and x.is_cuda and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cuda")):  # (under autocast x's dtype is not the queries')
            # SDPA on CUDA turns a boolean mask into an additive one at every call, three kernels a
            # layer (a decode step's ~500 launches are its cost): once here instead
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        if last_only:
            if keep is not None:
                raise ValueError("last_only and keep both choose the positions to keep: pass one")
            keep = torch.arange(T - 1, T, device=input_ids.device)
        if isinstance(mask, Segments) and (mask.start != start or sum(mask.lens) != T):
            raise ValueError(f"Segments mask of {sum(mask.lens)} tokens after {mask.start} slots, "
                             f"for a forward of {T} tokens after {start}")
        for i, block in enumerate(self.model.layers):
            kept = keep if i == len(self.model.layers) - 1 else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, kept, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, kept)
        if cache is not None:
            cache.pos += T
        x = self.model.norm(x)
        return x if return_hidden else self.lm_head(x)
