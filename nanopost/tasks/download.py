"""Fetch the benchmarks from their original public sources into the layout the tasks read
(each benchmark's own file layout, as its authors distribute it):

    gsm8k/{train,test}.jsonl            openai/grade-school-math on GitHub
    mmlu/{dev,val,test}/<s>_<split>.csv Hendrycks' data.tar (people.eecs.berkeley.edu)
    cmmlu/{dev,test}/<s>.csv            haonan-li/cmmlu on the Hugging Face hub (cmmlu_v1_0_1.zip)
    ceval/{dev,val,test}/<s>_<split>.csv ceval/ceval-exam on the Hugging Face hub (ceval-exam.zip)
    humaneval/HumanEval.jsonl           openai/human-eval on GitHub (HumanEval.jsonl.gz)

mmlu/, cmmlu/ and ceval/ also get mapping.json (subject -> display name and category), shipped
with nanopost in nanopost/tasks/mappings/.

Each benchmark is fetched and unpacked into a staging folder inside the data dir, checked by
loading it with its task loader, and only then moved into place, so an interrupted or failed
download (a connection cut short, a damaged archive) never leaves a half-written benchmark behind.
Benchmarks already present are skipped; a task folder that is there but incomplete is refused, never
replaced (it may hold the user's own files).

Machines without internet: fetch the original files elsewhere (the URLs are in SOURCES) and pass
`mirror=` (evaluate.py --mirror) as a local folder or http(s) URL that holds them by file name."""
import gzip
import http.client
import json
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib

from tqdm import tqdm

from nanopost import tasks
from nanopost.tasks.choice import MAPPINGS, SPLITS

GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
SOURCES = {
    "gsm8k": [GSM8K + "train.jsonl", GSM8K + "test.jsonl"],
    "mmlu": ["https://people.eecs.berkeley.edu/~hendrycks/data.tar"],
    "cmmlu": ["https://huggingface.co/datasets/haonan-li/cmmlu/resolve/main/cmmlu_v1_0_1.zip"],
    "ceval": ["https://huggingface.co/datasets/ceval/ceval-exam/resolve/main/ceval-exam.zip"],
    "humaneval": ["https://github.com/openai/human-eval/raw/master/data/HumanEval.jsonl.gz"],
}
# what the originals hold: (questions in the evaluated split, subjects); a mismatch is reported
EXPECTED = {"gsm8k": (1319, None), "mmlu": (14042, 57), "cmmlu": (11582, 67), "ceval": (1346, 52), "humaneval": (164, None)}
# archive members kept for each choice benchmark: (split, subject) from the member's path
MEMBERS = {
    "mmlu": re.compile(r"(?:^|/)(dev|val|test)/(\w+)_(?:dev|val|test)\.csv$"),
    "cmmlu": re.compile(r"(?:^|/)(dev|test)/(\w+)\.csv$"),
    "ceval": re.compile(r"(?:^|/)(dev|val|test)/(\w+)_(?:dev|val|test)\.csv$"),
}


class DownloadError(Exception):
    pass


def present(task: str, data_dir: str) -> bool:
    """Whether data_dir already holds the files the task reads."""
    root = os.path.join(data_dir, task)
    if task == "gsm8k":
        return all(os.path.isfile(os.path.join(root, f)) for f in ("train.jsonl", "test.jsonl"))
    if task == "humaneval":
        return os.path.isfile(os.path.join(root, "HumanEval.jsonl"))
    return all(os.path.isdir(os.path.join(root, s)) and os.listdir(os.path.join(root, s)) for s in ("dev", SPLITS[task]))


def fetch(url: str, dest: str, mirror: str | None = None, timeout: float = 60.0) -> str:
    """Copy url (or the file of the same name in `mirror`, a folder or a base URL) to dest,
    with a progress bar. Raises DownloadError naming what could not be fetched and why."""
    name = url.rsplit("/", 1)[-1]
    if mirror and not re.match(r"^https?://", mirror):
        src = os.path.join(mirror, name)
        if not os.path.isfile(src):
            raise DownloadError(f"{src}: not found (the mirror folder must hold {name}, from {url})")
        shutil.copyfile(src, dest)
        return dest
    if mirror:
        url = mirror.rstrip("/") + "/" + name
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "nanopost"}), timeout=timeout) as r, \
                open(dest, "wb") as f:
            got, size = 0, int(r.headers.get("Content-Length") or -1)
            with tqdm(total=size if size > 0 else None, unit="B", unit_scale=True, desc=name, leave=False) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            if size >= 0 and got != size:  # the server closed early: read() just ends
                raise OSError(f"the connection ended after {got} of {size} bytes")
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:  # IncompleteRead: a cut chunk
        reason = getattr(e, "reason", None) or e
        raise DownloadError(f"could not fetch {url}: {reason}. If this machine is offline, fetch {name} elsewhere "
                            f"and pass --mirror DIR holding it, or copy the benchmark folder into the data dir "
                            f"yourself (layout: nanopost/tasks/download.py)") from None
    return dest


