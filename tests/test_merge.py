"""merge.py and nanopost/merging.py against closed forms and float64 re-derivations."""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import nanopost
from nanopost.engine import Engine, Sampling
from nanopost.merging import (dare_drop, linear, resolve_param, slerp, slerp_rows, task_merge, trim_magnitude)
from nanopost.testing import load_script, make_tiny_checkpoint, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def merge(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "merge.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def state(d):
    return nanopost.load(d)[0].state_dict()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return make_tiny_checkpoint(str(root / "a"), seed=1), make_tiny_checkpoint(str(root / "b"), seed=2)


def slerp_ref(t, v0, v1):
    """SLERP as mergekit defines it (near-parallel vectors: linear), float64 numpy."""
    a, b = v0.double().numpy().ravel(), v1.double().numpy().ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = np.dot(a / na if na > 1e-8 else a, b / nb if nb > 1e-8 else b)
    if abs(dot) > 0.9995:
        return (1 - t) * v0.double() + t * v1.double()
    th = np.arccos(dot)
    return np.sin((1 - t) * th) / np.sin(th) * v0.double() + np.sin(t * th) / np.sin(th) * v1.double()


# ---- per-tensor operations ----

def test_linear_closed_form():
    xs = [torch.randn(5, 7, dtype=torch.float64) for _ in range(3)]
    w = [0.2, 0.5, 1.3]
    assert torch.allclose(linear(xs, w), sum(wi * x for wi, x in zip(w, xs)) / sum(w), atol=1e-12)
    assert torch.allclose(linear(xs, w, normalize=False), sum(wi * x for wi, x in zip(w, xs)), atol=1e-12)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_closed_form(t):
    v0, v1 = torch.randn(6, 9), torch.randn(6, 9)
    assert torch.allclose(slerp(t, v0, v1).double(), slerp_ref(t, v0, v1), atol=1e-5)
    if t == 0:
        assert torch.equal(slerp(t, v0, v1), v0)
    if t == 1:
        assert torch.equal(slerp(t, v0, v1), v1)


def test_slerp_parallel_falls_back_to_lerp():
    v = torch.randn(4, 4)
    for other in (2 * v, -3 * v):
        assert torch.allclose(slerp(0.3, v, other), 0.7 * v + 0.3 * other, atol=1e-6)
    assert torch.equal(slerp(0.3, v, v), v)


def test_slerp_rows_closed_form():
    v0, v1 = torch.randn(5, 8), torch.randn(5, 8)
    v1[2] = 2 * v0[2]  # a parallel row falls back to lerp on its own
    out = slerp_rows(0.4, v0, v1)
    for r in range(5):
        assert torch.allclose(out[r].double(), slerp_ref(0.4, v0[r], v1[r]), atol=1e-5)
    b0, b1 = torch.randn(8), torch.randn(8)
    assert torch.allclose(slerp_rows(0.4, b0, b1), 0.6 * b0 + 0.4 * b1, atol=1e-6)  # 1-D: linear


def test_gradient_and_filters():
    N = 5
    for i in range(N):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        assert resolve_param([0.0, 1.0], name, N) == pytest.approx(i / (N - 1))
        assert resolve_param([0.0, 1.0, 0.0], name, N) == pytest.approx(1 - abs(2 * i / (N - 1) - 1))
    spec = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "attn", "value": 0.9},
            {"filter": "mlp", "value": 0.2}, {"value": 0.5}]
    assert resolve_param(spec, "model.layers.4.self_attn.q_proj.weight", N) == 1.0  # first match wins
    assert resolve_param(spec, "model.layers.4.mlp.down_proj.weight", N) == 0.2
    assert resolve_param(spec, "model.norm.weight", N) == 0.5
    assert resolve_param([0.0, 1.0], "model.embed_tokens.weight", N) == 0.0
    # the final norm and lm_head at 0 too: mergekit's planner since 0.1.2 (up to 0.1.1: at 1)
    assert resolve_param([0.0, 1.0], "lm_head.weight", N) == resolve_param([0.0, 1.0], "model.norm.weight", N) == 0.0
    # mergekit's evaluate_setting: no entry matching is None (the next level decides), "*" matches every
    # tensor, a single {filter, value} outside a list is refused, a lone layer sits at 1 (its planner's t)
    assert resolve_param([{"filter": "mlp", "value": 1}], "model.norm.weight", N) is None
    assert resolve_param([{"filter": "mlp", "value": 0.2}, {"filter": "*", "value": 0.7}], "model.norm.weight", N) == 0.7
    with pytest.raises(ValueError, match="single"):
        resolve_param({"filter": "self_attn", "value": 0.9}, "model.norm.weight", N)
    assert resolve_param([0.2, 0.8], "model.layers.0.mlp.up_proj.weight", 1) == 0.8


