"""Packing: the fast best-fit decreasing against the plain O(examples x rows) one it replaced."""
import random
import sys
import time

from nanopost.data import Example, pack


def pack_reference(examples, max_len):
    """The original pack, kept as the definition: scan every row for the least room that fits."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    rows, room = [], []
    for i in order:
        n = len(examples[i].ids)
        best = min((r for r in range(len(rows)) if room[r] >= n), key=lambda r: room[r], default=None)
        if best is None:
            rows.append([i])
            room.append(max_len - n)
        else:
            rows[best].append(i)
            room[best] -= n
    return rows


def examples(lengths):
    return [Example(range(n), []) for n in lengths]  # pack reads only len(ids)


def test_pack_equals_the_reference_row_for_row():
    rng = random.Random(0)
    for _ in range(300):
        max_len = rng.choice([1, 2, 5, 16, 37, 100])
        # many ties, lengths == max_len, and few distinct values (rows with equal room left)
        pool = [rng.randint(1, max_len) for _ in range(rng.randint(1, 6))] + [max_len]
        lengths = [rng.choice(pool) if rng.random() < 0.7 else rng.randint(1, max_len)
                   for _ in range(rng.randint(0, 150))]
        exs = examples(lengths)
        assert pack(exs, max_len) == pack_reference(exs, max_len), (max_len, lengths)


def test_pack_does_constant_work_per_example():
    """Count the lines executed (sys.settrace): the reference scans every row for each example,
    ~n x rows lines; best fit by bisect and heaps runs a dozen or so lines per example."""
    rng = random.Random(1)
    n = 3000
    exs = examples(rng.randint(1, 512) for _ in range(n))
    lines, tracer = 0, sys.gettrace()

    def count(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return count
    sys.settrace(count)
    try:
        rows = pack(exs, 1024)
    finally:
        sys.settrace(tracer)
    assert lines < 40 * n, lines
    assert sorted(i for row in rows for i in row) == list(range(n))
    assert all(sum(len(exs[i].ids) for i in row) <= 1024 for row in rows)


def test_pack_a_paper_sized_set():
    rng = random.Random(2)
    exs = examples(min(2048, int(rng.lognormvariate(5.5, 1.0)) + 1) for _ in range(200_000))
    t = time.perf_counter()
    rows = pack(exs, 2048)
    print(f"packed {len(exs)} examples into {len(rows)} rows in {time.perf_counter() - t:.2f} s")
    assert sum(map(len, rows)) == len(exs)


def test_read_jsonl_line_ends_bom_and_bad_bytes(tmp_path):
    """Every line ending (\\n, \\r\\n, an old Mac's lone \\r) splits lines; a byte-order mark is
    skipped; a byte that is not UTF-8 is its own line's error, at its line number, and the lines
    after it are still read when errors are collected."""
    import pytest

    from nanopost.data import DataError, read_jsonl
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\r{"a": 2}\r\n{"a": "\xc3\xa9"}\n\n{"a": 4}\r')
    assert list(read_jsonl(str(p))) == [(1, {"a": 1}), (2, {"a": 2}), (3, {"a": "é"}), (5, {"a": 4})]
    p.write_bytes(b'{"a": 1}\n{"a": "\xff"}\r{"a": 3}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 text \(byte 0xff at column 8\)"):
        list(read_jsonl(str(p)))
    errors = []
    assert list(read_jsonl(str(p), errors)) == [(1, {"a": 1}), (3, {"a": 3})]
    assert len(errors) == 1 and errors[0].endswith("d.jsonl:2: not UTF-8 text (byte 0xff at column 8)")
    # half a UTF-16 pair (no tokenizer takes it), JSON nested too deep for Python, an integer too long:
    # each its own line's error, never a traceback
    p.write_bytes(b'{"a": 1}\n{"a": "x\\ud800y"}\n{"b": ' + b"[" * 100000 + b'\n{"c": ' + b"9" * 5000 + b'}\n')
    errors = []
    assert list(read_jsonl(str(p), errors)) == [(1, {"a": 1})]
    assert [e.split("d.jsonl:")[1][:2] for e in errors] == ["2:", "3:", "4:"], errors
    assert "lone UTF-16 surrogate" in errors[0] and all("not valid JSON" in e for e in errors[1:]), errors
    p.write_bytes(b'{"a": 1}\r\n{"a": 2\r\n')  # a torn last line: its error at its own end, not "line 2"
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON: Expecting ',' delimiter \(column 8\)"):
        list(read_jsonl(str(p)))


def test_sft_refuses_kto_lines_and_counts_only_kept_examples_as_truncated(tiny, tmp_path):
    """A KTO line (prompt, completion, label) read as SFT trained on its undesirable completions;
    and examples dropped for having no trained token left were counted as truncated too ("15 of 7
    examples were cut")."""
    import pytest

    import nanopost
    from nanopost.data import DataError, load_sft
    tok = nanopost.Tokenizer(tiny)
    f = tmp_path / "kto.jsonl"
    f.write_text('{"prompt": "Sky?", "completion": "Blue.", "label": true}\n{"prompt": "Sky?", "completion": "Mars.", "label": false}\n')
    with pytest.raises(DataError, match=r"kto.jsonl:1: a KTO line .*train_kto.py"):
        load_sft([str(f)], tok, 512)
    f.write_text('{"messages": [{"role": "user", "content": "' + "word " * 60 + '"}, {"role": "assistant", "content": "ok"}]}\n'
                 '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "' + "yes " * 60 + '"}]}\n')
    per_file, stats = load_sft([str(f)], tok, 40, skip_bad_lines=True, log=lambda *a: None)
    assert stats["bad_lines"] == 1 and stats["examples"] == 1 and stats["truncated"] == 1  # was 2
