"""Weight fusion of Qwen2 checkpoints, streamed tensor by tensor (mergekit's semantics).

    # the paper's fusions of two SFT checkpoints
    python merge.py --method linear --models runs/sft_a runs/sft_b --out runs/avg            # (w1+w2)/2
    python merge.py --method linear --models runs/sft_a runs/sft_b --weights 0.05 0.95 --out runs/lin
    # SLERP, base at t=0; t as a gradient over depth, with name filters
    python merge.py --method slerp --models base sft --t 0.5 --out runs/slerp
    python merge.py --method slerp --models base sft --t 0.5 --t-filter self_attn=0,0.5,0.3,0.7,1 \\
        --t-filter mlp=1,0.5,0.7,0.3,0 --out runs/slerp_grad
    # task vectors against a base
    python merge.py --method ties --base Qwen/Qwen2-0.5B-Instruct --models runs/sft runs/kto \\
        --weights 0.5 0.5 --densities 0.5 0.5 --out runs/ties
    python merge.py --method dare_ties --base base --models a b --densities 0.5 0.5 --seed 0 --out runs/dare
    # an existing mergekit YAML/JSON config (the supported subset: these methods, whole models)
    python merge.py --config merge.yml --out runs/merged

Models are local directories or hub ids. Tensors are read a block of rows at a time and written
straight into the output shards, so memory stays at a few tensors whatever the model size
(TIES and DARE hold whole tensors: their trim and drop are per tensor). The output directory is
written atomically, with the base model's tokenizer and generation config."""
import argparse
import json
import math
import os
import re
import shutil
import signal
import sys

import torch
from tqdm import tqdm

import nanopost
from nanopost.checkpoint import (LEFTOVER, TOKENIZER_FILES, CheckpointError, Reader, atomic_dir, closing_named, commit_dir, read_config,
                                 remove_unfinished, resolve, same_folder, unwritable, within,
                                 weight_files)
from nanopost.merging import (Writer, crc_seed, linear, resolve_param, slerp_coefficients, slerp_dot,
                              slerp_rows, task_merge)

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")
NORMALIZE_DEFAULT = {"linear": True, "slerp": False, "task_arithmetic": False, "ties": True,
                     "dare_linear": False, "dare_ties": False}
CHUNK_ELEMS = 4 * 1024 * 1024  # elements per block of whole rows: about 16 MB of float32 per input


def least_density(n: int) -> str:
    """The smallest density, written with 3 significant digits, at which TIES keeps one of n elements."""
    v, step = float(f"{1 / n:.3g}"), 10.0 ** (math.floor(math.log10(1 / n)) - 2)
    while int(v * n) < 1:  # rounded to nearest, then up a digit at a time: never a density keeping none
        v = float(f"{v + step:.3g}")
    return f"{v:.3g}"


class MergeError(ValueError):
    pass


# ---- the plan: what to merge, with which parameters ----

def plan_from_args(args) -> dict:
    if not args.models:
        raise MergeError("--models is required (or --config)")
    models = list(args.models)
    n = len(models)
    for flag, vals in (("--weights", args.weights), ("--densities", args.densities)):
        if vals is not None and len(vals) != n:
            raise MergeError(f"{flag} has {len(vals)} values for {n} models ({' '.join(models)})")
    t = args.t if args.t is None or len(args.t) > 1 else args.t[0]
    if args.t_filter:
        entries = []
        for f in args.t_filter:
            key, _, vals = f.partition("=")
            if not vals:
                raise MergeError(f"--t-filter {f!r}: expected NAME=V or NAME=V1,V2,...")
            values = [float(v) for v in vals.split(",")]
            entries.append({"filter": key, "value": values if len(values) > 1 else values[0]})
        t = entries + ([{"value": t}] if t is not None else [])
    return {"merge_method": args.method, "base_model": args.base, "dtype": args.dtype,
            "models": [{"model": m, "parameters": {k: v[i] for k, v in (("weight", args.weights),
                                                                        ("density", args.densities)) if v is not None}}
                       for i, m in enumerate(models)],
            "parameters": {k: v for k, v in (("t", t), ("normalize", args.normalize)) if v is not None}}


DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}


