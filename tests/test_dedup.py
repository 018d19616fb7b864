"""SimHash near-duplicates: fingerprints of (near-)identical texts are close, unrelated ones far;
the banded index finds exactly the pairs brute force finds; and on planted near-duplicates it
agrees with datasketch's MinHashLSH."""
import random

import numpy as np
import pytest

from nanopost import dedup


def random_text(rng, n_words, vocab=3000):
    return " ".join(f"w{rng.randrange(vocab)}" for _ in range(n_words))


def test_identical_and_formatting_only_collide():
    a = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    fps = dedup.simhash([a, a, a.upper(), a.replace(",", "").replace(" ", "   "), ""])
    assert [dedup.hamming(fps[0], f) for f in fps[:4]] == [0, 0, 0, 0]
    assert fps[4] == 0  # empty text: no features


def test_unicode_forms_cjk_characters_and_word_order():
    """NFC and NFD (and full-width) forms are one text; a Chinese sentence is words of one character
    (it was one token a clause: one character changed left no feature in common); shingles hash
    their words in order ("dog bites man" and "man bites dog" shared every 2-word feature)."""
    import unicodedata
    a = "Café in Zürich, ｃｏｆｆｅｅ at 9"
    fps = dedup.simhash([a, unicodedata.normalize("NFD", a), a.replace("ｃｏｆｆｅｅ", "coffee")])
    assert fps[0] == fps[1] == fps[2]
    assert dedup.tokens("写一首诗 about autumn") == ["写", "一", "首", "诗", "about", "autumn"]
    zh = "小明有三个苹果，又买了两个苹果，然后他把一半的苹果分给了他的好朋友小红，请问小明现在还有几个苹果？"
    fps = dedup.simhash([zh, zh.replace("三", "四"), "今天天气很好，我们一起去公园散步，然后在湖边的咖啡馆喝了一杯茶。"])
    assert dedup.hamming(fps[0], fps[1]) <= 12 < 24 <= dedup.hamming(fps[0], fps[2])  # (one token a clause: ~30)
    fps = dedup.simhash(["dog bites man", "man bites dog"], shingle=2)
    assert dedup.hamming(*fps) > 8
    for bad in (0, -1, 1.5, True):  # a shingle of no tokens was a reshape error from numpy
        with pytest.raises(ValueError, match="shingle"):
            dedup.simhash(["dog bites man"], shingle=bad)


def test_near_identical_within_threshold_unrelated_far():
    rng = random.Random(0)
    texts = [random_text(rng, 150) for _ in range(200)]
    near = 0
    for t in texts:
        words = t.split()
        words[rng.randrange(len(words))] = "changed"
        f = dedup.simhash([t, " ".join(words)], shingle=2)
        near += dedup.hamming(*f) <= 8
    assert near >= 190  # one word of 150 changed: almost always within 8 bits
    fps = dedup.simhash(texts, shingle=2)
    assert dedup.brute_force_pairs(fps, 12) == []  # unrelated texts: ~32 bits apart, none within 12


def test_char_shingles_short_texts():
    fps = dedup.simhash(["What is the capital of France?", "what is the capital of france", "Write a poem about cats."],
                        shingle=4, unit="char")
    assert dedup.hamming(fps[0], fps[1]) <= 8 < dedup.hamming(fps[0], fps[2])


