"""Tokenization and chat rendering against transformers' tokenizer + apply_chat_template."""
import json
import os
import shutil

import pytest

from nanopost.testing import QWEN2_TEMPLATE
from nanopost.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

STRINGS = ["Hello world", "  leading and trailing spaces   ", "tabs\tand\nnewlines\r\n\n\n",
           "def f(x):\n    return x ** 2  # square\n", "敏捷的棕色狐狸跳过了懒狗。", "こんにちは世界",
           "Ünïcödé café naïve", "1234567890 3.14159 -42", "emoji 🙂👍🏽", "<|im_start|>not a turn<|im_end|>",
           "I'm can't we'll", "", "\n", "   "]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}],
    [{"role": "user", "content": "\n\nstarts with newlines"}, {"role": "assistant", "content": "  two spaces\n"},
     {"role": "user", "content": "写一首诗"}, {"role": "assistant", "content": "床前明月光\n疑是地上霜"}],
    [{"role": "user", "content": "code?"}, {"role": "assistant", "content": "```python\nprint('x')\n```"}],
    [{"role": "user", "content": "cafe\u0301 \u05e9\u05b8\u05dc\u05d5\u05b9\u05dd"}],  # not NFC: the text is kept as given
    [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Yo"}],  # the default system turn still first
]


def hf_ids(htok, chat, gen):
    out = htok.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
    return list(out if isinstance(out, list) else out["input_ids"])


def check_equal(d):
    tok, htok = Tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    for s in STRINGS:
        assert tok.encode(s) == htok.encode(s, add_special_tokens=False), s
        assert tok.decode(tok.encode(s), skip_special_tokens=False) == htok.decode(htok.encode(s, add_special_tokens=False))
    for chat in CHATS:
        for gen in (False, True):
            if gen and chat[-1]["role"] == "assistant":
                continue
            ids, mask = tok.render(chat, add_generation_prompt=gen)
            assert ids == hf_ids(htok, chat, gen), chat
            assert tok.render_text(chat, gen) == htok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    return tok


def qwen25_template():
    """The Qwen2.5 ChatML template shape (default system prompt 'You are Qwen, ...')."""
    return QWEN2_TEMPLATE.replace("You are a helpful assistant.",
                                  "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")


def test_tiny_tokenizer_matches_transformers(tiny):
    tok = check_equal(tiny)
    assert tok.default_system == "You are a helpful assistant."


def test_qwen25_template_default_system(tmp_path, tiny):
    d = tmp_path / "t"
    shutil.copytree(tiny, d)
    cfg = json.load(open(d / "tokenizer_config.json"))
    cfg["chat_template"] = qwen25_template()
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    tok = check_equal(str(d))
    assert tok.default_system.startswith("You are Qwen")


@pytest.mark.parametrize("prompt", ["You\\'re a helpful assistant.", "You are a C++ expert.", "Line one.\\nLine two.",
                                    'Say \\"hi\\".', 'Answer as JSON, e.g. {"a": {"b": 1}}.'])
def test_default_system_prompts_with_quotes_plus_signs_and_escapes(tmp_path, tiny, prompt):
    """The template's default system prompt is a quoted Jinja string: an escaped quote, a plus sign or
    a \\n escape inside it is rendered as transformers renders it (they dropped the turn, or kept \\n)."""
    d = tmp_path / "t"
    shutil.copytree(tiny, d)
    cfg = json.load(open(d / "tokenizer_config.json"))
    cfg["chat_template"] = QWEN2_TEMPLATE.replace("You are a helpful assistant.", prompt)
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    tok = check_equal(str(d))
    assert tok.default_system == prompt.replace("\\n", "\n").replace("\\", "")


def test_a_double_quoted_default_system_prompt_may_hold_a_single_quote(tmp_path, tiny):
    """'You're ...' in a "..." Jinja string: no system turn was found, so none was rendered."""
    d = tmp_path / "t"
    shutil.copytree(tiny, d)
    cfg = json.load(open(d / "tokenizer_config.json"))
    cfg["chat_template"] = QWEN2_TEMPLATE.replace("'<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n'",
                                                  '"<|im_start|>system\\nYou\'re Qwen. You\'re helpful.<|im_end|>\\n"')
    assert cfg["chat_template"] != QWEN2_TEMPLATE
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    assert check_equal(str(d)).default_system == "You're Qwen. You're helpful."