def test_parameter_levels_as_mergekit_reads_them():
    """A source model's setting, then the slice's, then the top level's: the first whose entries match
    the tensor (mergekit's ConfigReader.parameter); t is never read from a model."""
    from merge import MergeError, resolved_params
    plan = {"models": [{"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 0.2}]}},
                       {"model": "b", "parameters": {}}],
            "slice_parameters": {"t": [{"filter": "self_attn", "value": 0.9}], "weight": [{"filter": "norm", "value": 3.0}]},
            "parameters": {"t": 0.1, "weight": 0.5}}
    mlp, attn, norm = "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"
    assert resolved_params(plan, mlp, 2) == ([0.2, 0.5], [1.0, 1.0], 0.1)
    assert resolved_params(plan, attn, 2) == ([0.5, 0.5], [1.0, 1.0], 0.9)
    assert resolved_params(plan, norm, 2) == ([3.0, 3.0], [1.0, 1.0], 0.1)
    del plan["parameters"]["weight"], plan["slice_parameters"]["weight"]
    with pytest.raises(MergeError, match="weight: no filter matches tensor model.norm.weight"):
        resolved_params(plan, norm, 2)  # set for model a, matching nowhere: mergekit requires a weight
    plan["models"][0]["parameters"] = {"density": [{"filter": "mlp", "value": 0.3}]}
    assert resolved_params(plan, norm, 2) == ([1.0, 1.0], [1.0, 1.0], 0.1)  # density falls back to its default


def ties_ref(base, xs, w, dens):
    """TIES re-derived in float64 numpy, element by element."""
    base = base.double().numpy()
    deltas = []
    for x, d in zip(xs, dens):
        delta = x.double().numpy() - base
        k = int(d * delta.size)
        keep = np.zeros(delta.size, bool)
        keep[np.argsort(-np.abs(delta).ravel(), kind="stable")[:k]] = True
        deltas.append(np.where(keep.reshape(delta.shape), delta, 0.0))
    out = base.copy()
    for idx in np.ndindex(base.shape):
        wd = [wi * dl[idx] for wi, dl in zip(w, deltas)]
        sign = 1.0 if sum(wd) >= 0 else -1.0
        agree = [i for i, v in enumerate(wd) if np.sign(v) == sign]
        num, den = sum(wd[i] for i in agree), sum(w[i] for i in agree)
        out[idx] += num / (den if den != 0 else 1.0)
    return torch.from_numpy(out)


def test_ties_matches_float64_rederivation():
    base = torch.randn(6, 5, dtype=torch.float64)
    xs = [base + torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    w, dens = [0.5, 0.3, 0.8], [0.5, 0.7, 0.3]
    got = task_merge(base, xs, w, dens, "ties", normalize=True)
    assert torch.allclose(got, ties_ref(base, xs, w, dens), atol=1e-12)
    kept = trim_magnitude(xs[0] - base, 0.5)
    assert (kept != 0).sum() == 15


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_float64_rederivation(method):
    base = torch.randn(8, 4, dtype=torch.float64)
    xs = [base + torch.randn(8, 4, dtype=torch.float64) for _ in range(2)]
    w, dens = [0.6, 0.9], [0.5, 0.25]
    got = task_merge(base, xs, w, dens, method, normalize=False, gen=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same seeded stream: a mask per model, in order
    deltas = []
    for x, d in zip(xs, dens):  # kept entries scaled so the delta keeps its L1 norm (mergekit's rescale)
        delta = (x - base).numpy()
        kept = np.where(torch.rand(base.shape, generator=g).numpy() < d, delta, 0.0)
        deltas.append(kept * np.abs(delta).sum() / np.abs(kept).sum())
    wd = [wi * dl for wi, dl in zip(w, deltas)]
    if method == "dare_ties":
        sign = np.where(sum(wd) >= 0, 1.0, -1.0)
        ref = base.numpy() + sum(np.where(np.sign(x) == sign, x, 0.0) for x in wd)
    else:
        ref = base.numpy() + sum(wd)
    assert torch.allclose(got, torch.from_numpy(ref), atol=1e-12)
    a = dare_drop(torch.ones(1000, dtype=torch.float64), 0.3, torch.Generator().manual_seed(1))
    assert 200 < (a != 0).sum() < 400 and set(a.unique().tolist()) == {0.0, 1000 / (a != 0).sum().item()}


# ---- merge.py end to end ----

def test_self_merge_is_bit_exact(tmp_path, pair):
    a, _ = pair
    ref = state(a)
    for method, extra in (("linear", []), ("slerp", ["--t", "0.3"]), ("slerp", ["--t", "0.3", "--slerp-rows"])):
        out = tmp_path / f"{method}{len(extra)}"
        r = merge("--method", method, "--models", a, a, "--out", out, *extra)
        assert r.returncode == 0, r.stderr
        got = state(out)
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_linear_merge_of_two_models_and_it_generates(tmp_path, pair):
    a, b = pair
    out = tmp_path / "lin"
    r = merge("--method", "linear", "--models", a, b, "--weights", 0.05, 0.95, "--out", out)
    assert r.returncode == 0, r.stderr
    sa, sb, got = state(a), state(b), state(out)
    for k in sa:
        assert torch.allclose(got[k], (0.05 * sa[k] + 0.95 * sb[k]) / 1.0, atol=1e-6), k
    model, tok = nanopost.load(str(out))
    assert len(Engine(model, tok).generate(["hi"], Sampling(max_new_tokens=4))) == 1
    for f in ("tokenizer.json", "generation_config.json", "merge_config.json", "config.json"):
        assert (out / f).exists()
    assert json.loads(r.stdout.strip().splitlines()[-1])["method"] == "linear"


def test_slerp_gradient_filters_and_sharding(tmp_path, pair):
    a, b = pair
    out = tmp_path / "slerp"
    r = merge("--method", "slerp", "--models", a, b, "--t", 0.5, "--t-filter", "self_attn=0,1", "--t-filter", "mlp=1,0",
              "--max-shard-gb", 0.00005, "--out", out)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors.index.json").exists()
    sa, sb, got = state(a), state(b), state(out)
    checks = {"model.layers.0.self_attn.q_proj.weight": 0.0, "model.layers.1.self_attn.q_proj.weight": 1.0,
              "model.layers.0.mlp.up_proj.weight": 1.0, "model.layers.1.mlp.down_proj.weight": 0.0,
              "model.norm.weight": 0.5, "model.layers.0.input_layernorm.weight": 0.5}
    for k, t in checks.items():
        assert torch.allclose(got[k].double(), slerp_ref(t, sa[k], sb[k]), atol=1e-5), k


def test_config_slice_parameters_and_wildcard_filter(tmp_path, pair):
    """mergekit's slices: the slice's t wins over the top level's (it was dropped), "*" matches every
    tensor (it was refused), and a slice key we do not read is refused rather than ignored."""
    a, b = pair
    cfg = {"slices": [{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}],
                       "parameters": {"t": [{"filter": "mlp", "value": 0.2}, {"filter": "*", "value": 0.9}]}}],
           "merge_method": "slerp", "base_model": a, "parameters": {"t": 0.1}}
    (tmp_path / "slice.json").write_text(json.dumps(cfg))
    r = merge("--config", tmp_path / "slice.json", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "out" / "merge_config.json"))["slice_parameters"] == cfg["slices"][0]["parameters"]
    sa, sb, got = state(a), state(b), state(tmp_path / "out")
    for k in got:
        assert torch.allclose(got[k].double(), slerp_ref(0.2 if "mlp" in k else 0.9, sa[k], sb[k]), atol=1e-5), k
    cfg["slices"][0]["residual_weight"] = 0.5
    (tmp_path / "slice.json").write_text(json.dumps(cfg))
    r = merge("--config", tmp_path / "slice.json", "--out", tmp_path / "out2")
    assert r.returncode != 0 and "unsupported keys ['residual_weight']" in r.stderr
    del cfg["slices"][0]["residual_weight"]
    cfg["slices"][0]["parameters"]["t"] = "abc"
    (tmp_path / "slice.json").write_text(json.dumps(cfg))
    r = merge("--config", tmp_path / "slice.json", "--out", tmp_path / "out3")
    assert r.returncode != 0 and "t: cannot read 'abc'" in r.stderr and "in the slice's parameters" in r.stderr, r.stderr