@pytest.mark.parametrize("threshold", [0, 3, 8, 12])
def test_banded_index_equals_brute_force(threshold):
    """Planted fingerprints 0..16 bits away from others, among random ones: the index must find
    every pair within the threshold (pigeonhole), and nothing else."""
    rng = np.random.default_rng(threshold)
    base = rng.integers(0, 2**63, size=2500, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
    copies = []
    for i in rng.choice(len(base), 700):
        flip = rng.choice(64, size=rng.integers(0, 17), replace=False)
        copies.append(base[i] ^ np.uint64(sum(1 << int(b) for b in flip)))
    fps = np.concatenate([base, np.array(copies, dtype=np.uint64)])
    found = dedup.near_pairs(fps, threshold, block=64)  # small blocks: the blocked path is exercised
    assert found == dedup.brute_force_pairs(fps, threshold)
    assert len(found) > 0


def test_banded_index_on_texts_equals_brute_force():
    rng = random.Random(1)
    texts = [random_text(rng, rng.randint(5, 60), vocab=400) for _ in range(2500)]
    texts += [t.replace("w1 ", "w2 ", 1) for t in texts[:500]]  # near-duplicates
    fps = dedup.simhash(texts, shingle=2)
    assert dedup.near_pairs(fps, 8) == dedup.brute_force_pairs(fps, 8)


def test_duplicate_of_keeps_first_and_breaks_chains():
    a, b, c = 0, 0b111, 0b111111  # a~b (3 bits), b~c (3 bits), a!~c (6 bits) at threshold 3
    assert dedup.duplicate_of([a, b, c, a], 3) == [None, 0, None, 0]
    with pytest.raises(ValueError):
        dedup.bands(64)


def test_agrees_with_datasketch_minhash_lsh():
    """Sanity check against an independent method on planted near-duplicates (one word changed
    in texts of 60-120 words): both find (almost) all planted pairs and almost nothing else."""
    datasketch = pytest.importorskip("datasketch")
    rng = random.Random(2)
    texts = [random_text(rng, rng.randint(60, 120)) for _ in range(1000)]
    planted = set()
    for i in rng.sample(range(1000), 100):
        words = texts[i].split()
        words[rng.randrange(len(words))] = "edited"
        planted.add((i, len(texts)))
        texts.append(" ".join(words))
    ours = set(dedup.near_pairs(dedup.simhash(texts, shingle=2), 8))
    lsh, mh = datasketch.MinHashLSH(threshold=0.8, num_perm=128), []
    for i, t in enumerate(texts):
        w = t.split()
        m = datasketch.MinHash(num_perm=128, seed=1)
        m.update_batch([" ".join(w[j:j + 2]).encode() for j in range(len(w) - 1)])
        lsh.insert(i, m)
        mh.append(m)
    theirs = {(i, j) for i, m in enumerate(mh) for j in lsh.query(m) if j > i}
    for found in (ours, theirs):
        assert len(found & planted) >= 0.9 * len(planted)
        assert len(found - planted) <= 2
    assert len(ours & theirs) >= 0.85 * len(planted)


def test_many_copies_of_one_text_are_fast_and_exact():
    """20k copies of one fingerprint: grouped before the banded index, not 2e8 pairs per band."""
    import time
    fps = np.r_[np.full(20_000, 12345, dtype=np.uint64), np.uint64(12345 ^ 0b111), np.uint64(2**64 - 1)]
    t0 = time.time()
    dup = dedup.duplicate_of(fps, 8)
    assert time.time() - t0 < 2
    assert dup[0] is None and set(dup[1:20_001]) == {0} and dup[-1] is None
    small = fps[[0, 20_000, 1, 2, 20_000, 20_001]]  # the same against brute force, copies interleaved
    assert dedup.duplicate_of(small, 3) == [None, 0, 0, 0, 0, None]
    assert dedup.near_pairs(small, 3, block=2) == dedup.brute_force_pairs(small, 3)


def test_texts_without_words_are_never_duplicates():
    texts = ["", "?", "...", "What is 2 + 2?", "what is 2+2"]
    fps = dedup.simhash(texts)
    assert list(fps[:3]) == [0, 0, 0]  # no features: the fingerprint says nothing
    ignore = [not dedup.tokens(t) for t in texts]
    assert dedup.duplicate_of(fps, 8, ignore=ignore) == [None, None, None, None, 3]


def test_a_repeated_span_counts_once_and_arithmetic_signs_are_words():
    """Features counted with their repeats let a chorus of "la" outvote everything else: two
    instructions sharing 5% of their word pairs had one fingerprint (datasketch's MinHash, a set,
    keeps them apart). And "12 + 5" and "12 * 5" were one question."""
    datasketch = pytest.importorskip("datasketch")
    a = "Translate this song chorus into French, keeping the rhythm: " + "la " * 30
    b = "Count how many times the word appears in this text: " + "la " * 30
    assert dedup.duplicate_of(dedup.simhash([a, b], 2), 8) == [None, None]
    m = []
    for text in (a, b):
        h = datasketch.MinHash(num_perm=128)
        toks = dedup.tokens(text)
        for x, y in zip(toks, toks[1:]):
            h.update(f"{x} {y}".encode())
        m.append(h)
    assert m[0].jaccard(m[1]) < 0.2
    ops = ["What is 12 + 5?", "What is 12 * 5?", "What is 12 - 5?", "What is 12 / 5?", "Is 7 < 3?", "Is 7 > 3?"]
    assert dedup.duplicate_of(dedup.simhash(ops, 2), 8) == [None] * len(ops)
    assert dedup.duplicate_of(dedup.simhash(["What is 12 + 5?", "what is 12+5"], 2), 8) == [None, 0]


def test_fingerprint_rules_as_documented():
    """Each rule below once passed every test when changed: a bit is set where *more* features have it
    than not (two features: both); a text shorter than one shingle is one feature (not fingerprint 0,
    which made every 1-2 word instruction a duplicate of every other); "char" units collapse spacing."""
    fp = lambda *texts, shingle=2, unit="word": [int(x) for x in dedup.simhash(list(texts), shingle, unit)]  # noqa: E731
    ab, bc, abc = fp("alpha beta", "beta gamma", "alpha beta gamma")
    assert abc == ab & bc  # a one-feature text's fingerprint is its feature; two features keep the bits both have
    short = fp("hello world", "one two three four", shingle=5)
    assert 0 not in short and short[0] != short[1]
    assert fp("hello world", shingle=3) == fp("hello world", shingle=2) != [0]
    a = "What is the capital of France?"
    assert len(set(fp(a, "What  is the\tcapital of France?", " " + a + "\n", shingle=4, unit="char"))) == 1


def test_duplicate_of_when_a_later_text_has_the_smaller_fingerprint():
    assert dedup.duplicate_of([7, 0], 3) == [None, 0]
    # the third is near both kept texts (0 and 0b111111 are 6 bits apart): the earliest is the one named
    assert dedup.duplicate_of([0, 0b111111, 0b111], 3) == [None, None, 0]
