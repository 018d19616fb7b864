"""Bad checkpoints fail with one clear error that names the file and the tensor."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanopost
from nanopost.checkpoint import CheckpointError


@pytest.fixture
def ckpt(tmp_path, tiny):
    d = tmp_path / "c"
    shutil.copytree(tiny, d)
    return str(d)


def rewrite(d, fn):
    f = os.path.join(d, "model.safetensors")
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)
    return f


def test_missing_tensor(ckpt):
    rewrite(ckpt, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*missing \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        nanopost.load(ckpt)


def test_extra_tensor(ckpt):
    rewrite(ckpt, lambda sd: sd.update({"model.layers.9.extra": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected \['model\.layers\.9\.extra'\]"):
        nanopost.load(ckpt)


def test_wrong_shape(ckpt):
    rewrite(ckpt, lambda sd: sd.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(5)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.q_proj\.bias has shape \(5,\)"):
        nanopost.load(ckpt)


def test_unsupported_model_type(ckpt):
    f = os.path.join(ckpt, "config.json")
    cfg = json.load(open(f))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(f, "w"))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'llama' is not supported"):
        nanopost.load(ckpt)


def test_missing_tokenizer(ckpt):
    os.remove(os.path.join(ckpt, "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json: missing"):
        nanopost.load(ckpt)


def test_corrupt_safetensors(ckpt):
    f = os.path.join(ckpt, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[:8] + b"{not json" + data[17:])  # header garbled
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        nanopost.load(ckpt)


def test_truncated_safetensors(ckpt):
    f = os.path.join(ckpt, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        nanopost.load(ckpt)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        nanopost.load(str(tmp_path / "nope"))
