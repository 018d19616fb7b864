"""Training data: JSONL readers and validators, tokenisation with the loss mask, truncation,
best-fit-decreasing packing, and batches, for SFT and (at the end) KTO.

Accepted lines (one JSON object per line):
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   (multi-turn)
    {"prompt": str, "completion": str}                                           (one exchange)
Labels follow the one mask convention: IGNORE (-100) marks a token the loss does not train on."""
import bisect
import hashlib
import heapq
import json
import random
import re
from dataclasses import dataclass

import torch

from nanopost.tokenizer import IGNORE, ROLES, Tokenizer, trained_turn


class DataError(ValueError):
    pass


BAD_BYTE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8


def whole_lines(path: str) -> tuple[bytes, bool]:
    """An append-only file's complete lines -> (their bytes, whether a last line was cut short). A
    last line a kill cut short is also removed from the file, so that the next row appended starts
    a line of its own."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return data[:end], end < len(data)


def read_jsonl(path: str, errors: list | None = None):
    """Yields (line_number, object). A line that is not a JSON object raises DataError(file:line),
    or, given an `errors` list, is appended to it as "file:line: why" and skipped."""
    try:  # a byte that is not UTF-8 becomes a lone surrogate: that line's error, at its own number
        f = open(path, encoding="utf-8", errors="surrogateescape")  # \n, \r\n and a lone \r end lines
    except OSError as e:
        raise DataError(f"{path}: {e.strerror}") from e
    with f:
        for n, line in enumerate(f, 1):
            if n == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark is not JSON
            bad = None
            if not line.isascii():
                try:
                    line.encode("utf-8")  # fast; only a lone surrogate (a bad byte) fails, then find it
                except UnicodeEncodeError:
                    bad = BAD_BYTE.search(line)
            if bad:
                obj, why = None, f"not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x} at column {bad.start() + 1})"
            else:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.rstrip("\r\n"))  # (a column past the line end, not "line 2, column 1")
                    why = None if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
                    if why is None and "\\u" in line:  # "\ud800" decodes to half a UTF-16 pair, which no tokenizer
                        json.dumps(obj, ensure_ascii=False).encode("utf-8")  # (nor UTF-8 file) takes
                except json.JSONDecodeError as e:
                    why = f"not valid JSON: {e.msg} (column {e.colno})"
                except UnicodeEncodeError as e:
                    why = f"text holds a lone UTF-16 surrogate ({e.object[e.start:e.end]!r}), which is not valid Unicode"
                except (RecursionError, ValueError) as e:  # nested 100000 deep; an integer of 5000 digits
                    why = f"not valid JSON ({type(e).__name__}: {str(e)[:100]})"
            if why is None:
                yield n, obj
            elif errors is None:
                raise DataError(f"{path}:{n}: {why}")
            else:
                errors.append(f"{path}:{n}: {why}")


def to_messages(obj: dict) -> list[dict]:
    """A chat record or a prompt/completion pair -> validated messages (raises ValueError)."""
    if "messages" in obj and ("prompt" in obj or "completion" in obj):  # (TRL would read the pair, we the chat)
        raise ValueError("has both 'messages' and 'prompt'/'completion': one format per line")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
    elif "prompt" in obj and "completion" in obj:
        if "label" in obj:  # a KTO line: SFT would train on an undesirable completion as on any other
            raise ValueError("a KTO line (it has a 'label'): train_kto.py reads these; SFT would learn its "
                             "undesirable completions too")
        prompt = obj["prompt"]  # a string (one user turn) or messages, as TRL's conversational format
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("'prompt' must be a string or a non-empty list of messages")
        # only the completion trains (TRL's completion_only_loss): a prompt's assistant turns are context
        prompt = [{**m, "train": False} if isinstance(m, dict) and m.get("role") == "assistant" else m for m in prompt]
        msgs = prompt + [{"role": "assistant", "content": completion_text(obj["completion"], "completion")}]
    else:
        raise ValueError(f"expected 'messages' or 'prompt'+'completion', got keys {sorted(obj)}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {i}: unknown role {m.get('role') if isinstance(m, dict) else m!r} "
                             f"(expected one of {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be a string")
        check_no_tool_calls(m, f"message {i}")
        if not isinstance(m.get("train", True), bool):
            raise ValueError(f"message {i}: train must be true or false")
    if not any(trained_turn(m) for m in msgs):
        raise ValueError("no assistant turn to train on")
    return msgs


def check_no_tool_calls(m: dict, where: str):
    """Tool calls are not rendered (only role and content are): a turn holding one would train as
    its content alone, an empty reply for a pure call."""
    if calls := [k for k in ("tool_calls", "function_call") if m.get(k)]:
        raise ValueError(f"{where}: has '{calls[0]}'; nanopost renders role and content only (no tool calls)")


@dataclass
class Example:
    ids: list[int]
    labels: list[int]


def encode(tok: Tokenizer, msgs, max_len: int, train_on_prompt=False) -> tuple[Example, bool, bool]:
    """-> (example, truncated, trained tokens lost). Longer than max_len: drop whole turns from the
    right while an assistant turn remains; if the first exchange alone is too long, cut tokens at
    max_len. (A cut of only a last user turn, or of the newline after the last <|im_end|>, loses no
    trained token.)"""
    ids, mask = tok.render(msgs)
    count = len if train_on_prompt else sum  # a mask's trained tokens
    truncated, trained = len(ids) > max_len, count(mask)
    if truncated:  # the longest prefix that ends with an assistant turn and fits, else a hard cut
        ends = [i + 1 for i, m in enumerate(msgs) if (m["role"] == "assistant" if train_on_prompt else trained_turn(m))]
        for end in reversed(ends):
            ids, mask = tok.render(msgs[:end])
            if len(ids) <= max_len:
                break
        else:
            ids, mask = ids[:max_len], mask[:max_len]
    labels = list(ids) if train_on_prompt else [i if m else IGNORE for i, m in zip(ids, mask)]
    return Example(ids, labels), truncated, count(mask) < trained


def report_bad_lines(bad: list[str], skip_bad_lines: bool, log) -> None:
    """Every bad line, as "file:line: why" (the first 20 shown): a DataError before training, or
    with skip_bad_lines a counted warning."""
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        if not skip_bad_lines:
            raise DataError(f"{len(bad)} bad line(s):\n  {shown}\n(--skip-bad-lines drops them with a warning)")
        log(f"warning: skipped {len(bad)} bad line(s):\n  {shown}")


def load_sft(paths, tok: Tokenizer, max_len: int, train_on_prompt=False, skip_bad_lines=False, log=print):
    """Read and tokenise every file -> (list of examples per file, stats). Every bad line is
    reported with file:line; unless skip_bad_lines, any bad line stops here (before training)."""
    per_file, bad, truncated, cut_trained = [], [], 0, 0
    for path in paths:
        examples, n_bad = [], len(bad)
        for n, obj in read_jsonl(path, bad):
            try:
                ex, cut, lost = encode(tok, to_messages(obj), max_len, train_on_prompt)
            except ValueError as e:
                bad.append(f"{path}:{n}: {e}")
                continue
            if all(y == IGNORE for y in ex.labels[1:]):
                bad.append(f"{path}:{n}: no trained token left after truncation to --max-len {max_len}")
                continue
            truncated, cut_trained = truncated + cut, cut_trained + lost  # (of the examples kept)
            examples.append(ex)
        if not examples and len(bad) == n_bad:
            raise DataError(f"{path}: empty file (no examples)")
        per_file.append(examples)
    report_bad_lines(bad, skip_bad_lines, log)
    if not any(per_file):
        raise DataError("no usable examples in " + ", ".join(paths))
    return per_file, {"bad_lines": len(bad), "truncated": truncated, "cut_trained": cut_trained,
                      "examples": sum(map(len, per_file))}


def mix(per_file, weights, seed: int):
    """The training examples: file i contributes weight_i x its examples (1 = each once, 2 = twice,
    0.5 = a seeded random half, the same half every epoch)."""
    rng, out = random.Random(seed), []
    for examples, w in zip(per_file, weights):
        whole, frac = int(w), w - int(w)
        out += examples * whole + rng.sample(examples, round(frac * len(examples)))
    return out


def pack(examples, max_len: int) -> list[list[int]]:
    """Best-fit decreasing: each example (longest first; ties in file order) goes into the open
    row with the least room that still fits it (ties: the row opened first). Returns rows as
    lists of example indices. Rows are kept by room left: a heap of row numbers per room value
    and the sorted room values (at most max_len + 1) to bisect, so an example costs O(log n), not
    a scan of every row (200k examples pack in well under a second)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    rows, by_room, rooms = [], {}, []  # by_room: room -> heap of rows with that room; rooms: its sorted keys
    for i in order:
        n = len(examples[i].ids)
        k = bisect.bisect_left(rooms, n)
        if k == len(rooms):  # no row fits: open one
            r, room = len(rows), max_len - n
            rows.append([i])
        else:
            room = rooms[k]
            r = heapq.heappop(by_room[room])
            if not by_room[room]:
                del by_room[room], rooms[k]
            rows[r].append(i)
            room -= n
        if room not in by_room:
            by_room[room] = []
            bisect.insort(rooms, room)
        heapq.heappush(by_room[room], r)
    return rows


