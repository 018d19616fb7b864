"""The model against transformers' Qwen2ForCausalLM on tiny random checkpoints."""
import json
import os
import shutil

import pytest
import torch

import nanopost
from nanopost.checkpoint import CheckpointError
from nanopost.testing import make_tiny_checkpoint

transformers = pytest.importorskip("transformers")

CONFIGS = [
    dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2),  # GQA 2
    dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4),  # MHA, untied
    dict(tie_word_embeddings=False, hidden_size=56, num_attention_heads=7, num_key_value_heads=1,
         num_hidden_layers=3),  # odd head count, GQA 7
    dict(tie_word_embeddings=True, hidden_size=60, num_attention_heads=5, num_key_value_heads=5,
         intermediate_size=92, rms_norm_eps=1e-2),  # (an eps that shows: every norm must read the config's)
]


def hf_model(d):
    return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


@pytest.mark.parametrize("cfg", CONFIGS, ids=["tied-gqa2", "untied-mha", "odd-gqa7", "tied-h5"])
def test_logits_match_transformers(tmp_path, cfg):
    d = make_tiny_checkpoint(str(tmp_path / "m"), **cfg)
    model, _ = nanopost.load(d)
    ref = hf_model(d)
    ids = torch.randint(0, model.config.vocab_size, (3, 23))
    packed = torch.tensor([list(range(9)) + list(range(6)) + list(range(8)),
                           list(range(23)),
                           list(range(4)) + list(range(19))])
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() <= 1e-4
        ours = model(ids, position_ids=packed)
        theirs = ref(ids, position_ids=packed, use_cache=False).logits  # no cache: packed masks on
        assert (ours - theirs).abs().max() <= 1e-4
        # and packing really isolates the sequences: segment 2 of row 0 equals running it alone
        alone = model(ids[:1, 9:15])
        assert (ours[:1, 9:15] - alone).abs().max() <= 1e-5
        # every row exactly two sequences (the case a single-segment shortcut must not swallow)
        two = torch.tensor([list(range(10)) + list(range(13)), list(range(4)) + list(range(19)),
                            list(range(12)) + list(range(11))])
        ours = model(ids, position_ids=two)
        assert (ours - ref(ids, position_ids=two, use_cache=False).logits).abs().max() <= 1e-4
        assert (ours[1:2, 4:] - model(ids[1:2, 4:])).abs().max() <= 1e-5
        # a sequence starts wherever the position is not the last + 1, upward too (as transformers reads them)
        jump = torch.tensor([list(range(4)) + list(range(7, 26)), list(range(23)), list(range(10)) + list(range(30, 43))])
        ours = model(ids, position_ids=jump)
        assert (ours - ref(ids, position_ids=jump, use_cache=False).logits).abs().max() <= 1e-4
        assert (ours[:1, 4:] - model(ids[:1, 4:], position_ids=jump[:1, 4:])).abs().max() <= 1e-5


def _loss_and_grads(model, ids, autocast, ours):
    from nanopost.losses import reference_sft_loss_sum
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = reference_sft_loss_sum(model, ids, ids) / ids[:, 1:].numel() if ours else \
            model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=["tied-gqa2", "untied-mha", "odd-gqa7"])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_training_loss_and_gradients_match_transformers(tmp_path, cfg, fused, monkeypatch):
    """Multi-token forwards on CUDA run q/k/v and gate/up as one matmul each (model.fused_linear;
    forced here on CPU), and under bf16 autocast the norms write bf16. float32: loss and every gradient equal
    transformers' (1e-4 relative). bf16 autocast: other rounding than transformers' own, so not the
    same bits, but as accurate: each gradient's error against the float32 truth is within 1.5x of
    transformers' own autocast error (both ~1e-2 here; measured worst 1.16x), and within 2e-2 of theirs."""
    import nanopost.model
    monkeypatch.setattr(nanopost.model, "fuse_projections", lambda x: fused)
    d = make_tiny_checkpoint(str(tmp_path / "m"), **cfg)
    ids = torch.randint(0, 500, (2, 17), generator=torch.Generator().manual_seed(3))
    truth_loss, truth = _loss_and_grads(hf_model(d), ids, False, ours=False)
    loss32, ours32 = _loss_and_grads(nanopost.load(d)[0], ids, False, ours=True)
    hf_loss, hf = _loss_and_grads(hf_model(d), ids, True, ours=False)
    loss, ours = _loss_and_grads(nanopost.load(d)[0], ids, True, ours=True)
    assert abs(loss32 - truth_loss) <= 1e-5 * truth_loss and abs(loss - hf_loss) <= 1e-2 * hf_loss
    for name, want in truth.items():
        # k's bias shifts every score of a query equally, which softmax ignores: its true gradient is 0
        # and what it holds is rounding noise, so it is measured against v's bias gradient instead
        scale = truth[name.replace("k_proj", "v_proj")].norm() if name.endswith("k_proj.bias") else want.norm()
        rel = lambda g, w: ((g - w).norm() / scale).item()
        assert rel(ours32[name], want) <= 1e-4, f"{name}: float32 gradient off by {rel(ours32[name], want):.1e}"
        err, hf_err = rel(ours[name], want), rel(hf[name], want)
        assert err <= 1.5 * hf_err + 1e-3, f"{name}: autocast gradient error {err:.1e}, transformers' {hf_err:.1e}"
        assert rel(ours[name], hf[name]) <= 2e-2, f"{name}: {rel(ours[name], hf[name]):.1e} from transformers' autocast"


