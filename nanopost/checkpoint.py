"""Load and save checkpoints in the Hugging Face layout: config.json, model.safetensors or
model-0000k-of-0000n.safetensors + model.safetensors.index.json, tokenizer files,
generation_config.json. A hub id is resolved with huggingface_hub.snapshot_download (which
honours HF_HOME and HF_HUB_OFFLINE); a local directory is read as it is."""
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import struct
import tempfile
import time

import torch
from safetensors.torch import save_file

from nanopost.model import Qwen2, Qwen2Config
from nanopost.tokenizer import Tokenizer, read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


class CheckpointError(ValueError):
    pass


DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class Reader:
    """A safetensors file read with ordinary reads (no mmap): header on open, then any tensor, or
    any block of its rows, on demand. Memory holds what was asked for and nothing else: file
    pages stay in the page cache, not in this process (safe_open's mmap would count them)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.f = open(path, "rb")
            (n,) = struct.unpack("<Q", self.f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(self.f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: not a readable safetensors file (its header is not a JSON object)")
        header.pop("__metadata__", None)
        for name, m in header.items():  # every entry checked once, so reads can trust it
            ok = isinstance(m, dict) and isinstance(m.get("shape"), list) and isinstance(m.get("data_offsets"), list) \
                and len(m["data_offsets"]) == 2 and all(type(x) is int and x >= 0 for x in m["shape"] + m["data_offsets"])
            if not ok:
                raise CheckpointError(f"{path}: tensor {name}: a malformed safetensors header entry {m!r}")
            if m.get("dtype") not in DTYPES:
                raise CheckpointError(f"{path}: tensor {name} has dtype {m.get('dtype')!r}, which nanopost does not read "
                                      f"(it reads {', '.join(DTYPES)})")
            begin, end = m["data_offsets"]
            size = torch.Size(m["shape"]).numel() * DTYPES[m["dtype"]].itemsize
            if end - begin != size:
                raise CheckpointError(f"{path}: tensor {name}: its data offsets span {end - begin} bytes, its shape "
                                      f"{m['shape']} and dtype {m['dtype']} take {size}")
        self.base = 8 + n
        self.meta = header

    def keys(self):
        return self.meta.keys()

    def shape(self, name):
        return tuple(self.meta[name]["shape"])

    def dtype(self, name):
        return DTYPES[self.meta[name]["dtype"]]

    def read(self, name, start=0, stop=None):
        """Rows [start, stop) of the leading axis (the whole tensor by default)."""
        shape, dtype = self.shape(name), self.dtype(name)
        begin, end = self.meta[name]["data_offsets"]
        rows = shape[0] if shape else 1
        stop = rows if stop is None else stop
        row_bytes = (end - begin) // max(rows, 1)
        out = torch.empty((stop - start,) + shape[1:] if shape else (), dtype=dtype)
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if buf is not None:
            self.f.seek(self.base + begin + start * row_bytes)
            if self.f.readinto(buf) != buf.size:
                raise CheckpointError(f"{self.path}: tensor {name} is truncated")
        return out


def resolve(path_or_hub_id: str) -> str:
    """A local directory as is; anything else is a hub id, downloaded (or found in the cache)."""
    recover(path_or_hub_id)
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id):
        raise CheckpointError(f"{path_or_hub_id}: not a checkpoint directory (a file)")
    # a hub id is "owner/name" (or a bare name); anything else that looks like a path is a missing folder
    if path_or_hub_id.startswith((".", "/", "~")) or path_or_hub_id.count("/") > 1 or "\\" in path_or_hub_id:
        raise CheckpointError(f"{path_or_hub_id}: no such directory")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path_or_hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
    except Exception as e:  # offline, unknown repo, gated repo: say which and why
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = ("HF_HUB_OFFLINE is set: only the local hub cache was searched" if offline else
                "Offline? Set HF_HUB_OFFLINE=1 to use the cache only")
        why = " ".join(str(e).split())[:300]
        parent = os.path.dirname(path_or_hub_id.rstrip("/"))
        if parent and os.path.isdir(parent):  # runs/sft-typo: most likely a folder, not a hub repo
            raise CheckpointError(f"{path_or_hub_id}: no such directory (nor a hub id that could be fetched: "
                                  f"{type(e).__name__}: {why}). {hint}, or check the path.") from e
        raise CheckpointError(f"{path_or_hub_id}: not a local directory and could not be fetched from the "
                              f"hub ({type(e).__name__}: {why}). {hint}, or pass a local directory.") from e


def read_config(ckpt_dir: str) -> Qwen2Config:
    file = os.path.join(ckpt_dir, "config.json")
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: missing")
    try:
        d = read_json(file)
    except ValueError as e:  # not valid JSON, or not an object: said as a checkpoint's error
        raise CheckpointError(str(e)) from e
    if d.get("model_type") != "qwen2":
        raise CheckpointError(f"{file}: model_type {d.get('model_type')!r} is not supported (nanopost "
                              "implements Qwen2: model_type 'qwen2')")
    try:
        return Qwen2Config.from_hf(d)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{file}: {e}") from e


INV_FREQ = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # a buffer older exports saved: recomputed, as transformers does


def weight_files(ckpt_dir: str) -> dict[str, str]:
    """tensor name -> safetensors file that holds it: model.safetensors, else the sharded index (the
    order transformers looks in, so a folder holding both loads the same weights)."""
    index, single = os.path.join(ckpt_dir, "model.safetensors.index.json"), os.path.join(ckpt_dir, "model.safetensors")
    if os.path.exists(index) and not os.path.exists(single):
        try:
            wmap = read_json(index).get("weight_map")
        except ValueError as e:  # not valid JSON, or not an object
            raise CheckpointError(str(e)) from e
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(f"{index}: no \"weight_map\" of tensor name -> file")
        files = {k: os.path.join(ckpt_dir, v) for k, v in wmap.items() if not INV_FREQ.search(k)}
        for f in set(files.values()):  # each shard must hold what the index says it does
            if not os.path.isfile(f):
                raise CheckpointError(f"{index} lists {os.path.basename(f)}, which is missing")
            absent = sorted(k for k, v in files.items() if v == f and k not in Reader(f).keys())
            if absent:
                raise CheckpointError(f"{index} puts {absent[:4]}{'...' if len(absent) > 4 else ''} in "
                                      f"{os.path.basename(f)}, which does not hold them")
        return files
    if not os.path.exists(single):
        raise CheckpointError(f"{ckpt_dir}: no model.safetensors or model.safetensors.index.json "
                              "(nanopost reads safetensors only)")
    return {k: single for k in Reader(single).keys() if not INV_FREQ.search(k)}


def load_model(ckpt_dir: str, dtype=torch.float32, device="cpu") -> Qwen2:
    """Build the model on the meta device and assign each tensor as it is read (converted to
    dtype): peak memory is the weights in `dtype` plus one tensor as stored."""
    cfg = read_config(ckpt_dir)
    with torch.device("meta"):
        model = Qwen2(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    files = weight_files(ckpt_dir)
    tied_copy = cfg.tie_word_embeddings and files.pop("lm_head.weight", None)  # some exporters write it
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    missing, extra = sorted(expected.keys() - files.keys()), sorted(files.keys() - expected.keys())
    if missing or extra:
        where = sorted(set(files.values())) or [ckpt_dir]
        hint = (" (config.json leaves tie_word_embeddings false or unset; set it to true if the head is "
                "model.embed_tokens.weight)" if missing == ["lm_head.weight"] else "")
        raise CheckpointError(f"{', '.join(where)}: tensors do not match the Qwen2 config: "
                              f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected {extra[:8]}{'...' if len(extra) > 8 else ''}{hint}")
    emb = "model.embed_tokens.weight"
    if tied_copy and not torch.equal(Reader(tied_copy).read("lm_head.weight"), Reader(files[emb]).read(emb)):
        raise CheckpointError(f"{tied_copy}: tensor lm_head.weight differs from {emb}, but config.json sets "
                              "tie_word_embeddings: true, so it would be left unused (set it to false to use it)")
    state = {}
    by_file = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        f = Reader(file)
        for name in names:
            if f.shape(name) != tuple(expected[name]):
                raise CheckpointError(f"{file}: tensor {name} has shape {f.shape(name)}, the config "
                                      f"expects {tuple(expected[name])}")
        for name in names:
            state[name] = f.read(name).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_tokenizer(d: str) -> Tokenizer:
    """A checkpoint folder's tokenizer; a broken tokenizer_config.json or generation_config.json is
    a CheckpointError naming the file (the scripts report those in one line, without a traceback)."""
    try:
        return Tokenizer(d)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load(path_or_hub_id: str, dtype=torch.float32, device="cpu"):
    """-> (model, tokenizer) from a local Hugging Face checkpoint directory or a hub id."""
    d = resolve(path_or_hub_id)
    read_config(d)  # a broken config.json is named before the tokenizer reads its eos ids from it
    tokenizer = load_tokenizer(d)
    return load_model(d, dtype, device), tokenizer


def atomic_dir(out_dir, inside=False):
    """A new folder beside out_dir to write into before commit_dir moves it into place; with the
    permissions any other new folder gets (mkdtemp's 0700 would hide a model from the rest of a team).
    inside: within out_dir instead, for commit_files, whose moves must stay on out_dir's filesystem
    (out_dir may be a mount point or a link to another disk, where a move from beside it fails)."""
    # a mount point (a container's output volume) cannot be renamed aside, a link would be replaced by
    # the folder, and a folder we may write in, but not beside, cannot be either: written inside them
    # (commit_dir then replaces what they hold)
    beside, bare = os.path.dirname(os.path.abspath(out_dir)), out_dir.rstrip(os.sep) or os.sep  # (a link/ is no link)
    inside = inside or os.path.isdir(out_dir) and (os.path.ismount(bare) or os.path.islink(bare)
                                                   or not os.access(beside, os.W_OK | os.X_OK))
    parent = out_dir if inside else beside
    os.makedirs(parent, exist_ok=True)
    prefix = ".tmp-save-" if inside else ".tmp-" + os.path.basename(os.path.abspath(out_dir)) + "-"
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def unwritable(out_dir: str, *inside: str, flag: str = "--out") -> str | None:
    """Why `flag` out_dir cannot be written (or, not there yet, created), else None: asked before any
    work, not found by a traceback once the model is loaded or a step has run. inside: folders in it
    that are written too, where they exist (a run's checkpoints/)."""
    name = f"{flag} {out_dir}".strip()
    if os.path.isdir(out_dir):  # (no test folder inside it: another rank may be listing it right now)
        for d in (out_dir, *inside):
            if os.path.isdir(d) and not os.access(d, os.W_OK | os.X_OK):
                return f"{name}: {'' if d == out_dir else d + ' '}not writable"
        return None
    parent = os.path.abspath(out_dir)
    while not os.path.lexists(parent):  # the nearest folder that exists: can we create ours in it?
        parent = os.path.dirname(parent)
    if os.path.islink(parent) and not os.path.exists(parent):
        return f"{name}: {parent} is a symbolic link to a folder that does not exist"
    if not os.path.isdir(parent):
        return f"{name}: {parent} is a file, not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".nanopost-write-check-", dir=parent))
    except OSError as e:
        return f"{name}: cannot write in {parent} ({e.strerror})"
    return None


def umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def same_folder(a: str, b: str) -> bool:
    """Two paths naming one folder: equal as given, or the same local folder however it is spelled
    (a trailing slash, ./, a symlink to it)."""
    return a == b or os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def within(path: str, folder: str) -> bool:
    """path is folder itself or lies inside it (by real paths)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


LEFTOVER = r"\.tmp-save-[a-z0-9_]{8}"  # atomic_dir(inside=True)'s folder: what a save into out_dir a kill cut short left


def remove_unfinished(out_dir):
    """Remove what saves of out_dir that a kill cut short left beside it (atomic_dir's folders:
    a whole model, with its optimizer state for a checkpoint); only out_dir's, matched by mkdtemp's
    8-character suffix, never another's (runs/sft-b's when out_dir is runs/sft)."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    for d in os.listdir(parent) if os.path.isdir(parent) else []:
        if re.fullmatch(re.escape(f".tmp-{name}-") + r"[a-z0-9_]{8}", d):
            shutil.rmtree(os.path.join(parent, d), ignore_errors=True)
    for d in os.listdir(out_dir) if os.path.isdir(out_dir) else []:  # atomic_dir(inside=True)'s
        if re.fullmatch(LEFTOVER, d):
            shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)


