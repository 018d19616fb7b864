"""Writes data/mini/: the small benchmark slices paper.py evaluates on when no --data-dir is given
(the project ships them, so the main job runs offline). Made once from full benchmark folders in
evaluate.py's layout (python evaluate.py --download --tasks gsm8k,mmlu,cmmlu,ceval,humaneval):

    python bench/mini_benchmarks.py --src data/benchmarks --out data/mini

Each multiple-choice task keeps 4 subjects (STEM, humanities, social science, other where the
mapping says so) with 6 test questions and 5 dev exemplars each; GSM8K keeps 24 test problems and
the 8 first train problems (the 4-shot exemplars come first); HumanEval keeps 24 problems. The
picks are seeded, so rerunning gives the same files. Licences: data/mini/README.md."""
import argparse
import csv
import json
import os
import random

CHOICE = {"mmlu": "test", "cmmlu": "test", "ceval": "val"}


def pick_subjects(mapping, subjects, rng):
    by_cat = {}
    for s in subjects:
        by_cat.setdefault(mapping.get(s, {}).get("category", "Other"), []).append(s)
    chosen = [rng.choice(sorted(v)) for _, v in sorted(by_cat.items())][:4]
    rest = sorted(set(subjects) - set(chosen))
    return sorted(chosen + rng.sample(rest, 4 - len(chosen)))


def rows(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def write(path, table):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(table)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="full benchmarks in evaluate.py's layout")
    p.add_argument("--out", default="data/mini")
    args = p.parse_args()
    rng = random.Random(0)
    for task, split in CHOICE.items():
        mapping = json.load(open(os.path.join(args.src, task, "mapping.json"), encoding="utf-8"))
        suffix = "" if task == "cmmlu" else f"_{split}"
        files = sorted(os.listdir(os.path.join(args.src, task, split)))
        subjects = [f[: -len(suffix + ".csv")] for f in files if f.endswith(".csv")]
        chosen = pick_subjects(mapping, subjects, rng)
        for s in chosen:
            for sp, n in ((split, 6), ("dev", 5)):
                name = f"{s}.csv" if task == "cmmlu" else f"{s}_{sp}.csv"
                table = rows(os.path.join(args.src, task, sp, name))
                header, body = ([], table) if task == "mmlu" else ([table[0]], table[1:])
                body = body[:n] if sp == "dev" else sorted(rng.sample(body, n), key=body.index)
                write(os.path.join(args.out, task, sp, name), header + body)
        with open(os.path.join(args.out, task, "mapping.json"), "w", encoding="utf-8") as f:
            json.dump({s: mapping[s] for s in chosen if s in mapping}, f, ensure_ascii=False, indent=1)
    g = os.path.join(args.src, "gsm8k")
    test = open(os.path.join(g, "test.jsonl"), encoding="utf-8").read().splitlines()
    train = open(os.path.join(g, "train.jsonl"), encoding="utf-8").read().splitlines()
    os.makedirs(os.path.join(args.out, "gsm8k"), exist_ok=True)
    with open(os.path.join(args.out, "gsm8k", "test.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in sorted(rng.sample(test, 24), key=test.index))
    with open(os.path.join(args.out, "gsm8k", "train.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in train[:8])
    he = open(os.path.join(args.src, "humaneval", "HumanEval.jsonl"), encoding="utf-8").read().splitlines()
    os.makedirs(os.path.join(args.out, "humaneval"), exist_ok=True)
    with open(os.path.join(args.out, "humaneval", "HumanEval.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in sorted(rng.sample(he, 24), key=he.index))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