def test_hidden_states_and_last_only(tiny):
    model, _ = nanopost.load(tiny)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        logits = model(ids)
        hidden = model(ids, return_hidden=True)
        assert torch.allclose(model.lm_head(hidden), logits)
        assert torch.allclose(model(ids, last_only=True), logits[:, -1:], atol=1e-5)


def dense_segments(m, lens):
    """Segments(m, lens) written out: (T, m + T), every cached slot, then causal within each sequence."""
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    causal = torch.ones(len(seg), len(seg), dtype=torch.bool).tril() & (seg[:, None] == seg[None, :])
    return torch.cat([torch.ones(len(seg), m, dtype=torch.bool), causal], 1)


def test_packed_prefill_segments_and_keep_equal_the_dense_forward(tiny):
    """A packed prefill (Engine._prefill) after m cached slots: a Segments mask (one SDPA per
    sequence) and keep (the last layer only at each sequence's last token) give the hidden states
    and every layer's cached keys/values of the dense-mask full forward, which equals one forward
    per sequence (float64)."""
    from nanopost.model import KVCache, Segments
    model, _ = nanopost.load(tiny, dtype=torch.float64)
    cfg, V = model.config, model.config.vocab_size
    m, lens = 5, [4, 1, 7, 3]
    T = sum(lens)
    head, ids = torch.randint(0, V, (1, m)), torch.randint(0, V, (1, T))
    positions = torch.cat([torch.arange(m, m + n) for n in lens])[None]
    keep = torch.cumsum(torch.tensor(lens), 0) - 1
    with torch.no_grad():
        def run(mask, keep):
            cache = KVCache(cfg, 1, m + T, torch.float64, "cpu")
            model(head, cache=cache)
            return model(ids, position_ids=positions, cache=cache, mask=mask, return_hidden=True, keep=keep), cache
        full, c0 = run(dense_segments(m, lens)[None, None], None)
        a = 0
        for n in lens:  # the dense reference: each sequence on its own after the cached slots
            cache = KVCache(cfg, 1, m + n, torch.float64, "cpu")
            model(head, cache=cache)
            alone = model(ids[:, a:a + n], cache=cache, return_hidden=True)
            assert (alone - full[:, a:a + n]).abs().max() <= 1e-10
            a += n
        for mask in (Segments(m, lens), dense_segments(m, lens)[None, None], dense_segments(m, lens)):
            for k in (None, keep, keep.flip(0)[:2]):
                out, c = run(mask, k)
                want = full if k is None else full[:, k]
                assert out.shape == want.shape and (out - want).abs().max() <= 1e-10
                assert (c.k - c0.k).abs().max() <= 1e-10 and (c.v - c0.v).abs().max() <= 1e-10
        with pytest.raises(ValueError, match="Segments mask of 15 tokens after 0 slots"):
            run(Segments(0, lens), keep)  # a layout that is not this forward's
        # keep with the default causal mask (no cache), and with a key mask (B, 1, 1, S)
        x = torch.randint(0, V, (2, 9))
        rows = torch.tensor([0, 4, 8])
        assert (model(x, keep=rows) - model(x)[:, rows]).abs().max() <= 1e-10
        assert (model(x, last_only=True) - model(x)[:, -1:]).abs().max() <= 1e-10
        keys = torch.ones(2, 1, 1, 9, dtype=torch.bool)
        keys[0, ..., :3] = False
        assert (model(x, mask=keys, keep=rows) - model(x, mask=keys)[:, rows]).abs().max() <= 1e-10
    # under gradient checkpointing: the gradients of the kept rows' outputs
    model.train()
    grads = []
    for ckpt, k in ((False, None), (True, rows)):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        out = model(x, keep=k)
        (out if k is not None else out[:, rows]).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.grad_checkpointing = False
    assert (grads[0] - grads[1]).abs().max() <= 1e-10 * grads[0].abs().max()


def test_kv_cache_chunks_equal_full_forward(tiny):
    model, _ = nanopost.load(tiny, dtype=torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    cache = nanopost.KVCache(model.config, 2, 16, torch.float64, "cpu")
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, :5], cache=cache), model(ids[:, 5:6], cache=cache), model(ids[:, 6:], cache=cache)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-10
    cache = nanopost.KVCache(model.config, 2, 16, torch.float64, "cpu")
    with torch.no_grad():  # a first chunk of one token: the next chunk's mask must still see it
        parts = [model(ids[:, :1], cache=cache), model(ids[:, 1:6], cache=cache), model(ids[:, 6:], cache=cache)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-10


def test_a_prompt_kv_continuation_equals_the_full_forward(tiny):
    """PromptKV (KTO's KL pairs): the keys/values kept from a prompt's forward, continued by a second
    forward with the default positions and mask, give what one forward over both gives."""
    from nanopost.model import PromptKV
    model, _ = nanopost.load(tiny, dtype=torch.float64)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    kept = PromptKV()
    with torch.no_grad():
        full, head = model(ids), model(ids[:, :5], cache=kept)
        more = kept.continued()
        assert more.pos == 5
        tail = model(ids[:, 5:], cache=more)
    assert (head - full[:, :5]).abs().max() < 1e-10 and (tail - full[:, 5:]).abs().max() < 1e-10


def test_a_tied_model_built_from_a_config_shares_one_tensor():
    """Qwen2(cfg) ties lm_head to the embedding where the config says so (loading ties them again,
    which would hide a model built untied: its head then trained apart from the embedding)."""
    from nanopost.model import Qwen2, Qwen2Config
    for tie in (True, False):
        m = Qwen2(Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie))
        assert (m.lm_head.weight is m.model.embed_tokens.weight) == tie