_HELD = {}  # real path -> the descriptor whose lock this process holds (hold_folder)


def _lock_now(fd: int) -> bool:
    """Take the lock of the folder open as fd; -> False if another process holds it (True too on a
    filesystem that cannot lock, some network mounts: not refused)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN)
    return True


def _open_folder(path: str) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def hold_folder(path: str) -> bool:
    """Lock the folder `path` for this process, while it writes there; -> False when another process
    holds it (a second training run started on the same --out). The lock is on the folder itself
    (flock: no lock file is left behind) and goes with the process, however it ends (kill -9 too),
    or with let_go_of_folders."""
    key = os.path.realpath(path)
    if key in _HELD:
        return True
    fd = _open_folder(path)
    if not _lock_now(fd):
        os.close(fd)
        return False
    _HELD[key] = fd
    return True


def let_go_of_folders() -> None:
    """Release every hold_folder lock of this process (a script's main, when it ends: tests run several in one)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


@contextlib.contextmanager
def folder_lock(path: str, patience: float = 60, log=print):
    """Wait for, then hold, the folder's lock for the block: a read-merge-write of a file that several
    processes add to (evaluate.py's results.json, when runs of several models share one --out; each
    holds it for moments). Held longer than `patience` seconds (a training run writing there holds it
    for hours): TimeoutError, said rather than waited for in silence."""
    fd = _open_folder(path)
    try:
        waited = 0.0
        while not _lock_now(fd):
            if waited == 0:
                log(f"{path}: another process is writing there; waiting (at most {patience:.0f} s)", flush=True)
            if waited >= patience:
                raise TimeoutError(f"{path}: another process held it for {patience:.0f} s")
            time.sleep(0.2)
            waited += 0.2
        yield
    finally:
        os.close(fd)


def _aside(out_dir):
    """Where commit_dir moves an earlier out_dir: a fixed name beside it, so a crash cannot lose it."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    return os.path.join(parent, ".old-" + name)


def recover(out_dir):
    """Finish a commit_dir that a crash cut short: with out_dir missing, the old checkpoint moves
    back from beside it; with out_dir there, the one moved aside is stale and goes."""
    old = _aside(out_dir)
    if os.path.exists(old):
        if os.path.exists(out_dir):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, out_dir)


FULL_DISK_TEXTS = ("No space left on device", "Disk quota exceeded", "database or disk is full")


def disk_full(e: BaseException) -> bool:
    """An error that says the disk (or the quota) is full: an OSError, or safetensors', tokenizers'
    and sqlite's own errors, which carry the OS error as text only."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(t in str(e) for t in FULL_DISK_TEXTS)


def raise_if_disk_full(e: BaseException, path: str) -> None:
    """A library's full-disk error raised as the OSError it is, naming the file being written."""
    if disk_full(e) and not (isinstance(e, OSError) and e.filename):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from e


def save_tensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the permissions of any other file we write (safetensors 0.8
    creates 0600 files: a shared model folder became unreadable to the rest of a team). Its error
    for a full disk names no file: raised here as the OSError it is, with the path."""
    with writing(path):
        save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~umask())


@contextlib.contextmanager
def writing(path: str):
    """A full disk inside names `path`: a write, flush or close of an open file raises an OSError
    that names none ("No space left on device", and no word of which file), and safetensors',
    tokenizers' and sqlite's errors say it in their text only."""
    try:
        yield
    except Exception as e:
        raise_if_disk_full(e, path)
        raise


@contextlib.contextmanager
def closing_named(f):
    """`with open(...) as f` whose close (the flush of what a full disk refused) names the file."""
    try:
        yield f
    finally:
        with writing(f.name):
            f.close()


@contextlib.contextmanager
def whole_file(path: str):
    """-> a temporary path beside `path` to write to; renamed over `path` when the block ends, and
    removed if the block fails (a full disk, an error, Ctrl-C): `path` is then the old file or the
    whole new one, never a part of one (a kill -9 can leave the temporary file, never a cut `path`).
    A full disk's error names `path`."""
    tmp = path + ".tmp"
    try:
        with writing(path):
            yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def commit_dir(tmp, out_dir):
    """Move the finished directory tmp (beside out_dir) to out_dir, replacing an earlier one.
    A crash leaves the old or the new checkpoint, as resolve and the next commit_dir see it (both
    call recover first): before (1), out_dir is the old one and tmp is garbage; between (1) and
    (2), out_dir is missing and the old one lies whole at .old-NAME, which recover moves back;
    after (2), out_dir is the new one, and a leftover .old-NAME (whole or half removed) goes.
    A tmp inside out_dir (atomic_dir's choice for a mount point or a link): out_dir's other entries go,
    config.json first, then tmp's files move in (commit_files); a crash in between leaves a folder
    that is no checkpoint, never a mix."""
    tmp = os.path.abspath(tmp)
    if os.path.dirname(tmp) == os.path.abspath(out_dir):
        for n in sorted(os.listdir(out_dir), key=lambda n: n != "config.json"):
            path = os.path.join(os.path.abspath(out_dir), n)
            if path != tmp:
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        return commit_files(tmp, out_dir)
    recover(out_dir)
    if os.path.exists(out_dir):
        os.rename(out_dir, _aside(out_dir))  # (1)
    os.rename(tmp, out_dir)  # (2)
    shutil.rmtree(_aside(out_dir), ignore_errors=True)


def remove_model_files(out_dir):
    """Remove a saved model from out_dir, keeping its other files: config.json first (so it stops
    looking like a checkpoint), then the weight files (model*.safetensors and their index) and the
    tokenizer's (an old chat_template.jinja that the new model's tokenizer lacks would be read with it)."""
    for n in ["config.json"] + sorted(os.listdir(out_dir)):
        if (n in ("config.json", "generation_config.json") + TOKENIZER_FILES
                or n.startswith("model") and n.endswith((".safetensors", ".safetensors.index.json"))) \
                and os.path.isfile(os.path.join(out_dir, n)):
            os.remove(os.path.join(out_dir, n))


def commit_files(tmp, out_dir):
    """Move the files of the finished directory tmp into out_dir, keeping out_dir's other files
    (metrics.jsonl, checkpoints/). An earlier save's model goes first (remove_model_files: a stale
    shard or index would be read with the new ones); the new files move in, config.json last. A
    crash in between leaves a directory without config.json, never one that loads a mix of old
    and new weights."""
    remove_model_files(out_dir)
    for n in sorted(os.listdir(tmp), key=lambda n: n == "config.json"):
        os.replace(os.path.join(tmp, n), os.path.join(out_dir, n))
    os.rmdir(tmp)


def save(model: Qwen2, tokenizer: Tokenizer | None, out_dir: str, max_shard_bytes: int = 2 * 1024**3,
         dtype=None, extra_files: dict | None = None, state_dict: dict | None = None, keep_other_files=False):
    """Write model (+ tokenizer files) in the Hugging Face layout, atomically. dtype: the dtype
    stored (default: the model's). extra_files: name -> text, or a function that writes the
    file given its path (e.g. args.json, trainer_state.json), inside the same atomic write.
    state_dict: the weights to write instead of model.state_dict() (e.g. gathered from FSDP2
    shards); the model then only supplies the config. keep_other_files: write into an existing
    out_dir file by file (commit_files), keeping what else it holds, instead of replacing it."""
    in_place = keep_other_files and os.path.isdir(out_dir)
    tmp = atomic_dir(out_dir, inside=in_place)
    try:
        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous()
                 for k, v in (model.state_dict() if state_dict is None else state_dict).items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        shards, cur, size = [], {}, 0
        for k, v in state.items():
            n = v.numel() * v.element_size()
            if cur and size + n > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = v, size + n
        shards.append(cur)
        if len(shards) == 1:
            save_tensors(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            wmap = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_tensors(shard, os.path.join(tmp, name), metadata={"format": "pt"})
                wmap.update({k: name for k in shard})
            total = sum(v.numel() * v.element_size() for v in state.values())
            _write_json(os.path.join(tmp, "model.safetensors.index.json"),
                        {"metadata": {"total_size": total}, "weight_map": wmap})
        any_param = next(iter(state.values()))
        cfg = {**model.config.to_hf(), "torch_dtype": str(any_param.dtype).removeprefix("torch.")}
        _write_json(os.path.join(tmp, "config.json"), cfg)
        if tokenizer is not None:
            for name in TOKENIZER_FILES + ("generation_config.json",):
                src = os.path.join(tokenizer.path, name)
                if os.path.exists(src):
                    shutil.copyfile(src, os.path.join(tmp, name))
            if not os.path.exists(os.path.join(tmp, "generation_config.json")):
                _write_json(os.path.join(tmp, "generation_config.json"),
                            {"eos_token_id": tokenizer.eos_ids, "pad_token_id": tokenizer.pad_id})
        for name, content in (extra_files or {}).items():
            if callable(content):
                content(os.path.join(tmp, name))
            else:
                with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                    f.write(content)
        if in_place:
            commit_files(tmp, out_dir)
        else:
            commit_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