def unpack(task: str, files: list[str], out: str) -> None:
    """Turn the fetched originals into the task's layout under `out` (the task's folder)."""
    os.makedirs(out)
    try:
        if task == "gsm8k":
            for f in files:
                shutil.copyfile(f, os.path.join(out, os.path.basename(f)))
        elif task == "humaneval":
            with gzip.open(files[0], "rb") as src, open(os.path.join(out, "HumanEval.jsonl"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            archive = files[0]
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z:
                    members = [(m, lambda m=m: z.read(m)) for m in z.namelist()]
                    _write_members(task, members, out)
            elif tarfile.is_tarfile(archive):
                with tarfile.open(archive) as t:
                    members = [(m.name, lambda m=m: t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]
                    _write_members(task, members, out)
                    t.fileobj.seek(t.offset)  # tarfile reads a header cut short as the archive's end: a whole
                    rest = t.fileobj.read()  # one ends in zero blocks after its last member (also when compressed)
                    if len(rest) < 1024 or rest.strip(b"\0"):
                        last = t.getmembers()[-1].name if t.getmembers() else "-"
                        raise DownloadError(f"{os.path.basename(archive)}: the tar archive is cut short (no "
                                            f"end-of-archive blocks after its last member, {last})")
            else:
                raise DownloadError(f"{archive}: neither a zip nor a tar archive")
            shutil.copyfile(os.path.join(MAPPINGS, f"{task}.json"), os.path.join(out, "mapping.json"))
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile, tarfile.TarError, gzip.BadGzipFile) as e:
        raise DownloadError(f"{task}: could not unpack {', '.join(map(os.path.basename, files))}: {e}") from None


def _write_members(task, members, out):
    """Copy only the CSV members that match the benchmark's layout (never a path from the archive
    itself, so a hostile archive cannot write outside `out`)."""
    n = 0
    for name, read in members:
        m = MEMBERS[task].search(name)
        if m and "__MACOSX" not in name:
            split, subject = m.groups()
            file = f"{subject}.csv" if task == "cmmlu" else f"{subject}_{split}.csv"
            os.makedirs(os.path.join(out, split), exist_ok=True)
            with open(os.path.join(out, split, file), "wb") as f:
                f.write(read())
            n += 1
    if not n:
        raise DownloadError(f"{task}: the archive holds no {MEMBERS[task].pattern} files")


def download(task: str, data_dir: str, mirror: str | None = None, force: bool = False, log=print) -> str:
    """Fetch one benchmark into data_dir/task (skipped when already there unless force).
    Returns what was done, e.g. 'mmlu: 14042 questions in 57 subjects'."""
    if task not in SOURCES:
        raise DownloadError(f"unknown task {task!r} (known: {', '.join(SOURCES)})")
    final = os.path.join(data_dir, task)
    if present(task, data_dir) and not force:
        return f"{task}: already in {final} (skipped)"
    if os.path.exists(final) and not force:  # never replaced without being asked: it may hold files of the user's
        raise DownloadError(f"{final} exists but does not hold the whole benchmark; nothing in it was changed: move it "
                            f"away (or complete it by hand: the layout is in nanopost/tasks/download.py) and run again")
    os.makedirs(data_dir, exist_ok=True)
    stage = os.path.join(data_dir, f".download-{task}")
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(os.path.join(stage, "raw"))
    names = [url.rsplit("/", 1)[-1] for url in SOURCES[task]]
    where = ", ".join(os.path.join(mirror, n) if mirror else u for n, u in zip(names, SOURCES[task]))
    try:
        files = []
        for url in SOURCES[task]:
            log(f"{task}: fetching {url if not mirror else os.path.basename(url) + ' from ' + mirror}")
            files.append(fetch(url, os.path.join(stage, "raw", url.rsplit("/", 1)[-1]), mirror))
        try:
            unpack(task, files, os.path.join(stage, task))
            examples = tasks.load(task, stage)[0]  # the check that counts: the task's own loader reads it
        except (OSError, ValueError, KeyError, IndexError, json.JSONDecodeError, DownloadError) as e:
            why = str(e).replace(os.path.join(stage, task) + os.sep, "").replace(os.path.join(stage, "raw") + os.sep, "")
            why = why.removeprefix(f"{task}: ")  # (said once, below)
            kind = "" if isinstance(e, DownloadError) else f"the files do not have the expected layout ({type(e).__name__}): "
            raise DownloadError(f"{task}: {kind}{why} (fetched from {where}; nothing was written to {final})") from None
        if not examples:
            raise DownloadError(f"{task}: the fetched files hold no questions")
        subjects = len({e["subject"] for e in examples if "subject" in e}) or None
        what = f"{task}: {len(examples)} questions" + (f" in {subjects} subjects" if subjects else "")
        if (len(examples), subjects) != EXPECTED[task]:
            n, s = EXPECTED[task]
            what += f" (note: the original has {n}" + (f" in {s} subjects" if s else "") + ")"
        if os.path.exists(final):  # --force: the old copy is removed only once the new one is in place
            os.replace(final, os.path.join(stage, "old"))
        os.replace(os.path.join(stage, task), final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return what + f" -> {final}"
