"""Near-duplicate detection with SimHash (Charikar 2002; the banded index is Manku et al. 2007's).

A text becomes a 64-bit fingerprint: its distinct features (shingles: k consecutive lowercase
words, or k consecutive characters; a set, as MinHash's, so a span repeated many times counts
once) are each hashed to 64 bits, and bit j of the fingerprint is 1 where more features have bit
j set than not. Texts that share most features get fingerprints that
differ in few bits, so "Hamming distance <= threshold" means near-duplicate. Unrelated texts
differ in about 32 bits.

Finding every pair within `threshold` bits without comparing all n^2/2 pairs: cut the 64 bits
into threshold + 1 bands. Two fingerprints that differ in at most `threshold` bits leave at
least one band untouched (pigeonhole), so each such pair has the same value in some band: bucket
the fingerprints by each band's value and compare only inside buckets. Nothing within the
threshold is missed (tests check it against brute force), and the work per band is about
n^2 / 2 / 2^(64 / (threshold + 1)) comparisons instead of n^2 / 2; a larger threshold means
narrower bands and fuller buckets."""
import hashlib
import re
import unicodedata

import numpy as np

# a word: a run of word characters, except that Chinese and Japanese characters, written without
# spaces between words, are one token each (else a whole clause is one token, and two clauses that
# differ in one character share no feature); and an arithmetic or comparison sign is a word of its
# own ("12 + 5" and "12 * 5" are different questions)
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_OPS = "+\\-*/=<>^%\u00d7\u00f7"
WORD = re.compile(rf"[{_CJK}]|[{_OPS}]|[^\W{_CJK}]+")
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix(x):
    """splitmix64's finaliser on a uint64 array: every input bit moves about half the output bits."""
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def tokens(text: str, unit: str = "word") -> list[str]:
    """Lowercase words (punctuation and spacing ignored, but + - * / = < > ^ % × ÷ are words; a Chinese
    or Japanese character is a word),
    or the characters of the whitespace-collapsed lowercase text; NFKC-normalised first (a composed
    and a decomposed "é", full- and half-width forms, are the same)."""
    text = unicodedata.normalize("NFKC", text).lower()
    if unit == "word":
        return WORD.findall(text)
    if unit == "char":
        return list(" ".join(text.split()))
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")


def simhash(texts, shingle: int = 3, unit: str = "word") -> np.ndarray:
    """-> (n,) uint64 fingerprints. A token's hash is blake2b (stable across processes, unlike
    Python's hash()); a shingle's hash mixes its tokens' hashes in order. A text shorter than one
    shingle is one feature; a text without tokens (empty, or no word characters in "word" unit) gets
    fingerprint 0, like every other such text: pass duplicate_of(..., ignore=) to keep them apart."""
    if isinstance(shingle, bool) or not isinstance(shingle, int) or shingle < 1:
        raise ValueError(f"simhash: shingle must be a whole number of tokens >= 1, got {shingle!r}")
    token_hash = {}  # token -> 64-bit hash, computed once per distinct token
    out = np.zeros(len(texts), dtype=np.uint64)
    for i, text in enumerate(texts):
        toks = tokens(text, unit)
        if not toks:
            continue
        for t in toks:
            if t not in token_hash:
                token_hash[t] = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
        h = np.fromiter((token_hash[t] for t in toks), dtype=np.uint64, count=len(toks))
        n = max(len(h) - shingle + 1, 1)
        feat = _mix(h[:n].copy())  # mixed before the next token joins: "a b" and "b a" differ
        for j in range(1, min(shingle, len(h))):
            feat = _mix(feat ^ h[j:j + n])
        feat = np.unique(feat)  # a set: "la la la ..." is one feature, not a majority of the bits
        n = len(feat)
        bits = np.unpackbits(feat.view(np.uint8)).reshape(n, 64)  # (features, 64)
        out[i] = np.packbits(2 * bits.sum(0, dtype=np.int64) > n).view(np.uint64)[0]
    return out


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x) if hasattr(np, "bitwise_count") else np.unpackbits(x.view(np.uint8)).reshape(
        *x.shape, 64).sum(-1)


def hamming(a: int, b: int) -> int:
    return bin(int(a) ^ int(b)).count("1")


