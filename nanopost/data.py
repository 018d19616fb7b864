"""SFT data: JSONL readers and validators, tokenisation with the loss mask, truncation,
best-fit-decreasing packing, and batches.

Accepted lines (one JSON object per line):
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   (multi-turn)
    {"prompt": str, "completion": str}                                           (one exchange)
Labels follow the one mask convention: IGNORE (-100) marks a token the loss does not train on."""
import bisect
import heapq
import json
import random
from dataclasses import dataclass

import torch

from nanopost.tokenizer import IGNORE, ROLES, Tokenizer


class DataError(ValueError):
    pass


def read_jsonl(path: str, errors: list | None = None):
    """Yields (line_number, object). A line that is not a JSON object raises DataError(file:line),
    or, given an `errors` list, is appended to it as "file:line: why" and skipped."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: {e.strerror}") from e
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                why = None if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
            except json.JSONDecodeError as e:
                why = f"not valid JSON ({e.msg} at column {e.colno})"
            if why is None:
                yield n, obj
            elif errors is None:
                raise DataError(f"{path}:{n}: {why}")
            else:
                errors.append(f"{path}:{n}: {why}")


def to_messages(obj: dict) -> list[dict]:
    """A chat record or a prompt/completion pair -> validated messages (raises ValueError)."""
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("'messages' must be a non-empty list")
    elif "prompt" in obj and "completion" in obj:
        msgs = [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    else:
        raise ValueError(f"expected 'messages' or 'prompt'+'completion', got keys {sorted(obj)}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {i}: unknown role {m.get('role') if isinstance(m, dict) else m!r} "
                             f"(expected one of {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: content must be a string")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ValueError("no assistant turn: nothing to train on")
    return msgs


@dataclass
class Example:
    ids: list[int]
    labels: list[int]


def encode(tok: Tokenizer, msgs, max_len: int, train_on_prompt=False) -> tuple[Example, bool]:
    """-> (example, truncated). Longer than max_len: drop whole turns from the right while an
    assistant turn remains; if the first exchange alone is too long, cut tokens at max_len."""
    ids, mask = tok.render(msgs)
    truncated = len(ids) > max_len
    if truncated:  # the longest prefix that ends with an assistant turn and fits, else a hard cut
        ends = [i + 1 for i, m in enumerate(msgs) if m["role"] == "assistant"]
        for end in reversed(ends):
            ids, mask = tok.render(msgs[:end])
            if len(ids) <= max_len:
                break
        else:
            ids, mask = ids[:max_len], mask[:max_len]
    labels = list(ids) if train_on_prompt else [i if m else IGNORE for i, m in zip(ids, mask)]
    return Example(ids, labels), truncated


def load_sft(paths, tok: Tokenizer, max_len: int, train_on_prompt=False, skip_bad_lines=False, log=print):
    """Read and tokenise every file -> (list of examples per file, stats). Every bad line is
    reported with file:line; unless skip_bad_lines, any bad line stops here (before training)."""
    per_file, bad, truncated = [], [], 0
    for path in paths:
        examples, n_bad = [], len(bad)
        for n, obj in read_jsonl(path, bad):
            try:
                ex, cut = encode(tok, to_messages(obj), max_len, train_on_prompt)
            except ValueError as e:
                bad.append(f"{path}:{n}: {e}")
                continue
            truncated += cut
            if all(y == IGNORE for y in ex.labels[1:]):
                bad.append(f"{path}:{n}: no trained token left after truncation to --max-len {max_len}")
                continue
            examples.append(ex)
        if not examples and len(bad) == n_bad:
            raise DataError(f"{path}: empty file (no examples)")
        per_file.append(examples)
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        if not skip_bad_lines:
            raise DataError(f"{len(bad)} bad line(s):\n  {shown}\n(--skip-bad-lines drops them with a warning)")
        log(f"warning: skipped {len(bad)} bad line(s):\n  {shown}")
    if not any(per_file):
        raise DataError("no usable examples in " + ", ".join(paths))
    return per_file, {"bad_lines": len(bad), "truncated": truncated, "examples": sum(map(len, per_file))}


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