def test_kv_cache_share_copies_the_row_it_is_given():
    """share(row, tokens) takes the prefix's keys/values from that row (row 0 may hold another prompt,
    or an idle slot)."""
    from nanopost.model import KVCache, Qwen2Config
    cfg = Qwen2Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    cache = KVCache(cfg, 3, 10, torch.float32, "cpu")
    cache.k.normal_(), cache.v.normal_()
    cache.pos = torch.full((3,), 6)
    cache.share(2, [5, 6, 7, 8])
    assert torch.equal(cache.prefix_k, cache.k[:, 2, :, :4]) and torch.equal(cache.prefix_v, cache.v[:, 2, :, :4])


def test_rope_angles_are_float32_as_transformers_computes_them():
    """cos/sin in bf16 are float32 angles rounded once, bit for bit transformers' Qwen2 rotary
    embedding (angles computed in bf16 are ~10x its own bf16 error at position 1500)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    from nanopost.model import rope_cos_sin
    cfg = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                   max_position_embeddings=4096)
    pos = torch.arange(1600)[None]
    for dtype in (torch.bfloat16, torch.float32):
        cos, sin = Qwen2RotaryEmbedding(config=cfg)(torch.zeros(1, dtype=dtype), pos)
        ours = rope_cos_sin(pos, 16, 1e6, dtype)
        assert torch.equal(ours[0].reshape(cos.shape), cos) and torch.equal(ours[1].reshape(sin.shape), sin)


def test_kv_cache_refuses_overflow_and_multi_token_rows(tiny):
    """Full slots are an error naming the cause, for a shared position and for per-row lengths
    (continuous batching), and nothing is written past max_len."""
    model, _ = nanopost.load(tiny, dtype=torch.float64)
    cache = nanopost.KVCache(model.config, 2, 6, torch.float64, "cpu")
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), cache=cache)
        with pytest.raises(ValueError, match="KV cache overflow: 7 positions > max_len 6"):
            model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache)
        cache.pos = torch.tensor([4, 5])  # per-row lengths: row 1 is full after one more token
        got = model(torch.tensor([[1], [2]]), cache=cache)
        assert cache.pos.tolist() == [5, 6]
        # row 0 at position 4 sees its 4 cached slots and itself, never row 1's extra slot
        ref = nanopost.KVCache(model.config, 1, 6, torch.float64, "cpu")
        model(torch.tensor([[1, 2, 3, 4]]), cache=ref)
        assert torch.allclose(got[0], model(torch.tensor([[1]]), cache=ref)[0], atol=1e-12)
        with pytest.raises(ValueError, match="KV cache overflow: 7 positions > max_len 6"):
            model(torch.tensor([[1], [2]]), cache=cache)
        with pytest.raises(ValueError, match="one token per row"):
            model(torch.tensor([[1, 2], [3, 4]]), cache=cache)


def test_save_load_round_trip_bit_exact_and_transformers_reads_it(tmp_path, tiny):
    model, tok = nanopost.load(tiny)
    out = nanopost.save(model, tok, str(tmp_path / "saved"))
    again, tok2 = nanopost.load(out)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tok2.encode("hello world") == tok.encode("hello world")
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(out, f))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (hf_model(out)(ids).logits - model(ids)).abs().max() <= 1e-5
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # no staging left behind


def test_special_token_ids_of_the_config_survive_a_save(tmp_path, tiny):
    """config.json's bos/eos/pad ids (Qwen2's: 151643, 151645) were dropped by every save: transformers'
    model.config.eos_token_id read None from a trained model."""
    import transformers
    src = shutil.copytree(tiny, tmp_path / "src")
    cfg = json.load(open(src / "config.json"))
    cfg.update(bos_token_id=3, eos_token_id=[4, 5], pad_token_id=0)
    json.dump(cfg, open(src / "config.json", "w"))
    model, tok = nanopost.load(str(src))
    out = nanopost.save(model, tok, str(tmp_path / "saved"))
    saved = json.load(open(os.path.join(out, "config.json")))
    assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (3, [4, 5], 0)
    assert transformers.AutoConfig.from_pretrained(out).eos_token_id == [4, 5]
    out = nanopost.save(nanopost.load(tiny)[0], tok, str(tmp_path / "none"))  # none given: none written
    assert not [k for k in json.load(open(os.path.join(out, "config.json"))) if k.endswith("_token_id")]


def test_sharded_save_and_rope_parameters_layout(tmp_path, tiny):
    model, tok = nanopost.load(tiny)
    out = nanopost.save(model, tok, str(tmp_path / "sharded"), max_shard_bytes=20_000)
    files = os.listdir(out)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    cfg_file = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_file))
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}  # 5.x layout
    json.dump(cfg, open(cfg_file, "w"))
    again, _ = nanopost.load(out)
    assert again.config.rope_theta == model.config.rope_theta
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    with torch.no_grad():
        assert (hf_model(out)(ids).logits - model(ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("limit", ["total", "total-1", 20_000, 1])
def test_shards_are_filled_in_order_and_never_empty(tmp_path, tiny, limit):
    """A shard takes tensors in state-dict order while they fit max_shard_bytes (a tensor larger
    than the limit is a shard of its own; none is empty); a limit equal to the total is one
    model.safetensors, as huggingface_hub's `> max_shard_size`. Shards are numbered from 1
    (model-00001-of-0000N, the Hugging Face names); the index's total_size counts bytes."""
    from safetensors import safe_open
    model, tok = nanopost.load(tiny)
    state = [(k, v.numel() * v.element_size()) for k, v in model.state_dict().items() if k != "lm_head.weight"]
    total = sum(n for _, n in state)
    limit = {"total": total, "total-1": total - 1}.get(limit, limit)
    out = nanopost.save(model, tok, str(tmp_path / "out"), max_shard_bytes=limit)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    if limit == total:
        assert files == ["model.safetensors"] and not os.path.exists(os.path.join(out, "model.safetensors.index.json"))
        return
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert index["metadata"]["total_size"] == total
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    shards = []
    for f in files:
        with safe_open(os.path.join(out, f), "pt") as h:
            shards.append(set(h.keys()))
    assert all(shards) and {k: f for f, sh in zip(files, shards) for k in sh} == index["weight_map"]
    order = [k for k, _ in state]
    size = dict(state)
    flat = [k for sh in shards for k in sorted(sh, key=order.index)]
    assert flat == order  # in order: each shard a run of the state dict
    for i, sh in enumerate(shards):
        bytes_ = sum(size[k] for k in sh)
        assert bytes_ <= limit or len(sh) == 1
        if i + 1 < len(shards):  # filled: the next shard's first tensor would not have fit
            assert bytes_ + size[min(shards[i + 1], key=order.index)] > limit
    if limit == 1:
        assert len(files) == len(state)
    assert torch.equal(nanopost.load(out)[0].model.norm.weight, model.model.norm.weight)


