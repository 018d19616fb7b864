"""The batched engine against naive full-recompute greedy decoding, and its sampling controls."""
import pytest
import torch

import nanopost
from nanopost.engine import Engine, Sampling, cut_at_stop, sample_next


def naive(model, prompt, n, eos, penalty=1.0):
    """One prompt alone, every step a full forward over all its tokens (no cache), greedy with
    transformers' repetition penalty."""
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[:, -1]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[0, ids] = True
            nxt = sample_next(logits, seen, Sampling(repetition_penalty=penalty), None).item()
            if nxt in eos:
                break
            new.append(nxt)
            ids.append(nxt)
    return new


@pytest.fixture(scope="module")
def eng64(tiny):
    model, tok = nanopost.load(tiny, dtype=torch.float64)  # float64: no argmax near-ties
    return Engine(model, tok)


def test_batched_greedy_equals_naive_row_by_row(eng64):
    g = torch.Generator().manual_seed(1)
    V = eng64.model.config.vocab_size - 10
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (3, 11, 1, 7, 7, 20)]
    outs = eng64.generate_ids(prompts, Sampling(max_new_tokens=15))
    for p, o in zip(prompts, outs):
        assert o == naive(eng64.model, p, 15, eng64.tok.eos_ids)
    assert [eng64.generate_ids([p], Sampling(max_new_tokens=15))[0] for p in prompts] == outs


def test_eos_stops_a_row_and_is_not_returned(eng64):
    model, tok = eng64.model, eng64.tok
    prompt = [5, 6, 7]
    first = naive(model, prompt, 1, [])[0]
    eng = Engine(model, tok)
    eng.eos = torch.tensor([first])  # make the first greedy token a stop token
    out = eng.generate_ids([prompt, [9, 10]], Sampling(max_new_tokens=6))
    assert out[0] == [] and len(out[1]) <= 6


def test_stop_strings_and_streaming(eng64):
    prompts = ["Hello world", "The answer is"]
    full = eng64.generate(prompts, Sampling(max_new_tokens=12))
    stop = full[0][3:6]
    assert stop
    cut = eng64.generate(prompts, Sampling(max_new_tokens=12, stop=[stop]))
    assert cut[0] == full[0][: full[0].find(stop)]
    seen = []
    eng64.generate_ids([eng64.encode_prompt(p) for p in prompts], Sampling(max_new_tokens=5),
                       on_token=lambda t, toks, done: seen.append((t, len(toks), len(done))))
    assert [s[0] for s in seen] == list(range(len(seen))) and all(s[1:] == (2, 2) for s in seen)
    assert cut_at_stop("abc STOP def", ["STOP", "def"]) == "abc "


def test_sampling_is_seeded_and_topk1_is_greedy(eng64):
    p = [[3, 4, 5], [6, 7]]
    s = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=123)
    assert eng64.generate_ids(p, s) == eng64.generate_ids(p, s)
    greedy = eng64.generate_ids(p, Sampling(max_new_tokens=10))
    assert eng64.generate_ids(p, Sampling(max_new_tokens=10, temperature=0.7, top_k=1, seed=5)) == greedy


def test_a_seeded_row_samples_as_it_would_alone(eng64):
    """One generator for the call drew every row's token from one stream: a seeded prompt's reply
    changed with the other prompts in the call, even one at a time (batch_size 1 drew after the
    earlier prompts). The in-process teacher caches replies by (messages, settings, seed)."""
    a, b, c = [3, 4, 5], [6, 7], [8, 9, 10, 11]
    s = Sampling(max_new_tokens=10, temperature=1.0, seed=0, ignore_eos=True)
    alone = eng64.generate_ids([a], s)[0]
    for prompts, bs in (([a, b], 16), ([b, a, c], 16), ([c, b, a], 1), ([b, c, a, a], 2)):
        got = eng64.generate_ids(prompts, s, batch_size=bs)
        assert all(out == alone for p, out in zip(prompts, got) if p == a), (prompts, bs)
    assert eng64.generate_ids([b], s)[0] != alone  # (its own prompt, its own tokens)


def test_sample_next_filters_against_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    seen = torch.zeros(4, 50, dtype=torch.bool)
    seen[:, :5] = True
    s = Sampling(temperature=0.5, top_k=10, top_p=0.8, repetition_penalty=1.3)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, seen, s, gen) for _ in range(400)], 1)
    # reference: the allowed set after penalty -> temperature -> top-k -> top-p
    pen = torch.where(seen, torch.where(logits < 0, logits * 1.3, logits / 1.3), logits) / 0.5
    for b in range(4):
        order = pen[b].argsort(descending=True)[:10]
        p = pen[b, order].softmax(-1)
        keep = (p.cumsum(0) - p) < 0.8  # smallest prefix whose mass reaches top_p
        allowed = set(order[keep].tolist())
        assert set(draws[b].tolist()) <= allowed
        assert len(set(draws[b].tolist())) == len(allowed)  # 400 draws hit every allowed token


def test_greedy_repetition_penalty_changes_choice():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    seen = torch.tensor([[True, False, False]])
    assert sample_next(logits, seen, Sampling(repetition_penalty=1.2), None).item() == 1
    assert sample_next(logits, seen, Sampling(), None).item() == 0


