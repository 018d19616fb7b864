"""nanopost: a small, readable toolkit for post-training small language models (Qwen2)."""
import argparse

from nanopost.checkpoint import load, save
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