def test_task_methods_and_config_file(tmp_path, pair):
    a, b = pair
    c = make_tiny_checkpoint(str(tmp_path / "c"), seed=3)
    sa, sb, sc = state(a), state(b), state(c)
    out = tmp_path / "ta"
    r = merge("--method", "task_arithmetic", "--base", a, "--models", b, c, "--weights", 0.5, 0.7, "--out", out)
    assert r.returncode == 0, r.stderr
    got = state(out)
    for k in sa:
        assert torch.allclose(got[k], sa[k] + 0.5 * (sb[k] - sa[k]) + 0.7 * (sc[k] - sa[k]), atol=1e-5)
    cfg = {"merge_method": "ties", "base_model": a, "parameters": {"normalize": True, "int8_mask": True},
           "models": [{"model": a}, {"model": b, "parameters": {"weight": 0.5, "density": 0.5}},
                      {"model": c, "parameters": {"weight": 0.5, "density": 0.5}}], "dtype": "float32"}
    (tmp_path / "ties.json").write_text(json.dumps(cfg))
    r = merge("--config", tmp_path / "ties.json", "--out", tmp_path / "ties")
    assert r.returncode == 0, r.stderr
    got = state(tmp_path / "ties")
    k = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(got[k], task_merge(sa[k], [sb[k], sc[k]], [0.5, 0.5], [0.5, 0.5], "ties", True), atol=1e-6)
    yaml = pytest.importorskip("yaml")
    (tmp_path / "ties.yml").write_text(yaml.safe_dump(cfg))
    r = merge("--config", tmp_path / "ties.yml", "--out", tmp_path / "ties_yaml")
    assert r.returncode == 0, r.stderr
    assert all(torch.equal(state(tmp_path / "ties_yaml")[k], got[k]) for k in got)
    (tmp_path / "bf16.yml").write_text(yaml.safe_dump({**cfg, "dtype": "bf16"}))  # mergekit's short names too
    r = merge("--config", tmp_path / "bf16.yml", "--out", tmp_path / "ties_bf16")
    assert r.returncode == 0, r.stderr
    assert load_file(tmp_path / "ties_bf16" / "model.safetensors")[k].dtype == torch.bfloat16


def test_dare_is_seeded(tmp_path, pair):
    a, b = pair
    outs = []
    for i, seed in enumerate((0, 0, 1)):
        out = tmp_path / f"dare{i}"
        r = merge("--method", "dare_ties", "--base", a, "--models", b, "--densities", 0.5, "--seed", seed, "--out", out)
        assert r.returncode == 0, r.stderr
        outs.append(state(out))
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(outs[0][k], outs[1][k]) and not torch.equal(outs[0][k], outs[2][k])


def test_tied_checkpoints_with_a_stored_lm_head_copy_merge_to_a_loadable_model(tmp_path, pair):
    """A tied checkpoint may store lm_head.weight as a copy of the embeddings: it is merged as the
    embeddings (DARE drew its own mask for it by name, writing a model that would not load), and
    such a checkpoint merges with one that stores no copy."""
    import shutil
    a, b = pair
    copies = []
    for src in (a, b):
        d = shutil.copytree(src, tmp_path / f"copy-{os.path.basename(src)}")
        sd = load_file(d / "model.safetensors")
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        save_file(sd, d / "model.safetensors")
        copies.append(d)
    for base, models in ((copies[0], [copies[1]]), (a, [copies[1]])):
        out = tmp_path / f"dare-{len(os.listdir(tmp_path))}"
        r = merge("--method", "dare_linear", "--base", base, "--models", *models, "--densities", 0.5, "--out", out)
        assert r.returncode == 0, r.stderr
        plain = tmp_path / f"plain-{len(os.listdir(tmp_path))}"
        assert merge("--method", "dare_linear", "--base", a, "--models", b, "--densities", 0.5, "--out", plain).returncode == 0
        assert all(torch.equal(x, y) for x, y in zip(state(out).values(), state(plain).values()))  # loads; the same model


# ---- bad input: a clear error, nothing written ----

