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
