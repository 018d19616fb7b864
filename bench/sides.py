"""What the benchmark scripts share: each side (nanopost, transformers) runs in a fresh process,
so its time and peak memory are its own, and hands back one JSON line."""
import json
import os
import subprocess
import sys

DEFAULT_MODEL = os.environ.get("NANOPOST_REAL_MODEL", os.path.expanduser("~/.cache/nanopost/qwen2.5-coder-0.5b-instruct"))


def run_side(script: str, argv: list[str], what: str) -> dict:
    """python SCRIPT ARGV (the script's hidden --worker mode) -> the JSON of its last stdout line;
    exits naming `what` with the tail of stderr if it failed."""
    out = subprocess.run([sys.executable, script, *map(str, argv)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