def read_config_file(path: str) -> dict:
    """A mergekit config (YAML needs PyYAML; JSON always works), checked against what we support."""
    try:
        text = open(path, encoding="utf-8-sig").read()  # -sig: a byte-order mark is not part of the config
    except OSError as e:
        raise MergeError(f"{path}: {e}") from e
    except UnicodeDecodeError as e:
        raise MergeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.endswith((".yml", ".yaml")):
        try:
            import yaml
        except ImportError:
            raise MergeError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or write the config as JSON")
        try:
            cfg = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MergeError(f"{path}: not valid YAML: {e}") from e
    else:
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise MergeError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise MergeError(f"{path}: expected a mapping at the top level")
    unknown = set(cfg) - {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "tokenizer_source"}
    if unknown:
        raise MergeError(f"{path}: unsupported keys {sorted(unknown)}")
    if cfg.get("merge_method") not in METHODS:
        raise MergeError(f"{path}: merge_method {cfg.get('merge_method')!r} is not supported; nanopost merges "
                         f"with {', '.join(METHODS)}")
    if cfg.get("tokenizer_source") not in (None, "base"):
        raise MergeError(f"{path}: tokenizer_source {cfg['tokenizer_source']!r} is not supported (the base "
                         "model's tokenizer is copied)")
    if "slices" in cfg and "models" in cfg:  # (mergekit refuses both too) one would be dropped unread
        raise MergeError(f"{path}: has both models and slices; give exactly one")
    if "slices" in cfg:  # one slice of whole models is the same as `models:`
        slices = cfg.pop("slices")
        if not isinstance(slices, list) or len(slices) != 1:
            raise MergeError(f"{path}: slices must be a list of one slice covering every layer (got {slices!r:.80})")
        sources = slices[0].get("sources") if isinstance(slices[0], dict) else None
        if not isinstance(sources, list) or not all(isinstance(x, dict) for x in sources):
            raise MergeError(f"{path}: the slice needs `sources:`, a list of {{model: ..., layer_range: [0, N]}}")
        for x in sources:  # a misspelt key (paramters:) would drop its weights unread
            if unknown := set(x) - {"model", "layer_range", "parameters"}:
                raise MergeError(f"{path}: the slice's source {x.get('model')} has unsupported keys {sorted(unknown)}")
        unknown = set(slices[0]) - {"sources", "parameters", "base_model"}
        if unknown:
            raise MergeError(f"{path}: the slice has unsupported keys {sorted(unknown)}")
        cfg["models"] = [{"model": x.get("model"), "parameters": x.get("parameters", {}), "layer_range": x.get("layer_range")}
                         for x in sources]
        # mergekit reads a parameter from the source model, then the slice, then the top level; a
        # slice's base_model wins over the top level's
        cfg["slice_parameters"] = slices[0].get("parameters") or {}
        if not isinstance(cfg["slice_parameters"], dict):
            raise MergeError(f"{path}: the slice's parameters must be a mapping")
        if slices[0].get("base_model") is not None:
            cfg["base_model"] = slices[0]["base_model"]
    if cfg.get("dtype") is not None:
        dtype = DTYPES.get(str(cfg["dtype"]).removeprefix("torch."))
        if dtype is None:
            raise MergeError(f"{path}: dtype {cfg['dtype']!r} is not supported; use float32, bfloat16 or float16")
        cfg["dtype"] = dtype
    if not isinstance(cfg.get("base_model"), (str, type(None))):
        raise MergeError(f"{path}: base_model is {cfg['base_model']!r:.80}; expected one DIR_OR_HUB_ID")
    if not cfg.get("models"):
        raise MergeError(f"{path}: no models")
    if not isinstance(cfg["models"], list):
        raise MergeError(f"{path}: models must be a list of {{model: DIR_OR_HUB_ID, parameters: ...}}")
    for i, m in enumerate(cfg["models"]):
        if not isinstance(m, dict) or not isinstance(m.get("model"), str):
            raise MergeError(f"{path}: models[{i}] is {m!r:.80}; expected {{model: DIR_OR_HUB_ID, parameters: ...}}")
        if unknown := set(m) - {"model", "parameters", "layer_range"}:  # a misspelt key would drop its weights
            raise MergeError(f"{path}: model {m['model']} has unsupported keys {sorted(unknown)}")
        if not isinstance(m.get("parameters") or {}, dict):
            raise MergeError(f"{path}: model {m['model']}: parameters must be a mapping")
    if not isinstance(cfg.get("parameters") or {}, dict):
        raise MergeError(f"{path}: parameters must be a mapping")
    for m in cfg["models"]:
        bad = set(m.get("parameters") or {}) - {"weight", "density"}
        if bad:
            raise MergeError(f"{path}: model {m.get('model')}: unsupported parameters {sorted(bad)}")
    for where, params in (("", cfg.get("parameters")), ("the slice's ", cfg.get("slice_parameters"))):
        bad = set(params or {}) - {"t", "normalize", "weight", "density", "int8_mask", "rescale"}
        if bad:
            raise MergeError(f"{path}: {where}unsupported parameters {sorted(bad)}")
    cfg["weights_required"] = True  # as mergekit (only --models without --weights weighs each model 1)
    return cfg