def test_float32_engine_matches_naive(tiny):
    model, tok = nanopost.load(tiny)
    eng = Engine(model, tok)
    prompts = [[1, 2, 3, 4], [7, 8]]
    assert eng.generate_ids(prompts, Sampling(max_new_tokens=8)) == [naive(model, p, 8, tok.eos_ids) for p in prompts]


def test_packed_linears_equal_plain_and_follow_weight_updates(tiny):
    model, tok = nanopost.load(tiny)
    packed, plain = Engine(model, tok), Engine(model, tok, pack_weights=False)
    if not packed.pack:
        pytest.skip("oneDNN packing unavailable on this CPU/build")
    prompts = [[1, 2, 3, 4], [7, 8]]
    s = Sampling(max_new_tokens=8)
    assert packed.generate_ids(prompts, s) == plain.generate_ids(prompts, s)
    ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        ref = model(ids)
        with packed.fast_linears():
            assert (model(ids) - ref).abs().max() < 1e-4
    assert all("forward" not in m.__dict__ for m in model.modules())  # patches removed afterwards
    with torch.no_grad():  # an in-place update (as an optimizer step does) must reach the packed copy
        model.lm_head.weight.mul_(-1)
    assert packed.generate_ids(prompts, s) == plain.generate_ids(prompts, s)


# ---- shared-prefix KV cache and continuous batching ----

@pytest.fixture(scope="module")
def eng32(tiny):
    model, tok = nanopost.load(tiny)  # float32, as the exactness claim is made
    return Engine(model, tok)


def shared_prompts(tok):
    """Prompts with a long common token prefix (a few-shot block), a second group with another
    one, and prompts that share nothing."""
    shots = "Question: Natalia sold clips to 48 of her friends in April. The answer is 72.\n\n" * 3
    chat = lambda text: tok.render([{"role": "user", "content": text}], add_generation_prompt=True)[0]
    return ([chat(shots + q) for q in ("Hello world", "The quick brown fox", "How many clips?", "Der Fuchs")]
            + [[7, 8, 9] * 20 + [n] for n in (3, 30, 40)] + [[5], [11, 12, 13, 14], chat("こんにちは")])


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_prefix_shared_continuous_batching_equals_one_at_a_time(eng32, penalty):
    """11 prompts through 3 slots (a waiting queue), rows ending at very different lengths
    (eos at different steps, the 24-token limit): each row's tokens equal decoding it alone."""
    model, tok = eng32.model, eng32.tok
    prompts = shared_prompts(tok)
    free = [naive(model, p, 24, [], penalty) for p in prompts]
    eos = [free[0][2], free[5][11], free[9][20]]  # tokens some rows reach early, some late, some never
    eng = Engine(model, tok)
    eng.eos = torch.tensor(eos)
    finished = []
    outs = eng.generate_ids(prompts, Sampling(max_new_tokens=24, repetition_penalty=penalty), batch_size=3,
                            on_done=lambda i, ids: finished.append(i))
    assert outs == [naive(model, p, 24, eos, penalty) for p in prompts]
    assert sorted(finished) == list(range(len(prompts)))
    assert len({len(o) for o in outs}) >= 3  # the rows really did finish at different lengths
    assert [len(k) for k, _ in eng._prefixes] and min(len(k) for k, _ in eng._prefixes) >= 32  # prefixes were shared


@pytest.mark.parametrize("batch_size", [3, 16])
def test_cascade_decoding_equals_one_at_a_time(eng32, monkeypatch, batch_size):
    """Decode steps attend the prompt tokens every running row shares once for all rows
    (KVCache.share): as rows come and go the shared part shrinks (a prompt from another group) or
    grows (the tail), and every row's tokens still equal decoding it alone. The threshold is
    lowered so the tiny prompts take it, and the cascade is checked to have run."""
    import nanopost.engine as engine_mod
    from nanopost.model import KVCache
    monkeypatch.setattr(engine_mod, "MIN_CASCADE", 4)
    shared, share = [], KVCache.share
    monkeypatch.setattr(KVCache, "share", lambda self, row, tokens: (shared.append(len(tokens)), share(self, row, tokens))[1])
    model, tok = eng32.model, eng32.tok
    prompts = shared_prompts(tok)
    limits = [4 + 5 * (i % 4) for i in range(len(prompts))]
    want = [naive(model, p, n, tok.eos_ids) for p, n in zip(prompts, limits)]
    assert Engine(model, tok).generate_ids(prompts, Sampling(), batch_size=batch_size, limits=limits) == want
    assert 0 in shared  # not shared with the prompts that lack the few-shot block
    assert max(shared) >= 60 or batch_size >= len(prompts)  # and shared by a batch of the rows with it
    shared.clear()
    assert Engine(model, tok).generate_ids(prompts[:4], Sampling(max_new_tokens=12), batch_size=batch_size) == \
        [naive(model, p, 12, tok.eos_ids) for p in prompts[:4]]
    assert shared and min(shared) >= 60