def test_saved_dtype_is_the_asked_or_the_models_and_config_says_which(tmp_path, tiny):
    from safetensors import safe_open

    def stored(out):
        with safe_open(os.path.join(out, "model.safetensors"), "pt") as h:
            dtypes = {h.get_tensor(k).dtype for k in h.keys()}
        return dtypes, json.load(open(os.path.join(out, "config.json")))["torch_dtype"]
    model, tok = nanopost.load(tiny)
    assert stored(nanopost.save(model, tok, str(tmp_path / "f32"))) == ({torch.float32}, "float32")
    out = nanopost.save(model, tok, str(tmp_path / "bf16"), dtype=torch.bfloat16)
    assert stored(out) == ({torch.bfloat16}, "bfloat16")
    assert torch.equal(nanopost.load(out, dtype=torch.bfloat16)[0].model.norm.weight, model.model.norm.weight.bfloat16())
    half, _ = nanopost.load(tiny, dtype=torch.bfloat16)  # a bf16 model, dtype left to it
    assert stored(nanopost.save(half, tok, str(tmp_path / "as-is"))) == ({torch.bfloat16}, "bfloat16")


def test_tokenizer_and_generation_files_are_carried_over_whole(tmp_path, tiny):
    """Every tokenizer file the source has (special_tokens_map.json too) and its generation_config.json,
    sampling defaults included, are copied byte for byte; without one, a generation_config.json with
    the tokenizer's eos and pad ids is written (what transformers' generate stops and pads with)."""
    from nanopost.checkpoint import TOKENIZER_FILES
    src = shutil.copytree(tiny, tmp_path / "src")
    (src / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    gen = json.load(open(src / "generation_config.json"))
    json.dump({**gen, "temperature": 0.7, "top_p": 0.8, "do_sample": True}, open(src / "generation_config.json", "w"))
    model, tok = nanopost.load(str(src))
    out = nanopost.save(model, tok, str(tmp_path / "out"))
    carried = [n for n in TOKENIZER_FILES + ("generation_config.json",) if (src / n).exists()]
    assert "special_tokens_map.json" in carried and len(carried) >= 4
    for n in carried:
        assert open(os.path.join(out, n), "rb").read() == (src / n).read_bytes(), n
    assert not [n for n in TOKENIZER_FILES if not (src / n).exists() and os.path.exists(os.path.join(out, n))]
    (src / "generation_config.json").unlink()
    model, tok = nanopost.load(str(src))
    out = nanopost.save(model, tok, str(tmp_path / "none"))
    assert tok.pad_id is not None and tok.eos_ids
    assert json.load(open(os.path.join(out, "generation_config.json"))) == {"eos_token_id": tok.eos_ids,
                                                                          "pad_token_id": tok.pad_id}


class FileStepCrash(BaseException):
    pass


@pytest.mark.parametrize("how", ["run-dir", "link"])
def test_a_crash_at_any_file_step_never_leaves_a_loadable_mix(tmp_path, tiny, monkeypatch, how):
    """A save into a run dir (keep_other_files) or into a linked out_dir (written inside it) replaces
    the model file by file: config.json goes first and comes back last. A crash at each removal or move
    in turn leaves a folder that loads exactly the old checkpoint's files, exactly the new one's, or
    does not load at all (an old model with the new one's chat template, or a new one without its
    generation config, would be a mix that loads)."""
    old_src = shutil.copytree(tiny, tmp_path / "old-src")
    (old_src / "chat_template.jinja").write_text("{{ 'OLD TEMPLATE' }}")
    old_model, old_tok = nanopost.load(str(old_src))
    new_model, new_tok = nanopost.load(tiny)
    with torch.no_grad():
        new_model.model.norm.weight.add_(1)

    def model_files(d):
        return {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)
                if not n.startswith(".") and n != "metrics.jsonl" and os.path.isfile(os.path.join(d, n))}

    def fresh(name):  # out holding the old checkpoint (and, for a run dir, a file of its own)
        if how == "link":
            os.makedirs(tmp_path / name / "real")
            os.symlink(tmp_path / name / "real", tmp_path / name / "out")
        out = str(tmp_path / name / "out")
        nanopost.save(old_model, old_tok, out)
        open(os.path.join(out, "metrics.jsonl"), "w").write("{}\n")
        return out

    def save_new(out):
        nanopost.save(new_model, new_tok, out, keep_other_files=how == "run-dir")
    out = fresh("whole")
    old = model_files(out)
    save_new(out)
    new = model_files(out)
    assert old != new and old.keys() != new.keys()  # the chat template goes with the old model
    real_remove, real_replace = os.remove, os.replace
    seen = []
    k = 0
    while True:
        steps = []

        def step(real):
            def crashing(path, *a, **kw):
                if str(path).startswith(str(tmp_path / f"crash{k}")):
                    steps.append(os.path.basename(str(path)))
                    if len(steps) == k + 1:
                        raise FileStepCrash
                return real(path, *a, **kw)
            return crashing
        out = fresh(f"crash{k}")
        monkeypatch.setattr(os, "remove", step(real_remove))
        monkeypatch.setattr(os, "replace", step(real_replace))
        try:
            save_new(out)
            crashed = False
        except FileStepCrash:
            crashed = True
        monkeypatch.undo()
        if not crashed:
            break
        try:
            nanopost.load(out)
            loads = True
        except (CheckpointError, FileNotFoundError):
            loads = False
        now = model_files(out)
        seen.append("old" if now == old else "new" if now == new else "none")
        assert not loads or now in (old, new), (k, steps, sorted(now))
        if how == "run-dir":
            assert open(os.path.join(out, "metrics.jsonl")).read() == "{}\n"
        k += 1
    assert k >= 8 and "none" in seen and seen[0] == "old", seen