# ---- checks before any work ----

def open_models(plan, embed_slice: bool):
    """Resolve every model, check that they can be merged, and open their tensors."""
    method = plan["merge_method"]
    names = [m["model"] for m in plan["models"]]
    base = plan.get("base_model")
    if method == "slerp":
        base = base or names[0]
    elif method != "linear" and not base:
        raise MergeError(f"{method} needs a base model (--base)")
    # the base as --models spells it (m1/ and ./m1 are m1): spelled otherwise it would join as one more model
    base = next((n for n in names if base and same_folder(n, base)), base)
    if method == "linear" and base and base not in names:  # it would join the average at a weight nobody gave
        raise MergeError(f"linear averages the --models only, and the base {base} is not one of them: list it in "
                         f"--models with a weight (mergekit, too, needs a weight for every model of a linear merge)")
    if base and base not in names:
        names = [base] + names
        plan["models"] = [{"model": base, "parameters": {}}] + plan["models"]
    if method not in ("linear", "slerp") and len(names) < 2:
        raise MergeError(f"{method} merges task vectors against the base: give at least one model besides {base}")
    if method == "slerp":  # base first: it is theta_0 (t=0)
        if len(names) != 2:
            raise MergeError(f"slerp merges two models (the base and one other), got {len(names)}: {names}")
        plan["models"].sort(key=lambda m: m["model"] != base)
        names = [m["model"] for m in plan["models"]]
    base = base or names[0]
    dirs = [resolve(n) for n in names]
    cfgs = [read_config(d) for d in dirs]
    n_layers = cfgs[0].num_hidden_layers
    for m in plan["models"]:
        if m.get("layer_range") not in (None, [0, n_layers]):
            raise MergeError(f"{m['model']}: layer_range {m['layer_range']} does not cover all {n_layers} layers "
                             "(partial slices are not supported)")
    # everything the forward reads: the merged model gets the base's config.json, so a model whose
    # rope_theta or rms_norm_eps differs would be merged into one that computes something else
    # (vocab sizes may differ: the tensor shapes are checked below, --embed-slice)
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "tie_word_embeddings", "rope_theta", "rms_norm_eps")
    for d, c in zip(dirs[1:], cfgs[1:]):
        diff = [f"{k}: {getattr(cfgs[0], k)} vs {getattr(c, k)}" for k in keys if getattr(c, k) != getattr(cfgs[0], k)]
        if diff:
            raise MergeError(f"{dirs[0]} and {d} have different architectures ({'; '.join(diff)})")
    readers, index = {}, []
    for d in dirs:
        files = weight_files(d)
        for f in set(files.values()):
            if f not in readers:
                readers[f] = Reader(f)
        index.append({k: readers[f] for k, f in files.items()})
    if cfgs[0].tie_word_embeddings:  # lm_head is embed_tokens: a stored copy is merged as that (the loader
        for idx in index:  # ties it), never on its own (DARE's drop would differ: a model that will not load)
            idx.pop("lm_head.weight", None)
    base_i = names.index(base)
    ref = index[base_i]
    for d, idx in zip(dirs, index):
        missing, extra = sorted(ref.keys() - idx.keys()), sorted(idx.keys() - ref.keys())
        if missing or extra:
            raise MergeError(f"{d}: tensor names differ from {dirs[base_i]}: missing {missing[:5]}, extra {extra[:5]}")
        for k in ref:
            s_ref, s = ref[k].shape(k), idx[k].shape(k)
            if s != s_ref:
                is_vocab = k.endswith(("embed_tokens.weight", "lm_head.weight")) and s[1:] == s_ref[1:]
                if not (is_vocab and embed_slice):
                    hint = " (different vocab sizes: --embed-slice cuts to the base's rows)" if is_vocab else ""
                    raise MergeError(f"{d}: tensor {k} has shape {s}, {dirs[base_i]} has {s_ref}{hint}")
                if s[0] < s_ref[0]:
                    raise MergeError(f"{d}: tensor {k} has {s[0]} rows, fewer than the base's {s_ref[0]}")
    return names, dirs, index, base_i, n_layers