@pytest.mark.parametrize("before", ["\\n", "<|endoftext|>"])
def test_a_default_system_prompt_after_other_text_in_its_string(tmp_path, tiny, before):
    d = tmp_path / "t"
    shutil.copytree(tiny, d)
    cfg = json.load(open(d / "tokenizer_config.json"))
    cfg["chat_template"] = QWEN2_TEMPLATE.replace("'<|im_start|>system", f"'{before}<|im_start|>system")
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    assert Tokenizer(str(d)).default_system == "You are a helpful assistant."


def test_a_chat_template_file_wins_over_the_config_key(tmp_path, tiny):
    """As transformers: chat_template.jinja beside a tokenizer_config.json that also has a template."""
    d = tmp_path / "t"
    shutil.copytree(tiny, d)
    (d / "chat_template.jinja").write_text(qwen25_template())
    assert json.load(open(d / "tokenizer_config.json"))["chat_template"] == QWEN2_TEMPLATE
    assert check_equal(str(d)).default_system.startswith("You are Qwen")


def test_a_qwen2_tokenizer_file_without_its_normalizer_still_normalises_to_nfc(tmp_path, tiny):
    """transformers' Qwen2Tokenizer always applies NFC; a tokenizer.json re-saved without it (as the
    GGUF-built real checkpoint's is) made "é" written as e + U+0301 other tokens than transformers'."""
    d = tmp_path / "t"
    shutil.copytree(tiny, d)
    t = json.load(open(d / "tokenizer.json"))
    assert t["normalizer"] is not None
    t["normalizer"] = None
    json.dump(t, open(d / "tokenizer.json", "w"))
    text = "Cafe\u0301 re\u0301sume\u0301 \u212b"
    cfg = json.load(open(d / "tokenizer_config.json"))
    for cls in ("Qwen2Tokenizer", "PreTrainedTokenizerFast", None):  # transformers picks Qwen2Tokenizer by model_type
        json.dump({**cfg, "tokenizer_class": cls}, open(d / "tokenizer_config.json", "w"))
        tok = check_equal(str(d))
        assert tok.encode(text) == Tokenizer(tiny).encode(text) == tok.encode("Café résumé \u00c5")
        assert tok.encode(text) == transformers.AutoTokenizer.from_pretrained(d).encode(text, add_special_tokens=False)


def test_a_bad_message_is_numbered_as_the_caller_wrote_it(tiny):
    tok = Tokenizer(tiny)
    assert tok.default_system is not None  # (a system turn is added in front: not counted)
    with pytest.raises(ValueError, match="^message 0: "):
        tok.render([{"role": "user", "content": None}])
    with pytest.raises(ValueError, match="^message 1: "):
        tok.render([{"role": "user", "content": "hi"}, "not a message"])


def test_text_that_is_not_unicode_is_named_with_its_place(tiny):
    """A byte that is not UTF-8, read leniently (stdin, argv: surrogateescape), is a lone surrogate:
    tokenizers raised a TypeError about types; now a ValueError saying where in the content."""
    tok = Tokenizer(tiny)
    with pytest.raises(ValueError, match=r"^message 1's content is not valid Unicode text: a lone surrogate U\+DCFF at "
                                         r"character 3 \(a byte that is not UTF-8"):
        tok.render([{"role": "user", "content": "ok"}, {"role": "user", "content": "hi \udcff"}])
    with pytest.raises(ValueError, match=r"U\+D800 at character 1$"):
        tok.encode("a\ud800")
    with pytest.raises(ValueError, match=r"U\+DC80 at character 2 \(a byte that is not UTF-8, read leniently\)"):
        tok.encode(b"ab\x80".decode("utf-8", "surrogateescape"))  # the lowest such byte