def test_save_replaces_existing_checkpoint_atomically(tmp_path, tiny, monkeypatch):
    model, tok = nanopost.load(tiny)
    out = str(tmp_path / "ckpt")
    nanopost.save(model, tok, out)
    before = open(os.path.join(out, "model.safetensors"), "rb").read()
    import nanopost.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        nanopost.save(model, tok, out)
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == before  # the old one survives
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_config_without_tie_key_is_untied_as_in_transformers(tmp_path):
    """transformers reads a config.json without tie_word_embeddings as untied: lm_head.weight in
    the file is the head (it must not be dropped for embed_tokens)."""
    d = make_tiny_checkpoint(str(tmp_path / "m"), tie_word_embeddings=False)
    cfg = json.load(open(os.path.join(d, "config.json")))
    del cfg["tie_word_embeddings"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    model, _ = nanopost.load(d)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert (model(ids) - hf_model(d)(ids).logits).abs().max() <= 1e-4


def test_config_without_kv_heads_is_multi_head(tmp_path):
    """A config.json without num_key_value_heads (Qwen2Config's own default is MHA) loads with one
    key/value head per query head."""
    d = make_tiny_checkpoint(str(tmp_path / "m"), num_attention_heads=4, num_key_value_heads=4)
    model, _ = nanopost.load(d)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    del cfg["num_key_value_heads"]
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    again, _ = nanopost.load(d)
    assert again.config.num_key_value_heads == 4
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_a_head_dim_of_its_own_is_saved(tmp_path):
    """head_dim other than hidden // heads: saved in config.json (it was dropped, so neither nanopost
    nor transformers could load the saved weights), and both read the same model from it."""
    d = make_tiny_checkpoint(str(tmp_path / "m"), head_dim=24)
    assert json.load(open(os.path.join(d, "config.json")))["head_dim"] == 24
    model, _ = nanopost.load(d)
    again, _ = nanopost.load(nanopost.save(model, _, str(tmp_path / "again")))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
        assert (model(ids) - hf_model(d)(ids).logits).abs().max() <= 1e-4
    plain = make_tiny_checkpoint(str(tmp_path / "plain"))
    assert "head_dim" not in json.load(open(os.path.join(plain, "config.json")))  # the usual one: not said


@pytest.mark.parametrize("edit,theta", [
    (lambda c: c.pop("rope_theta"), 10000.0),  # none at all: transformers' default, not nanopost's 1e6
    (lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 500.0}), 500.0),  # over the top level
    (lambda c: c.update(rope_scaling={"rope_type": "default", "rope_theta": 5e5}), 5e5),  # rope_scaling first
    (lambda c: c.update(rope_scaling={"rope_type": "default"},  # its block has none: the top level's
                        rope_parameters={"rope_type": "default", "rope_theta": 5e5}), 1e6),
], ids=["absent", "rope-parameters-first", "rope-scaling-first", "top-level-after-the-block"])
def test_rope_theta_is_read_as_transformers_reads_it(tmp_path, edit, theta):
    d = make_tiny_checkpoint(str(tmp_path / "m"), rope_theta=1e6)
    f = os.path.join(d, "config.json")
    cfg = json.load(open(f))
    edit(cfg)
    json.dump(cfg, open(f, "w"))
    model, _ = nanopost.load(d)
    ref = hf_model(d)
    assert model.config.rope_theta == theta == ref.config.rope_parameters["rope_theta"]
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("scaling", [{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
                                     {"rope_type": "linear", "factor": 2.0}])
def test_rope_scaling_beside_default_rope_parameters_is_refused(tmp_path, scaling):
    """transformers prefers rope_scaling to rope_parameters: a YaRN block added to a 5.x config scales
    RoPE there; nanopost read only rope_parameters ("default") and loaded it with other logits."""
    d = make_tiny_checkpoint(str(tmp_path / "m"))
    f = os.path.join(d, "config.json")
    cfg = json.load(open(f))
    cfg.update(rope_parameters={"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}, rope_scaling=scaling)
    json.dump(cfg, open(f, "w"))
    with pytest.raises(CheckpointError, match="unsupported rope scaling rope_scaling="):
        nanopost.load(d)


def test_config_and_file_layouts_transformers_loads_as_it_does(tmp_path):
    """Each of these loaded other weights or was refused where transformers loads it exactly: a
    folder with model.safetensors and a shard index (transformers reads the single file),
    use_sliding_window with no layer past max_window_layers, and the rotary inv_freq buffers older
    exports saved. A layer that does slide, or RoPE blocks per layer type (whose settings were
    ignored; transformers' Qwen2 fails on them), are refused."""
    from safetensors.torch import load_file, save_file
    base = make_tiny_checkpoint(str(tmp_path / "base"), rope_theta=1e4)
    ids = torch.randint(0, 100, (2, 40))

    def variant(name, edit=None, weights=None):
        d = str(tmp_path / name)
        shutil.copytree(base, d)
        f = os.path.join(d, "config.json")
        cfg = json.load(open(f))
        if edit:
            edit(cfg)
        json.dump(cfg, open(f, "w"))
        if weights:
            weights(d)
        return d

    def same_as_transformers(d):
        model = nanopost.load(d)[0]
        with torch.no_grad():
            assert (model(ids) - hf_model(d)(ids).logits).abs().max() <= 1e-4, d

    def both(d):  # a shard index beside model.safetensors, pointing at other (noisy) weights
        sd = {k: v + 0.05 * torch.randn_like(v) for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
        save_file(sd, os.path.join(d, "model-00001-of-00001.safetensors"), metadata={"format": "pt"})
        json.dump({"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in sd}},
                  open(os.path.join(d, "model.safetensors.index.json"), "w"))

    def inv_freq(d):  # in the file, and listed by an index that does not hold it (transformers loads both)
        f = os.path.join(d, "model.safetensors")
        sd = load_file(f)
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
        save_file(sd, f, metadata={"format": "pt"})
        shard = "model-00001-of-00001.safetensors"
        os.rename(f, os.path.join(d, shard))
        listed = [*sd, "model.layers.1.self_attn.rotary_emb.inv_freq"]
        json.dump({"metadata": {}, "weight_map": {k: shard for k in listed}}, open(os.path.join(d, "model.safetensors.index.json"), "w"))

    n = json.load(open(os.path.join(base, "config.json")))["num_hidden_layers"]
    same_as_transformers(variant("both", weights=both))
    same_as_transformers(variant("no-layer-slides", lambda c: c.update(use_sliding_window=True, sliding_window=4,
                                                                       max_window_layers=n)))
    same_as_transformers(variant("inv-freq", weights=inv_freq))
    for name, edit, why in [
            ("slides", lambda c: c.update(use_sliding_window=True, sliding_window=4, max_window_layers=1),
             "use_sliding_window=true with layers that slide"),
            ("per-type-yarn", lambda c: c.update(rope_parameters={"full_attention": {
                "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 1e4}}),
             "a RoPE block per layer type is not supported"),  # (the scaling was ignored; transformers: KeyError)
            ("per-type", lambda c: c.update(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100.0}}),
             "a RoPE block per layer type")]:  # (its theta was ignored)
        with pytest.raises(CheckpointError, match=why):
            nanopost.load(variant(name, edit))


def test_attention_dropout_as_transformers(tmp_path):
    """attention_dropout drops attention probabilities in training mode, as transformers' SDPA path
    does (the same draws from the same seed), and is saved (it was ignored and written as 0.0)."""
    d = make_tiny_checkpoint(str(tmp_path / "m"), attention_dropout=0.3)
    model, tok = nanopost.load(d)
    ref = hf_model(d)
    assert json.load(open(os.path.join(nanopost.save(model, tok, str(tmp_path / "again")), "config.json"))
                     )["attention_dropout"] == 0.3
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max() <= 1e-4  # eval: no dropout
        model.train(), ref.train()
        torch.manual_seed(5)
        ours = model(ids)
        torch.manual_seed(5)
        theirs = ref(ids).logits
    assert (ours - model.eval()(ids)).abs().max() > 1e-2  # it drops something
    assert (ours - theirs).abs().max() <= 1e-4


class Crash(BaseException):
    pass


@pytest.mark.parametrize("crash", ["old-aside", "new-in", "old-removed"])
def test_a_crash_while_replacing_leaves_the_old_or_the_new_checkpoint(tmp_path, tiny, monkeypatch, crash):
    """commit_dir's steps: (1) rename out_dir aside, (2) rename the new one in, (3) remove the old.
    A crash at (1) or (2) must load the old checkpoint, at (3) the new one, and leave no litter."""
    import shutil
    model, tok = nanopost.load(tiny)
    out = str(tmp_path / "ckpt")
    nanopost.save(model, tok, out)
    old_norm = model.model.norm.weight.clone()
    with torch.no_grad():
        model.model.norm.weight.add_(1)
    renames, rename, rmtree = [], os.rename, shutil.rmtree

    def crashing_rename(src, dst):
        renames.append(dst)
        if (crash, len(renames)) in (("old-aside", 1), ("new-in", 2)):
            raise Crash
        rename(src, dst)

    def crashing_rmtree(path, *a, **k):
        if crash == "old-removed" and len(renames) == 2:  # after (2)
            raise Crash
        rmtree(path, *a, **k)
    monkeypatch.setattr(os, "rename", crashing_rename)
    monkeypatch.setattr(shutil, "rmtree", crashing_rmtree)
    with pytest.raises(Crash):
        nanopost.save(model, tok, out)
    monkeypatch.undo()
    loaded, _ = nanopost.load(out)
    expected = model.model.norm.weight if crash == "old-removed" else old_norm
    assert torch.equal(loaded.model.norm.weight, expected)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    nanopost.save(model, tok, out)  # and the next save goes through
    assert torch.equal(nanopost.load(out)[0].model.norm.weight, model.model.norm.weight)


def test_save_into_a_run_dir_keeps_its_files_and_drops_stale_shards(tmp_path, tiny):
    model, tok = nanopost.load(tiny)
    out = tmp_path / "run"
    nanopost.save(model, tok, str(out), max_shard_bytes=20_000)  # an earlier, sharded save
    (out / "metrics.jsonl").write_text("{}\n")
    with torch.no_grad():
        model.model.norm.weight.add_(1)
    nanopost.save(model, tok, str(out), keep_other_files=True)
    assert sorted(f for f in os.listdir(out) if f.startswith("model")) == ["model.safetensors"]
    assert (out / "metrics.jsonl").read_text() == "{}\n"
    assert torch.equal(nanopost.load(str(out))[0].model.norm.weight, model.model.norm.weight)


def test_save_into_a_run_dir_drops_the_old_tokenizer_and_stays_on_its_filesystem(tmp_path, tiny, monkeypatch):
    """A tokenizer file the new model lacks (chat_template.jinja, which wins over tokenizer_config's
    template) goes with the old model; and the files are staged inside the run dir, so a run dir that
    is a mount point or a link to another disk takes them (a move from beside it failed with EXDEV
    after every step had run: the final model could never be written)."""
    import errno
    from nanopost import checkpoint
    model, tok = nanopost.load(tiny)
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    (other / "chat_template.jinja").write_text("{{ 'You are B.' }}")
    out = tmp_path / "run"
    nanopost.save(model, nanopost.load(str(other))[1], str(out))
    (out / "metrics.jsonl").write_text("{}\n")
    real = os.replace

    def one_filesystem(src, dst):  # out is another filesystem: only moves within it work
        if os.path.commonpath([os.path.abspath(src), str(out)]) != str(out):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(src, dst)
    monkeypatch.setattr(checkpoint.os, "replace", one_filesystem)
    nanopost.save(model, tok, str(out), keep_other_files=True)
    monkeypatch.undo()
    assert not (out / "chat_template.jinja").exists() and (out / "metrics.jsonl").exists()
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == sorted(os.listdir(out))  # nothing staged left
    assert nanopost.load(str(out))[1].render([{"role": "user", "content": "x"}]) == tok.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("H,K", [(14, 2), (4, 4), (7, 1)])
def test_decode_attention_equals_float64_and_sdpa(H, K):
    """One query per row in float32 on CPU takes attention()'s matmul-softmax path (no SDPA):
    equal to a float64 re-derivation and to SDPA, with per-row key masks and without a mask."""
    from nanopost.model import attention
    B, S, D = 5, 37, 16
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, K, S, D), torch.randn(B, K, S, D)
    lengths = torch.tensor([1, 9, 37, 20, 3])
    for mask in ((torch.arange(S) < lengths[:, None])[:, None, None, :], None):
        with torch.inference_mode():
            got = attention(q, k, v, mask, 0.25)
            sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
        kk, vv = (t.double().repeat_interleave(H // K, dim=1) for t in (k, v))
        s = q.double() @ kk.transpose(-1, -2) * 0.25
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        want = s.softmax(-1) @ vv
        assert got.shape == (B, H, 1, D)
        assert (got.double() - want).abs().max() < 1e-6
        assert (got - sdpa).abs().max() < 1e-6
    # masks the fast path does not take (per head, additive float) go to SDPA, as its docstring says
    per_head = torch.rand(B, H, 1, S) < 0.7
    per_head[..., 0] = True
    for mask in (per_head, torch.where(per_head, 0.0, float("-inf"))):
        with torch.inference_mode():
            got = attention(q, k, v, mask, 0.25)
            sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
        assert (got - sdpa).abs().max() < 1e-6


@pytest.mark.parametrize("T", [1, 4])
def test_bf16_queries_against_a_float32_cache_are_float32_math(T):
    """The engine keeps a bf16 model's keys/values in a float32 cache on CPU (engine.cache_dtype):
    attention then runs on exactly those bf16 numbers in float32 — a decode step (one query a row,
    per-row key masks, a shared prefix: the matmul path) and a query block (SDPA) — and the output
    is rounded once to bf16: within half a bf16 step of the float64 result."""
    from nanopost.model import attention
    B, H, K, P, S, D = 5, 14, 2, 9, 11, 16
    q, k, v = torch.randn(B, H, T, D).bfloat16(), torch.randn(B, K, S, D).bfloat16(), torch.randn(B, K, S, D).bfloat16()
    kp, vp = torch.randn(K, P, D).bfloat16(), torch.randn(K, P, D).bfloat16()
    lengths = torch.tensor([3, 4, 11, 7, 5])
    mask = (torch.arange(S) < lengths[:, None])[:, None, None, :] & torch.ones(T, S, dtype=torch.bool).tril(S - T)
    kk, vv = (torch.cat([p.double().expand(B, -1, -1, -1), x.double()], 2).repeat_interleave(H // K, dim=1)
              for p, x in ((kp, k), (vp, v)))
    full = torch.cat([torch.ones(B, 1, T, P, dtype=torch.bool), mask.expand(B, 1, T, S)], -1)
    want = (q.double() @ kk.transpose(-1, -2) * 0.25).masked_fill(~full, float("-inf")).softmax(-1) @ vv
    with torch.inference_mode():
        got = attention(q, k.float(), v.float(), mask, 0.25, (kp.float(), vp.float()))
    assert got.dtype == torch.bfloat16
    assert ((got.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-6).all()


@pytest.mark.parametrize("H,K", [(14, 2), (4, 4), (7, 1)])
def test_cascade_attention_equals_the_prefix_in_every_row(H, K):
    """A prefix every row shares (KVCache.share), attended once for all rows, equals each row
    holding its own copy in front of its keys (float64 re-derivation): the matmul-softmax path
    (float32 CPU decode) and the SDPA fallback (bf16, and a query block), with per-row masks. A row
    whose own keys are all masked (an idle slot) still gets a finite output from the prefix."""
    from nanopost.model import attention
    B, P, S, D = 5, 23, 11, 16
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, K, S, D), torch.randn(B, K, S, D)
    kp, vp = torch.randn(K, P, D), torch.randn(K, P, D)
    lengths = torch.tensor([0, 4, 11, 7, 1])  # each row's own keys after the prefix; 0: an idle slot
    mask = (torch.arange(S) < lengths[:, None])[:, None, None, :]

    def want(q, mask):
        kk, vv = (torch.cat([p.double().expand(B, -1, -1, -1), t.double()], 2).repeat_interleave(H // K, dim=1)
                  for p, t in ((kp, k), (vp, v)))
        s = q.double() @ kk.transpose(-1, -2) * 0.25
        full = torch.cat([torch.ones(B, 1, q.shape[2], P, dtype=torch.bool), mask.expand(B, 1, q.shape[2], S)], -1)
        return s.masked_fill(~full, float("-inf")).softmax(-1) @ vv
    with torch.inference_mode():
        got = attention(q, k, v, mask, 0.25, (kp, vp))
        assert torch.isfinite(got).all() and (got.double() - want(q, mask)).abs().max() < 1e-6
        got16 = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.25, (kp.bfloat16(), vp.bfloat16()))
        assert (got16.double() - want(q, mask)).abs().max() < 3e-2
        q3 = torch.randn(B, H, 3, D)  # three queries a row: causal among them, after every prefix slot
        causal = torch.ones(3, S, dtype=torch.bool).tril(S - 3)[None, None].expand(B, 1, 3, S)
        assert (attention(q3, k, v, None, 0.25, (kp, vp)).double() - want(q3, causal)).abs().max() < 1e-6
        # a row's own score far above every prefix score (exp of the gap overflows float32): the softmax's
        # shift is the larger of the two maxima
        q[2], k[2, :, 0] = 1.0, 100.0
        got = attention(q, k, v, mask, 0.25, (kp, vp))
        assert torch.isfinite(got).all() and (got.double() - want(q, mask)).abs().max() < 1e-6