def setting(levels, key, name, n_layers, default=None):
    """A parameter for one tensor as mergekit's ConfigReader finds it: the first level (a model's
    parameters, the slice's, the top level's) that sets it and whose entries match the tensor. Never
    set: the default. Set, but matching nowhere: the default for density, an error for weight and t
    (mergekit requires those)."""
    given = [(where, level[key]) for where, level in zip(("a model's", "the slice's", "the top level's")[-len(levels):],
                                                          levels) if key in level]
    for where, spec in given:
        try:
            value = resolve_param(spec, name, n_layers, key)
        except ValueError as e:
            raise MergeError(f"{e}, in {where} parameters") from None
        if value is not None:
            return value
    if given and key != "density":
        raise MergeError(f"{key}: no filter matches tensor {name} and no fallback entry (one without 'filter', "
                         f"or with filter '*') at any level")
    return default


def resolved_params(plan, name, n_layers):
    """Per-model weight/density and the global t for one tensor (a weight a config never sets: None)."""
    g, sl = plan.get("parameters") or {}, plan.get("slice_parameters") or {}
    weights, densities = [], []
    for m in plan["models"]:
        levels = [m.get("parameters") or {}, sl, g]
        weights.append(setting(levels, "weight", name, n_layers, None if plan.get("weights_required") else 1.0))
        densities.append(setting(levels, "density", name, n_layers, 1.0))
    return weights, densities, setting([sl, g], "t", name, n_layers)


def switches(plan, name, n_layers):
    """normalize and rescale for one tensor: --normalize, else the slice's, else the top level's (read
    as mergekit reads them: filters and gradients apply, a number is true unless 0), else the method's
    default."""
    method, out = plan["merge_method"], []
    for key, default in (("normalize", NORMALIZE_DEFAULT[method]), ("rescale", method.startswith("dare"))):
        if key == "normalize" and plan.get("normalize_flag") is not None:
            out.append(plan["normalize_flag"])
            continue
        value = setting([plan.get("slice_parameters") or {}, plan.get("parameters") or {}], key, name, n_layers, default)
        if value not in (0, 1):  # (mergekit: "Input should be a valid boolean")
            raise MergeError(f"{key} = {value} for tensor {name}: expected true or false (or 1 or 0)")
        out.append(bool(value))
    return out


def check_params(plan, names_in_order, n_layers, numel=None, base_i=0):
    method = plan["merge_method"]
    if method == "slerp" and "t" not in {**(plan.get("parameters") or {}), **(plan.get("slice_parameters") or {})}:
        raise MergeError("slerp needs t (--t)")
    for name in names_in_order:
        weights, densities, t = resolved_params(plan, name, n_layers)
        normalize, _ = switches(plan, name, n_layers)
        for i, (m, w) in enumerate(zip(plan["models"], weights)):  # linear weighs every model, the others a delta each
            if w is None and method != "slerp" and (method == "linear" or i != base_i):
                raise MergeError(f"model {m['model']} has no weight for tensor {name}: a {method} config gives every "
                                 f"model{' but the base' if method != 'linear' else ''} a weight (as mergekit requires)")
        if method != "linear":
            weights = [1.0 if w is None else w for w in weights]  # (the base's and slerp's are never read)
        if t is not None and not 0 <= t <= 1:
            raise MergeError(f"t = {t} for tensor {name} is outside [0, 1]")
        for m, d, w in zip(plan["models"], densities, weights):
            if not 0 < d <= 1:
                raise MergeError(f"density {d} of {m['model']} for tensor {name} is outside (0, 1]")
            if method == "ties" and numel and numel[name] and d < 1 and int(d * numel[name]) < 1:
                small = min(n for n in numel.values() if n)
                raise MergeError(f"density {d} of {m['model']} keeps no element of tensor {name} ({numel[name]} "
                                 f"elements): TIES keeps int(density x elements); use at least {least_density(numel[name])}"
                                 + (f" (the smallest tensor, {small} elements, needs {least_density(small)})"
                                    if small < numel[name] else ""))
            if not math.isfinite(w):  # a NaN or inf weight would write a model of NaNs
                raise MergeError(f"weight {w} of {m['model']} for tensor {name} is not a finite number")
        if not math.isfinite(sum(weights)):
            raise MergeError(f"the weights for tensor {name} sum to {sum(weights)}: not a finite number")
        if method == "linear" and normalize and abs(sum(weights)) < 1e-12:
            raise MergeError(f"linear weights sum to 0 for tensor {name}; cannot normalize")


