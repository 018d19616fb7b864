"""--download: the original files (built here in each source's own archive format, since this
machine is offline) are unpacked into the layout the tasks read; failures leave nothing behind."""
import functools
import gzip
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile

import pytest

from nanopost import tasks
from nanopost.tasks.download import SOURCES, DownloadError, download

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [f'{i},"问题 {i}, with a comma",甲{i},乙,丙,丁,{"ABCD"[i % 4]}\n' for i in range(6)]
MMLU_ROWS = "".join(r.split(",", 1)[1] for r in ROWS)  # MMLU has no id column and no header
CMMLU = ",Question,A,B,C,D,Answer\n" + "".join(ROWS)
CEVAL = "id,question,A,B,C,D,answer,explanation\n" + "".join(r.rstrip("\n") + ",because\n" for r in ROWS)
GSM8K = [{"question": f"What is {n} + {n}?", "answer": f"{n}+{n}=<<{n}+{n}={2 * n}>>{2 * n}\n#### {2 * n}"} for n in range(5)]
HUMANEVAL = [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n",
              "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(1, 2) == 3\n",
              "entry_point": "add"}]


def _zip(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A folder holding every original file under its own name, in its own format."""
    d = tmp_path_factory.mktemp("mirror")
    for split in ("train", "test"):
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
    with tarfile.open(d / "data.tar", "w") as t:  # Hendrycks' data.tar: data/<split>/<subject>_<split>.csv
        files = {f"data/{s}/{sub}_{s}.csv": MMLU_ROWS for s in ("dev", "val", "test") for sub in ("abstract_algebra", "anatomy")}
        files["data/README.txt"] = "not a benchmark file"
        files["data/test/../../escape_test.csv"] = "hostile path"
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            t.addfile(info, io.BytesIO(text.encode()))
    _zip(d / "cmmlu_v1_0_1.zip", {f"{s}/{sub}.csv": CMMLU for s in ("dev", "test") for sub in ("agronomy", "anatomy")})
    _zip(d / "ceval-exam.zip", {f"{s}/{sub}_{s}.csv": CEVAL for s in ("dev", "val", "test")
                                for sub in ("accountant", "art_studies")} | {"__MACOSX/val/._x_val.csv": "junk"})
    with gzip.open(d / "HumanEval.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in HUMANEVAL))
    # every file the real sources name is here
    assert {u.rsplit("/", 1)[-1] for urls in SOURCES.values() for u in urls} <= set(os.listdir(d))
    return str(d)


def test_every_benchmark_from_a_mirror_folder(tmp_path, mirror):
    data = tmp_path / "bench"
    for task in tasks.NAMES:
        msg = download(task, str(data), mirror=mirror, log=lambda *a: None)
        assert "note: the original has" in msg  # our miniature files are not the originals' size
    assert sorted(os.listdir(data)) == sorted(tasks.NAMES)  # no staging folder left behind
    assert not (tmp_path / "escape_test.csv").exists() and not (data / "escape_test.csv").exists()
    assert sorted(os.listdir(data / "mmlu")) == ["dev", "mapping.json", "test", "val"]
    mmlu = tasks.load("mmlu", str(data))[0]
    assert len(mmlu) == 12 and mmlu[0]["subject"] == "abstract_algebra" and mmlu[0]["category"] == "STEM"
    assert mmlu[1]["answer"] == "B" and "问题 1, with a comma" in mmlu[1]["messages"][0]["content"]
    cmmlu = tasks.load("cmmlu", str(data), shots=5)[0]
    assert len(cmmlu) == 12 and "农学" in cmmlu[0]["messages"][0]["content"]  # display name from the shipped mapping
    ceval = tasks.load("ceval", str(data))[0]
    assert len(ceval) == 12 and {e["subject"] for e in ceval} == {"accountant", "art_studies"}
    assert [e["answer"] for e in tasks.load("gsm8k", str(data))[0]] == ["0", "2", "4", "6", "8"]
    assert tasks.load("humaneval", str(data))[0][0]["id"] == "HumanEval/0"
    # present benchmarks are skipped, and --force replaces them
    assert "skipped" in download("mmlu", str(data), mirror=mirror)
    assert "skipped" not in download("mmlu", str(data), mirror=mirror, force=True, log=lambda *a: None)
    assert len(tasks.load("mmlu", str(data))[0]) == 12


@pytest.mark.parametrize("bars", ["on", "off"])
def test_over_http(tmp_path, mirror, bars, monkeypatch):
    """Also with progress bars off (TQDM_DISABLE=1, as in CI jobs): the bytes are counted by fetch
    itself, not by the bar (whose count stays 0 when disabled: every download read as cut short)."""
    if bars == "off":  # (tqdm reads TQDM_DISABLE when it is imported: set what it sets)
        import nanopost.tasks.download as module
        monkeypatch.setattr(module, "tqdm", functools.partial(module.tqdm, disable=True))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=mirror)
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        download("ceval", str(tmp_path), mirror=url, log=lambda *a: None)
        download("humaneval", str(tmp_path), mirror=url, log=lambda *a: None)
    finally:
        server.shutdown()
    assert len(tasks.load("ceval", str(tmp_path))[0]) == 12
    assert len(tasks.load("humaneval", str(tmp_path))[0]) == 1


def test_failures_leave_nothing_behind(tmp_path, mirror):
    data = tmp_path / "bench"
    with pytest.raises(DownloadError, match=r"could not fetch http://127\.0\.0\.1:9/data\.tar.*--mirror"):
        download("mmlu", str(data), mirror="http://127.0.0.1:9", log=lambda *a: None)
    assert os.listdir(data) == []
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cmmlu_v1_0_1.zip").write_bytes(b"this is not an archive")
    with pytest.raises(DownloadError, match="neither a zip nor a tar"):
        download("cmmlu", str(data), mirror=str(bad), log=lambda *a: None)
    _zip(bad / "ceval-exam.zip", {"readme.md": "no csv here"})
    with pytest.raises(DownloadError, match="holds no"):
        download("ceval", str(data), mirror=str(bad), log=lambda *a: None)
    (bad / "test.jsonl").write_text('{"question": "no answer field"}\n')
    (bad / "train.jsonl").write_text("")
    with pytest.raises(DownloadError, match="expected layout"):
        download("gsm8k", str(data), mirror=str(bad), log=lambda *a: None)
    with pytest.raises(DownloadError, match="not found"):
        download("humaneval", str(data), mirror=str(bad), log=lambda *a: None)
    assert os.listdir(data) == []


def test_cut_connections_damaged_archives_and_a_partial_folder(tmp_path, mirror):
    """A server that closes before the length it announced (read() just ends), or inside a chunk
    (IncompleteRead), damaged deflate data (zlib.error), and a task folder that is there but partial:
    each a DownloadError, and nothing landed or removed."""
    body = open(os.path.join(mirror, "test.jsonl"), "rb").read()

    class Cut(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            if "chunked" in self.path:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n" % (len(body) * 4) + body)  # a chunk announced longer than sent
            else:
                self.send_header("Content-Length", str(len(body) * 4))
                self.end_headers()
                self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cut)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    data = tmp_path / "bench"
    try:
        for kind, why in (("length", f"after {len(body)} of {len(body) * 4} bytes"), ("chunked", "IncompleteRead")):
            with pytest.raises(DownloadError, match=f"could not fetch .*{why}"):
                download("gsm8k", str(data), mirror=f"http://127.0.0.1:{server.server_address[1]}/{kind}",
                         log=lambda *a: None)
    finally:
        server.shutdown()
    assert os.listdir(data) == []
    bad = tmp_path / "bad"
    bad.mkdir()
    raw = bytearray(gzip.compress(open(os.path.join(mirror, "test.jsonl"), "rb").read() * 50))
    raw[40:60] = bytes(b ^ 0xFF for b in raw[40:60])
    (bad / "HumanEval.jsonl.gz").write_bytes(bytes(raw))
    with pytest.raises(DownloadError, match="humaneval: could not unpack"):
        download("humaneval", str(data), mirror=str(bad), log=lambda *a: None)
    assert os.listdir(data) == []
    raw = open(os.path.join(mirror, "data.tar"), "rb").read()
    with tarfile.open(os.path.join(mirror, "data.tar")) as t:  # every CSV whole, cut inside a later header
        later = next(m.offset for m in t.getmembers() if m.name.endswith("README.txt"))
    gz = tmp_path / "gz"  # whole, but gzipped: its zero blocks are in the decompressed stream
    gz.mkdir()
    (gz / "data.tar").write_bytes(gzip.compress(raw))
    download("mmlu", str(tmp_path / "gz-bench"), mirror=str(gz), log=lambda *a: None)
    assert len(tasks.load("mmlu", str(tmp_path / "gz-bench"))[0]) == 12
    for cut in (later + 100, later):  # inside a header; at one (every member before it whole, no end blocks)
        (bad / "data.tar").write_bytes(raw[:cut])
        with pytest.raises(DownloadError, match="cut short"):  # (tarfile read it as the archive's end)
            download("mmlu", str(data), mirror=str(bad), log=lambda *a: None)
        assert os.listdir(data) == []
    (data / "gsm8k").mkdir()  # train.jsonl missing, and a file of the user's beside test.jsonl
    (data / "gsm8k" / "test.jsonl").write_text("mine")
    (data / "gsm8k" / "notes.txt").write_text("mine")
    with pytest.raises(DownloadError, match="exists but does not hold the whole benchmark"):
        download("gsm8k", str(data), mirror=mirror, log=lambda *a: None)
    assert sorted(os.listdir(data / "gsm8k")) == ["notes.txt", "test.jsonl"]
    # a choice benchmark is there only with both its few-shot (dev) and its question folders, neither empty
    for made in ({"dev": [], "test": []}, {"test": ["anatomy_test.csv"]}):
        shutil.rmtree(data / "mmlu", ignore_errors=True)
        for split, files in made.items():
            (data / "mmlu" / split).mkdir(parents=True)
            for f in files:
                (data / "mmlu" / split / f).write_text("q,a,b,c,d,A\n")
        with pytest.raises(DownloadError, match="exists but does not hold the whole benchmark"):
            download("mmlu", str(data), mirror=mirror, log=lambda *a: None)


def test_cli(tmp_path, mirror):
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *map(str, a)],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run("--download", "--tasks", "gsm8k,humaneval", "--data-dir", tmp_path / "d", "--mirror", mirror)
    assert r.returncode == 0, r.stderr
    assert "gsm8k: 5 questions" in r.stdout and sorted(os.listdir(tmp_path / "d")) == ["gsm8k", "humaneval"]
    r = run("--download", "--tasks", "mmlu", "--data-dir", tmp_path / "e", "--mirror", "http://127.0.0.1:9")
    assert r.returncode != 0 and "error: could not fetch" in r.stderr and "Traceback" not in r.stderr
    r = run("--tasks", "mmlu")
    assert r.returncode != 0 and "--model" in r.stderr
