"""SimHash near-duplicate search (nanopost/dedup.py) against datasketch's MinHashLSH on the same
synthetic texts with planted near-duplicates: time, recall and precision of the planted pairs.

    python bench/dedup.py --n 200000                    # the issue's size (minutes; give it the CPU)
    python bench/dedup.py --n 20000 --threshold 3 6 8   # quick check, several Hamming thresholds

Texts: words drawn from a Zipf-like vocabulary (so unrelated texts share common words, as real
ones do), 40-200 words each. A tenth of them get a near-duplicate copy with one light edit, named
in the per-edit recall: formatting only (case, punctuation, spacing), one word replaced, one word
inserted, one word deleted, two adjacent words swapped. A found pair counts as right when it is a
planted pair; recall = planted pairs found / planted; precision = planted found / all found.
MinHashLSH (num_perm 128, Jaccard threshold --jaccard over the same word shingles) returns
candidates; they are kept when the MinHash estimate of their Jaccard reaches --jaccard, its usual use."""
import argparse
import os
import random
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanopost import dedup  # noqa: E402

EDITS = ["format", "replace", "insert", "delete", "swap"]


def make_texts(n, seed):
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(30000)]
    weights = [1 / (i + 10) for i in range(len(vocab))]
    n_orig = int(n / 1.1)
    texts = [" ".join(rng.choices(vocab, weights, k=rng.randint(40, 200))) + "." for _ in range(n_orig)]
    planted = {}
    for i in rng.sample(range(n_orig), n - n_orig):
        words, kind = texts[i].rstrip(".").split(), rng.choice(EDITS)
        k = rng.randrange(len(words) - 1)
        if kind == "format":
            new = ", ".join(" ".join(words[j:j + 7]) for j in range(0, len(words), 7)).upper() + "!"
        else:
            if kind == "replace":
                words[k] = rng.choice(vocab)
            elif kind == "insert":
                words.insert(k, rng.choice(vocab))
            elif kind == "delete":
                del words[k]
            else:
                words[k], words[k + 1] = words[k + 1], words[k]
            new = " ".join(words) + "."
        planted[(i, len(texts))] = kind
        texts.append(new)
    return texts, planted


def score(found, planted):
    found = set(found)
    hit = found & set(planted)
    per = {e: [0, 0] for e in EDITS}
    for pair, kind in planted.items():
        per[kind][0] += pair in hit
        per[kind][1] += 1
    return (len(hit) / len(planted), len(hit) / max(len(found), 1),
            " ".join(f"{e} {a / b:.2f}" if b else f"{e} -" for e, (a, b) in per.items()))  # -: none planted


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="texts, planted copies included")
    p.add_argument("--threshold", type=int, nargs="+", default=[6, 8], help="SimHash Hamming thresholds to try")
    p.add_argument("--shingle", type=int, default=2, help="words per shingle (both methods)")
    p.add_argument("--jaccard", type=float, default=0.8, help="MinHashLSH Jaccard threshold")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.n < 20:  # a tenth of them planted copies: at least two
        p.error("--n must be at least 20")
    texts, planted = make_texts(args.n, args.seed)
    print(f"{len(texts)} texts, {len(planted)} planted near-duplicate pairs, shingle {args.shingle} words")
    print("| method | setting | fingerprint s | search s | total s | recall | precision | recall per edit |")
    print("|---|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    fps = dedup.simhash(texts, args.shingle)
    t_fp = time.perf_counter() - t0
    for k in args.threshold:
        t0 = time.perf_counter()
        pairs = dedup.near_pairs(fps, k)
        t_s = time.perf_counter() - t0
        r, pr, per = score(pairs, planted)
        print(f"| SimHash (nanopost) | Hamming <= {k} | {t_fp:.1f} | {t_s:.1f} | {t_fp + t_s:.1f} | {r:.3f} | {pr:.3f} | {per} |",
              flush=True)
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError:
        print("datasketch not installed (pip install datasketch): no MinHashLSH column")
        return
    t0 = time.perf_counter()
    hashes = []
    for t in texts:
        toks = dedup.tokens(t)
        m = MinHash(num_perm=args.num_perm, seed=1)
        m.update_batch([" ".join(toks[i:i + args.shingle]).encode() for i in range(max(len(toks) - args.shingle + 1, 1))])
        hashes.append(m)
    t_fp = time.perf_counter() - t0
    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=args.jaccard, num_perm=args.num_perm)
    for i, m in enumerate(hashes):
        lsh.insert(i, m)
    found = set()
    for i, m in enumerate(hashes):
        for j in lsh.query(m):
            if j > i and m.jaccard(hashes[j]) >= args.jaccard:
                found.add((i, j))
    t_s = time.perf_counter() - t0
    r, pr, per = score(found, planted)
    print(f"| MinHashLSH (datasketch) | Jaccard >= {args.jaccard}, {args.num_perm} perm | {t_fp:.1f} | {t_s:.1f} | "
          f"{t_fp + t_s:.1f} | {r:.3f} | {pr:.3f} | {per} |")


if __name__ == "__main__":
    main()
