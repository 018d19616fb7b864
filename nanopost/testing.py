"""Tiny random Qwen2 checkpoints in the Hugging Face layout, for tests and the offline demo:
a small config + random weights + a small byte-level BPE tokenizer trained here on a built-in
text, with Qwen2's normalizer, pre-tokenizer regex and the ChatML special tokens."""
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import tempfile

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import nanopost
from nanopost.checkpoint import LEFTOVER, save, unwritable, writing
from nanopost.model import Qwen2, Qwen2Config

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split (the same regex its tokenizer.json carries)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                  "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
                  "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = """The quick brown fox jumps over the lazy dog. You are a helpful assistant.
Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May? Let's think step by step.
The answer is 72. def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5
Der schnelle braune Fuchs. Le renard brun rapide. 敏捷的棕色狐狸跳过了懒狗。 こんにちは世界。
Hello, world! 1234567890 +-*/=<>()[]{} "quotes" 'single' \t tabs\r\n and   spaces.
"""


def load_script(script: str):
    """A script at the repository root (merge.py, build_data.py, ...) as a fresh module, so a test
    can call its functions or change a constant before calling its main."""
    name = "_nanopost_script_" + os.path.splitext(os.path.basename(script))[0]
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(script: str, *args) -> subprocess.CompletedProcess:
    """Run a script's main(argv) in this process and return what a subprocess run would
    (returncode, stdout, stderr with the sys.exit message): error paths tested without an
    interpreter start-up each. An uncaught exception propagates, so a traceback fails the test."""
    module = load_script(script)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            err.write(e.code + "\n")
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def make_tokenizer(vocab_size: int = 512) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.add_special_tokens(SPECIALS)  # appended after the BPE vocab, as in Qwen2
    return tok


def make_tiny_checkpoint(out_dir: str, seed: int = 0, template: str = QWEN2_TEMPLATE, dtype=torch.float32,
                         init_std: float = 0.1, **cfg_overrides) -> str:
    """Write a random Qwen2 checkpoint + tokenizer to out_dir; returns out_dir."""
    tok = make_tokenizer()
    n_tokens = tok.get_vocab_size()
    cfg = Qwen2Config(**{"vocab_size": n_tokens + 5, "hidden_size": 64, "intermediate_size": 128,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": True,
                         **cfg_overrides})
    torch.manual_seed(seed)
    model = Qwen2(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # random norms and biases too, so a wrong norm or a dropped bias shows in parity tests
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else init_std * torch.randn_like(p))
    model.to(dtype)
    staging = tempfile.mkdtemp(prefix="nanopost-tokenizer-")  # its files, for save() to copy; removed however this ends
    try:
        with writing(os.path.join(staging, "tokenizer.json")):  # tokenizers' full-disk error names no file
            tok.save(os.path.join(staging, "tokenizer.json"))
        ids = {t: tok.token_to_id(t) for t in SPECIALS}
        with open(os.path.join(staging, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                       "bos_token": None, "unk_token": None, "chat_template": template,
                       "model_max_length": cfg.max_position_embeddings}, f, indent=2)
        with open(os.path.join(staging, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}, f)
        from nanopost.tokenizer import Tokenizer as ChatTokenizer
        save(model, ChatTokenizer(staging), out_dir, extra_files={MARKER: json.dumps({"seed": seed}) + "\n"})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


MARKER = "nanopost_testing.json"  # says "a random checkpoint this module wrote": the CLI replaces only such a folder
TINY_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}


# what make_tiny_checkpoint writes besides TINY_FILES: the --shape 0.5b model's shards, and a save a kill cut short
OWN_NAMES = rf"model-\d{{5}}-of-\d{{5}}\.safetensors|model\.safetensors\.index\.json|{LEFTOVER}"


def foreign(folder: str) -> list[str]:
    """The names in folder that make_tiny_checkpoint does not write (work of a user's kept there)."""
    return sorted(n for n in os.listdir(folder) if n not in TINY_FILES | {MARKER} and not re.fullmatch(OWN_NAMES, n))


def ours(folder: str) -> bool:
    """A folder this module wrote and nothing else did: the CLI replaces only such a folder (a trained
    run or notes kept inside it would go with it)."""
    names = set(os.listdir(folder))
    if foreign(folder):
        return False
    if MARKER in names or all(re.fullmatch(LEFTOVER, n) for n in names):  # (or only what a killed save of ours left)
        return True
    try:
        cfg = json.load(open(os.path.join(folder, "config.json")))
    except (OSError, ValueError):
        return False
    return names == TINY_FILES and cfg.get("hidden_size") == 64 and cfg.get("num_hidden_layers") == 2


# Qwen2-0.5B's shapes (random weights, the small tokenizer): GPU benchmarks where the hub is out of reach
SHAPE_05B = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
             "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1e6, "max_position_embeddings": 32768}

if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Write a tiny random Qwen2 checkpoint (for tests and offline demos): "
                                "python -m nanopost.testing runs/tiny")
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="weights seed")
    p.add_argument("--shape", choices=["tiny", "0.5b"], default="tiny",
                   help="0.5b: Qwen2-0.5B's shapes with random weights (benchmarks; about 2 GB)")
    a = p.parse_args()
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"{a.out} is a file, not a folder")
    if os.path.isdir(a.out) and os.listdir(a.out) and not ours(a.out):  # a trained run, a real model, a typo
        held = foreign(a.out) or sorted(os.listdir(a.out))
        p.error(f"{a.out} holds {', '.join(held[:4])}: not a checkpoint this command wrote, and it would be "
                "replaced whole; choose another folder")
    if why := unwritable(a.out, flag=""):
        p.error(why)
    write = nanopost.exits_when_disk_full("rerun the same command")(make_tiny_checkpoint)
    print(write(a.out, seed=a.seed, **(dict(SHAPE_05B, init_std=0.02) if a.shape == "0.5b" else {})))