def collate(rows, examples, pad_id: int):
    """Rows of example indices -> input_ids, labels, position_ids (B, L), right-padded to the
    longest row; positions restart at 0 for every example (the model masks across them)."""
    width = max(sum(len(examples[i].ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for i in row:
            ex = examples[i]
            n = len(ex.ids)
            ids[b, t:t + n] = torch.tensor(ex.ids)
            labels[b, t:t + n] = torch.tensor(ex.labels)
            labels[b, t] = IGNORE  # a sequence's first token has no prediction inside the row
            pos[b, t:t + n] = torch.arange(n)
            t += n
        pos[b, t:] = torch.arange(width - t)  # padding: its own segment, never attended by data
    return ids, labels, pos


# ---- KTO: prompts, completions and labels ----
# Accepted lines (TRL's formats):
#     {"prompt": str | [messages], "completion": str | [one assistant message], "label": true | false}
#     {"prompt": str | [messages], "chosen": ..., "rejected": ...}   (paired: one desirable + one undesirable)
# A string prompt is one user turn. Prompt tokens: the chat template with the generation prompt;
# completion tokens: the assistant content + <|im_end|>, exactly the tokens SFT trains on.

@dataclass
class KTOExample:
    prompt: list[int]
    completion: list[int]
    label: bool  # True: desirable
    source: str = ""  # a hash of the whole rendered prompt: one prompt's completions share it (cut or not)


def completion_text(value, key) -> str:
    """A completion as TRL writes it: a string, or a list of one assistant message (-> its content)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) \
            and value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
        check_no_tool_calls(value[0], f"'{key}'")
        return value[0]["content"]
    raise ValueError(f"'{key}' must be a string or a list of one assistant message")


def to_kto(obj: dict) -> list[tuple[list[dict], str, bool]]:
    """One JSONL record -> [(prompt messages, completion text, label)] (raises ValueError)."""
    if "messages" in obj and "prompt" not in obj:  # the reverse of to_messages' KTO-line message
        raise ValueError("an SFT chat line ('messages'): train_sft.py reads these; KTO needs prompt, completion and "
                         "label (or prompt, chosen and rejected)")
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"'prompt' must be a string or a non-empty list of messages, got keys {sorted(obj)}")
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"prompt message {i}: expected {{'role': one of {', '.join(ROLES)}, 'content': str}}")
        check_no_tool_calls(m, f"prompt message {i}")
    if "chosen" in obj or "rejected" in obj:
        if "completion" in obj or "label" in obj:  # which one was meant? (the label would be ignored)
            raise ValueError("has both 'chosen'/'rejected' and 'completion'/'label': one format per line")
        if missing := [k for k in ("chosen", "rejected") if k not in obj]:
            raise ValueError(f"paired format without '{missing[0]}' (a pair needs 'chosen' and 'rejected')")
        return [(prompt, completion_text(obj.get("chosen"), "chosen"), True),
                (prompt, completion_text(obj.get("rejected"), "rejected"), False)]
    if "completion" not in obj or not isinstance(obj.get("label"), bool):
        raise ValueError("expected 'completion' and a boolean 'label' (true = desirable), or 'chosen' + 'rejected'")
    return [(prompt, completion_text(obj["completion"], "completion"), obj["label"])]


def encode_kto(tok: Tokenizer, prompt: list[dict], completion: str) -> tuple[list[int], list[int]]:
    """-> (prompt ids, completion ids): the completion is what the SFT mask trains of the reply. A
    completion that starts with a newline merges it with the header's ("assistant\n" + "\n..." is
    one "\n\n" token, which SFT trains): the prompt then ends before that token, as TRL's common
    prefix of the two tokenizations does."""
    p_ids, _ = tok.render(prompt, add_generation_prompt=True)
    ids, mask = tok.render(prompt + [{"role": "assistant", "content": completion}])
    start = len(p_ids)
    if ids[:start] != p_ids:
        start -= 1  # the header's last token, merged into the completion's first
        if ids[:start] != p_ids[:start] or not mask[start]:
            raise ValueError("the rendered prompt is not a prefix of prompt + completion")
    return ids[:start], [t for t, m in zip(ids[start:], mask[start:]) if m]


def truncate_kto(prompt: list[int], completion: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Fit prompt + completion into max_len keeping the completion: the prompt is cut from the
    left (down to half of max_len), then the completion from the right."""
    if len(prompt) + len(completion) <= max_len:
        return prompt, completion
    keep = max(max_len - len(completion), min(len(prompt), max_len // 2))
    return prompt[len(prompt) - keep:], completion[:max_len - keep]


def load_kto(paths, tok: Tokenizer, max_len: int, skip_bad_lines=False, log=print):
    """Read and tokenise every file -> (examples, stats), with the same file:line errors as load_sft."""
    examples, bad, stats = [], [], {"prompts_cut": 0, "completions_cut": 0}
    for path in paths:
        n_before, n_bad = len(examples), len(bad)
        for n, obj in read_jsonl(path, bad):
            try:
                items = [encode_kto(tok, p, c) + (label, tok.render(p, add_generation_prompt=True)[0])
                         for p, c, label in to_kto(obj)]
            except ValueError as e:
                bad.append(f"{path}:{n}: {e}")
                continue
            for p_ids, c_ids, label, prompt in items:
                p_cut, c_cut = truncate_kto(p_ids, c_ids, max_len)
                if not p_cut or not c_cut:  # (--max-len 1: no completion token is predicted from a prompt one)
                    bad.append(f"{path}:{n}: no completion token left after truncation to --max-len {max_len}")
                    continue
                stats["prompts_cut"] += len(p_cut) < len(p_ids)
                stats["completions_cut"] += len(c_cut) < len(c_ids)
                examples.append(KTOExample(p_cut, c_cut, label, hashlib.sha1(str(prompt).encode()).hexdigest()))
        if len(examples) == n_before and len(bad) == n_bad:
            raise DataError(f"{path}: empty file (no examples)")
    report_bad_lines(bad, skip_bad_lines, log)
    if not examples:
        raise DataError("no usable examples in " + ", ".join(paths))
    stats.update(bad_lines=len(bad), examples=len(examples), desirable=sum(e.label for e in examples))
    return examples, stats


def kto_groups(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """The micro-batches of KTO: a seeded shuffle of the examples cut into groups of batch_size
    (the last may be smaller, never one example alone: that one joins the group before it, as alone
    it would be its own KL pair), fixed for the whole run: the KL pairs are formed inside each group,
    so reference log-probs can be computed once (--precompute-ref); epochs reshuffle the groups."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    groups = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(groups) > 1 and len(groups[-1]) == 1:
        groups[-2].append(groups.pop()[0])
    return groups


def collate_kto(group, examples, pad_id: int, max_len: int, kl: bool = False):
    """A group of KTO examples -> input_ids, labels, position_ids (one sequence per row, labels on
    the completion only). kl=True: the KL pairs instead, prompt i with completion i-1 (cyclic),
    truncated like the examples."""
    rows = []
    for i, j in zip(group, group[-1:] + group[:-1] if kl else group):
        p, c = truncate_kto(examples[i].prompt, examples[j].completion, max_len)
        rows.append(Example(p + c, [IGNORE] * len(p) + c))
    return collate([[b] for b in range(len(rows))], rows, pad_id)


def collate_kl(group, examples, pad_id: int, max_len: int):
    """A group's KL pairs (collate_kto(kl=True): prompt i with completion i-1) as a continuation of
    its examples' batch (collate_kto, T wide), for a second forward that attends the prompts'
    keys/values kept from the first (model.PromptKV): row i holds the last token of prompt i
    (which predicts the completion's first) and completion i-1, at the positions that continue
    the prompt, seeing the prompt's other slots and itself: each prompt is computed once for its
    example and its KL pair. A pair whose prompt is cut otherwise than its example's (a longer
    completion) holds that whole prompt and sees no kept slot.
    -> input_ids, position_ids (B, W), mask (B, 1, W, T + W) bool (True = attend), src, targets,
    rows: target k is predicted by the hidden state at flattened position src[k] of this batch,
    its log-prob summed into row rows[k]."""
    B, seqs = len(group), []
    for i, j in zip(group, group[-1:] + group[:-1]):
        p, c = truncate_kto(examples[i].prompt, examples[i].completion, max_len)
        kp, kc = truncate_kto(examples[i].prompt, examples[j].completion, max_len)
        lead = p[-1:] if kp == p else kp  # kp == p: slots [0, P - 1) are the kept prompt's
        seqs.append((len(p) + len(c), len(p) - len(lead) if kp == p else 0, lead + kc, len(lead)))
    T, W = max(s[0] for s in seqs), max(1, max(len(s[2]) for s in seqs))
    ids = torch.full((B, W), pad_id, dtype=torch.long)
    pos = torch.zeros((B, W), dtype=torch.long)
    mask = torch.zeros((B, 1, W, T + W), dtype=torch.bool)
    causal = torch.ones(W, W, dtype=torch.bool).tril()
    src, targets, rows = [], [], []
    for b, (_, seen, seq, lead) in enumerate(seqs):
        ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        pos[b] = torch.arange(W) + seen
        mask[b, 0, :, :seen] = True
        mask[b, 0, :, T:] = causal
        for at in range(max(lead, 1) - 1, len(seq) - 1):  # the completion's tokens after the first of the row
            src.append(b * W + at)
            targets.append(seq[at + 1])
            rows.append(b)
    return ids, pos, mask, *(torch.tensor(x, dtype=torch.long) for x in (src, targets, rows))
