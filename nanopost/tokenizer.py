"""tokenizer.json through `tokenizers`, and ChatML rendering with the SFT loss mask.

Rendering equals the checkpoint's own chat template (transformers' apply_chat_template) for the
Qwen2 / Qwen2.5 family: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, a default
system turn when the first message is not a system one (read from the checkpoint's template:
Qwen2 and Qwen2.5 differ), and `<|im_start|>assistant\\n` as the generation prompt."""
import json
import os
import re

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import normalizers

IGNORE = -100  # label of a position the loss does not train on, everywhere in nanopost
ROLES = ("system", "user", "assistant")


def read_json(path) -> dict:
    """A JSON object file -> dict ({} when the file is absent); a ValueError naming the file when it
    is not UTF-8, not valid JSON or not an object (config.json, tokenizer_config.json, generation_config.json)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d


JINJA_STRING = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"", re.DOTALL)  # with its escapes (\n, \')
_STR = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""  # (a "}}" inside a string does not end its block)
JINJA_BLOCK = re.compile(rf"\{{\{{(?:{_STR}|[^'\"])*?\}}\}}|\{{%(?:{_STR}|[^'\"])*?%\}}", re.DOTALL)


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system turn a ChatML template prepends when the conversation has none, or None: the first
    string literal of a Jinja block that holds a whole '<|im_start|>system\n...<|im_end|>'."""
    for block in JINJA_BLOCK.finditer(chat_template or ""):
        for s in JINJA_STRING.finditer(block.group()):
            text = s.group(1) if s.group(1) is not None else s.group(2)
            if m := re.search(r"<\|im_start\|>system\\n(.*?)<\|im_end\|>", text, re.DOTALL):
                return re.sub(r"\\(.)", lambda e: {"n": "\n", "t": "\t", "r": "\r"}.get(e.group(1), e.group(1)),
                              m.group(1))
    return None


def trained_turn(m: dict) -> bool:
    """An assistant turn SFT learns: one marked "train": false is context only (a prompt's turns)."""
    return m["role"] == "assistant" and m.get("train", True) is not False


class Tokenizer:
    def __init__(self, path: str):
        """path: a checkpoint directory holding tokenizer.json (+ tokenizer_config.json,
        generation_config.json, config.json for the chat template and stop tokens)."""
        file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: missing; nanopost reads the fast-tokenizer file "
                                    "(tokenizer.json) that every Qwen2 checkpoint ships")
        self.path = path
        self.tok = HFTokenizer.from_file(file)
        tcfg = read_json(os.path.join(path, "tokenizer_config.json"))
        # transformers' AutoTokenizer picks Qwen2Tokenizer for a qwen2 model whatever tokenizer_class says
        if read_json(os.path.join(path, "config.json")).get("model_type") == "qwen2" \
                or str(tcfg.get("tokenizer_class")).startswith("Qwen2Tokenizer"):
            # transformers' Qwen2Tokenizer normalises to NFC whatever tokenizer.json says (the released
            # files say NFC too): one re-saved without it would split "é" written as e + U+0301 otherwise
            self.tok.normalizer = normalizers.NFC()
        template = tcfg.get("chat_template")  # a chat_template.jinja beside it wins, as in transformers
        if os.path.exists(os.path.join(path, "chat_template.jinja")):
            template = open(os.path.join(path, "chat_template.jinja"), encoding="utf-8").read()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template
        self.default_system = default_system_prompt(template)
        self.im_start, self.im_end = self.token_id("<|im_start|>"), self.token_id("<|im_end|>")
        self.eos_ids = self._stop_ids(path)
        self.pad_id = self.tok.token_to_id("<|endoftext|>") or self.eos_ids[0]

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.path}/tokenizer.json has no {token} token (not a ChatML tokenizer)")
        return i

    def _stop_ids(self, path):
        ids = []
        for name in ("generation_config.json", "config.json"):
            e = read_json(os.path.join(path, name)).get("eos_token_id")
            ids += e if isinstance(e, list) else [] if e is None else [e]
        # and always both ChatML ends: an assistant turn ends at <|im_end|> and raw text at <|endoftext|>,
        # even where a base checkpoint's generation_config lists only <|endoftext|> (transformers'
        # generate would run on past the end of the turn there)
        for t in ("<|im_end|>", "<|endoftext|>"):
            ids.append(self.tok.token_to_id(t))
        return list(dict.fromkeys(i for i in ids if i is not None))

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._encode(text).ids

    def _encode(self, text: str, where="the text", offset=0):
        try:
            return self.tok.encode(text, add_special_tokens=False)
        except TypeError:  # tokenizers' message ("TextInputSequence must be str") for a lone surrogate
            bad = next((i for i, ch in enumerate(text) if "\ud800" <= ch <= "\udfff"), None) if isinstance(text, str) else None
            if bad is None:
                raise
            byte = " (a byte that is not UTF-8, read leniently)" if text[bad] >= "\udc80" else ""
            raise ValueError(f"{where} is not valid Unicode text: a lone surrogate U+{ord(text[bad]):04X} at character "
                             f"{bad - offset}{byte}") from None

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _with_system(self, messages) -> tuple[list, bool]:
        """The messages as the template renders them: the default system prompt first where none is."""
        messages = list(messages)
        added = (not messages or not isinstance(messages[0], dict) or messages[0].get("role") != "system") \
            and self.default_system is not None
        return ([{"role": "system", "content": self.default_system}] if added else []) + messages, added

    def render(self, messages, add_generation_prompt=False) -> tuple[list[int], list[bool]]:
        """Chat messages [{"role", "content"}] -> (ids, mask), mask True on the tokens SFT trains
        on: each assistant turn's content and its closing <|im_end|> (not the newline after); an
        assistant turn marked "train": False is context only (a prompt's turns, data.to_messages)."""
        messages, added = self._with_system(messages)
        ids, mask = [], []
        nl = self.encode("\n")
        for i, m in enumerate(messages):
            role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
            if role not in ROLES or not isinstance(content, str):  # (numbered as the caller's list)
                raise ValueError(f"message {i - added}: role must be one of {ROLES} and content a string, got {m!r}")
            # header and content are encoded as one string, as the template renders them: content
            # that starts with whitespace can merge with the header's newline into one token
            head = role + "\n"
            enc = self._encode(head + content, f"message {i - added}'s content", len(head))
            trained = trained_turn(m)
            train = [trained and end > len(head) for _, end in enc.offsets]
            ids += [self.im_start] + enc.ids + [self.im_end] + nl
            mask += [False] + train + [trained] + [False] * len(nl)
        if add_generation_prompt:
            head = [self.im_start] + self.encode("assistant\n")
            ids += head
            mask += [False] * len(head)
        return ids, mask

    def render_text(self, messages, add_generation_prompt=False) -> str:
        """The template's text (apply_chat_template(tokenize=False)): the content as given, where
        decoding render()'s ids would show it NFC-normalised."""
        self.render(messages, add_generation_prompt)  # (its checks)
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in self._with_system(messages)[0])
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def show(self, ids, mask) -> str:
        """A conversation as text, trained tokens wrapped in ANSI green: what the loss sees."""
        out, start = [], 0
        for i in range(1, len(ids) + 1):  # decode runs of equal mask: multi-byte chars stay whole
            if i == len(ids) or mask[i] != mask[start]:
                piece = self.decode(ids[start:i], skip_special_tokens=False)
                out.append(f"\033[42m{piece}\033[0m" if mask[start] else piece)
                start = i
        return "".join(out)