def refuse_out_holding(out, models):
    """--out replaces its folder whole: never one that is or holds a model being merged."""
    for m in models:
        if within(m, out):
            raise MergeError(f"--out {out} is or holds {m}, one of the models being merged: writing there would "
                             "replace it")


# ---- merging one tensor ----

def row_blocks(shape):
    rows = shape[0] if shape else 1
    per_row = max(1, int(torch.Size(shape[1:]).numel())) if shape else 1
    step = max(1, CHUNK_ELEMS // per_row)
    return [(a, min(a + step, rows)) for a in range(0, rows, step)] if shape else [(0, None)]


def merge_tensor(name, plan, index, base_i, n_layers, cdtype, seed, slerp_by_row, out_rows):
    """Yields (merged block in the compute dtype, the base model's same rows as stored) for `name`, in
    blocks of rows (the base rows feed the summary, read once unless the compute dtype rounds them)."""
    method = plan["merge_method"]
    weights, densities, t = resolved_params(plan, name, n_layers)
    normalize, rescale = switches(plan, name, n_layers)
    read = lambda i, a, b: index[i][name].read(name, a, b).to(cdtype)  # noqa: E731
    exact = cdtype != torch.bfloat16  # float32/64 hold every stored float16/bfloat16/float32 value
    stored = lambda a, b, v: v if exact else index[base_i][name].read(name, a, b)  # noqa: E731
    shape = (out_rows,) + index[base_i][name].shape(name)[1:]
    blocks = row_blocks(shape) if index[base_i][name].shape(name) else [(0, None)]
    n = len(index)
    if method == "slerp" and not slerp_by_row:  # two passes: the angle needs the whole tensor
        sq0 = sq1 = dot = 0.0
        for a, b in blocks:
            v0, v1 = read(0, a, b).double(), read(1, a, b).double()
            sq0, sq1, dot = sq0 + (v0 * v0).sum().item(), sq1 + (v1 * v1).sum().item(), dot + (v0 * v1).sum().item()
        c = slerp_coefficients(t, slerp_dot(sq0, sq1, dot))
        for a, b in blocks:
            v = read(0, a, b), read(1, a, b)
            yield (torch.lerp(v[0], v[1], t) if c is None else c[0] * v[0] + c[1] * v[1]), stored(a, b, v[base_i])
    elif method == "slerp":
        for a, b in blocks:
            v = read(0, a, b), read(1, a, b)
            yield slerp_rows(t, v[0], v[1]), stored(a, b, v[base_i])
    elif method == "linear":
        for a, b in blocks:
            vs = [read(i, a, b) for i in range(n)]
            yield linear(vs, weights, normalize), stored(a, b, vs[base_i])
    else:
        others = [i for i in range(n) if i != base_i]
        w, d = [weights[i] for i in others], [densities[i] for i in others]
        if method == "task_arithmetic":  # elementwise: stream it
            for a, b in blocks:
                base = read(base_i, a, b)
                yield (task_merge(base, [read(i, a, b) for i in others], w, d, method, normalize),
                       stored(a, b, base))
        else:  # trim / drop are per whole tensor
            a, b = 0, shape[0] if shape else None
            gen = torch.Generator().manual_seed(crc_seed(seed, name)) if method.startswith("dare") else None
            base = read(base_i, a, b)
            yield (task_merge(base, [read(i, a, b) for i in others], w, d, method, normalize, gen, rescale),
                   stored(a, b, base))


# ---- main ----

@nanopost.exits_when_disk_full("rerun the same command (nothing of this merge was written)")
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=nanopost.HelpFormatter)
    # ---- what to merge ----
    p.add_argument("--method", choices=METHODS, help="merge method")
    p.add_argument("--models", nargs="+", help="checkpoint directories or hub ids")
    p.add_argument("--base", default=None, help="base model (task vectors are taken against it; slerp's t=0 model)")
    p.add_argument("--config", default=None, help="a mergekit YAML/JSON config instead of the flags above")
    # ---- parameters ----
    p.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per model in --models")
    p.add_argument("--densities", nargs="+", type=float, default=None, help="ties/dare: fraction of each delta kept")
    p.add_argument("--t", nargs="+", type=float, default=None,
                   help="slerp: a number, or several = a gradient over layer depth (layer i gets the value at i/(N-1))")
    p.add_argument("--t-filter", action="append", default=None, metavar="NAME=V[,V...]",
                   help="slerp: t for tensors whose name contains NAME (first match wins; --t is the fallback)")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide by the sum of weights (default: on for linear and ties, off otherwise)")
    p.add_argument("--slerp-rows", action="store_true",
                   help="slerp each row of a matrix on its own instead of the whole tensor (the default, and mergekit's "
                        "through 0.1.5)")
    p.add_argument("--seed", type=int, default=0, help="dare: seed of the random drop")
    p.add_argument("--embed-slice", action="store_true",
                   help="models with larger vocabularies: cut embed_tokens/lm_head to the base's rows")
    # ---- output ----
    p.add_argument("--out", required=True, help="output checkpoint directory (written atomically); must be new or "
                   "empty unless --overwrite, and never one of the models merged")
    p.add_argument("--overwrite", action="store_true", help="replace what a non-empty --out holds")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="output dtype (default: the base model's)")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "float64", "bfloat16"],
                   help="dtype of the arithmetic")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="largest output shard, GiB")
    args = p.parse_args(argv)
    if not 0 < args.max_shard_gb < float("inf"):  # (0 or -1 wrote a shard per tensor, nan one shard)
        p.error("--max-shard-gb must be a positive number")

    try:
        if args.config:
            plan = read_config_file(args.config)
            if args.dtype:
                plan["dtype"] = args.dtype
        else:
            if not args.method:
                p.error("--method is required (or --config)")
            plan = plan_from_args(args)
        method = plan["merge_method"]
        plan["parameters"] = plan.get("parameters") or {}
        plan["normalize_flag"] = args.normalize  # wins over the config's, for every tensor
        if os.path.islink(args.out):  # replacing it would replace the link, not the folder it points to
            raise MergeError(f"--out {args.out} is a symbolic link: give the folder itself")
        if os.path.isfile(args.out):
            raise MergeError(f"--out {args.out} is a file, not a directory")
        if why := unwritable(args.out):  # found now, not by a traceback once the merge has run
            raise MergeError(why)
        if within(os.getcwd(), args.out):
            raise MergeError(f"--out {args.out} is the working directory or holds it: the merge replaces that folder "
                             "whole; name a folder of its own")
        # (a save of ours that a kill cut short, inside a mount point or link, is no use: remove_unfinished's)
        used = sorted(n for n in os.listdir(args.out) if not re.fullmatch(LEFTOVER, n)) if os.path.isdir(args.out) else []
        # the local folders first: said before --overwrite is offered (the hub's, resolved, below)
        refuse_out_holding(args.out, [m for m in [plan.get("base_model")] + [m["model"] for m in plan["models"]]
                                      if m and os.path.isdir(m)])
        if used and not args.overwrite:  # before reading any model: a used --out is never replaced by default
            raise MergeError(f"--out {args.out} already holds {', '.join(used[:4])}: choose "
                             "another folder, or pass --overwrite to replace it")
        names, dirs, index, base_i, n_layers = open_models(plan, args.embed_slice)
        refuse_out_holding(args.out, dirs)
        tensor_names = list(index[base_i].keys())
        check_params(plan, tensor_names, n_layers,
                     {k: torch.Size(index[base_i][k].shape(k)).numel() for k in tensor_names}, base_i)
    except (MergeError, CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")

    base_reader = index[base_i]
    out_dtype = getattr(torch, plan["dtype"]) if plan.get("dtype") else None
    cdtype = getattr(torch, args.compute_dtype)
    entries = [(k, base_reader[k].shape(k), out_dtype or base_reader[k].dtype(k)) for k in tensor_names]
    # shard plan, fixed before any work so each shard's header can be written first
    shards, cur, size = [], [], 0
    for e in entries:
        nbytes = torch.Size(e[1]).numel() * torch.empty((), dtype=e[2]).element_size()
        if cur and size + nbytes > args.max_shard_gb * 1024**3:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += nbytes
    shards.append(cur)

    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so the folder being written goes; so does Ctrl-C
    # where a shell started us in the background with SIGINT ignored
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    remove_unfinished(args.out)  # what a kill (SIGKILL, power) left of an earlier merge to the same --out
    tmp = atomic_dir(args.out)
    summary = {}
    try:
        wmap = {}
        bar = tqdm(total=len(entries), desc=f"{method} merge", unit="tensor")
        for si, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
            w = Writer(os.path.join(tmp, fname), shard)
            for name, shape, dtype in shard:
                out_sq = diff_sq = base_sq = merged_sq = 0.0
                for block, ref in merge_tensor(name, plan, index, base_i, n_layers, cdtype, args.seed, args.slerp_rows,
                                               shape[0] if shape else 1):
                    ref = ref.double()
                    merged_sq += (block.double() - ref).pow(2).sum().item()
                    block = block.to(dtype)
                    if not torch.isfinite(block).all():  # an overflow (weights 1e39 in float32), NaN inputs
                        raise MergeError(f"{name}: the merge has values that are not finite numbers in "
                                         f"{str(dtype).removeprefix('torch.')}; nothing was written to --out")
                    written = block.double()  # what is written, after rounding to dtype
                    out_sq += written.pow(2).sum().item()
                    diff_sq += (written - ref).pow(2).sum().item()
                    base_sq += ref.pow(2).sum().item()
                    w.write(block)
                summary[name] = {"norm": out_sq ** 0.5, "change_vs_base": diff_sq ** 0.5 / max(base_sq ** 0.5, 1e-12),
                                 "change_before_rounding": merged_sq ** 0.5 / max(base_sq ** 0.5, 1e-12),
                                 **dict(zip(("normalize", "rescale"), switches(plan, name, n_layers)))}
                wmap[name] = fname
                bar.update(1)
            w.close()
        bar.close()
        if len(shards) > 1:
            total = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, s, d in entries)
            with closing_named(open(os.path.join(tmp, "model.safetensors.index.json"), "w")) as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": wmap}, f, indent=2)
        cfg = json.load(open(os.path.join(dirs[base_i], "config.json")))
        cfg["torch_dtype"] = str(entries[0][2]).removeprefix("torch.")
        cfg.pop("dtype", None)
        with closing_named(open(os.path.join(tmp, "config.json"), "w")) as f:  # closed here: its error raised, naming it
            json.dump(cfg, f, indent=2)
        for f in TOKENIZER_FILES + ("generation_config.json",):
            if os.path.exists(os.path.join(dirs[base_i], f)):
                shutil.copyfile(os.path.join(dirs[base_i], f), os.path.join(tmp, f))
        record = {"merge_method": method, "models": plan["models"], "base_model": names[base_i],
                  "resolved_paths": dirs, "parameters": plan["parameters"],
                  **({"slice_parameters": plan["slice_parameters"]} if plan.get("slice_parameters") else {}),
                  "slerp_rows": args.slerp_rows, "seed": args.seed, "dtype": str(entries[0][2]), "tensors": summary}
        with closing_named(open(os.path.join(tmp, "merge_config.json"), "w")) as f:
            json.dump(record, f, indent=2)
        commit_dir(tmp, args.out)
    except MergeError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(f"error: {e}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    changed = sorted(summary.items(), key=lambda kv: -kv[1]["change_vs_base"])
    print(f"{method} of {', '.join(names)} (base {names[base_i]}) -> {args.out}")
    print("most changed tensors (||merged - base|| / ||base||):")
    for k, v in changed[:8]:
        print(f"  {v['change_vs_base']:.4f}  {k}")
    mean = sum(v["change_vs_base"] for v in summary.values()) / len(summary)
    intended = sum(v["change_before_rounding"] for v in summary.values()) / len(summary)
    if intended > 0 and mean < 0.75 * intended:  # small fine-tuning deltas vanish in bf16
        dtype = str(entries[0][2]).removeprefix("torch.")
        print(f"note: rounding to {dtype} kept {mean / intended:.0%} of the merge's change against the base "
              f"(mean {mean:.3g} of {intended:.3g}); --dtype float32 keeps all of it")
    print(json.dumps({"out": args.out, "method": method, "tensors": len(summary), "mean_change_vs_base": mean}))


if __name__ == "__main__":
    main()
