"""Evaluation tasks. Each yields examples (dicts with "id", "messages" and "answer"), scores a
reply, and says whether it is generated ("generate") or scored by option letters ("choice")."""
from nanopost.tasks import choice, gsm8k, humaneval

NAMES = ("gsm8k", "mmlu", "cmmlu", "ceval", "humaneval")


def load(name: str, data_dir: str, shots: int | None = None, humaneval_mode: str = "chat"):
    """-> (examples, score function, mode). shots: None = the task's default (GSM8K 4, others 0).
    An example prompts with "messages" (chat template) or "raw" text, optionally with "stop"."""
    if name == "gsm8k":
        return gsm8k.load(data_dir, 4 if shots is None else shots), gsm8k.score, "generate"
    if name in ("mmlu", "cmmlu", "ceval"):
        return choice.load(name, data_dir, shots or 0), choice.score, "choice"
    if name == "humaneval":
        return humaneval.load(data_dir, humaneval_mode), humaneval.score, "generate"
    raise ValueError(f"unknown task {name!r} (known: {', '.join(NAMES)})")