def assert_fails_cleanly(tmp_path, r, pattern):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    import re
    assert re.search(pattern, r.stderr), r.stderr
    assert not (tmp_path / "out").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_bad_inputs(tmp_path, pair):
    """The first case through the CLI (no traceback on stderr), the rest in-process (quick)."""
    a, b = pair
    out = tmp_path / "out"
    other = make_tiny_checkpoint(str(tmp_path / "wide"), hidden_size=32)
    assert_fails_cleanly(tmp_path, merge("--method", "linear", "--models", a, other, "--out", out),
                         r"different architectures \(hidden_size: 64 vs 32")
    here = lambda *args: run_main(os.path.join(ROOT, "merge.py"), *args)  # noqa: E731
    assert_fails_cleanly(tmp_path, here("--method", "linear", "--models", a, b, "--weights", 1, "--out", out),
                         r"--weights has 1 values for 2 models")
    assert_fails_cleanly(tmp_path, here("--method", "slerp", "--models", a, b, "--t", 1.5, "--out", out),
                         r"t = 1.5 .* outside \[0, 1\]")
    assert_fails_cleanly(tmp_path, here("--method", "ties", "--models", a, b, "--out", out), r"needs a base model")
    for gb in (0, -1, "nan"):  # (a shard per tensor, or one shard)
        r = here("--method", "linear", "--models", a, b, "--out", out, "--max-shard-gb", gb)
        assert r.returncode == 2 and "--max-shard-gb must be a positive number" in r.stderr and not out.exists()
    c = make_tiny_checkpoint(str(tmp_path / "c"), seed=3)  # linear: a base outside --models had joined at weight 1
    assert_fails_cleanly(tmp_path, here("--method", "linear", "--base", c, "--models", a, b, "--weights", 0.5, 0.5,
                                        "--out", out), r"linear averages the --models only.*list it in --models")
    assert_fails_cleanly(tmp_path, here("--method", "linear", "--models", a, b, "--weights", "inf", 1, "--out", out),
                         r"weight inf of .* is not a finite number")
    assert_fails_cleanly(tmp_path, here("--method", "linear", "--models", a, b, "--weights", 1e308, 1e308, "--out", out),
                         r"sum to inf: not a finite number")
    assert_fails_cleanly(tmp_path, here("--method", "linear", "--models", a, b, "--weights", 1e39, 1, "--no-normalize",
                                        "--out", out), r"not finite numbers in float32; nothing was written")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 1}}, {"model": b, "parameters": {"weight": 1}}]}).encode())
    assert here("--config", tmp_path / "bom.json", "--out", tmp_path / "bom").returncode == 0  # a BOM is read
    (tmp_path / "bad.json").write_bytes(b"\xff{}")
    assert_fails_cleanly(tmp_path, here("--config", tmp_path / "bad.json", "--out", out), r"bad.json: not UTF-8 text")
    assert_fails_cleanly(tmp_path, here("--method", "slerp", "--models", a, b, a, "--t", 0.5, "--out", out),
                         r"slerp merges two models")
    rope = make_tiny_checkpoint(str(tmp_path / "rope"), rope_theta=5e5)  # same shapes, another forward
    assert_fails_cleanly(tmp_path, here("--method", "linear", "--models", a, rope, "--out", out),
                         r"different architectures \(rope_theta: 10000.0 vs 500000.0\)")
    big = make_tiny_checkpoint(str(tmp_path / "bigvocab"), vocab_size=600)
    assert_fails_cleanly(tmp_path, here("--method", "linear", "--models", a, big, "--out", out),
                         r"embed_tokens.weight has shape \(600, 64\).*--embed-slice")
    r = here("--method", "linear", "--models", a, big, "--embed-slice", "--out", tmp_path / "sliced")
    assert r.returncode == 0, r.stderr
    assert state(tmp_path / "sliced")["model.embed_tokens.weight"].shape[0] == state(a)["model.embed_tokens.weight"].shape[0]
    broken = tmp_path / "broken"
    import shutil
    shutil.copytree(b, broken)
    sd = load_file(broken / "model.safetensors")
    sd.pop("model.layers.0.mlp.gate_proj.weight")
    save_file(sd, broken / "model.safetensors")
    assert_fails_cleanly(tmp_path, here("--method", "linear", "--models", a, broken, "--out", out),
                         r"broken: tensor names differ .*missing \['model.layers.0.mlp.gate_proj.weight'\]")
    (tmp_path / "bad.json").write_text(json.dumps({"merge_method": "passthrough", "models": [{"model": a}]}))
    assert_fails_cleanly(tmp_path, here("--config", tmp_path / "bad.json", "--out", out),
                         r"merge_method 'passthrough' is not supported")
    for cfg, why in (({"slices": None}, r"slices must be a list"), ({"models": [a, b]}, r"models\[0\] is '.*'; expected"),
                     ({"models": [{"name": a}]}, r"models\[0\] is .*expected"),
                     ({"slices": [{"sources": "x"}]}, r"needs `sources:`"),
                     ({"models": [{"model": a}, {"model": b}], "dtype": "int8"}, r"dtype 'int8' is not supported"),
                     ({"models": [{"model": a}], "base_model": [a]}, r"base_model is \[.*expected one"),
                     ({"models": [{"model": a, "parameters": {"weight": float("nan")}}, {"model": b, "parameters": {"weight": 1}}]},
                      r"weight nan of .* is not a finite number")):
        (tmp_path / "bad.json").write_text(json.dumps({"merge_method": "linear", **cfg}))
        assert_fails_cleanly(tmp_path, here("--config", tmp_path / "bad.json", "--out", out), why)


def test_base_spelled_otherwise_only_base_and_out_edges(tmp_path, pair):
    """--base names a --models folder however it is spelled (m1/ and ./m1 joined as one more model,
    or were refused); a task merge of the base alone, a TIES density that keeps nothing of a tensor,
    an --out under a file or the working directory are clean errors before any work; the merged
    folder is readable like any other (umask 022: 0755)."""
    import stat
    a, b = pair
    here = lambda *args: run_main(os.path.join(ROOT, "merge.py"), *args)  # noqa: E731
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        r = here("--method", "task_arithmetic", "--base", a, "--models", a + "/", b, "--weights", 1, 1, "--out",
                 tmp_path / "ta")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(tmp_path / "ta").st_mode) == 0o755
    assert json.load(open(tmp_path / "ta" / "merge_config.json"))["resolved_paths"].__len__() == 2
    r = here("--method", "task_arithmetic", "--base", a, "--models", b, "--out", tmp_path / "ta2")
    assert r.returncode == 0, r.stderr
    for k, v in state(tmp_path / "ta2").items():  # the same merge as spelled plainly
        assert torch.equal(v, state(tmp_path / "ta")[k]), k
    r = here("--method", "slerp", "--models", a + "/", b, "--base", a, "--t", 0.5, "--out", tmp_path / "sl")
    assert r.returncode == 0, r.stderr
    assert_fails_cleanly(tmp_path, here("--method", "ties", "--base", a, "--models", a, "--out", out),
                         r"at least one model besides")
    r = here("--method", "ties", "--base", a, "--models", b, "--densities", 0.01, "--out", out)
    assert_fails_cleanly(tmp_path, r, r"density 0.01 of .* keeps no element of tensor")
    # the density it advises keeps an element of the tensor it names; the smallest tensor's lets it merge
    n, advised = re.search(r"\((\d+) elements\): TIES .* use at least ([0-9.e-]+)", r.stderr).groups()
    assert int(float(advised) * int(n)) >= 1, r.stderr
    smallest = re.search(r"the smallest tensor, \d+ elements, needs ([0-9.e-]+)", r.stderr)
    r = here("--method", "ties", "--base", a, "--models", b, "--densities", smallest.group(1) if smallest else advised,
             "--out", tmp_path / "ties")
    assert r.returncode == 0, r.stderr
    (tmp_path / "afile").write_text("x")
    assert_fails_cleanly(tmp_path, here("--method", "linear", "--models", a, b, "--out", tmp_path / "afile" / "x"),
                         r"is a file, not a directory")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert_fails_cleanly(tmp_path, here("--method", "linear", "--models", a, b, "--out", "."),
                             r"is the working directory")
    finally:
        os.chdir(cwd)