def test_bf16_on_cpu_decodes_from_a_float32_cache_with_the_cascade(tiny, monkeypatch):
    """A bf16 model on CPU: every cache the engine makes (prefill, decode, the kept prefix) is
    float32 (engine.cache_dtype; the attention math is tested in test_model.py), and the decode
    steps take the cascade for the shared few-shot block and the greedy screen, as float32 models do."""
    import nanopost.engine as engine_mod
    from nanopost.model import KVCache
    monkeypatch.setattr(engine_mod, "MIN_CASCADE", 4)
    made, init = [], KVCache.__init__
    monkeypatch.setattr(KVCache, "__init__", lambda self, *a: (init(self, *a), made.append(self))[0])
    shared, share = [], KVCache.share
    monkeypatch.setattr(KVCache, "share", lambda self, row, tokens: (shared.append(len(tokens)), share(self, row, tokens))[1])
    model, tok = nanopost.load(tiny, dtype=torch.bfloat16)
    assert engine_mod.cache_dtype(model) == torch.float32
    eng = Engine(model, tok)
    prompts = shared_prompts(tok)[:4]
    out = eng.generate_ids(prompts, Sampling(max_new_tokens=6), batch_size=4)
    assert all(len(o) for o in out) and made and all(c.k.dtype == c.v.dtype == torch.float32 for c in made)
    assert shared and max(shared) >= 60 and eng._prefixes[0][1].k.dtype == torch.float32
    assert eng.generate_ids(prompts, Sampling(max_new_tokens=6), batch_size=4) == out  # the kept prefix reused
    if engine_mod.int8_matmul(model.config.hidden_size) is not None:  # and greedy tokens came through the screen
        assert eng._screen[1] is not None and eng._screen[1].w.dtype == torch.bfloat16


def test_a_stop_string_the_model_spells_in_many_tokens_ends_its_row(eng64):
    """A stop string may come in more tokens than its own encoding (")" * 40 one bracket a token,
    which encodes to 20): the row still ends at the token that completes it, not at the limit."""
    tok, g = eng64.tok, torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, eng64.model.config.vocab_size - 10, (6,), generator=g).tolist() for _ in range(20)]
    full = eng64.generate_ids(prompts, Sampling(max_new_tokens=60, ignore_eos=True))
    tested = 0
    for p, f in zip(prompts, full):
        for i in range(50):  # the longest clean stretch ending at the last token spelled in more tokens than
            stop = tok.decode(f[i:])  # its encoding + 8 (the old bound on the tokens a stop string spans)
            if "\ufffd" not in stop and len(f) - i > len(tok.encode(stop)) + 8:
                break
        else:
            continue
        end = next(k for k in range(1, 61) if stop in tok.decode(f[:k]))
        got = eng64.generate_ids([p], Sampling(max_new_tokens=80, ignore_eos=True, stop=[stop]))[0]
        assert got == f[:end]
        tested += 1
    assert tested  # the tiny model spells some stretch so


def test_extreme_sampling_values_sample_not_crash():
    """temperature 1e-40 overflowed logits / T to inf and an extreme repetition penalty made
    logits inf: softmax gave NaN and torch.multinomial raised (an HTTP 500 from the server)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 5
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[:, :10] = True
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, seen, Sampling(temperature=1e-40), gen), logits.argmax(-1))
    for penalty in (1e-300, 1e300):
        nxt = sample_next(logits, seen, Sampling(temperature=1.0, repetition_penalty=penalty), gen)
        pen = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
        if penalty < 1:  # every seen token with a positive logit becomes the (tied) most likely
            assert all(seen[b, t] and logits[b, t] > 0 for b, t in enumerate(nxt.tolist()))
        else:
            assert not seen[torch.arange(3), nxt].any() and torch.isfinite(pen.amax(-1)).all()


def test_stop_strings_with_shared_prefix_and_a_queue(eng32):
    model, tok = eng32.model, eng32.tok
    prompts = shared_prompts(tok)
    full = [tok.decode(naive(model, p, 16, tok.eos_ids)) for p in prompts]
    # whole characters of two replies (a random model's text has U+FFFD for bytes that are not
    # UTF-8: a stop ending in one is matched a token later, when it is known not to be a character
    # still arriving; test_serve has those)
    stops = [full[1][4:7], full[7][:2]]
    assert all(len(x) >= 2 and "\ufffd" not in x for x in stops), (stops, full[1], full[7])
    s = Sampling(max_new_tokens=16, stop=stops)
    got = Engine(model, tok).generate(prompts, s, batch_size=4)
    assert got == [cut_at_stop(f, stops) for f in full]
    assert got[1] != full[1] and got[7] != full[7]  # both stops cut their row
    ids = Engine(model, tok).generate_ids(prompts, s, batch_size=4)
    for row in (1, 7):  # the row ended at the token that completed its stop string, freeing its slot
        assert any(x in tok.decode(ids[row]) for x in stops) and not any(x in tok.decode(ids[row][:-1]) for x in stops)


def test_a_kept_prefix_is_reused_across_calls_and_dropped_when_weights_change(tiny):
    model, tok = nanopost.load(tiny)
    eng = Engine(model, tok)
    prompts = shared_prompts(tok)
    s = Sampling(max_new_tokens=6)
    first = eng.generate_ids(prompts[:2], s)
    kept = [c for _, c in eng._prefixes]
    assert kept
    assert eng.generate_ids(prompts[2:4], s) == [naive(model, p, 6, tok.eos_ids) for p in prompts[2:4]]
    assert any(c is kept[0] for _, c in eng._prefixes)  # the few-shot block was not computed again
    with torch.no_grad():  # an in-place update, as an optimizer step does: the kept K/V are stale
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    again = eng.generate_ids(prompts[:2], s)
    assert again == [naive(model, p, 6, tok.eos_ids) for p in prompts[:2]] and again != first
    assert all(c is not kept[0] for _, c in eng._prefixes)


def test_next_logprobs_with_a_shared_prefix_equal_a_full_forward(eng32):
    model, tok = eng32.model, eng32.tok
    prompts = shared_prompts(tok)
    ids = [tok.encode(L)[0] for L in "ABCD"]
    eng = Engine(model, tok)
    got = eng.next_logprobs(prompts, ids, batch_size=4)
    assert eng._prefixes
    with torch.no_grad():
        for p, lp in zip(prompts, got):
            ref = model(torch.tensor([p]))[0, -1].float().log_softmax(-1)[ids]
            assert (torch.tensor(lp) - ref).abs().max() <= 1e-5


def test_next_logprobs_of_a_float64_model_are_float64(eng64):
    """Scored at float64 (they were cast down to float32: 1e-7 off a float64 forward)."""
    model, tok = eng64.model, eng64.tok
    prompts, ids = shared_prompts(tok), [tok.encode(L)[0] for L in "ABCD"]
    got = Engine(model, tok).next_logprobs(prompts, ids, batch_size=4)
    with torch.no_grad():
        ref = torch.stack([model(torch.tensor([p]))[0, -1].log_softmax(-1)[ids] for p in prompts])
    assert (torch.tensor(got, dtype=torch.float64) - ref).abs().max() <= 1e-12


def test_next_logprobs_refuses_an_empty_prompt(eng64):
    """No position to score from: packed with others, an empty prompt got another row's log-probs."""
    for prompts in ([[]], [[], [5, 6]], [[5, 6], []], [torch.tensor([], dtype=torch.long)]):
        with pytest.raises(ValueError, match="is empty"):
            eng64.next_logprobs(prompts, [10, 20])
    assert eng64.next_logprobs([torch.tensor([0])], [10]) == eng64.next_logprobs([[0]], [10])  # token 0 is a token