def bands(threshold: int) -> list[tuple[int, int]]:
    """threshold + 1 bit ranges [lo, hi) covering the 64 bits, as equal as possible."""
    if not 0 <= threshold < 64:
        raise ValueError(f"threshold must be in 0..63 bits, got {threshold}")
    edges = np.linspace(0, 64, threshold + 2).round().astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def _distinct_pairs(u, threshold: int, block: int):
    """Pairs (a, b), a < b, of indices into u (distinct fingerprints) within threshold bits, each
    once: a pair is taken only in the first band where the two agree, so later bands that bucket it
    again add nothing (no set of repeats, threshold + 1 times the pairs)."""
    spans = bands(threshold)
    keys = np.stack([(u >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1) for lo, hi in spans])  # (bands, n)
    out_a, out_b = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for band, key in enumerate(keys):
        order = np.argsort(key, kind="stable")
        k = key[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        ends = np.r_[starts[1:], len(k)]
        for s, e in zip(starts[ends - starts > 1].tolist(), ends[ends - starts > 1].tolist()):
            idx = np.sort(order[s:e])
            for b in range(0, len(idx), block):  # rows idx[b:b+block] against themselves and later rows
                rows, cols = idx[b:b + block], idx[b:]
                r, c = np.nonzero(popcount(u[rows][:, None] ^ u[cols][None, :]) <= threshold)
                a, c = rows[r[c > r]], cols[c[c > r]]  # c indexes idx[b:], so c > r means a later element
                first = ~(keys[:band, a] == keys[:band, c]).any(0)  # not already found in an earlier band
                out_a.append(a[first])
                out_b.append(c[first])
    return np.concatenate(out_a), np.concatenate(out_b)


def near_pairs(fps, threshold: int, block: int = 2048) -> list[tuple[int, int]]:
    """Every pair (i, j), i < j, with Hamming(fps[i], fps[j]) <= threshold, sorted; through the
    banded index (see the module docstring) over the distinct fingerprints, in blocks of `block`
    rows inside a large bucket. k copies of one fingerprint are k (k - 1) / 2 pairs: to decide
    what to drop, use duplicate_of, which never lists them."""
    fps = np.asarray(fps, dtype=np.uint64)
    u, inv = np.unique(fps, return_inverse=True)
    members = [[] for _ in u]
    for i, g in enumerate(inv.tolist()):
        members[g].append(i)
    found = [(m[x], m[y]) for m in members for x in range(len(m)) for y in range(x + 1, len(m))]
    for a, b in zip(*(x.tolist() for x in _distinct_pairs(u, threshold, block))):
        found += [(min(i, j), max(i, j)) for i in members[a] for j in members[b]]
    return sorted(found)


def brute_force_pairs(fps, threshold: int) -> list[tuple[int, int]]:
    """The same pairs by comparing all n^2 / 2 (for tests)."""
    fps = np.asarray(fps, dtype=np.uint64)
    i, j = np.nonzero(np.triu(popcount(fps[:, None] ^ fps[None, :]) <= threshold, 1))
    return sorted(zip(i.tolist(), j.tolist()))


def duplicate_of(fps, threshold: int, ignore=None) -> list[int | None]:
    """For each text, the earliest kept text it is a near-duplicate of, or None (kept). Greedy in
    order: a text is dropped only for a *kept* one, so chains (a~b, b~c, a!~c) keep a and c.
    ignore[i] True: text i is never a duplicate nor the reason to drop one (pass it for texts
    without features, e.g. no word characters: their fingerprint 0 says nothing about them).

    Texts with one fingerprint share their neighbours, so the greedy pass runs over distinct
    fingerprints (first occurrences): time and memory grow with the distinct ones and their near
    pairs, not with the square of the copies of one text."""
    fps = np.asarray(fps, dtype=np.uint64)
    dup = [None] * len(fps)
    use = np.flatnonzero(~np.asarray(ignore, dtype=bool)) if ignore is not None else np.arange(len(fps))
    u, first, inv = np.unique(fps[use], return_index=True, return_inverse=True)  # first: index into use
    near = [[] for _ in u]  # group -> earlier groups (by first occurrence) within the threshold
    for a, b in zip(*(x.tolist() for x in _distinct_pairs(u, threshold, 2048))):
        early, late = (a, b) if first[a] < first[b] else (b, a)
        near[late].append(early)
    group_dup = {}  # group -> index into use of the kept text it duplicates, or None (its first text is kept)
    for g in np.argsort(first, kind="stable").tolist():
        kept = [first[h] for h in near[g] if group_dup[h] is None]
        group_dup[g] = min(kept) if kept else None
    for k, g in enumerate(inv.reshape(-1).tolist()):  # a later copy duplicates what its first did, or the first
        d = group_dup[g] if k == first[g] or group_dup[g] is not None else first[g]
        dup[use[k]] = None if d is None else int(use[d])
    return dup