def test_sigterm_removes_the_folder_being_written_and_a_killed_merges_leftovers_go(tmp_path, pair):
    a, b = pair
    stale = tmp_path / ".tmp-out-abcd1234"  # what a SIGKILLed merge to --out left
    stale.mkdir()
    big = make_tiny_checkpoint(str(tmp_path / "big"), hidden_size=512, intermediate_size=2048, num_hidden_layers=8)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "merge.py"), "--method", "slerp", "--models", big, big,
                          "--t", "0.5", "--compute-dtype", "float64", "--max-shard-gb", "0.01", "--out", tmp_path / "out"],
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-out-") and n != stale.name] and time.time() - t0 < 60:
        time.sleep(0.02)
    p.terminate()
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 128 + 15 and "Traceback" not in err, err
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # the stale one went at the start
    r = run_main(os.path.join(ROOT, "merge.py"), "--method", "linear", "--models", a, b, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr


@pytest.mark.real
def test_real_merge_memory_and_generation(real_model_dir, tmp_path):
    """SLERP of two copies of the real 0.5B checkpoint: peak RSS above the interpreter's baseline
    (torch imported) stays under 1.5 GB, and the result loads and generates."""
    out = tmp_path / "merged"
    code = ("import resource, runpy, sys, torch, tqdm, nanopost.merging, nanopost.checkpoint\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"sys.argv = ['merge.py', '--method', 'slerp', '--models', {real_model_dir!r}, {real_model_dir!r}, "
            f"'--t', '0.5', '--out', {str(out)!r}]\n"
            f"runpy.run_path({os.path.join(ROOT, 'merge.py')!r}, run_name='__main__')\n"
            "print('PEAK_ABOVE_BASE_MB', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    peak = float(r.stdout.split("PEAK_ABOVE_BASE_MB")[1].split()[0])
    print(f"peak RSS above baseline: {peak:.0f} MB")
    assert peak < 1536
    model, tok = nanopost.load(str(out))
    text = Engine(model, tok).generate(["Write a Python function that adds two numbers."], Sampling(max_new_tokens=24))[0]
    assert "def" in text


def test_a_used_out_is_kept_unless_overwrite_and_never_an_input(tmp_path, pair):
    """A merge never replaces a folder silently: a non-empty --out needs --overwrite, and --out may
    never be one of the models being merged (the input would be gone). Broken config files name
    themselves, without a traceback."""
    a, b = pair
    here = lambda *args: run_main(os.path.join(ROOT, "merge.py"), *args)  # noqa: E731
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("keep me")
    r = here("--method", "linear", "--models", a, b, "--out", used)
    assert r.returncode != 0 and "already holds notes.txt" in r.stderr and "--overwrite" in r.stderr
    assert (used / "notes.txt").read_text() == "keep me"
    assert here("--method", "linear", "--models", a, b, "--out", used, "--overwrite").returncode == 0
    assert "model.layers.0.mlp.up_proj.weight" in state(used)
    import shutil
    a2 = shutil.copytree(a, tmp_path / "a2")
    before = state(a2)
    for extra in ((), ("--overwrite",)):  # said first (it said "already holds: pass --overwrite", then refused that)
        r = here("--method", "linear", "--models", a2, b, "--out", a2, *extra)
        assert r.returncode != 0 and "one of the models being merged" in r.stderr and "pass --overwrite" not in r.stderr, r.stderr
        assert all(torch.equal(before[k], v) for k, v in state(a2).items())
    r = here("--method", "linear", "--models", a2, b, "--out", tmp_path, "--overwrite")  # a folder holding a2
    assert r.returncode != 0 and "is or holds" in r.stderr and all(torch.equal(before[k], v) for k, v in state(a2).items())
    os.symlink(used, tmp_path / "link")
    r = here("--method", "linear", "--models", a, b, "--out", tmp_path / "link", "--overwrite")
    assert r.returncode != 0 and "symbolic link" in r.stderr and os.path.islink(tmp_path / "link")
    for name, text, kind in (("bad.json", '{"merge_method": ', "JSON"), ("bad.yml", "merge_method: [linear", "YAML")):
        if kind == "YAML":
            pytest.importorskip("yaml")
        (tmp_path / name).write_text(text)
        r = here("--config", tmp_path / name, "--out", tmp_path / "out")
        assert r.returncode != 0 and f"bad.{name.split('.')[1]}: not valid {kind}" in r.stderr, r.stderr


def test_an_out_that_is_a_mount_point_or_a_link_is_written_inside(tmp_path, pair, monkeypatch):
    """A mount point (a container's output volume) cannot be renamed aside: the whole merge ran, then
    a traceback (EBUSY). nanopost.testing replaced a link to its folder by a folder. Both now write
    inside the folder: the same folder (inode) holds the new model and only it, and a link stays a link."""
    a, b = pair
    here = lambda *args: run_main(os.path.join(ROOT, "merge.py"), *args)  # noqa: E731
    vol = tmp_path / "vol"
    vol.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20M", "tmpfs", str(vol)], capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    if not mounted:  # (not root here): the same path taken, as for a mount point
        real = os.path.ismount
        monkeypatch.setattr(os.path, "ismount", lambda p: os.path.abspath(p) == str(vol) or real(p))
    try:
        inode = os.stat(vol).st_ino
        (vol / ".tmp-save-ab12cd34").mkdir()  # what a save killed there left: ours to clear, not "already holds"
        r = here("--method", "linear", "--models", a, b, "--out", vol)
        assert r.returncode == 0 and not (vol / ".tmp-save-ab12cd34").exists(), r.stderr
        (vol / "old-notes.txt").write_text("from an earlier merge")
        r = here("--method", "linear", "--models", a, b, "--out", vol, "--weights", 0.25, 0.75, "--overwrite")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert os.stat(vol).st_ino == inode and not (vol / "old-notes.txt").exists()
        assert sorted(os.listdir(vol)) == sorted(set(os.listdir(a)) - {"nanopost_testing.json"} | {"merge_config.json"})
        sa, sb = state(a), state(b)
        assert all(torch.allclose(v, 0.25 * sa[k] + 0.75 * sb[k], atol=1e-6) for k, v in state(vol).items())
    finally:
        if mounted:
            subprocess.run(["umount", str(vol)], check=True)
    tiny = tmp_path / "tiny"
    assert subprocess.run([sys.executable, "-m", "nanopost.testing", str(tiny)], capture_output=True).returncode == 0
    os.symlink(tiny, tmp_path / "link")
    for seed, spelled in ((5, str(tmp_path / "link")), (6, str(tmp_path / "link") + "/")):  # (link/ is the folder)
        r = subprocess.run([sys.executable, "-m", "nanopost.testing", spelled, "--seed", str(seed)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and os.path.islink(tmp_path / "link"), r.stderr
        assert json.load(open(tiny / "nanopost_testing.json")) == {"seed": seed} and not state(tiny).keys() - state(a).keys()
    (tmp_path / "cut").mkdir()  # a save killed inside a mount point or link left only its temporary folder
    (tmp_path / "cut" / ".tmp-save-ab12cd34").mkdir()
    r = subprocess.run([sys.executable, "-m", "nanopost.testing", str(tmp_path / "cut")], capture_output=True, text=True)
    assert r.returncode == 0 and "nanopost_testing.json" in os.listdir(tmp_path / "cut"), r.stderr


def reported_and_stored_change(out, base_dir):
    """-> (tensor, its merge_config.json record, ||stored - base|| / ||base|| from the files) per tensor."""
    stored, base = load_file(str(out / "model.safetensors")), load_file(str(base_dir / "model.safetensors"))
    for name, v in json.load(open(out / "merge_config.json"))["tensors"].items():
        yield name, v, ((stored[name].double() - base[name].double()).norm() / base[name].double().norm()).item()


def test_the_reported_change_is_the_change_written(tmp_path, pair):
    """merge_config.json's change_vs_base is measured on what is stored, after rounding to the output
    dtype: a bf16 base merged with a float32 fine-tune of small deltas wrote bf16 (the base's dtype),
    which rounds most of the deltas away, while the report showed the change before rounding."""
    a, _ = pair
    model, tok = nanopost.load(a, dtype=torch.bfloat16)
    nanopost.save(model, tok, str(tmp_path / "base"))
    model, tok = nanopost.load(str(tmp_path / "base"), dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * p.abs().mean() * torch.randn_like(p))  # well under a bf16 step of most weights
    nanopost.save(model, tok, str(tmp_path / "tuned"))
    out = tmp_path / "merged"
    r = run_main(os.path.join(ROOT, "merge.py"), "--method", "linear", "--models", tmp_path / "base",
                 tmp_path / "tuned", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "note: rounding to bfloat16 kept" in r.stdout and "--dtype float32" in r.stdout, r.stdout
    assert load_file(str(out / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16
    for name, v, change in reported_and_stored_change(out, tmp_path / "base"):
        assert v["change_vs_base"] == pytest.approx(change, rel=1e-9, abs=1e-12), name
        assert v["change_before_rounding"] >= v["change_vs_base"] * 0.999, name
    r = run_main(os.path.join(ROOT, "merge.py"), "--method", "linear", "--models", tmp_path / "base",
                 tmp_path / "tuned", "--out", tmp_path / "f32", "--dtype", "float32")
    assert r.returncode == 0 and "note: rounding" not in r.stdout, r.stdout + r.stderr
    # against the base as stored, not as rounded to --compute-dtype: a float32 self-merge in bfloat16 changes it
    r = run_main(os.path.join(ROOT, "merge.py"), "--method", "linear", "--models", tmp_path / "tuned",
                 tmp_path / "tuned", "--compute-dtype", "bfloat16", "--out", tmp_path / "self")
    assert r.returncode == 0, r.stderr
    for name, v, change in reported_and_stored_change(tmp_path / "self", tmp_path / "tuned"):
        assert change > 0 and v["change_vs_base"] == pytest.approx(change, rel=1e-9), name


# ---- mergekit itself as the oracle (a test-only extra) ----

def mergekit_merge(cfg, out):
    mk_config = pytest.importorskip("mergekit.config")
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    run_merge(mk_config.MergeConfiguration.model_validate(cfg), str(out),
              MergeOptions(copy_tokenizer=False, low_cpu_memory=False, quiet=True))
    return {k: v for f in os.listdir(out) if f.endswith(".safetensors") for k, v in load_file(os.path.join(out, f)).items()}


@pytest.mark.parametrize("case", ["linear-filtered-normalize", "slerp-gradient", "task-arithmetic-gradient",
                                  "ties-rescale", "ties"])
def test_configs_merge_as_mergekit_merges_them(tmp_path, pair, case):
    """The same config through mergekit (its run_merge) and merge.py: every tensor equal (SLERP
    whole-tensor: mergekit's slerp() reads its leading axis as a batch of whole tensors, not rows). Covers per-tensor normalize (a filter list, not a truthy list), depth
    gradients (the final norm sits at t=0 in mergekit's planner), TIES' L1 rescale and sign election.
    DARE is left out: its random masks come from another generator by construction."""
    a, b = pair
    w = lambda x: {"weight": x}  # noqa: E731
    cfg = {"linear-filtered-normalize": {"merge_method": "linear", "models": [{"model": a, "parameters": w(1.0)},
                                                                                {"model": b, "parameters": w(0.5)}],
                                         "parameters": {"normalize": [{"filter": "mlp", "value": 0}, {"value": 1}]}},
           "slerp-gradient": {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                              "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": [0.8, 0.3]}]}},
           "task-arithmetic-gradient": {"merge_method": "task_arithmetic", "base_model": a,
                                        "models": [{"model": b, "parameters": {"weight": [0.2, 1.0]}}]},
           "ties-rescale": {"merge_method": "ties", "base_model": a, "parameters": {"rescale": True},
                            "models": [{"model": b, "parameters": {"weight": 0.7, "density": 0.4}}]},
           "ties": {"merge_method": "ties", "base_model": a,
                    "models": [{"model": b, "parameters": {"weight": 0.7, "density": 0.4}},
                               {"model": make_tiny_checkpoint(str(tmp_path / "c"), seed=3),
                                "parameters": {"weight": 0.4, "density": 0.6}}]}}[case]
    theirs = mergekit_merge({**cfg, "dtype": "float32"}, tmp_path / "mergekit")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = run_main(os.path.join(ROOT, "merge.py"), "--config", tmp_path / "cfg.json", "--out", tmp_path / "ours")
    assert r.returncode == 0, r.stderr
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6), (k, (ours[k] - theirs[k]).abs().max())
    if case.startswith("linear"):  # the filter list decided per tensor: mlp summed, the rest averaged
        sa, sb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
        k = "model.layers.0.mlp.up_proj.weight"
        assert torch.allclose(ours[k], sa[k] + 0.5 * sb[k], atol=1e-6)


def test_the_base_gives_config_and_tokenizer_and_asks_nanopost_cannot_do_are_refused(tmp_path, pair):
    """A base listed second still gives the merged model its config.json (its vocab_size, under
    --embed-slice) and its tokenizer files (chat template); config.json's torch_dtype is the dtype
    written, and --dtype applies to a --config merge too. A config asking for what nanopost does not
    do (tokenizer_source union, a slice over some layers) and an --embed-slice whose other model has
    fewer rows than the base are refused, nothing written."""
    from safetensors import safe_open
    a, b = pair
    here = lambda *args: run_main(os.path.join(ROOT, "merge.py"), *args)  # noqa: E731
    other = make_tiny_checkpoint(str(tmp_path / "other"), seed=3, vocab_size=600,
                                 template="{% for m in messages %}X {{ m['content'] }}{% endfor %}")
    r = here("--method", "linear", "--models", other, b, "--base", b, "--embed-slice", "--dtype", "bfloat16",
             "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    for f in ("tokenizer_config.json", "tokenizer.json"):
        assert open(tmp_path / "m" / f).read() == open(os.path.join(b, f)).read(), f
    cfg = json.load(open(tmp_path / "m" / "config.json"))
    assert cfg["vocab_size"] == json.load(open(os.path.join(b, "config.json")))["vocab_size"] and cfg["torch_dtype"] == "bfloat16"
    assert nanopost.load(str(tmp_path / "m"))[0].config.vocab_size == cfg["vocab_size"]  # it loads
    two = [{"model": a, "parameters": {"weight": 1}}, {"model": b, "parameters": {"weight": 1}}]
    (tmp_path / "c.json").write_text(json.dumps({"merge_method": "linear", "models": two}))
    assert here("--config", tmp_path / "c.json", "--dtype", "bfloat16", "--out", tmp_path / "c").returncode == 0
    with safe_open(str(tmp_path / "c" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    r = here("--method", "linear", "--models", b, other, "--base", other, "--embed-slice", "--out", tmp_path / "out")
    assert_fails_cleanly(tmp_path, r, r"has \d+ rows, fewer than the base's 600")
    for cfg, why in (({"models": two, "tokenizer_source": "union"}, r"tokenizer_source 'union' is not supported"),
                     ({"slices": [{"sources": [{**m, "layer_range": [0, 1]} for m in two]}]},
                      r"layer_range \[0, 1\] does not cover all 2 layers")):
        (tmp_path / "c.json").write_text(json.dumps({"merge_method": "linear", **cfg}))
        assert_fails_cleanly(tmp_path, here("--config", tmp_path / "c.json", "--out", tmp_path / "out"), why)


def test_config_mistakes_that_would_change_the_weights_are_refused(tmp_path, pair):
    """Each of these once merged something else than the config said, exit 0: models and slices
    both (slices won), a misspelt key (its weights dropped, 1.0 used), a weight never given (1.0),
    normalize as the string "false" (truthy: normalized)."""
    a, b = pair
    two = [{"model": a, "parameters": {"weight": 0.9}}, {"model": b, "parameters": {"weight": 0.1}}]
    for cfg, pattern in [
            ({"merge_method": "linear", "models": two,
              "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]}]},
             "both models and slices"),
            ({"merge_method": "linear", "models": [{"model": a, "paramters": {"weight": 0.9}}, two[1]]},
             r"model .* has unsupported keys \['paramters'\]"),
            ({"merge_method": "linear", "slices": [{"sources": [{"model": a, "layer_range": [0, 2], "paramters": {}},
                                                                {"model": b, "layer_range": [0, 2]}]}]},
             r"source .* has unsupported keys \['paramters'\]"),
            ({"merge_method": "linear", "models": [two[0], {"model": b}]}, r"has no weight for tensor .*mergekit requires"),
            ({"merge_method": "ties", "base_model": a, "models": [{"model": b}]}, "has no weight"),
            ({"merge_method": "linear", "models": two, "parameters": {"normalize": "false"}}, "normalize: cannot read 'false'"),
            ({"merge_method": "linear", "models": two, "parameters": {"normalize": 0.5}}, "normalize = 0.5 for tensor .*: expected true")]:
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
        r = run_main(os.path.join(ROOT, "merge.py"), "--config", tmp_path / "cfg.json", "--out", tmp_path / "out")
        assert r.returncode != 0 and re.search(pattern, r.stderr), (cfg, r.stderr)
        assert not (tmp_path / "out").exists()
    # the base of a task merge needs no weight, and flags need none anywhere
    (tmp_path / "cfg.json").write_text(json.dumps({"merge_method": "ties", "base_model": a, "parameters": {"normalize": False},
                                                   "models": [{"model": b, "parameters": {"weight": 1}}]}))
    assert run_main(os.path.join(ROOT, "merge.py"), "--config", tmp_path / "cfg.json", "--out", tmp_path / "out").returncode == 0



def test_edge_values_equal_mergekits():
    """Where mergekit guards an edge, so do we (each case once passed every test with the guard gone):
    SLERP with an all-zero tensor or row (not normalised), anti-parallel rows (linear), DARE keeping
    nothing (zeros, no 0/0), a TIES sign vote that sums to 0 (goes to +), task-arithmetic weights that
    sum to 0 under normalize (divisor 1)."""
    mk_slerp = pytest.importorskip("mergekit.merge_methods.slerp").slerp
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.sparsify import RescaleNorm, rescaled_masked_tensor
    from nanopost.merging import masked
    t = torch.tensor(0.3)
    v0, v1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 2)
    assert torch.allclose(slerp(0.3, v0, v1), mk_slerp(t, v0.flatten()[None], v1.flatten()[None]).view(2, 2))
    for v0, v1 in ((torch.tensor([[1.0, 2, 3], [1, 0, 0]]), torch.tensor([[-2.0, -4, -6], [0, 1, 0]])),
                   (torch.tensor([[0.0, 0], [1, 0]]), torch.tensor([[1.0, 1], [0, 1]]))):
        assert torch.allclose(slerp_rows(0.3, v0, v1), mk_slerp(t, v0, v1)), (v0, v1)
    delta, none = torch.tensor([1.0, -2.0]), torch.tensor([False, False])
    assert torch.equal(masked(delta, none, True), rescaled_masked_tensor(delta, none, RescaleNorm.l1))
    assert torch.equal(task_merge(torch.zeros(2), [delta], [1.0], [0.01], "dare_linear", False,
                                  torch.Generator().manual_seed(0)), torch.zeros(2))
    deltas, w = torch.tensor([[1.0, 2, -1], [-1, 1, -3]]), torch.ones(2, 1)
    mask = get_mask(deltas, "sum")
    assert torch.allclose(task_merge(torch.zeros(3), list(deltas), [1.0, 1.0], [1, 1], "ties", True),
                          (deltas * mask).sum(0) / (w * mask).sum(0))
    assert torch.equal(task_merge(torch.zeros(3), list(deltas), [1.0, -1.0], [1, 1], "task_arithmetic", True),
                       torch.tensor([2.0, 1.0, 2.0]))  # mergekit: a divisor under 1e-8 is 1


def test_flags_and_settings_reach_every_tensor(pair, tmp_path):
    """--no-normalize (linear), --normalize (task arithmetic), --slerp-rows and a --base listed second
    each change the merge as they say; a whole-tensor SLERP read in several row blocks takes its angle
    over all of them; a t whose filters miss a tensor is an error, not an unset t."""
    a, b = pair
    A, B = state(a), state(b)
    c = make_tiny_checkpoint(str(tmp_path / "c"), seed=3)
    C = state(c)
    here = lambda *args: run_main(os.path.join(ROOT, "merge.py"), *args)  # noqa: E731
    r = here("--method", "linear", "--models", a, b, "--weights", 0.5, 0.7, "--no-normalize", "--out", tmp_path / "lin")
    assert r.returncode == 0, r.stderr
    for k, v in state(tmp_path / "lin").items():
        assert torch.allclose(v, 0.5 * A[k] + 0.7 * B[k], atol=1e-6), k
    (tmp_path / "norm.json").write_text(json.dumps({"merge_method": "linear", "parameters": {"normalize": True},
                                                    "models": [{"model": a, "parameters": {"weight": 0.5}},
                                                               {"model": b, "parameters": {"weight": 0.7}}]}))
    r = here("--config", tmp_path / "norm.json", "--no-normalize", "--out", tmp_path / "lin2")  # the flag wins
    assert r.returncode == 0, r.stderr
    for k, v in state(tmp_path / "lin2").items():
        assert torch.allclose(v, 0.5 * A[k] + 0.7 * B[k], atol=1e-6), k
    r = here("--method", "task_arithmetic", "--base", a, "--models", b, c, "--weights", 0.5, 0.7, "--normalize",
             "--out", tmp_path / "ta")
    assert r.returncode == 0, r.stderr
    for k, v in state(tmp_path / "ta").items():
        assert torch.allclose(v, A[k] + (0.5 * (B[k] - A[k]) + 0.7 * (C[k] - A[k])) / 1.2, atol=1e-6), k
    r = here("--method", "slerp", "--models", a, b, "--t", 0.5, "--slerp-rows", "--out", tmp_path / "rows")
    assert r.returncode == 0, r.stderr
    for k, v in state(tmp_path / "rows").items():
        assert torch.allclose(v, slerp_rows(0.5, A[k], B[k]), atol=1e-6), k
    r = here("--method", "slerp", "--models", a, b, "--base", b, "--t", 0, "--out", tmp_path / "t0")
    assert r.returncode == 0, r.stderr
    assert all(torch.equal(v, B[k]) for k, v in state(tmp_path / "t0").items())  # t = 0 is the base
    module = load_script(os.path.join(ROOT, "merge.py"))
    module.CHUNK_ELEMS = 64  # every matrix of the tiny model in several blocks
    module.main(["--method", "slerp", "--models", a, b, "--t", "0.5", "--out", str(tmp_path / "blocks")])
    for k, v in state(tmp_path / "blocks").items():
        assert torch.allclose(v, slerp(0.5, A[k], B[k]), atol=1e-6), k
    (tmp_path / "miss.json").write_text(json.dumps({"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                                                    "parameters": {"t": [{"filter": "self_attn", "value": 0.5}]}}))
    r = here("--config", tmp_path / "miss.json", "--out", tmp_path / "miss")
    assert r.returncode != 0 and "t: no filter matches tensor" in r.stderr, r.stderr


def test_the_least_density_advised_is_the_smallest_that_keeps_an_element():
    module = load_script(os.path.join(ROOT, "merge.py"))
    for n in (*range(1, 3000), 10**4, 10**5, 10**9, 10**9 + 1, 151936 * 896):
        v = module.least_density(n)
        assert int(float(v) * n) >= 1 and float(v) <= 1.01 / n, (n, v)
    assert [module.least_density(n) for n in (3, 64, 10**4, 10**9)] == ["0.334", "0.0157", "0.0001", "1e-09"]
    assert task_merge(torch.zeros(0), [torch.zeros(0)], [1.0], [0.5], "ties", True).numel() == 0  # an empty tensor
