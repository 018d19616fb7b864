"""nanopost: a small, readable toolkit for post-training small language models (Qwen2)."""
import argparse
import functools
import sys

import torch

from nanopost.checkpoint import disk_full, let_go_of_folders, load, save
from nanopost.model import KVCache, Qwen2, Qwen2Config
from nanopost.tokenizer import IGNORE, Tokenizer

__all__ = ["load", "save", "Qwen2", "Qwen2Config", "KVCache", "Tokenizer", "IGNORE"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help for our scripts: the docstring as written, and each option's default after its help
    where it has one (not None or off) that the help does not state already."""

    def _get_help_string(self, action):
        text = action.help or ""
        off = action.default is None or action.default is False or action.default == [] or action.default == argparse.SUPPRESS
        if not action.option_strings or off or "(default" in text or "%(default)" in text:
            return text
        return text + " (default: %(default)s)"


def device_arg(value: str) -> str:
    """argparse type of --device: cpu, cuda or cuda:N, refused when this machine cannot run it
    (a CPU-only torch build or no GPU), before any work starts."""
    try:
        d = torch.device(value)
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r}: expected cpu, cuda or cuda:N")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value}: no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return value


def exits_when_disk_full(rerun: str):
    """Decorates a script's main: a full disk ends the run with one error line (the file being
    written where known, and what to do), not a traceback from deep inside. Every script writes
    its outputs whole or not at all (a temporary name, renamed when complete), so what finished
    before is kept and `rerun` says how to carry on once there is space. When main ends, the
    folders it locked (checkpoint.hold_folder) are let go: a next script in the same process may take them."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except Exception as e:
                if not disk_full(e):
                    raise
                # the file being written: a copy's OSError names its source first and the destination second
                path = isinstance(e, OSError) and e.strerror and (e.filename2 or e.filename)
                sys.exit(f"error: the disk is full{f' writing {path}' if path else ''} "
                         f"({e.strerror if path else e}); what finished before is kept: free space "
                         f"(or choose another --out) and {rerun}")
            finally:
                let_go_of_folders()
        return run
    return wrap
