"""nanopost: a small, readable toolkit for post-training small language models (Qwen2)."""
from nanopost.checkpoint import load, save
from nanopost.model import KVCache, Qwen2, Qwen2Config
from nanopost.tokenizer import IGNORE, Tokenizer

__all__ = ["load", "save", "Qwen2", "Qwen2Config", "KVCache", "Tokenizer", "IGNORE"]
