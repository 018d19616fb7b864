"""The batched engine against naive full-recompute greedy decoding, and its sampling controls."""
import pytest
import torch

import nanopost
from nanopost.engine import Engine, Sampling, cut_at_stop, sample_next


def naive_greedy(model, prompt, n, eos):
    ids, new = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(torch.tensor([ids]))[0, -1].argmax().item()
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
        assert o == naive_greedy(eng64.model, p, 15, eng64.tok.eos_ids)
    assert [eng64.generate_ids([p], Sampling(max_new_tokens=15))[0] for p in prompts] == outs


def test_eos_stops_a_row_and_is_not_returned(eng64):
    model, tok = eng64.model, eng64.tok
    prompt = [5, 6, 7]
    first = naive_greedy(model, prompt, 1, [])[0]
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
    assert eng.generate_ids(prompts, Sampling(max_new_tokens=8)) == [naive_greedy(model, p, 8, tok.eos_ids) for p in prompts]


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
