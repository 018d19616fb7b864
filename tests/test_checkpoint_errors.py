"""Bad checkpoints fail with one clear error that names the file and the tensor."""
import io
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanopost
from nanopost.checkpoint import CheckpointError
from nanopost.testing import run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_config_json_is_named_before_the_tokenizer(ckpt):
    """A folder of another architecture is named as such by its config.json, not by whichever
    tokenizer file it happens to lack."""
    f = os.path.join(ckpt, "config.json")
    json.dump({**json.load(open(f)), "model_type": "llama"}, open(f, "w"))
    os.remove(os.path.join(ckpt, "tokenizer.json"))
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


def test_an_implausible_header_length_is_refused_before_reading(ckpt):
    """safetensors caps the header at 100 MB; a length past it is a damaged file, said as such
    (not read as 200 MB of header)."""
    f = os.path.join(ckpt, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write((200_000_000).to_bytes(8, "little") + data[8:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*header length 200000000 is implausible"):
        nanopost.load(ckpt)


def test_a_saved_rotary_inv_freq_buffer_is_ignored_in_one_file_as_in_shards(ckpt, tiny):
    """Older exports saved rotary_emb.inv_freq; transformers recomputes it, and so do we, whether
    the weights are one model.safetensors or shards (the shard case is tested with the index)."""
    rewrite(ckpt, lambda sd: sd.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(nanopost.load(ckpt)[0](ids), nanopost.load(tiny)[0](ids))


def test_local_looking_paths_are_never_sent_to_the_hub(tmp_path, monkeypatch):
    """./x, /x, ~/x and a/b/c can only be folders: a missing one is said to be missing, with no
    hub request (~ is not expanded, as transformers does not: the shell expands it)."""
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError(f"sent to the hub: {a}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    for path in ("./nanopost-absent", "~/nanopost-absent", str(tmp_path / "absent"), "a/b/c"):
        with pytest.raises(CheckpointError, match=re.escape(path) + ": no such directory$"):
            nanopost.load(path)


def test_a_hub_download_fetches_every_file_loading_reads(monkeypatch):
    """snapshot_download's allow_patterns take the weights (one file or shards and their index), the
    config, the generation config and every tokenizer file, chat_template.jinja included (it wins over
    tokenizer_config.json's template), and nothing else. Offline tests cannot see this: offline, the
    whole cached snapshot is returned. And the offline hint reads HF_HUB_OFFLINE as huggingface_hub does."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects
    from nanopost.checkpoint import TOKENIZER_FILES
    asked = []

    def fake(repo_id, allow_patterns=None, **k):
        asked.append(allow_patterns)
        raise OSError("no network here")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    for value, hint in (("1", "HF_HUB_OFFLINE is set"), ("true", "HF_HUB_OFFLINE is set"), ("ON", "HF_HUB_OFFLINE is set"),
                        ("yes", "HF_HUB_OFFLINE is set"), ("0", r"Offline\? Set HF_HUB_OFFLINE=1"), ("", r"Offline\? Set")):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        with pytest.raises(CheckpointError, match=r"owner/model: not a local directory.*\(OSError: no network here\)\. " + hint):
            nanopost.load("owner/model")
    needed = ["config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
              "model-00001-of-00002.safetensors", *TOKENIZER_FILES, "chat_template.jinja"]
    repo = needed + ["README.md", "pytorch_model.bin", "onnx/model.onnx", "LICENSE", ".gitattributes"]
    assert sorted(filter_repo_objects(repo, allow_patterns=asked[0])) == sorted(needed)


def test_truncated_safetensors(ckpt):
    f = os.path.join(ckpt, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        nanopost.load(ckpt)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nope: no such directory"):
        nanopost.load(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="runs/nope/deeper: no such directory"):  # never tried as a hub id
        nanopost.load("runs/nope/deeper")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        nanopost.load(str(tmp_path / "file"))


def test_a_folder_typo_that_looks_like_a_hub_id_says_why(tmp_path):
    """runs/sft-typo beside an existing runs/: tried on the hub (it could be owner/name), then called
    a missing directory, with the hub's reason and the offline hint."""
    import subprocess
    import sys
    (tmp_path / "runs").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    code = "import nanopost; nanopost.load('runs/sft-typo')"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    err = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "runs/sft-typo: no such directory (nor a hub id" in err, r.stderr[-2000:]
    assert "HF_HUB_OFFLINE is set" in err and "Error:" in err, err


def test_hub_id_resolves_from_the_local_hub_cache_offline(tmp_path, tiny):
    """A hub id goes through huggingface_hub.snapshot_download, which honours HF_HUB_CACHE and
    HF_HUB_OFFLINE: a snapshot already in the cache loads with no network."""
    import subprocess
    import sys
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--nanopost-test--tiny"
    shutil.copytree(tiny, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = ("import nanopost; m, t = nanopost.load('nanopost-test/tiny'); print(m.config.hidden_size)\n"
            "try:\n    nanopost.load('nanopost-test/absent')\nexcept nanopost.checkpoint.CheckpointError as e:\n"
            "    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "64"
    assert "nanopost-test/absent: not a local directory and could not be fetched" in r.stdout


@pytest.fixture
def tied(tmp_path):
    from nanopost.testing import make_tiny_checkpoint
    return make_tiny_checkpoint(str(tmp_path / "tied"), tie_word_embeddings=True)


def test_tied_config_with_another_lm_head_in_the_file(tied):
    f = rewrite(tied, lambda sd: sd.update({"lm_head.weight": sd["model.embed_tokens.weight"] + 1}))
    why = r": tensor lm_head\.weight differs from model\.embed_tokens\.weight.*true, so it would be left unused"
    with pytest.raises(CheckpointError, match=re.escape(f) + why):
        nanopost.load(tied)
    def one_ulp(sd):  # "a copy" means bit for bit: one element one float32 step away is another head
        head = sd["model.embed_tokens.weight"].clone()
        head[3, 5] = torch.nextafter(head[3, 5], torch.tensor(float("inf")))
        sd["lm_head.weight"] = head
    rewrite(tied, one_ulp)
    with pytest.raises(CheckpointError, match=re.escape(f) + why):
        nanopost.load(tied)
    rewrite(tied, lambda sd: sd.update({"lm_head.weight": sd["model.embed_tokens.weight"].clone()}))
    model, _ = nanopost.load(tied)  # an exact copy of the embedding (some exporters write one) is fine
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_config_without_lm_head(tied):
    f = os.path.join(tied, "config.json")
    json.dump({k: v for k, v in json.load(open(f)).items() if k != "tie_word_embeddings"}, open(f, "w"))
    with pytest.raises(CheckpointError, match=r"missing \['lm_head\.weight'\].*set it to true if the head is"):
        nanopost.load(tied)
    rewrite(tied, lambda sd: sd.pop("model.norm.weight"))  # more than the head missing: no tie would mend it
    with pytest.raises(CheckpointError, match=r"missing \['lm_head\.weight', 'model\.norm\.weight'\], unexpected \[\]$"):
        nanopost.load(tied)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "generation_config.json"])
@pytest.mark.parametrize("text,why", [('{"model_type": ', "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                      (b'{"model_type": "\xff"}', r"not UTF-8 text \(byte 0xff at offset 16\)")])
def test_a_broken_config_is_named(ckpt, tmp_path, name, text, why):
    with open(os.path.join(ckpt, name), "wb" if isinstance(text, bytes) else "w") as f:
        f.write(text)
    with pytest.raises(CheckpointError, match=f"{name}: {why}"):
        nanopost.load(ckpt)
    if name != "config.json":  # the training scripts read the tokenizer first: one line, no traceback
        data = tmp_path / "d.jsonl"
        data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
        r = run_main(os.path.join(ROOT, "train_sft.py"), "--model", ckpt, "--data", data, "--out", tmp_path / "o")
        assert r.returncode != 0 and re.search(f"{name}: {why}", r.stderr), r.stderr


@pytest.mark.parametrize("key,value,why", [
    ("num_key_value_heads", 0, "num_key_value_heads is 0: expected a positive integer"),
    ("num_attention_heads", 0, "num_attention_heads is 0"),
    ("num_hidden_layers", 2.0, "num_hidden_layers is 2.0: expected a positive integer"),
    ("hidden_size", True, "hidden_size is True"),
    ("rope_parameters", "x", "rope_parameters is 'x': expected an object"),
    ("rope_scaling", [2], "rope_scaling is [2]: expected an object"),
    ("attention_dropout", 1, "attention_dropout is 1: expected a number in [0, 1)"),
    ("rope_theta", "1e4", "rope_theta is '1e4': expected a positive number"),
    ("rms_norm_eps", -1, "rms_norm_eps is -1"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings is 'yes': expected true or false"),
])
def test_a_config_value_of_the_wrong_kind_is_named(ckpt, key, value, why):
    f = os.path.join(ckpt, "config.json")
    json.dump({**json.load(open(f)), key: value}, open(f, "w"))
    with pytest.raises(CheckpointError, match=re.escape(f"config.json: {why}")):
        nanopost.load(ckpt)


def test_a_bad_shard_index_or_header_names_the_file(ckpt):
    sd = load_file(os.path.join(ckpt, "model.safetensors"))
    os.remove(os.path.join(ckpt, "model.safetensors"))
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:5]}, os.path.join(ckpt, "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[5:]}, os.path.join(ckpt, "model-00002-of-00002.safetensors"))
    index = os.path.join(ckpt, "model.safetensors.index.json")
    wmap = {k: f"model-0000{1 + (i >= 5)}-of-00002.safetensors" for i, k in enumerate(names)}
    json.dump({"weight_map": wmap}, open(index, "w"))
    nanopost.load(ckpt)  # (the sharded layout itself loads)
    for bad, why in (({"weight_map": {**wmap, names[-1]: "model-00001-of-00002.safetensors"}}, "which does not hold them"),
                     ({"metadata": {}}, 'no "weight_map"'),
                     ({"weight_map": {**wmap, names[0]: "model-00003-of-00002.safetensors"}}, "which is missing")):
        json.dump(bad, open(index, "w"))
        with pytest.raises(CheckpointError, match="model.safetensors.index.json.*" + why):
            nanopost.load(ckpt)
    open(index, "w").write('{"weight_map": ')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not valid JSON"):
        nanopost.load(ckpt)
    json.dump({"weight_map": wmap}, open(index, "w"))
    shard = os.path.join(ckpt, "model-00001-of-00002.safetensors")
    data = open(shard, "rb").read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    for edit, why in ((lambda h: h.update({names[0]: {**h[names[0]], "dtype": "F8_E4M3"}}), "dtype 'F8_E4M3'"),
                      (lambda h: h.update({names[0]: {**h[names[0]], "shape": [1]}}), "data offsets span"),
                      (lambda h: h.update({names[0]: "x"}), "malformed safetensors header entry")):
        h = json.loads(json.dumps(header))
        edit(h)
        text = json.dumps(h).encode()
        text += b" " * (-len(text) % 8)
        open(shard, "wb").write(len(text).to_bytes(8, "little") + text + data[8 + n:])
        with pytest.raises(CheckpointError, match=re.escape(shard) + f": tensor {re.escape(names[0])}.*{why}"):
            nanopost.load(ckpt)
    open(shard, "wb").write((8).to_bytes(8, "little") + b"[1, 2]  " + data[8 + n:])
    with pytest.raises(CheckpointError, match=re.escape(shard) + ": .*its header is not a JSON object"):
        nanopost.load(ckpt)


def test_saved_weights_are_readable_like_any_file_and_foreign_activations_refused(tmp_path, tiny):
    """safetensors 0.8 writes 0600 files: a model shared on a team machine was readable by its owner only."""
    import stat
    model, tok = nanopost.load(tiny)
    old = os.umask(0o022)
    try:
        nanopost.save(model, tok, str(tmp_path / "saved"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "saved" / "model.safetensors").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "saved").st_mode) == 0o755  # (mkdtemp makes 0700 folders)
    cfg = json.load(open(tmp_path / "saved" / "config.json"))
    json.dump({**cfg, "hidden_act": "gelu"}, open(tmp_path / "saved" / "config.json", "w"))
    with pytest.raises(CheckpointError, match="hidden_act 'gelu' is not supported"):
        nanopost.load(str(tmp_path / "saved"))


# ---- a full disk: whole files or none, and one error line naming the file ----

def test_whole_file_keeps_the_old_file_and_names_it_when_the_disk_fills(tmp_path):
    import errno
    from nanopost.checkpoint import whole_file
    path = str(tmp_path / "results.json")
    with open(path, "w") as f:
        f.write("old")
    with pytest.raises(OSError) as e, whole_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write("new, cut short")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write or close raises: no file named
    assert e.value.errno == errno.ENOSPC and e.value.filename == path
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["results.json"]  # no .tmp left behind
    with whole_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert open(path).read() == "new" and os.listdir(tmp_path) == ["results.json"]


def test_a_full_disk_ends_a_script_with_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno
    import nanopost.checkpoint as checkpoint
    full = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' own words

    def save_file_on_a_full_disk(*args, **kwargs):
        raise Exception(full)
    monkeypatch.setattr(checkpoint, "save_file", save_file_on_a_full_disk)
    path = str(tmp_path / "model.safetensors")

    @nanopost.exits_when_disk_full("rerun the same command with --resume")
    def main():
        checkpoint.save_tensors({"w": torch.zeros(2)}, path)
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code.startswith(f"error: the disk is full writing {path} (No space left on device)")
    assert e.value.code.endswith("rerun the same command with --resume")

    @nanopost.exits_when_disk_full("rerun")
    def sqlite_full():
        raise Exception("database or disk is full")
    with pytest.raises(SystemExit, match="disk is full"):
        sqlite_full()

    @nanopost.exits_when_disk_full("rerun")
    def other():
        raise OSError(errno.EACCES, "Permission denied", path)
    with pytest.raises(PermissionError):  # anything else is not ours to reword
        other()


def test_merge_fails_when_its_last_file_cannot_be_written(tmp_path, tiny, monkeypatch):
    """merge_config.json written through a file never closed: the full disk's error (raised when the
    buffer is flushed) was lost, the merge reported success with an empty file. /dev/full fails that way."""
    import builtins
    from nanopost.testing import run_main
    real_open = builtins.open

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith("merge_config.json") and "w" in mode:  # /dev/full under this file's name
            raw = real_open("/dev/full", "wb", buffering=0)
            raw.name = str(path)
            return io.TextIOWrapper(io.BufferedWriter(raw))
        return real_open(path, mode, *args, **kwargs)
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    out = tmp_path / "merged"
    r = run_main(os.path.join(os.path.dirname(__file__), "..", "merge.py"), "--method", "linear", "--models", tiny, tiny,
                 "--weights", 0.5, 0.5, "--out", out)
    monkeypatch.undo()
    assert r.returncode == 1 and "error: the disk is full writing" in r.stderr and "merge_config.json" in r.stderr, \
        r.stdout + r.stderr
    assert not out.exists() and os.listdir(tmp_path) == []  # nothing committed, no temporary folder left


def test_device_arg_takes_only_devices_this_machine_has(monkeypatch):
    """--device: cpu, cuda or cuda:N with N below the machine's GPU count (one GPU faked here); another
    device type (mps, meta) is refused by name."""
    import argparse

    from nanopost import device_arg
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_arg("cuda:0") == "cuda:0" and device_arg("cuda") == "cuda" and device_arg("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match="this machine has 1 CUDA device"):
        device_arg("cuda:1")
    for other in ("mps", "meta"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected cpu, cuda or cuda:N"):
            device_arg(other)


def test_a_full_disk_names_the_file_being_written_and_the_folders_are_let_go(tmp_path):
    """A copy's OSError names its source first and the destination second: the one-line error names
    the destination (the file that could not be written). When main ends, however, the folders it
    locked are free again."""
    import errno
    import fcntl

    from nanopost import exits_when_disk_full
    from nanopost.checkpoint import hold_folder

    @exits_when_disk_full("rerun")
    def copying():
        assert hold_folder(str(tmp_path))
        raise OSError(errno.ENOSPC, "No space left on device", "runs/sft/model.safetensors", None,
                      "runs/merged/model.safetensors")
    with pytest.raises(SystemExit, match="the disk is full writing runs/merged/model.safetensors"):
        copying()
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while this process still held it
    finally:
        os.close(fd)