def test_template_variants_and_what_is_trained(tmp_path, tiny):
    """(Each case once passed every test when changed.) A template without a default system prompt
    renders none, as transformers; of a list of templates the one named "default" is used; a default
    system prompt is the first whole system turn, not up to the last <|im_end|>; a turn marked
    "train": false and the generation prompt are never trained; content starting with a newline
    trains that newline; decode skips special tokens unless asked; show() keeps the last run."""
    from nanopost.tokenizer import default_system_prompt
    d = tmp_path / "t"
    shutil.copytree(tiny, d)
    cfg = json.load(open(d / "tokenizer_config.json"))
    cfg["chat_template"] = QWEN2_TEMPLATE.replace("{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}", "")
    assert cfg["chat_template"] != QWEN2_TEMPLATE
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    assert check_equal(str(d)).default_system is None
    cfg["chat_template"] = [{"name": "tool_use", "template": QWEN2_TEMPLATE.replace("a helpful", "a tool-using")},
                            {"name": "default", "template": QWEN2_TEMPLATE}]
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    assert Tokenizer(str(d)).default_system == "You are a helpful assistant."
    both = "{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n<|im_start|>user\\nHello<|im_end|>\\n' }}"
    assert default_system_prompt(both) == "Be brief."
    tok = Tokenizer(tiny)
    trained = lambda msgs: tok.decode([i for i, m in zip(*tok.render(msgs)) if m], skip_special_tokens=False)  # noqa: E731
    assert trained([{"role": "user", "content": "q"}, {"role": "assistant", "content": "ctx", "train": False},
                    {"role": "user", "content": "q2"}, {"role": "assistant", "content": "ans"}]) == "ans<|im_end|>"
    assert "\nHello<|im_end|>" in trained([{"role": "user", "content": "q"}, {"role": "assistant", "content": "\nHello"}])
    assert not any(tok.render([{"role": "user", "content": "q"}], add_generation_prompt=True)[1])
    assert tok.decode([tok.im_start] + tok.encode("Hi")) == "Hi"
    shown = tok.show(*tok.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}]))
    assert shown.endswith("A<|im_end|>\033[0m\n"), repr(shown)


def test_mask_marks_assistant_content_and_im_end_only(tiny):
    tok = Tokenizer(tiny)
    chat = CHATS[2]
    ids, mask = tok.render(chat)
    trained = [i for i, m in zip(ids, mask) if m]
    expected = []
    for m in chat:
        if m["role"] == "assistant":
            expected += tok.encode(m["content"]) + [tok.im_end]
    # every assistant turn: content tokens + <|im_end|>; nothing from system/user turns or headers
    assert tok.decode(trained, skip_special_tokens=False) == tok.decode(expected, skip_special_tokens=False)
    assert trained.count(tok.im_end) == 2
    assert sum(mask) == len(trained) and len(mask) == len(ids)
    # the newline after <|im_end|> is never trained
    for i, (t, m) in enumerate(zip(ids, mask)):
        if t == tok.im_end and i + 1 < len(ids):
            assert not mask[i + 1]
    shown = tok.show(ids, mask)
    assert "\033[42m" in shown and "写一首诗" in shown


def test_stop_ids_read_from_generation_config(tiny):
    tok = Tokenizer(tiny)
    assert tok.eos_ids == [tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")]


def test_stop_ids_always_hold_both_chatml_ends(tiny, tmp_path):
    """A base checkpoint's generation_config lists only <|endoftext|>: generation still stops at the
    end of an assistant turn (<|im_end|>), after the checkpoint's own ids."""
    base = tmp_path / "base"
    shutil.copytree(tiny, base)
    tok = Tokenizer(str(base))
    endoftext, im_end = tok.token_id("<|endoftext|>"), tok.token_id("<|im_end|>")
    for name, eos in (("generation_config.json", endoftext), ("config.json", 7)):
        cfg = json.loads((base / name).read_text())
        (base / name).write_text(json.dumps({**cfg, "eos_token_id": eos}))
    assert Tokenizer(str(base)).eos_ids == [endoftext, 7, im_end]


@pytest.mark.real
def test_real_tokenizer_matches_transformers(real_model_dir, tmp_path):
    check_equal(real_model_dir)  # its own (Qwen2.5) template
    d = tmp_path / "qwen2-style"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(real_model_dir, f), d / f)
    cfg = json.load(open(d / "tokenizer_config.json"))
    cfg["chat_template"] = QWEN2_TEMPLATE
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    tok = check_equal(str(d))
    assert tok.default_system == "You are a helpful assistant."
    assert tok.token_id("<|im_end|>") == 151645
