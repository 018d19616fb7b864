"""Parity on the real 0.5B checkpoint (../shared/tools/get-real-qwen2.sh); skipped when absent."""
import os

import pytest
import torch

import nanopost
from nanopost.engine import Engine, Sampling

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.real

CHAT = [{"role": "user", "content": "Write a Python function that checks whether a number is prime. "
                                    "Explain briefly how it works, what its time complexity is, and give two "
                                    "examples of calling it with small and large inputs."}]


def one_test_under_xdist(fixture_name, config):
    """Under `pytest -n N` the models live only while their test holds the real-tests lock (conftest):
    a worker waiting for it must not hold a copy meanwhile."""
    return "function" if "PYTEST_XDIST_WORKER" in os.environ else "module"


@pytest.fixture(scope=one_test_under_xdist)
def both(real_model_dir):
    model, tok = nanopost.load(real_model_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()
    return model, tok, ref


def test_real_logits_match(both):
    model, tok, ref = both
    ids, _ = tok.render(CHAT, add_generation_prompt=True)
    ids = ids[:64]
    assert len(ids) == 64
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max() <= 1e-3


@pytest.mark.parametrize("penalty", [1.0, 1.1])  # 1.1 is the checkpoint's generation_config default
def test_real_greedy_generation_token_identical(both, penalty):
    model, tok, ref = both
    prompts = [tok.render(CHAT, add_generation_prompt=True)[0],
               tok.render([{"role": "user", "content": "Say hello in French."}], add_generation_prompt=True)[0]]
    ours = Engine(model, tok).generate_ids(prompts, Sampling(max_new_tokens=64, repetition_penalty=penalty))
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            g = ref.generate(torch.tensor([p]), do_sample=False, max_new_tokens=64, repetition_penalty=penalty,
                             eos_token_id=tok.eos_ids, pad_token_id=tok.pad_id)
        theirs = g[0, len(p):].tolist()
        while theirs and theirs[-1] in tok.eos_ids:  # we return the text before the eos
            theirs.pop()
        assert o == theirs


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_real_load_holds_one_copy_of_the_weights(real_model_dir, dtype):
    """Peak RSS while loading stays well under two copies of the weights (measured here: weights +
    190 MB in bfloat16, + 230-590 MB in float32, where the largest stored tensor is 272 MB)."""
    import subprocess
    import sys
    code = ("import resource, sys, torch, nanopost\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"m, t = nanopost.load({real_model_dir!r}, dtype=torch.{dtype})\n"
            "size = sum(p.numel() * p.element_size() for p in m.state_dict().values())\n"
            "print(size / 2**20, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    weights_mb, peak_mb = map(float, r.stdout.split())
    assert peak_mb < 1.3 * weights_mb, (weights_mb, peak_mb)


def test_real_prefix_shared_continuous_batching_equals_one_at_a_time(both):
    """A shared 4-shot block and plain chats, 6 prompts through 2 slots, eos respected: each row's
    tokens equal the plain engine decoding that prompt alone (no other row, no kept prefix)."""
    model, tok, _ = both
    shots = "".join(f"Question: What is {a} + {b}?\nLet's think step by step\n{a} + {b} = {a + b}.\nThe answer is {a + b}.\n\n"
                    for a, b in ((12, 30), (7, 8), (100, 23), (5, 5)))
    chats = [shots + f"Question: What is {q}?\nLet's think step by step" for q in ("3 + 4", "20 * 3", "9 - 11", "2 ** 10")]
    chats += ["Say hello in French.", "Write one sentence about the sea, then stop."]
    prompts = [tok.render([{"role": "user", "content": c}], add_generation_prompt=True)[0] for c in chats]
    eng = Engine(model, tok)
    s = Sampling(max_new_tokens=40)
    outs = eng.generate_ids(prompts, s, batch_size=2)
    assert eng._prefixes and max(len(k) for k, _ in eng._prefixes) > 150  # the 4-shot block was shared
    assert outs == [Engine(model, tok).generate_ids([p], s)[0] for p in prompts]
    assert len({len(o) for o in outs}) > 1  # rows of different lengths (eos)