def test_bf16_letter_scores_are_not_rounded_to_bf16_steps(tiny, monkeypatch):
    """In bf16 the lm_head's outputs are rounded to 1/16-1/8 at logits of ~10-30, tying near options
    (ties went to A). The option log-probs must equal a float64 re-derivation from the engine's own
    bf16 hidden states far closer than that rounding."""
    model, tok = nanopost.load(tiny, dtype=torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    prompts = shared_prompts(tok)
    ids = [tok.encode(L)[0] for L in "ABCD"]
    eng, hiddens = Engine(model, tok), []
    prefill = eng._prefill

    def spy(*a, **kw):
        cache, h = prefill(*a, **kw)
        hiddens.append(h.clone())
        return cache, h
    monkeypatch.setattr(eng, "_prefill", spy)
    got = eng.next_logprobs(prompts[:4], ids, batch_size=4)  # one packed group: rows in token order
    h = hiddens[-1]  # the one packed group's prefill (the shared few-shot prefix is computed before it)
    assert h.shape[0] == 4
    order = sorted(range(4), key=lambda i: prompts[i])
    with torch.no_grad():
        letters = h.double() @ model.lm_head.weight[ids].double().T
        want = letters - model.lm_head(h).double().logsumexp(-1, keepdim=True)
        bf16_error = (model.lm_head(h).double()[:, ids] - letters).abs().max().item()
    assert (torch.tensor([got[i] for i in order], dtype=torch.float64) - want).abs().max() < 1e-4
    assert bf16_error > 1e-2  # bf16 logits really were that coarse here: the test tells the two apart


# ---- --dtype auto ----

def test_auto_dtype_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    from nanopost import engine
    monkeypatch.setattr(engine, "cpu_flags", lambda: {"avx2", "avx512f", "avx512bw"})  # AVX-512 without BF16
    dtype, why = engine.auto_dtype("cpu")
    assert dtype == torch.float32 and "neither" in why
    monkeypatch.setattr(engine, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert engine.auto_dtype("cpu")[0] == torch.bfloat16
    monkeypatch.setattr(engine, "cpu_flags", lambda: {"amx_bf16", "amx_tile"})
    assert engine.auto_dtype("cpu")[0] == torch.bfloat16
    said = []
    assert engine.resolve_dtype("float32", "cpu", log=said.append) == torch.float32 and not said  # explicit wins
    assert engine.resolve_dtype("auto", "cpu", log=said.append) == torch.bfloat16 and "amx_bf16" in said[0]


def test_per_row_limits_and_rows_added_mid_run_equal_one_at_a_time(eng32):
    """A server's requests arrive while others decode: more(n) hands in new prompts (with their own
    max_new_tokens) as slots free up; the cache grows in rows and length for them. Every row's
    tokens equal decoding it alone with its own limit, and more() is never asked for more than fits."""
    model, tok = eng32.model, eng32.tok
    prompts = shared_prompts(tok)
    limits = [4 + 5 * (i % 4) for i in range(len(prompts))]
    want = [naive(model, p, n, tok.eos_ids) for p, n in zip(prompts, limits)]
    feed, asked = list(range(1, len(prompts))), []

    def more(n):  # one new prompt every other call, the longest prompt last (the cache must grow)
        asked.append(n)
        if not feed or len(asked) % 2:
            return []
        i = feed.pop(0)
        return [(prompts[i], limits[i])]
    eng = Engine(model, tok)
    got = eng.generate_ids([prompts[0]], Sampling(), batch_size=3, limits=limits[:1], more=more)
    assert got == want
    assert not feed and 0 < max(asked) <= 3
    # prompts that arrive one at a time still share their few-shot block: the second one to come
    # shares it with the first (kept from the earlier arrival), and it is computed once
    assert any(len(k) >= 60 and list(k) == prompts[0][:len(k)] for k, _ in eng._prefixes)


def test_rows_the_caller_ends_free_their_slots(eng32):
    """on_token may end rows (a client went away): a running row stops there, a waiting row never runs."""
    model, tok = eng32.model, eng32.tok
    prompts = shared_prompts(tok)[:5]
    steps, end = [], []

    def on_token(step, tokens, done):
        steps.append([t is not None for t in tokens])
        if step == 2:  # one row that ran from the start, and the one queued behind the four slots
            end.extend([steps[0].index(True), steps[0].index(False)])
            return end
    got = Engine(model, tok).generate_ids(prompts, Sampling(max_new_tokens=8), batch_size=4, on_token=on_token)
    ran, queued = end
    assert len(got[ran]) == 3 and got[queued] == []
    assert not any(s[ran] for s in steps[3:]) and not any(s[queued] for s in steps)
    rest = [i for i in range(5) if i not in end]
    assert [got[i] for i in rest] == [naive(model, prompts[i], 8, tok.eos_ids) for i in rest]


def test_prompts_added_mid_run_are_checked_like_the_first(eng32):
    eng = Engine(eng32.model, eng32.tok)
    for bad in ([([], 4)], [([5, 6], 0)]):  # an empty prompt; a limit below one token
        with pytest.raises(ValueError, match="at least one token and a limit >= 1"):
            eng.generate_ids([[5, 6, 7]], Sampling(max_new_tokens=4), more=lambda n, bad=bad: bad)


# ---- CUDA graphs: decode steps on a static cache ----

class EagerGraph:
    """DecodeGraph's bookkeeping and static cache without a GPU: the same step, run eagerly."""
    captures = 0

    def __init__(self, model, cache):
        type(self).captures += 1
        self.model, self.cache, self.k, self.v, self.pos = model, cache, cache.k, cache.v, cache.pos
        cache.static = True

    def captured_on(self, cache):
        return cache.k is self.k and cache.v is self.v and cache.pos is self.pos

    def __call__(self, ids_B):
        assert self.captured_on(self.cache)  # a step never runs on tensors it was not captured on
        return self.model(ids_B[:, None], cache=self.cache)[:, -1].float()


def test_static_cache_decode_equals_one_at_a_time(eng32, monkeypatch):
    """What a CUDA graph replays: every step attends over all max_len slots with each row's keys
    past its own length masked (fixed shapes, no host sync). Rows finishing at different steps, a
    queue, the tail shrinking the batch and rows added mid-run (the cache grows): each change of
    the cache's tensors is captured again, and every row equals decoding it alone."""
    import nanopost.engine as engine_mod
    monkeypatch.setattr(engine_mod, "DecodeGraph", EagerGraph)
    model, tok = eng32.model, eng32.tok
    prompts = shared_prompts(tok)
    limits = [4 + 5 * (i % 4) for i in range(len(prompts))]
    want = [naive(model, p, n, tok.eos_ids) for p, n in zip(prompts, limits)]
    eng = Engine(model, tok)
    eng._graphs_for = lambda cache: True  # a CPU model: the stand-in graph
    EagerGraph.captures = 0
    assert eng.generate_ids(prompts, Sampling(), batch_size=4, limits=limits) == want
    assert EagerGraph.captures >= 2 and eng._graph is None  # captured again after the tail shrank; freed at the end
    feed = list(range(1, len(prompts)))

    def more(n):  # one new prompt at a time, the longest last (the cache grows)
        return [(prompts[feed[0]], limits[feed.pop(0)])] if n and feed else []
    assert eng.generate_ids([prompts[0]], Sampling(), batch_size=3, limits=limits[:1], more=more) == want


def test_cuda_graphs_need_a_cuda_model(eng32):
    with pytest.raises(ValueError, match="CUDA"):
        Engine(eng32.model, eng32.tok, cuda_graphs=True)
    from nanopost.model import KVCache
    cache = KVCache(eng32.model.config, 1, 4, torch.float32, "cpu")
    assert not Engine(eng32.model, eng32.tok)._graphs_for(cache)  # the default follows the cache's device


def test_the_cuda_graphs_switch_is_checked(eng32, monkeypatch):
    from nanopost.model import KVCache
    cache = KVCache(eng32.model.config, 1, 4, torch.float32, "cpu")
    monkeypatch.setenv("NANOPOST_CUDA_GRAPHS", "off")
    with pytest.raises(ValueError, match="NANOPOST_CUDA_GRAPHS='off'"):  # when the engine is made, not mid-run
        Engine(eng32.model, eng32.tok)
    assert not Engine(eng32.model, eng32.tok, cuda_graphs=False)._graphs_for(cache)  # an explicit choice wins


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_follow_the_model_off_the_gpu(tiny):
    """An engine built for a CUDA model whose model then moves to the CPU decodes eagerly there."""
    model, tok = nanopost.load(tiny, device="cuda")
    eng = Engine(model, tok)
    prompts = shared_prompts(tok)[:3]
    on_gpu = eng.generate_ids(prompts, Sampling(max_new_tokens=6))
    model.cpu()
    assert eng.generate_ids(prompts, Sampling(max_new_tokens=6)) == on_gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(tiny, dtype):
    model, tok = nanopost.load(tiny, dtype=dtype, device="cuda")
    prompts = shared_prompts(tok)
    limits = [4 + 5 * (i % 4) for i in range(len(prompts))]
    s = Sampling()
    eager = Engine(model, tok, cuda_graphs=False).generate_ids(prompts, s, batch_size=4, limits=limits)
    graphs = Engine(model, tok)
    assert graphs.cuda_graphs
    assert graphs.generate_ids(prompts, s, batch_size=4, limits=limits) == eager
    if dtype == torch.float32:
        assert eager == [naive(model.cpu(), p, n, tok.eos_ids) for p, n in zip(prompts, limits)]


# ---- the int8 greedy screen ----

@pytest.mark.parametrize("backends", [("onednn",), ("int_mm",), ("onednn", "int_mm")])
def test_int8_matmul_is_exact_here_or_refused(backends):
    """int8_matmul names a backend only if its integer sums are exact here; then random int8 with
    every product and pair sum at its limit (both signs) equals int64 arithmetic, scaled once."""
    from nanopost.engine import Int8Matmul, int8_matmul
    for C in (64, 96, 896, 1041, 2101, 3584):  # above 1040 the largest sums no longer fit float32 exactly
        backend = int8_matmul(C, backends)
        assert backend is None or backend in backends
        if backend is not None:
            a = torch.randint(-127, 128, (5, C), dtype=torch.int8)
            a[0, :1040], a[1, :1040] = 127, -127
            b = torch.randint(-127, 128, (24, C), dtype=torch.int8)
            b[0], b[1] = 127, -127
            scale = torch.rand(24)
            assert torch.equal(Int8Matmul(b, scale, backend)(a), (a.long() @ b.long().T).float() * scale)
    if int8_matmul(96, backends) is not None:  # a machine that has it for one size has it for all
        assert all(int8_matmul(C, backends) is not None for C in (1041, 2047, 2101, 4097))


@pytest.mark.parametrize("backend", ["onednn", "int_mm"])
def test_greedy_screen_bound_holds_and_it_picks_the_float32_argmax(backend):
    """The screen's error bound holds against float64 logits, and the token it picks is the
    float32 argmax: rows of very different sizes, hidden states with outlier dimensions, planted
    near-ties (two tokens 1e-4 apart), exact ties (the first index wins, as argmax), an all-zero
    hidden state (every logit ties: the float32 fallback), and small and large batches."""
    from nanopost.engine import GreedyScreen, int8_matmul
    g = torch.Generator().manual_seed(0)
    V, C = 5000, 96
    backend = int8_matmul(C, (backend,))
    if backend is None:
        pytest.skip("no exact int8 matmul on this machine")
    w = torch.randn(V, C, generator=g) * torch.rand(V, 1, generator=g) * 0.2
    w[11] = w[5]  # an exact tie
    w[7] = w[3]
    w[7, 0] += 1e-4  # a near-tie, decided by h[:, 0]
    head = torch.nn.Linear(C, V, bias=False)
    head.weight.data = w
    screen = GreedyScreen(head, backend)
    h = torch.randn(64, C, generator=g) * 3
    h[:, [4, 50]] *= 15  # outlier dimensions, as real hidden states have
    h[1] = 0
    h[2:10] = w[3] * 40  # tokens 3 and 7 on top, 1e-4 * h[0] apart
    h[10:14] = w[5] * 40  # tokens 5 and 11 exactly tied
    h[2:6, 0] = h[2:6, 0].abs()
    h[6:10, 0] = -h[6:10, 0].abs()
    want = (h @ w.T).argmax(1)
    for rows in (slice(0, 1), slice(0, 16), slice(0, 64)):
        assert torch.equal(screen(h[rows]), want[rows])
        S, hr = screen.screened(h[rows])
        exact = h[rows].double() @ w.double().T
        s_h = (h[rows].abs().amax(1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny).double()
        assert ((exact - s_h * S.double()).abs() <= s_h * (hr.double() @ screen.norms.double()) + 1e-12).all()
    assert set(want[2:6].tolist()) == {7} and set(want[6:10].tolist()) == {3} and set(want[10:14].tolist()) == {5}
    assert want[1] == 0
    screen(h[16:64])
    assert 0 < screen.rescored < V // 8  # the rows with a clear winner rescored few tokens in float32


def test_greedy_screen_of_a_bf16_head_picks_the_float32_argmax():
    """A bf16 lm_head: the screen picks the argmax of the float32 logits of the bf16 weights and
    hidden states (float64 re-derivation), also where rounding the logits to bf16 ties two tokens
    and hands the tie to the first, as the bf16 head's own logits do."""
    from nanopost.engine import GreedyScreen, int8_matmul
    backend = int8_matmul(64)
    if backend is None:
        pytest.skip("no exact int8 matmul on this machine")
    g = torch.Generator().manual_seed(1)
    V, C = 3000, 64
    head = torch.nn.Linear(C, V, bias=False).bfloat16()
    w = (torch.randn(V, C, generator=g) * 0.1).bfloat16()
    w[9] = w[4]
    w[9, 0] += w[9, 0].abs() / 64  # token 9 a little above token 4 for a positive h[:, 0]; the bf16 logits tie
    head.weight.data = w
    h = (torch.randn(32, C, generator=g) * 2).bfloat16()
    h[:8] = (w[4].float() * 60).bfloat16()
    h[:8, 0] = h[:8, 0].abs() + 1
    want = (h.double() @ w.double().T).argmax(1)
    rounded = head(h).float()
    assert set(want[:8].tolist()) == {9} and (rounded[:8, 4] == rounded[:8, 9]).any()  # the tie bf16 makes
    screen = GreedyScreen(head, backend)
    assert torch.equal(screen(h.float()), want)
    # a flat row (every logit 0) or a NaN row sends the batch to the full logits: still float32 ones,
    # so the other rows' tokens do not change
    for odd in (torch.zeros(1, C), torch.full((1, C), float("nan"))):
        assert torch.equal(screen(torch.cat([h[:8].float(), odd]))[:8], want[:8]) and screen.rescored == V


def test_greedy_decoding_goes_through_the_screen_where_it_applies(eng32, monkeypatch):
    """Plain greedy decoding of a float32 CPU model uses the screen (same tokens as without it, and
    as decoding alone); sampling and a repetition penalty, which need every logit, do not; a weight
    update rebuilds it."""
    model, tok = eng32.model, eng32.tok
    prompts = shared_prompts(tok)[:6]
    eng = Engine(model, tok)
    if eng._screen_for(Sampling()) is None:
        pytest.skip("no exact int8 matmul on this machine")
    from nanopost.engine import GreedyScreen
    calls, call = [], GreedyScreen.__call__
    monkeypatch.setattr(GreedyScreen, "__call__", lambda self, h: (calls.append(len(h)), call(self, h))[1])
    got = eng.generate_ids(prompts, Sampling(max_new_tokens=12), batch_size=4)
    assert calls  # the tokens really came from the screen
    calls.clear()
    assert got == Engine(model, tok, greedy_screen=False).generate_ids(prompts, Sampling(max_new_tokens=12), batch_size=4)
    assert not calls and got == [naive(model, p, 12, tok.eos_ids) for p in prompts]
    assert eng._screen_for(Sampling(temperature=0.7)) is None and eng._screen_for(Sampling(repetition_penalty=1.2)) is None
    first = eng._screen_for(Sampling())
    assert eng._screen_for(Sampling()) is first  # kept while the weights are unchanged
    with torch.no_grad():
        model.lm_head.weight.mul_(1.0)  # an in-place update: a new version
    assert eng._screen_for(Sampling()) is not first


def test_copies_follow_model_to_another_dtype_and_back(tiny):
    """model.to() swaps each weight's storage without moving its version: the packed weights, the
    int8 screen and the kept prefixes must still follow (a bf16 model once crashed the packed
    linears; bf16 -> float32 kept the screen's old int8 copy)."""
    model, tok = nanopost.load(tiny)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # varied tokens rather than one repeated
    prompts = [[1, 2, 3, 4] * 20 + [5], [1, 2, 3, 4] * 20 + [9, 9], [7, 8]]
    s = Sampling(max_new_tokens=10)
    eng = Engine(model, tok)
    eng.generate_ids(prompts, s)  # packs, screens and keeps the prefix in float32
    for dtype in (torch.bfloat16, torch.float32):
        model.to(dtype)  # bf16 -> float32: the same values rounded to bf16, the versions unchanged
        fresh = Engine(model, tok).generate_ids(prompts, s)
        assert eng.generate_ids(prompts, s) == fresh
        if dtype == torch.float32:
            assert Engine(model, tok, greedy_screen=False, pack_weights=False).generate_ids(prompts, s) == fresh


def test_greedy_screen_with_nan_or_inf_hidden_states_takes_the_full_logits():
    """A diverged model's NaN or inf hidden state satisfies no bound: the batch takes the float32
    logits' argmax, exactly what decoding without the screen returns, instead of failing or
    giving a row another row's token."""
    from nanopost.engine import GreedyScreen, int8_matmul
    C = 32
    backend = int8_matmul(C)
    if backend is None:
        pytest.skip("no exact int8 matmul on this machine")
    head = torch.nn.Linear(C, 300, bias=False)
    screen = GreedyScreen(head, backend)
    h = torch.randn(3, C)
    for bad in (float("nan"), float("inf")):
        h[1, 5] = bad
        with torch.inference_mode():
            assert torch.equal(screen(h), head(h).argmax(1))
            assert torch.equal(screen(h[1:2]), head(h[1:2]).argmax(1))


@pytest.mark.parametrize("scale_w,scale_h", [(1e-25, 1.0), (1.0, 1e-30), (1.0, 1e19)])
def test_greedy_screen_bound_holds_at_extreme_scales(scale_w, scale_h):
    """Weights or hidden states whose float32 squares would under- or overflow keep the bound (its
    norms are taken in the int8 domain): near-ties whose int8 codes differ still pick the float32
    argmax. (Found by review: norms of 1e-25 weights came out 0, and 97 of 1600 rows mismatched.)"""
    from nanopost.engine import GreedyScreen, int8_matmul
    V, C = 200, 64
    backend = int8_matmul(C)
    if backend is None:
        pytest.skip("no exact int8 matmul on this machine")
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(V, C, generator=g) * 0.05
        w[7] = w[3] + torch.randn(C, generator=g) * 2e-3
        h = (w[3].repeat(8, 1) * 40 + torch.randn(8, C, generator=g) * 0.3) * scale_h
        head = torch.nn.Linear(C, V, bias=False)
        head.weight.data = w * scale_w
        with torch.inference_mode():
            assert torch.equal(GreedyScreen(head, backend)(h), (h @ head.weight.T).argmax(1))


def test_sampling_edges_as_transformers_filters_them():
    """(Each case once passed every test when changed.) top-p keeps what transformers' TopPLogitsWarper
    keeps, ties included; a top-p so small that 1 - top_p rounds to 1 keeps the most likely token
    (not an empty distribution); a temperature under 1e-5 is greedy even between near-ties."""
    from transformers.generation.logits_process import TopPLogitsWarper
    none = torch.zeros(1, 4, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    logits = torch.zeros(1, 4)
    drawn = {sample_next(logits, none, Sampling(temperature=1.0, top_p=0.5), gen).item() for _ in range(400)}
    assert drawn == set(TopPLogitsWarper(0.5)(None, logits.clone())[0].isfinite().nonzero().flatten().tolist())
    logits = torch.randn(1, 1000, generator=gen) * 0.01
    assert sample_next(logits, torch.zeros(1, 1000, dtype=torch.bool), Sampling(temperature=1.0, top_p=1e-9),
                       gen).item() == logits.argmax().item()
    near = torch.tensor([[1.0, 1.0 - 1e-6, -3.0]])
    assert {sample_next(near, none[:, :3], Sampling(temperature=1e-6), gen).item() for _ in range(200)} == {0}


def test_edges_of_planning_and_slots_equal_one_at_a_time(eng64):
    """(Each case once passed every test when changed.) The repetition penalty counts the prompt's
    first token; a finished row's idle slot stays at position 0 (it ran on past the cache); a prompt
    that is all prefix of another keeps a token of its own to run; a group's shared prefix is its
    shortest; a kept prefix never covers a whole prompt; a reply cut by a stop string is not truncated."""
    model, tok = eng64.model, eng64.tok
    eos = set(tok.eos_ids)
    g = torch.Generator().manual_seed(1)
    for p in [[210, 364, 413]] + [torch.randint(5, 500, (3,), generator=g).tolist() for _ in range(20)]:
        assert eng64.generate_ids([p], Sampling(max_new_tokens=8, repetition_penalty=3.0))[0] == \
            naive(model, p, 8, eos, penalty=3.0), p
    alone = lambda p, n: Engine(model, tok).generate_ids([p], Sampling(max_new_tokens=n, ignore_eos=True))[0]  # noqa: E731
    a = torch.randint(5, 500, (30,), generator=g).tolist()
    out = Engine(model, tok).generate_ids([a, [5], [6]], Sampling(max_new_tokens=31, ignore_eos=True), limits=[2, 31, 31])
    assert out == [alone(a, 2), alone([5], 31), alone([6], 31)]
    p = torch.randint(5, 500, (40,), generator=g).tolist()
    assert Engine(model, tok).generate_ids([p, p + [7]], Sampling(max_new_tokens=5, ignore_eos=True))[0] == alone(p, 5)
    x = torch.randint(5, 500, (100,), generator=g).tolist()
    eng = Engine(model, tok)
    eng.generate_ids([x + [1], x + [2]], Sampling(max_new_tokens=2))  # keeps x as a prefix
    p3 = x[:50] + [100] + torch.randint(5, 500, (60,), generator=g).tolist()
    assert eng.generate_ids([p3, x + [3]], Sampling(max_new_tokens=5, ignore_eos=True))[0] == alone(p3, 5)
    assert eng.generate_ids([x[:60]], Sampling(max_new_tokens=5, ignore_eos=True))[0] == alone(x[:60], 5)
    known = []
    eng._plan([list(range(10, 60)) + [5]], known)
    assert eng._plan([list(range(10, 60)) + [9]], known)[1] == [50]  # shared with the earlier request
    new = tok.encode("The answer is 72.\n\nQuestion")
    assert eng64.reply(new, Sampling(max_new_tokens=len(new), stop=["Question"])) == ("The answer is 72.\n\n", False)
