"""GSM8K, the paper's protocol: chat template, k-shot chain of thought in one user turn
("Question: ...\nLet's think step by step"), exemplars ending "The answer is N", greedy decoding
stopped where the reply starts a next "Question:" (continuing the exemplars' pattern), prediction =
the last number in the reply, exact match against the number after "####"."""
import os
import re

from nanopost.data import DataError, read_jsonl

# A minus sign (or U+2212) only where it cannot be a dash between numbers ("between 5-6" is 6,
# not -6); commas only as thousands separators ("1,234" but "1,2,3" is three numbers); ".5" is a number.
# ASCII digits only, as lm-evaluation-harness' [0-9]: a "１８" or "𝟏" could never equal the gold, yet as the
# last number it would override the answer before it.
NUMBER = re.compile(r"(?:(?<![\w.])[-\u2212])?\$?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)", re.ASCII)
STOP = ["Question:"]


def gold(answer: str) -> str:
    return normalize(answer.split("####")[-1])


def normalize(num: str) -> str:
    """'$1,234.50' -> '1234.5'; '-3' stays; '7.0' -> '7'; '.5' -> '0.5'; '007' -> '7'; '-0', '.0' -> '0'."""
    s = num.replace(",", "").replace("$", "").replace("\u2212", "-").strip().rstrip(".")
    s = re.sub(r"^(-?)\.", r"\g<1>0.", s)  # before the zeros go: ".0" is 0, not ""
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    s = re.sub(r"^(-?)0+(?=\d)", r"\g<1>", s)  # leading zeros: 007 is 7
    return "0" if s == "-0" else s


def extract(reply: str) -> str | None:
    """The last number in the reply (commas, signs, $ and decimals understood), or None."""
    found = NUMBER.findall(reply)
    return normalize(found[-1]) if found else None


def exemplar(row) -> str:
    """A train solution as chain of thought: calculator annotations <<...>> dropped, the final
    '#### N' turned into 'The answer is N.'"""
    steps = re.sub(r"<<[^>]*>>", "", row["answer"].split("####")[0]).strip()
    return f"Question: {row['question']}\nLet's think step by step\n{steps}\nThe answer is {gold(row['answer'])}."


def read_rows(path: str) -> list[dict]:
    """The {question, answer} rows of a GSM8K JSONL file; a malformed one is a DataError naming file:line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    for n, row in read_jsonl(path):
        bad = [k for k in ("question", "answer") if not isinstance(row.get(k), str)]
        if bad:
            raise DataError(f"{path}:{n}: no string {' or '.join(bad)} (a GSM8K row is {{\"question\", \"answer\"}})")
        if not NUMBER.fullmatch(gold(row["answer"]) if "####" in row["answer"] else ""):
            raise DataError(f"{path}:{n}: the answer has no final '#### N' line with a number")
        rows.append(row)
    return rows


def load(data_dir: str, shots: int = 4):
    """-> examples [{id, question, answer, messages}] from data_dir/gsm8k/test.jsonl; exemplars
    are the first `shots` problems of train.jsonl."""
    root = os.path.join(data_dir, "gsm8k")
    read = lambda f: read_rows(os.path.join(root, f))  # noqa: E731
    train = read("train.jsonl") if shots else []
    if len(train) < shots:  # never fewer exemplars than the results record
        raise DataError(f"gsm8k: --shots {shots}, but {os.path.join(root, 'train.jsonl')} has {len(train)} problems")
    shots_text = "\n\n".join(exemplar(r) for r in train[:shots])
    examples = []
    test = read("test.jsonl")
    if not test:  # a score of nothing would read as a result
        raise DataError(f"{os.path.join(root, 'test.jsonl')}: no problems in it")
    for i, row in enumerate(test):
        q = f"Question: {row['question']}\nLet's think step by step"
        examples.append({"id": i, "question": row["question"], "answer": gold(row["answer"]), "stop": STOP,
                         "messages": [{"role": "user", "content": (shots_text + "\n\n" + q) if shots else q}]})
    return examples


def score(ex, reply: str, cut: bool = False):
    """cut (the reply hit its token limit): read as it stands, as lm-evaluation-harness does."""
    pred = extract(reply)
    return pred, pred == ex["answer"]
