"""build_data.py end to end on the tiny random model (its replies are garbage: the path where the
teacher fails every check), over HTTP against a scripted fake server and nanopost.serve, the
request cache, garbage and unreachable teachers, and SIGKILL in the middle of every stage."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from nanopost.data import load_kto, load_sft
from nanopost.testing import load_script, run_main
from nanopost.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "build_data.py")
FIXTURE = os.path.join(ROOT, "tests", "data", "gsm8k_train_sample.jsonl")
FAST = ["--max-new-tokens", "12", "--json-max-tokens", "12", "--retries", "1", "--min-label-count", "1",
        "--batch-size", "16", "--seed", "0"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """16 rows: 10 GSM8K-style, an exact and a near duplicate, 4 in the other source formats."""
    rows = open(FIXTURE, encoding="utf-8").read().splitlines()
    path = tmp_path_factory.mktemp("src") / "sources.jsonl"
    path.write_text("\n".join(rows[:10] + rows[24:]) + "\n")
    return str(path)


def read(path):
    return open(path, encoding="utf-8").read()


def check_outputs(out, tiny):
    tok = Tokenizer(tiny)
    sft, _ = load_sft([os.path.join(out, "sft.jsonl")], tok, 4096)
    kto, stats = load_kto([os.path.join(out, "kto.jsonl")], tok, 4096)
    assert sft[0] and kto and 0 < stats["desirable"] < len(kto)
    assert os.path.exists(os.path.join(out, "report.md"))
    return [json.loads(x) for x in read(os.path.join(out, "sft.jsonl")).splitlines()], \
        [json.loads(x) for x in read(os.path.join(out, "kto.jsonl")).splitlines()]


@pytest.fixture(scope="module")
def baseline(tiny, sources, tmp_path_factory):
    """One uninterrupted in-process run with the tiny model as teacher and student."""
    out = str(tmp_path_factory.mktemp("base") / "out")
    t0 = time.time()
    r = run_main(SCRIPT, "--teacher", tiny, "--student", tiny, "--sources", sources, "--out", out, *FAST)
    assert r.returncode == 0, r.stderr
    return out, time.time() - t0


def test_in_process_garbage_teacher(baseline, tiny):
    out, seconds = baseline
    sft, kto = check_outputs(out, tiny)
    # the tiny teacher never ends a reply (every one is cut off at the token limit) nor writes valid
    # JSON: every label, judgment and safety check failed and was counted; the rows kept their rule
    # category and the original (gold-correct) responses won
    report = read(os.path.join(out, "report.md"))
    assert "truncated" in report
    n_scored = len(read(os.path.join(out, "7_score.jsonl")).splitlines())
    failed = re.search(r"^\| 7 score \| [^|]*truncated[^|]* \| (\d+) \|$", report, re.M)
    assert failed and int(failed.group(1)) == n_scored, report  # items, not responses x checks (it said 2 x 3 x items)
    labels = [json.loads(x) for x in read(os.path.join(out, "4_label.jsonl")).splitlines()]
    assert all(r["label_source"] == "rule" and r["failures"] and r["prompt_version"] for r in labels)
    assert all(r["chosen"]["source"] == "original" and r["chosen"]["judge"] is None for r in sft)
    assert len(sft) == 14  # 16 rows - 1 exact duplicate - 1 near duplicate
    assert {r["label"] for r in kto} == {True, False}
    # the student (the same model) is cut off too: its replies are marked so, and never chosen
    student = [x for line in read(os.path.join(out, "6_respond.jsonl")).splitlines()
               for x in json.loads(line)["responses"] if x["source"] == "student"]
    assert student and all(x.get("truncated") is True for x in student)
    desirable = {r["id"]: r["completion"] for r in kto if r["label"]}
    assert all(r["messages"][-1]["content"] == desirable[r["id"]] for r in sft if r["id"] in desirable)
    assert seconds < 120


def test_resume_sends_nothing_and_refuses_changed_settings(baseline, tiny, sources):
    out, _ = baseline
    before = read(os.path.join(out, "sft.jsonl")), read(os.path.join(out, "kto.jsonl"))
    r = run_main(SCRIPT, "--teacher", tiny, "--student", tiny, "--sources", sources, "--out", out, *FAST, "--resume")
    assert r.returncode == 0, r.stderr
    assert "teacher requests this run: 0 sent" in read(os.path.join(out, "report.md"))
    assert (read(os.path.join(out, "sft.jsonl")), read(os.path.join(out, "kto.jsonl"))) == before
    r = run_main(SCRIPT, "--teacher", tiny, "--student", tiny, "--sources", sources, "--out", out, *FAST)
    assert r.returncode != 0 and "--resume" in r.stderr
    r = run_main(SCRIPT, "--teacher", tiny, "--student", tiny, "--sources", sources, "--out", out, *FAST,
                 "--resume", "--dedup-threshold", "2")
    assert r.returncode != 0 and "dedup_threshold" in r.stderr
    # rows asked with other teacher prompts (an older build_data.py) do not mix with this version's
    args_path = os.path.join(out, "args.json")
    saved = read(args_path)
    args = json.loads(saved)
    args["settings"]["prompt_version"] = "0"
    try:
        open(args_path, "w").write(json.dumps(args))
        r = run_main(SCRIPT, "--teacher", tiny, "--student", tiny, "--sources", sources, "--out", out, *FAST, "--resume")
        assert r.returncode != 0 and "prompt_version: 0 -> " in r.stderr, r.stderr
        assert "resume with the code that wrote it" in r.stderr, r.stderr  # not a flag to set
    finally:
        open(args_path, "w").write(saved)


FILES = {"ingest": "1_ingest", "classify": "2_classify", "dedup": "3_dedup", "label": "4_label",
         "diversity": "5_diversity", "respond": "6_respond", "score": "7_score", "select": None}


@pytest.mark.parametrize("stages", [["dedup", "respond", "select"],
                                    pytest.param(list(FILES), marks=pytest.mark.slow, id="every-stage")])
def test_sigkill_mid_stage_then_resume_equals_uninterrupted(baseline, tiny, sources, tmp_path, stages):
    """Kill the run (SIGKILL, at a row count set through NANOPOST_BUILD_KILL) in the middle of each
    stage in turn (a global decision, a model stage, the final write; `-m slow`: all eight),
    tearing the last line of the stage file too; each rerun resumes. The final files equal the
    uninterrupted run's, and no stage file holds an id twice."""
    out = str(tmp_path / "out")
    base = [sys.executable, SCRIPT, "--teacher", tiny, "--student", tiny, "--sources", sources, "--out", out, *FAST]
    files = {k: FILES[k] for k in stages}
    for n, (stage, name) in enumerate(files.items()):
        env = {**os.environ, "NANOPOST_BUILD_KILL": f"{stage}:3"}
        r = subprocess.run(base + (["--resume"] if n else []), env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
        if name:
            path = os.path.join(out, name + ".jsonl")
            assert len(read(path).splitlines()) == 3
            with open(path, "a") as f:
                f.write('{"key": "torn')  # a write cut short by the kill
    r = subprocess.run(base + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in (f for f in FILES.values() if f):
        keys = [json.loads(x)["key"] for x in read(os.path.join(out, name + ".jsonl")).splitlines()]
        assert len(keys) == len(set(keys)), name
    for f in ("sft.jsonl", "kto.jsonl"):
        assert read(os.path.join(out, f)) == read(os.path.join(baseline[0], f)), f


# ---- HTTP: a scripted fake OpenAI server (garbage on purpose), then nanopost.serve ----

class Fake:
    """An OpenAI-compatible server whose replies the test scripts by prompt kind; counts requests."""

    def __init__(self):
        fake = self
        self.requests, self.clean = 0, False
        # label requests fail: None | "http_500" | "http_401" | "timeout" | "null" | "surrogate" | "cut_body" |
        # "not_http" | "trickle"; seconds before every reply
        self.fail_labels, self.delay = None, 0.0
        self.cut_first_answer = False  # answers stop at max_tokens (finish_reason "length") until retried
        self.model, self.failing_gets = "fake-teacher", 0  # the model served; GET /v1/models answered 503 this often
        self.get_status = 503  # (or 401: a key wanted)
        self.sent = set()  # every system and user message received

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def send(self, obj, status=200):
                body = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout under test)

            def do_GET(self):
                if fake.failing_gets:  # a server still starting up
                    fake.failing_gets -= 1
                    return self.send({"error": "loading or a key wanted"}, fake.get_status)
                self.send({"object": "list", "data": [{"id": fake.model, "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests += 1
                fake.sent.update(m["content"] for m in body["messages"] if m["role"] != "assistant")
                time.sleep(fake.delay)
                if fake.fail_labels and body["messages"][0]["content"].startswith("You sort"):
                    if fake.fail_labels == "null":  # a reasoning model that spent max_tokens thinking
                        return self.send({"choices": [{"index": 0, "finish_reason": "length", "message": {
                            "role": "assistant", "content": None, "reasoning_content": "Let me think..."}}]})
                    if fake.fail_labels in ("http_500", "http_401"):
                        return self.send({"error": "overloaded or a wrong key"}, int(fake.fail_labels[5:]))
                    if fake.fail_labels == "surrogate":  # JSON's escape of half a UTF-16 pair: no UTF-8 text holds it
                        return self.send({"choices": [{"index": 0, "finish_reason": "stop", "message": {
                            "role": "assistant", "content": '{"primary": "math", "secondary": "x"} \ud800'}}]})
                    if fake.fail_labels in ("cut_body", "not_http", "trickle"):
                        try:
                            if fake.fail_labels == "not_http":
                                return self.wfile.write(b"garbage\r\n\r\n")
                            self.send_response(200)
                            self.send_header("Content-Length", "100")
                            self.end_headers()
                            if fake.fail_labels == "cut_body":  # half the body, then the connection closes
                                return self.wfile.write(b'{"choices": [' + b" " * 37)
                            for _ in range(100):  # a byte every 0.05 s: each read is quick, the reply is not
                                self.wfile.write(b" ")
                                self.wfile.flush()
                                time.sleep(0.05)
                        except (BrokenPipeError, ConnectionResetError):
                            return
                    time.sleep(3)  # past --timeout
                text = fake.reply(body["messages"], fake.clean)
                if text is None:
                    return self.send({"error": "not this shape"})  # a 200 that is not a completion
                cut = fake.cut_first_answer and body["messages"][0]["role"] == "user" and len(body["messages"]) == 1
                self.send({"choices": [{"index": 0, "message": {"role": "assistant", "content": text[:8] if cut else text},
                                        "finish_reason": "length" if cut else "stop"}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def reply(messages, clean):
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        last, retry = messages[-1]["content"], len(messages) > 2 and messages[-2]["role"] == "assistant"
        item = messages[1]["content"] if system else messages[0]["content"]
        if system.startswith("You sort"):
            if "clips" in item:  # garbage first, valid when told what was wrong
                return '{"primary": "math", "secondary": "counting"}' if retry else "Sure! It is math."
            if "apples" in item:
                return '{"primary": "cooking", "secondary": "fruit"}'  # never in the allowed set
            if "stamps" in item:
                return ""
            if "marbles" in item and not clean:
                return None
            return '```json\n{"primary": "math", "secondary": "arithmetic"}\n```'
        if system.startswith("You grade"):
            return '{"score": 9, "rationale": "worked steps"}' if "The answer is" in last else '{"score": 2, "rationale": "no"}'
        if system.startswith("You check"):
            return '{"safe": true, "reason": "harmless"}' if "poem" not in item else '{"safe": "maybe"}'
        if "Write one new instruction" in last:
            return '{"instruction": "How many legs do 3 spiders have?"}'
        if "sea" in item and not clean:
            time.sleep(3)  # past --timeout
        return "Let me see. The answer is 42."


@pytest.fixture(scope="module")
def fake():
    f = Fake()
    yield f
    f.httpd.shutdown()


def test_http_fake_teacher_garbage_counted_and_cache(fake, tiny, sources, tmp_path):
    cache = str(tmp_path / "cache.sqlite")
    out = str(tmp_path / "out")
    args = ["--teacher-url", fake.url, "--student", tiny, "--sources", sources, "--out", out, "--cache", cache,
            "--synthesize", "2", "--timeout", "1", *FAST]
    r = run_main(SCRIPT, *args)
    # the 'marbles' label requests get a 200 that is not a completion: no answer, so not a finished item
    assert r.returncode != 0 and "items not finished: teacher transport errors (bad_response" in r.stderr, r.stderr
    labels = {r["key"]: r for r in map(json.loads, read(os.path.join(out, "4_label.jsonl")).splitlines())}
    ingest = [json.loads(x) for x in read(os.path.join(out, "1_ingest.jsonl")).splitlines()]
    dups = {r["key"]: r["duplicate_of"] for r in map(json.loads, read(os.path.join(out, "3_dedup.jsonl")).splitlines())}
    left = [r for r in ingest if r["id"] and dups[r["id"]] is None and r["id"] not in labels]
    assert len(labels) == 14 and len(left) == 1 and "marbles" in left[0]["prompt"][0]["content"]
    fake.clean = True  # the server recovers: the resumed run asks for exactly the unfinished items
    try:
        n = fake.requests
        r = run_main(SCRIPT, *args, "--resume")
        assert r.returncode == 0, r.stderr
    finally:
        fake.clean = False
    assert "teacher requests this run: " in read(os.path.join(out, "report.md"))
    sft, kto = check_outputs(out, tiny)
    report = read(os.path.join(out, "report.md"))
    for kind in ("not_json", "label_not_allowed", "empty", "bad_safe"):
        assert kind in report, kind
    labels = {r["key"]: r for r in map(json.loads, read(os.path.join(out, "4_label.jsonl")).splitlines())}
    assert sum(r["label_source"] == "teacher" for r in labels.values()) >= 8  # clips rows: right on the retry
    assert all(r["secondary"] in ("arithmetic", "counting", None) for r in labels.values())
    assert "How many legs do 3 spiders have?" in read(os.path.join(out, "sft.jsonl"))  # synthesized (+ 1 duplicate)
    texts = [m["content"] for r in sft for m in r["messages"]] + [r["completion"] for r in kto]
    assert not any("Sure! It is math." in t or "cooking" in t for t in texts)  # garbage never enters the data
    assert fake.requests > n
    # every prompt went out formatted, as the teacher should read it: the judge and safety prompts were
    # sent as templates ('{{"score": ...}}'), and real teachers copied the doubled braces (no JSON)
    for text in fake.sent:
        assert "{{" not in text and "}}" not in text and not re.search(r"\{[a-z_]+\}", text), text


@pytest.fixture(scope="module")
def clean_http_run(fake, tiny, sources, tmp_path_factory):
    """An uninterrupted run against the fake teacher with no transport failures."""
    fake.clean = True
    try:
        out = str(tmp_path_factory.mktemp("clean") / "out")
        r = run_main(SCRIPT, "--teacher-url", fake.url, "--student", tiny, "--sources", sources, "--out", out, *FAST)
        assert r.returncode == 0, r.stderr
    finally:
        fake.clean = False
    return out


@pytest.mark.parametrize("kind", ["http_500", "timeout", "http_401"])
def test_http_transport_failures_are_redone_on_resume(fake, tiny, sources, tmp_path, clean_http_run, kind):
    """A 500, a timeout or a 401 (a key the server no longer takes) is not the teacher's answer: the
    items stay unwritten, the run exits non-zero naming them, and --resume (the server back) asks
    again: the rows equal an uninterrupted run's."""
    out = str(tmp_path / "out")
    # the timeout case needs a short --timeout (the server sleeps 3 s); the 500 case a generous one, or
    # a slow reply on a loaded machine would be counted as a timeout instead
    timeout = "1" if kind == "timeout" else "20"
    args = ["--teacher-url", fake.url, "--student", tiny, "--sources", sources, "--out", out, "--timeout", timeout, *FAST]
    fake.clean, fake.fail_labels = True, kind
    try:
        r = run_main(SCRIPT, *args)
        said = "14 items not finished: teacher transport errors (http_500: 14)" if kind == "http_500" else \
            "the teacher stopped answering: none of 14 requests got a reply"  # (a hanging teacher stops the run)
        if kind == "http_401":
            said += " (http_401: "
        assert r.returncode != 0 and said in r.stderr, r.stderr
        assert "--resume" in r.stderr and read(os.path.join(out, "4_label.jsonl")) == ""
        fake.fail_labels, n = None, fake.requests
        r = run_main(SCRIPT, *args, "--resume")
        assert r.returncode == 0, r.stderr
        assert fake.requests - n >= 14  # the label requests were sent again
    finally:
        fake.clean, fake.fail_labels = False, None
    rows = lambda d: sorted(read(os.path.join(d, "4_label.jsonl")).splitlines())  # noqa: E731
    assert rows(out) == rows(clean_http_run) and "teacher" in read(os.path.join(out, "4_label.jsonl"))
    for f in ("sft.jsonl", "kto.jsonl"):
        assert read(os.path.join(out, f)) == read(os.path.join(clean_http_run, f)), f


def test_http_sigint_stops_at_once_keeps_replies_and_resumes(fake, tiny, sources, tmp_path, clean_http_run):
    """Ctrl-C with a slow teacher: the process exits within seconds (queued requests cancelled,
    those in flight not waited for), every reply received is in the cache, and --resume finishes
    with the files of an uninterrupted run."""
    import sqlite3
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache.sqlite")
    cmd = [sys.executable, SCRIPT, "--teacher-url", fake.url, "--student", tiny, "--sources", sources, "--out", out,
           "--cache", cache, "--concurrency", "2", "--timeout", "60", *FAST]
    count = lambda: sqlite3.connect(cache).execute("SELECT COUNT(*) FROM replies").fetchone()[0]  # noqa: E731
    fake.clean, fake.delay = True, 1.0
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.time()
        while not (os.path.exists(cache) and count() >= 4) and time.time() - t0 < 120:
            time.sleep(0.1)
        before = count()
        p.send_signal(signal.SIGINT)
        t0 = time.time()
        _, err = p.communicate(timeout=30)
        assert time.time() - t0 < 5 and p.returncode == 130, err[-2000:]
        assert "interrupted" in err and count() >= before
        fake.delay = 0.0
        r = run_main(*cmd[1:], "--resume")
        assert r.returncode == 0, r.stderr
    finally:
        fake.clean, fake.delay = False, 0.0
    cached = re.search(r"(\d+) answered from the cache", read(os.path.join(out, "report.md")))
    assert int(cached.group(1)) >= before  # the replies received before Ctrl-C were not asked again
    for f in ("sft.jsonl", "kto.jsonl"):
        assert read(os.path.join(out, f)) == read(os.path.join(clean_http_run, f)), f


def test_bad_sources_and_flags_refused_before_any_write(tiny, tmp_path):
    src, out = tmp_path / "src.jsonl", tmp_path / "out"
    src.write_text('{"prompt": "What is 2 + 2?"}\n{"prompt": "bad \\ud800 text"}\n')
    args = ["--teacher", tiny, "--student", tiny, "--sources", src, "--out", out, *FAST, "--stages", "1-2"]
    r = run_main(SCRIPT, *args)
    assert r.returncode != 0 and f"{src}:2:" in r.stderr and "surrogate" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()  # so the rerun below needs no --resume
    r = run_main(SCRIPT, *args, "--skip-bad-lines")
    assert r.returncode == 0, r.stderr
    assert len(read(os.path.join(out, "1_ingest.jsonl")).splitlines()) == 1
    for stages in ("3-2", "0", "9", "1,"):
        r = run_main(SCRIPT, *args[:-1], stages)
        assert r.returncode == 2 and "--stages" in r.stderr, stages
    # token budgets of 0 ended in a traceback at the first stage that generated; 0 requests in flight
    for flag, value, why in (("--max-new-tokens", 0, "at least 1"), ("--json-max-tokens", 0, "at least 1"),
                             ("--concurrency", 0, "at least 1"), ("--batch-size", -1, "at least 1"),
                             ("--timeout", 0, "more than 0"), ("--timeout", "inf", "more than 0 and at most"),
                             ("--synthesize", 10**9, "at most"), ("--kto-min-gap", 0, "at least 1")):
        r = run_main(SCRIPT, *args, "--out", tmp_path / "o2", flag, value)
        assert r.returncode == 2 and f"{flag} must be {why}" in r.stderr, (flag, r.stderr)
        assert not (tmp_path / "o2").exists()
    for source, why in ((tmp_path, "a directory, not a JSONL file"), ("/dev/null", "not a regular file")):
        r = run_main(SCRIPT, *args[:5], source, *args[6:], "--out", tmp_path / "o3")
        assert r.returncode != 0 and f"--sources {source}: {why}" in r.stderr, r.stderr
    r = run_main(SCRIPT, *args, "--out", tmp_path / "o4", "--max-len", 1)  # no token to score: NaN perplexities
    assert r.returncode == 2 and "--max-len must be at least 2" in r.stderr, r.stderr
    # the teacher's own folder as --out: the run's files would change its fingerprint (no resume ever after)
    r = run_main(SCRIPT, *args[:-2], "--out", tiny, "--overwrite", "--stages", "1-4")
    assert r.returncode != 0 and "is the --teacher checkpoint's folder" in r.stderr, r.stderr
    assert not os.path.exists(os.path.join(tiny, "args.json"))



def test_a_wrong_teacher_or_student_is_refused_before_any_stage(tiny, tmp_path, monkeypatch):
    """A teacher or student that is not a checkpoint is named at start, before stage 1 writes a file
    (it used to surface at stage 4 or 6, after earlier stages wrote theirs); one no chosen stage
    needs is not looked at."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src, out = tmp_path / "src.jsonl", tmp_path / "out"
    src.write_text('{"prompt": "What is 2 + 2?"}\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    for flag, bad in (("--teacher", tmp_path / "nope"), ("--student", empty), ("--student", "runs/zz")):
        models = {"--teacher": tiny, "--student": tiny, flag: bad}
        r = run_main(SCRIPT, "--teacher", models["--teacher"], "--student", models["--student"], "--sources", src,
                     "--out", out, *FAST)
        assert r.returncode != 0 and f"{flag} {bad}" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not out.exists()
    r = run_main(SCRIPT, "--teacher", tiny, "--student", empty, "--sources", src, "--out", out, *FAST, "--stages", "1-3")
    assert r.returncode == 0, r.stderr  # stages 1-3 need no student
    r = run_main(SCRIPT, "--teacher", "Org/Missing-7B", "--student", tiny, "--sources", tmp_path / "typo.jsonl",
                 "--out", tmp_path / "out2", *FAST)
    assert r.returncode != 0 and "typo.jsonl: no such file" in r.stderr  # the cheap check first: no 7B download


def test_http_cache_second_run_sends_zero_requests(fake, tiny, sources, tmp_path):
    fake.clean = True  # no timeouts or non-completions: every request gets a reply, so all are cached
    try:
        args = ["--teacher-url", fake.url, "--student", tiny, "--sources", sources, "--out", str(tmp_path / "out"),
                "--cache", str(tmp_path / "cache.sqlite"), *FAST]
        r = run_main(SCRIPT, *args)
        assert r.returncode == 0, r.stderr
        first, n = read(str(tmp_path / "out" / "sft.jsonl")), fake.requests
        r = run_main(SCRIPT, *args, "--overwrite")
        assert r.returncode == 0, r.stderr
        assert fake.requests == n and "this run: 0 sent" in read(str(tmp_path / "out" / "report.md"))
        assert read(str(tmp_path / "out" / "sft.jsonl")) == first
    finally:
        fake.clean = False


def test_http_unreachable_names_the_urls(tiny, sources, tmp_path):
    r = run_main(SCRIPT, "--teacher-url", "http://127.0.0.1:9", "http://127.0.0.1:7", "--student", tiny,
                 "--sources", sources, "--out", str(tmp_path / "out"), *FAST)
    assert r.returncode != 0
    assert "http://127.0.0.1:9" in r.stderr and "http://127.0.0.1:7" in r.stderr and "Traceback" not in r.stderr


def test_http_nanopost_serve_end_to_end(tiny, sources, tmp_path):
    serve = pytest.importorskip("nanopost.serve")
    with serve.start({"tiny": tiny}, port=0, dtype="float32", log_requests=False, log=lambda *a: None) as server:
        out = str(tmp_path / "out")
        r = run_main(SCRIPT, "--teacher-url", server.url, "--student", tiny, "--sources", sources, "--out", out,
                     "--concurrency", "4", *FAST)
        assert r.returncode == 0, r.stderr
    check_outputs(out, tiny)
    assert "teacher requests this run: 0 sent" not in read(os.path.join(out, "report.md"))


def test_selection_rules():
    m = load_script(SCRIPT)
    s = lambda src, **kw: {"source": src, "ppl": 10.0, "judge": None, "safe": None, "correct": None, **kw}  # noqa: E731
    # correctness first; a wrong answer is never the best
    best, worst, _ = m.select_responses([s("original", correct=True), s("teacher", correct=False, judge=10)], 3)
    assert (best["source"], worst["source"]) == ("original", "teacher")
    # judge scores decide; a small gap writes no KTO pair
    best, worst, why = m.select_responses([s("teacher", judge=7), s("student", judge=6)], 3)
    assert best["source"] == "teacher" and worst is None and why == "gap not clear"
    # unsafe never wins; unjudged ranks below judged; without any judgment the original, then perplexity
    best, _, _ = m.select_responses([s("teacher", judge=10, safe=False), s("student", judge=2)], 3)
    assert best["source"] == "student"
    best, worst, why = m.select_responses([s("student", ppl=2.0), s("original", ppl=50.0)], 3)
    assert best["source"] == "original" and worst is None  # perplexity alone is not a clear gap
    assert m.select_responses([s("student", correct=False)], 3)[0] is None
    # a response cut off at the token limit is never the best, even judged 10; it is the worst, but
    # being cut off is no clear gap by itself (KTO would learn that shorter is better)
    best, worst, why = m.select_responses([s("student", judge=10, truncated=True), s("teacher", judge=9)], 3)
    assert best["source"] == "teacher" and worst is None and why == "gap not clear"
    best, worst, _ = m.select_responses([s("student", judge=2, truncated=True), s("teacher", judge=9)], 3)
    assert (best["source"], worst["source"]) == ("teacher", "student")
    assert m.select_responses([s("student", judge=10, truncated=True)], 3)[0] is None
    # ... but a wrong answer is, cut off or not (evaluation scores a reply cut off by its last number too)
    best, worst, why = m.select_responses([s("original", correct=True, judge=5), s("student", correct=False, judge=4,
                                                                                  truncated=True)], 3)
    assert (best["source"], worst["source"]) == ("original", "student")
    # "not flagged unsafe": a safety check that stayed unknown ranks as safe, so the judge decides
    best, worst, _ = m.select_responses([s("original", judge=9), s("teacher", judge=2, safe=True),
                                         s("student", judge=2, safe=True, ppl=20.0)], 3)
    assert (best["source"], worst["source"]) == ("original", "student")
    # a judge gap of exactly --kto-min-gap is clear; a safety check left unknown is no clear gap against unsafe
    best, worst, _ = m.select_responses([s("teacher", judge=8), s("student", judge=5)], 3)
    assert (best["source"], worst["source"]) == ("teacher", "student")
    best, worst, why = m.select_responses([s("original", judge=6), s("student", judge=6, safe=False)], 3)
    assert best["source"] == "original" and worst is None and why == "gap not clear"
    # an unjudged response (the judge's reply failed) loses to one judged 1, whatever its perplexity
    best, _, _ = m.select_responses([s("teacher", judge=1), s("student", ppl=2.0)], 3)
    assert best["source"] == "teacher"
    # correctness is the reply's last number (as evaluation scores GSM8K), not the gold number anywhere in it
    assert m.correct("15 a box, 10 boxes: 15 * 10 = 150. The answer is 150.", "15") is False
    assert m.correct("Half of 30 is 15.", "15") is True and m.correct("anything", None) is None
    # the teacher's JSON replies: labels in the allowed set with a short topic (lowercased, spaces
    # folded), scores the integers 1-10 (not true, not 0), answers not blank
    label = m.check_label(["math", "code"])
    assert label('{"primary": "math", "secondary": "Percentages"}') == (("math", "percentages"), None)
    assert label('{"primary": "math", "secondary": "long  division of  numbers"}') == (("math", "long division of numbers"), None)
    assert label('{"primary": "math", "secondary": "very long secondary topic name"}') == (None, "bad_secondary")
    for score, ok in (("true", False), ("0", False), ("1", True), ("10", True), ("11", False), ("7.0", False)):
        assert (m.check_judge(f'{{"rationale": "r", "score": {score}}}')[1] is None) == ok, score
    assert m.check_answer("  \n ") == (None, "empty") and m.check_answer(" Paris. ") == ("Paris.", None)
    # the rules' table: "c++" is code wherever it stands
    for text in ("Explain move semantics in C++", "How do templates work in C++?", "Port this C++11 snippet"):
        assert m.classify(text, m.CATEGORIES) == "code", text


def test_synthesis_without_sources_sends_distinct_requests(fake, tiny, tmp_path):
    """Greedy decoding answers one prompt one way: with no source examples, each request must still differ."""
    seen, reply = [], Fake.reply
    fake.reply = lambda messages, clean: seen.append(messages[-1]["content"]) or reply(messages, clean)
    try:
        r = run_main(SCRIPT, "--teacher-url", fake.url, "--student", tiny, "--synthesize", "12", "--out", tmp_path / "out",
                     "--stages", "1", *FAST)
    finally:
        fake.reply = reply
    assert r.returncode == 0, r.stderr
    asks = [x for x in seen if "Write one new instruction" in x]
    assert len(asks) == 12 and len(set(asks)) == 12
    assert "exact duplicates (11 among the syntheses)" in read(os.path.join(tmp_path, "out", "report.md"))


def test_cut_off_replies_fail_their_check_and_are_cached_as_such(fake, tmp_path):
    """finish_reason "length" marks a reply cut off at max_tokens: ask_json counts it as a failed try
    ("truncated", even when the text would pass the check) and does not retry it; the cache keeps the
    flag, and rows from a cache that predates the flag are asked again, never trusted as whole answers."""
    import sqlite3

    from nanopost.teacher import HTTPBackend, Teacher, request_key

    def check_answer(text):
        return (text.strip(), None) if text.strip() else (None, "empty")
    cache = str(tmp_path / "cache.sqlite")
    fake.cut_first_answer = True
    try:
        teacher = Teacher(HTTPBackend([fake.url], retries=0), cache, "test")
        asked = [[{"role": "user", "content": "How many eggs?"}]]
        n = fake.requests
        values, fails = teacher.ask_json(asked, check_answer, teacher.sampling(16), 1, "That reply was {why}.")
        assert values == [None] and fake.requests == n + 1  # one request: no retry
        assert [(f["attempt"], f["kind"], f["raw"]) for f in fails[0]] == [(0, "truncated", "Let me s")]
        n = fake.requests
        again = Teacher(HTTPBackend([fake.url], retries=0), cache, "test")
        assert again.complete(asked, again.sampling(16))[0].truncated  # from the cache, flag and all
        assert fake.requests == n  # no completion request: the reply came from the cache
    finally:
        fake.cut_first_answer = False
    # a cache written before replies carried the flag: its rows are not used
    old = str(tmp_path / "old.sqlite")
    db = sqlite3.connect(old)
    db.execute("CREATE TABLE replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL, request TEXT NOT NULL, created REAL NOT NULL)")
    t = Teacher(HTTPBackend([fake.url], retries=0), str(tmp_path / "probe.sqlite"), "test")
    key = request_key(asked[0], t.sampling(16), t.backend.id, "test")
    db.execute("INSERT INTO replies VALUES (?, ?, ?, 0)", (key, "stale half", "{}"))
    db.commit()
    db.close()
    n = fake.requests
    reply = Teacher(HTTPBackend([fake.url], retries=0), old, "test").complete(asked, t.sampling(16))[0]
    assert reply.text == "Let me see. The answer is 42." and fake.requests == n + 1  # asked again


def test_engine_reports_replies_cut_off_at_the_limit(tiny):
    import nanopost
    from nanopost.engine import Engine, Sampling
    eng = Engine(*nanopost.load(tiny))
    prompts = ["Hello there", "What is 2 + 2?"]
    for n in (1, 3, 40):
        s = Sampling(max_new_tokens=n)
        got = eng.generate(prompts, s, return_truncated=True)
        ids = eng.generate_ids([eng.encode_prompt(p) for p in prompts], s)
        assert [t for t, _ in got] == eng.generate(prompts, s)
        assert [cut for _, cut in got] == [len(x) == n for x in ids]
    assert any(cut for _, cut in eng.generate(prompts, Sampling(max_new_tokens=1), return_truncated=True))


def test_http_teacher_model_must_be_served_and_a_textless_reply_is_final(fake, tiny, sources, tmp_path):
    """A --teacher-model no server serves is refused at start, naming what they serve (every request
    was refused with a 404 and counted as the teacher's failure: a run of original responses only);
    a completion whose content is null (a reasoning model cut off while thinking) is the teacher's
    answer, failed and final, not a transport error that every --resume would ask again."""
    out = tmp_path / "out"
    r = run_main(SCRIPT, "--teacher-url", fake.url, "--teacher-model", "teachr", "--student", tiny, "--sources", sources,
                 "--out", out, *FAST)
    assert r.returncode != 0 and "no teacher server serves the model 'teachr'" in r.stderr and "fake-teacher" in r.stderr
    assert not out.exists()
    fake.clean, fake.fail_labels = True, "null"
    try:
        r = run_main(SCRIPT, "--teacher-url", fake.url, "--student", tiny, "--sources", sources, "--out", out,
                     "--stages", "1-4", *FAST)
    finally:
        fake.clean, fake.fail_labels = False, None
    assert r.returncode == 0, r.stderr
    labels = [json.loads(x) for x in read(out / "4_label.jsonl").splitlines()]
    assert len(labels) == 14 and all(r["label_source"] == "rule" and r["failures"][0]["kind"] == "truncated" for r in labels)


def test_resume_refuses_an_edited_source_or_a_retrained_student(tiny, tmp_path):
    """A source edited in place (the same size) or a student retrained in place (its files' stamp)
    would mix two runs' rows; lines that stored U+2028 (which str.splitlines splits at) resume."""
    import shutil
    student = shutil.copytree(tiny, tmp_path / "student")
    src, out = tmp_path / "src.jsonl", tmp_path / "out"
    rows = [{"instruction": "Summarise:\u2028First line.\u2028Second line.", "output": "Two lines."},
            {"instruction": "What is 2 + 2?", "output": "4"}, {"instruction": "Name a colour.", "output": "Red."}]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    args = ["--teacher", tiny, "--student", student, "--sources", src, "--out", out, *FAST]
    r = run_main(SCRIPT, *args, "--stages", "1-6")
    assert r.returncode == 0, r.stderr
    assert "\u2028" in read(out / "1_ingest.jsonl")
    saved = json.loads(read(out / "args.json"))  # a build from before sources were hashed recorded their sizes
    saved["settings"]["sources"] = [[str(src), os.path.getsize(src)]]
    (out / "args.json").write_text(json.dumps(saved))
    r = run_main(SCRIPT, *args, "--resume", "--stages", "1-5")
    assert r.returncode == 0, r.stderr
    os.utime(student / "model.safetensors", ns=(1, 1))  # "retrained"
    r = run_main(SCRIPT, *args, "--resume")
    assert r.returncode != 0 and "student_files" in r.stderr, r.stderr
    r = run_main(SCRIPT, *args, "--resume", "--stages", "1-5")  # stages that need no student: fine
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    saved = json.loads(read(out / "args.json"))  # rows made on a GPU: its replies and perplexities round otherwise
    (out / "args.json").write_text(json.dumps({**saved, "settings": {**saved["settings"], "device_type": "cuda"}}))
    r = run_main(SCRIPT, *args, "--resume", "--stages", "1-5")
    assert r.returncode != 0 and "device_type: cuda -> cpu" in r.stderr, r.stderr
    (out / "args.json").write_text(json.dumps(saved))
    src.write_text(read(src).replace("Red.", "Tan."), encoding="utf-8")  # the same size
    r = run_main(SCRIPT, *args, "--resume", "--stages", "1-5")
    assert r.returncode != 0 and "sources" in r.stderr, r.stderr


@pytest.mark.parametrize("line,why", [('{"instruction": 5, "output": "x"}', "'instruction' and 'input' must be strings"),
                                      ('{"question": "Q?", "answer": "So.\\n#### yes"}', "not a number")])
def test_malformed_sources_are_bad_lines_and_an_empty_source_is_refused(tiny, tmp_path, line, why):
    src, out = tmp_path / "src.jsonl", tmp_path / "out"
    src.write_text('{"prompt": "What is 2 + 2?"}\n' + line + "\n")
    r = run_main(SCRIPT, "--teacher", tiny, "--student", tiny, "--sources", src, "--out", out, *FAST)
    assert r.returncode != 0 and f"{src}:2: " in r.stderr and why in r.stderr and "Traceback" not in r.stderr, r.stderr
    src.write_text("\n")
    r = run_main(SCRIPT, "--teacher", tiny, "--student", tiny, "--sources", src, "--out", out, *FAST)
    assert r.returncode != 0 and f"--sources {src}: an empty file" in r.stderr and not out.exists(), r.stderr
    # one empty file among good ones passed silently; one that only repeats another is a warning
    good, again = tmp_path / "good.jsonl", tmp_path / "again.jsonl"
    good.write_text('{"prompt": "What is 2 + 2?"}\n')
    again.write_text('{"prompt": "What is 2 + 2?"}\n')
    r = run_main(SCRIPT, "--teacher", tiny, "--student", tiny, "--sources", good, src, "--out", out, *FAST)
    assert r.returncode != 0 and f"--sources {src}: an empty file" in r.stderr and not out.exists(), r.stderr
    r = run_main(SCRIPT, "--teacher", tiny, "--student", tiny, "--sources", good, again, "--out", out, *FAST,
                 "--stages", "1")
    assert r.returncode == 0 and f"warning: --sources {again} adds no example" in r.stdout + r.stderr, r.stderr


def test_teacher_cache_keys_greedy_without_seed_and_local_with_dtype(tiny, tmp_path):
    """A greedy request's key does not change with --seed (its reply cannot), and an in-process
    teacher's key does change with its dtype and its weights (its replies do)."""
    import torch

    import nanopost
    from nanopost.teacher import LocalBackend, Teacher
    greedy = Teacher.sampling(None, 16, seed=7)
    assert greedy == Teacher.sampling(None, 16, seed=0) and Teacher.sampling(None, 16, 0.7, seed=7)["seed"] == 7
    ids = {LocalBackend(*nanopost.load(tiny, dtype=d), tiny).id for d in (torch.float32, torch.bfloat16)}
    assert len(ids) == 2
    # and with its weights: a teacher retrained in the same folder does not get the old one's replies
    from nanopost.testing import make_tiny_checkpoint
    ids = []
    for seed in (0, 1):
        shutil.rmtree(tmp_path / "teacher", ignore_errors=True)
        d = make_tiny_checkpoint(str(tmp_path / "teacher"), seed=seed)
        ids.append(LocalBackend(*nanopost.load(d), d).id)
    assert ids[0] != ids[1]


def test_a_finished_http_build_resumes_with_its_teacher_gone(clean_http_run, tiny, sources, tmp_path):
    """Asking the servers at start must not stop a resume that has nothing left for the teacher."""
    import shutil
    out = shutil.copytree(clean_http_run, tmp_path / "out")
    r = run_main(SCRIPT, "--teacher-url", "http://127.0.0.1:9", "--student", tiny, "--sources", sources, "--out", out,
                 *FAST, "--resume")
    assert r.returncode == 0 and "warning: no teacher server answered" in r.stdout, r.stderr


@pytest.mark.parametrize("kind", ["surrogate", "cut_body", "not_http", "trickle"])
def test_http_garbage_on_the_wire_is_a_failure_never_a_crash(fake, kind):
    """A reply the teacher spells with half a UTF-16 pair is its (repaired) answer; a body cut short, a
    reply that is not HTTP, or a body trickled out past --timeout is a transport failure (the item left
    for --resume), never a traceback; --timeout bounds the whole reply, not each read."""
    from nanopost.teacher import HTTPBackend
    backend = HTTPBackend([fake.url], timeout=1, retries=0)
    fake.fail_labels = kind
    try:
        t0 = time.time()
        reply = backend._one(0, [{"role": "system", "content": "You sort"}, {"role": "user", "content": "x"}], {})
    finally:
        fake.fail_labels = None
    if kind == "surrogate":
        assert reply.error is None and reply.text == '{"primary": "math", "secondary": "x"} \ufffd'
        reply.text.encode("utf-8")  # it can be cached and written
    else:
        assert reply.text is None and reply.transient, reply
        assert reply.error == ("timeout" if kind == "trickle" else "bad_response"), reply
        assert time.time() - t0 < 4


def test_a_repeated_prompt_keeps_the_response_and_gold_of_any_of_its_lines(tiny, tmp_path):
    """TRL's unpaired KTO format gives a prompt once per completion: the desirable one, after an
    undesirable line, was dropped with the repeat (and a GSM8K gold answer after a plain prompt)."""
    src, out = tmp_path / "src.jsonl", tmp_path / "out"
    src.write_text('{"prompt": "Capital of France?", "completion": "Berlin.", "label": false}\n'
                   '{"prompt": "Capital of France?", "completion": "Paris.", "label": true}\n'
                   '{"prompt": "Capital of France?", "completion": "Lyon.", "label": true}\n'
                   '{"prompt": "Natalia sold 5 clips. How many?"}\n'
                   '{"question": "Natalia sold 5 clips. How many?", "answer": "She sold 5.\\n#### 5"}\n'
                   '{"prompt": "Capital of Spain?", "completion": "Madrid.", "label": true}\n'
                   '{"prompt": "Capital of Spain?", "completion": "Seville.", "label": false}\n'
                   '{"instruction": "Ann has 5 cats; 1 leaves. How many?", "output": "Ann has 6 cats."}\n'
                   '{"question": "Ann has 5 cats; 1 leaves. How many?", "answer": "5 - 1 = 4.\\n#### 4"}\n')
    r = run_main(SCRIPT, "--teacher", tiny, "--student", tiny, "--sources", src, "--out", out, *FAST, "--stages", "1")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in read(os.path.join(out, "1_ingest.jsonl")).splitlines()]
    # a gold answer comes with its own worked solution, never beside another line's response
    assert [(r["response"], r["gold"]) for r in rows] == [("Paris.", None), ("She sold 5.\nThe answer is 5.", "5"),
                                                          ("Madrid.", None), ("5 - 1 = 4.\nThe answer is 4.", "4")]


def test_sources_in_kto_form_and_damaged_stage_files(tmp_path):
    """A KTO line as a source: only its desirable completion is an original response (a completion
    labelled false is known to be bad). A damaged stage file names its file and line. A judge reply
    that gives one key twice is no score."""
    m = load_script(SCRIPT)
    user = [{"role": "user", "content": "Capital of France?"}]
    assert m.normalise({"prompt": "Capital of France?", "completion": "Berlin.", "label": False}) == (user, None, None)
    assert m.normalise({"prompt": "Capital of France?", "completion": "Paris.", "label": True}) == (user, "Paris.", None)
    assert m.normalise({"prompt": user, "chosen": [{"role": "assistant", "content": "Paris."}],
                        "rejected": "Berlin."}) == (user, "Paris.", None)
    # TRL's conversational prompt/completion, as train_sft.py reads it (was "the response must be a string")
    assert m.normalise({"prompt": user, "completion": [{"role": "assistant", "content": "Paris."}]}) == (user, "Paris.", None)
    # contents verbatim: stripped, code lost its first line's indent (a whitespace-only response is none)
    code = [{"role": "user", "content": "Complete:\ndef f(x):\n"}]
    assert m.normalise({"prompt": code, "completion": "    y = x + 1\n    return y\n"}) == \
        (code, "    y = x + 1\n    return y\n", None)
    assert m.normalise({"instruction": " Indent: ", "output": "  a: 1\n  b: 2"})[:2] == \
        ([{"role": "user", "content": " Indent: "}], "  a: 1\n  b: 2")
    assert m.normalise({"prompt": "q", "completion": " \n"}) == ([{"role": "user", "content": "q"}], None, None)
    for bad in ({"prompt": "q", "completion": "a", "label": "yes"}, {"prompt": "q", "chosen": "a"},
                {"prompt": "q", "completion": [{"role": "user", "content": "a"}]}):
        with pytest.raises(ValueError):
            m.normalise(bad)
    call = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]  # only role and content are kept:
    for msgs in ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": call}],  # an
                 [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": call},  # empty
                  {"role": "user", "content": "r"}]):  # reply trained
        with pytest.raises(ValueError, match="has 'tool_calls'"):
            m.normalise({"messages": msgs})
    assert m.check_judge('{"score": 3, "score": 9}') == (None, "duplicate_key")
    # replies that json cannot read at all are failures, not a crash of the build
    assert m.check_judge("[" * 3000) == (None, "not_json")  # past the recursion limit
    assert m.check_judge('{"score": 1' + "0" * 5000 + "}") == (None, "not_json")  # past int's digit limit
    assert m.check_judge('{"score": 9, "rationale": "ok"}') == ((9, "ok"), None)
    for line, why in ((b'{"id": "x"}', "not a row of this stage"), (b"[1]", "not a row of this stage"),
                      (b'{"key": "a"', "Expecting"), (b'{"key": "\xff"}', "can't decode")):
        (tmp_path / "2_classify.jsonl").write_bytes(b'{"key": "k1"}\n' + line + b"\n")
        with pytest.raises(m.DataError, match=re.escape(str(tmp_path / "2_classify.jsonl")) + ":2: .*" + why):
            m.StageFile(str(tmp_path), "2_classify")


def test_perplexity_of_a_response_does_not_depend_on_the_rest_of_the_wave(tiny):
    """A row's float rounding depends on its batch (padding, matmul shapes): batched by --batch-size,
    one response in a few hundred rounded to another 4th digit when a resumed run (or another
    --batch-size) batched it with other rows, and the resumed kto.jsonl differed. Each instruction's
    responses are now one batch; the numbers are the float64 perplexities to 4 digits."""
    import random

    import nanopost
    m = load_script(SCRIPT)
    model, tok = nanopost.load(tiny, dtype=torch.float32)
    rng = random.Random(0)
    words = "the cat sat on a mat with two dogs and 37 apples how many sum is".split()
    groups = [([{"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(3, 30)))}],
               [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(rng.randint(1, 3))]) for _ in range(40)]
    whole = m.perplexities(model, tok, groups, 256)
    assert [len(x) for x in whole] == [len(t) for _, t in groups]
    assert [x for g in groups for x in m.perplexities(model, tok, [g], 256)] == whole  # alone = with the others
    assert m.perplexities(model, tok, groups[::-1], 256) == whole[::-1]
    model64 = model.double()
    for (prompt, texts), got in zip(groups[:5], whole[:5]):
        for text, ppl in zip(texts, got):
            p, c = m.truncate_kto(*m.encode_kto(tok, prompt, text), 256)
            ids = torch.tensor([p + c])
            logp = torch.log_softmax(model64(ids)[0, len(p) - 1:-1], -1).gather(1, torch.tensor(c)[:, None]).mean()
            assert abs(ppl - math.exp(-logp.item())) <= 1e-3 * ppl


def test_a_retry_that_gets_no_reply_leaves_its_items_unfinished_not_the_wave(tmp_path):
    """ask_json asks again only the items whose reply failed its check; when that retry timed out, the
    whole wave was taken for "the teacher stopped answering": none of its rows was written, and the
    same happened at every --resume. The retried items are unfinished; the rest are answered. Not one
    reply to a wave's first try still stops the run."""
    from nanopost.teacher import Reply, Teacher, TeacherUnreachable

    class Stub:
        id = "stub"

        def __init__(self, down=False):
            self.down, self.calls = down, []

        def complete(self, requests, sampling, on_reply):
            self.calls.append(len(requests))
            for j, msgs in enumerate(requests):
                if self.down or len(msgs) > 1:  # down, or a retry (the reply and what was wrong appended)
                    on_reply(j, Reply(None, "timeout", "no reply"))
                else:
                    on_reply(j, Reply('{"ok": 1}' if "good" in msgs[0]["content"] else "garbage"))

    check = lambda t: (json.loads(t), None) if t.startswith("{") else (None, "not_json")  # noqa: E731
    reqs = [[{"role": "user", "content": c}] for c in ("good 1", "bad", "good 2", "bad too")]
    t = Teacher(Stub(), str(tmp_path / "a.sqlite"), "v")
    values, failures = t.ask_json(reqs, check, t.sampling(8), retries=2, retry_prompt="{why}")
    assert values == [{"ok": 1}, None, {"ok": 1}, None] and failures == [[], None, [], None]
    assert t.unfinished == {"timeout": 2} and t.backend.calls == [4, 2]
    t = Teacher(Stub(down=True), str(tmp_path / "b.sqlite"), "v")
    with pytest.raises(TeacherUnreachable, match="none of 4 requests got a reply"):
        t.ask_json(reqs, check, t.sampling(8), retries=2, retry_prompt="{why}")


def test_a_server_that_wants_a_key_is_told_from_one_that_is_down(fake, monkeypatch):
    """A 401 to the first GET /v1/models said "no teacher server answered ... Start one": the server
    had answered; the key (NANOPOST_TEACHER_API_KEY) was what was missing or wrong."""
    from nanopost.teacher import HTTPBackend, TeacherUnreachable
    monkeypatch.delenv("NANOPOST_TEACHER_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake.failing_gets, fake.get_status = 2, 401
    for key, said in ((None, "it wants a key"), ("wrong", "its key is wrong")):
        if key:
            monkeypatch.setenv("NANOPOST_TEACHER_API_KEY", key)
        with pytest.raises(TeacherUnreachable, match=f"refused GET /v1/models .*401.*{said}; set NANOPOST_TEACHER_API_KEY"):
            HTTPBackend([fake.url])
    # one server of several that wants a key is left out, as any other that does not answer, not the end
    good = Fake()
    try:
        fake.failing_gets = 2
        assert HTTPBackend([fake.url, good.url]).urls == [good.url]
    finally:
        good.httpd.shutdown()
    fake.failing_gets, fake.get_status = 0, 503


def test_resume_checks_the_served_teacher_even_when_the_first_probe_failed(fake, tiny, sources, tmp_path):
    """A resume whose first GET /v1/models failed (a server still loading) only warned, and the model
    served once the stage started was never checked: the rows of two teachers mixed (and args.json
    still named the first). It is checked when the stage connects."""
    out = tmp_path / "out"
    args = ["--teacher-url", fake.url, "--student", tiny, "--sources", sources, "--out", out, *FAST]
    fake.clean = True
    try:
        r = run_main(SCRIPT, *args, "--stages", "1-4")
        assert r.returncode == 0, r.stderr
        labels = read(out / "4_label.jsonl")
        fake.model, fake.failing_gets = "other-teacher", 1
        r = run_main(SCRIPT, *args, "--resume")
        assert r.returncode != 0 and "teacher_served: fake-teacher -> other-teacher" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and read(out / "4_label.jsonl") == labels
        assert not (out / "6_respond.jsonl").exists() or read(out / "6_respond.jsonl") == ""
        fake.model, fake.failing_gets = "fake-teacher", 1  # the same teacher, loading at first: it goes on
        r = run_main(SCRIPT, *args, "--resume")
        assert r.returncode == 0 and "warning: no teacher server answered" in r.stdout, r.stderr
    finally:
        fake.clean, fake.model, fake.failing_gets = False, "fake-teacher", 0


def test_a_build_already_writing_to_out_keeps_it(tiny, sources, tmp_path):
    """A second build_data.py on the --out of one still running (a --resume started twice) rewrote its
    stage files under it: refused before it writes, until the first has ended."""
    out = tmp_path / "out"
    args = ["--teacher", tiny, "--student", tiny, "--sources", sources, "--out", out, *FAST, "--stages", "1"]
    assert run_main(SCRIPT, *args).returncode == 0
    before = {f: read(out / f) for f in os.listdir(out) if f.endswith((".jsonl", ".json"))}
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True)  # the first build, still running (its lock)
    try:
        assert holder.stdout.readline() == "held\n"
        for flag in ("--resume", "--overwrite"):
            r = run_main(SCRIPT, *args[:-1], "1-2", flag)
            assert r.returncode == 1 and "another process is writing there now" in r.stderr, r.stderr
            assert {f: read(out / f) for f in os.listdir(out) if f.endswith((".jsonl", ".json"))} == before
    finally:
        holder.kill()
        holder.wait()
    assert run_main(SCRIPT, *args[:-1], "1-2", "--resume").returncode == 0  # once it has ended


def test_a_source_in_out_or_a_bad_cache_is_refused_before_any_write(tiny, tmp_path):
    """--overwrite deleted a --sources file that had an output's name in --out (sft.jsonl of an earlier
    build, say) after reading it, and --resume replaced it with its own sft.jsonl; a --cache that is a
    folder or not SQLite ended in a traceback after stages 1-3 had written their files."""
    out = tmp_path / "out"
    out.mkdir()
    src = out / "sft.jsonl"
    src.write_text('{"prompt": "What is 2 + 2?", "completion": "4"}\n')
    (out / "args.json").write_text('{"settings": {}, "args": {}}')  # an earlier build's folder
    args = ["--teacher", tiny, "--student", tiny, "--out", out, *FAST]
    for flag in ("--overwrite", "--resume"):
        r = run_main(SCRIPT, *args, "--sources", src, "--stages", "1-3", flag)
        assert r.returncode != 0 and f"--sources {src} is one of the files this run writes" in r.stderr, r.stderr
        assert read(src) == '{"prompt": "What is 2 + 2?", "completion": "4"}\n' and sorted(os.listdir(out)) == ["args.json", "sft.jsonl"]
    link = tmp_path / "link.jsonl"  # the same file by another name
    link.symlink_to(src)
    r = run_main(SCRIPT, *args, "--sources", link, "--stages", "1-3", "--overwrite")
    assert r.returncode != 0 and "is one of the files this run writes" in r.stderr, r.stderr
    ok = tmp_path / "src.jsonl"
    ok.write_text(read(src))
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n" * 100)
    for cache, why in ((tmp_path, "a directory, not the teacher's request cache"),
                       (notes, "cannot be opened as the teacher's request cache"),
                       (notes / "cache.sqlite", "is a file, not a folder")):
        for stages in ("1-8", "1-3"):  # (stages 1-3 ask no teacher: accepted, refused at the --resume of 4-8)
            r = run_main(SCRIPT, *args[:-len(FAST)], "--sources", ok, "--out", tmp_path / "o2", *FAST, "--cache", cache,
                         "--stages", stages)
            assert r.returncode != 0 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "o2").exists()
    assert read(notes) == "not a database\n" * 100
    # a --cache that is one of the run's own files: refused after stages 1-3 wrote theirs, or (sft.jsonl)
    # replaced by the output at the end, the cache lost
    for name in ("1_ingest.jsonl", "sft.jsonl"):
        r = run_main(SCRIPT, *args[:-len(FAST)], "--sources", ok, "--out", tmp_path / "o3", *FAST,
                     "--cache", tmp_path / "o3" / name)
        assert r.returncode != 0 and "is one of the files this run writes" in r.stderr, r.stderr
        assert not (tmp_path / "o3").exists()
    # a folder of someone else's: "continue that run with --resume" named no run, and --resume wrote one beside it
    # and names alone do not make a run: a user's own sft.jsonl, a training run's args.json (--resume
    # wrote over them, --overwrite removed them)
    for name, files in (("mine", {"notes.txt": "mine"}), ("data", {"sft.jsonl": read(ok), "notes.txt": "mine"}),
                        ("trained", {"args.json": '{"lr": 1e-05}', "model.safetensors": "weights"})):
        mine = tmp_path / name
        mine.mkdir()
        for f, text in files.items():
            (mine / f).write_text(text)
        for flag in ((), ("--resume",), ("--overwrite",)):
            r = run_main(SCRIPT, *args[:-len(FAST)], "--sources", ok, "--out", mine, *FAST, "--stages", "1-3", *flag)
            assert r.returncode != 0 and "but no build_data.py run" in r.stderr, r.stderr
            assert {f: read(mine / f) for f in os.listdir(mine)} == files
    # a run killed (or stopped by a full disk) while writing its first file left only args.json.tmp:
    # that folder was refused as someone else's, with --resume and --overwrite too
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "args.json.tmp").write_text('{"settings": {')
    r = run_main(SCRIPT, *args[:-len(FAST)], "--sources", ok, "--out", killed, *FAST, "--stages", "1")
    assert r.returncode != 0 and "continue that run with --resume" in r.stderr, r.stderr
    r = run_main(SCRIPT, *args[:-len(FAST)], "--sources", ok, "--out", killed, *FAST, "--stages", "1", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "args.json.tmp" not in os.listdir(killed) and (killed / "1_ingest.jsonl").exists()


def test_near_duplicates_keep_the_row_with_gold_only_within_one_system_prompt_and_sources_stay_verbatim(tiny, tmp_path):
    """Of two near-duplicate lines (punctuation apart), the first was kept even when only the second
    had the gold answer: the result changed with the order of the lines. The same question under
    another system prompt was dropped as a duplicate. Stage 6 stripped the sources' responses again
    (code lost its first indent in sft.jsonl)."""
    plain = '{"prompt": "Rita fills 52 boxes with 7 shells each and gives 5 boxes away. How many shells are left?"}'
    gold = ('{"question": "Rita fills 52 boxes with 7 shells each, and gives 5 boxes away; how many shells are left?", '
            '"answer": "47 * 7 = 329\\n#### 329"}')
    systems = ('{"messages": [{"role": "system", "content": "Reply only in %s."}, {"role": "user", "content": '
               '"Describe your favourite season and say why you like it."}]}')
    kept = {}
    for name, lines in (("fwd", [plain, gold]), ("rev", [gold, plain])):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("\n".join(lines + [systems % "French", systems % "Japanese"]) + "\n")
        r = run_main(SCRIPT, "--teacher", tiny, "--student", tiny, "--sources", src, "--out", tmp_path / name, *FAST,
                     "--stages", "1-3")
        assert r.returncode == 0, r.stderr
        ingest = {x["key"]: x for x in map(json.loads, read(tmp_path / name / "1_ingest.jsonl").splitlines())}
        rows = [json.loads(x) for x in read(tmp_path / name / "3_dedup.jsonl").splitlines()]
        kept[name] = sorted((ingest[x["key"]]["prompt"][0]["content"][:20], ingest[x["key"]]["gold"])
                            for x in rows if x["duplicate_of"] is None)
    assert kept["fwd"] == kept["rev"] == [("Reply only in French", None), ("Reply only in Japane", None),
                                          ("Rita fills 52 boxes ", "329")], kept
    src = tmp_path / "code.jsonl"
    src.write_text(json.dumps({"prompt": "Complete the body of this Python function:\ndef f(x):",
                               "completion": "    y = x + 1\n    return y"}) + "\n")
    r = run_main(SCRIPT, "--teacher", tiny, "--student", tiny, "--sources", src, "--out", tmp_path / "code", *FAST)
    assert r.returncode == 0, r.stderr
    responses = json.loads(read(tmp_path / "code" / "6_respond.jsonl"))["responses"]
    assert {"source": "original", "text": "    y = x + 1\n    return y"} in responses


def test_near_duplicates_keep_gold_then_a_response_and_name_the_kept_id():
    """Unit cases of the rule above (each once passed every test when changed): of near-duplicates,
    the copy with a gold answer is kept before one with a response, and one with a response before a
    bare one; the dropped copy names the kept one's id; texts without words are no one's duplicates."""
    from nanopost import dedup
    bd = load_script(SCRIPT)

    def run(rows):  # [(id, text, gold, response)] -> near_duplicates
        by_id = {i: {"prompt": [{"role": "user", "content": t}], "gold": g, "response": r} for i, t, g, r in rows}
        texts = [t for _, t, _, _ in rows]
        return bd.near_duplicates([i for i, *_ in rows], by_id, texts, dedup.simhash(texts), 3)
    q = "Rita fills 52 boxes with 7 shells each and gives 5 boxes away. How many shells are left?"
    assert run([("p", q, None, None), ("r", q[:-1], None, "329")]) == {"r": None, "p": "r"}
    assert run([("r", q, None, "329"), ("g", q[:-1], "329", None)]) == {"g": None, "r": "g"}
    assert run([("x", "?", None, None), ("y", "...", None, None)]) == {"x": None, "y": None}


def test_http_retries_go_to_the_next_server_back_off_and_cap_retry_after(monkeypatch):
    """HTTPBackend without a network: a server that answers 503 with Retry-After: 3600 is waited on
    a minute at most, retries double their pause and move to the next URL; "/v1" on a URL is the
    server's root as given; the cache key changes with the prompt version."""
    import io
    import urllib.error
    from nanopost import teacher
    calls, sleeps = [], []

    class Fake(teacher.HTTPBackend):
        def _call(self, url, path, body, timeout):
            calls.append(url + path)
            if path == "/v1/models":
                return {"data": [{"id": "m"}]}
            raise urllib.error.HTTPError(url + path, 503, "busy", {"Retry-After": "3600"}, io.BytesIO(b"busy"))
    monkeypatch.setattr(teacher.time, "sleep", sleeps.append)
    backend = Fake(["http://a/v1", "http://b/"], retries=3, backoff=1.0)
    assert calls == ["http://a/v1/models", "http://b/v1/models"]
    calls.clear()
    reply = backend._one(0, [{"role": "user", "content": "hi"}], {"max_tokens": 4})
    assert reply.text is None and calls == ["http://a/v1/chat/completions", "http://b/v1/chat/completions"] * 2
    assert sleeps == [60, 1.0, 60, 2.0, 60, 4.0]
    msgs, s = [{"role": "user", "content": "hi"}], {"max_tokens": 4}
    assert teacher.request_key(msgs, s, "http:m", "1") != teacher.request_key(msgs, s, "http:m", "2")


INSTRUCTIONS = ["Compute the sum of 17 and 25 apples in a basket.", "Calculate the area of a circle with radius 9 meters.",
                "What percentage of 80 is 12 when rounding down?", "Solve the equation for x where 3x plus 4 equals 19.",
                "Write a short poem about an old lighthouse keeper.", "Explain why the sky looks blue at noon."]


def diversity(tmp_path, topics, *flags, again=None):
    """Stage 5 on six instructions whose stage 4 labels are written here: topics, one (primary,
    secondary) per instruction, secondary None where the teacher's label failed -> [(secondary, kept,
    why)]; again: flags of a --resume after it, whose refusal is returned instead."""
    m = load_script(SCRIPT)
    src, out = tmp_path / "src.jsonl", tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    src.write_text("".join(json.dumps({"instruction": t, "output": "ok"}) + "\n" for t in INSTRUCTIONS))
    base = ["--teacher", "unused", "--student", "unused", "--sources", src, "--out", out]
    r = run_main(SCRIPT, *base, *flags, "--stages", "1-3")
    assert r.returncode == 0, r.stderr
    ids = [json.loads(x)["key"] for x in read(out / "3_dedup.jsonl").splitlines()]
    with open(out / "4_label.jsonl", "w") as f:
        for i, (primary, secondary) in zip(ids, topics):
            f.write(json.dumps({"key": i, "primary": primary, "secondary": secondary, "failures": [],
                                "label_source": "teacher" if secondary else "rule", "prompt_version": m.PROMPT_VERSION}) + "\n")
    r = run_main(SCRIPT, *base, *flags, "--resume", "--stages", "5")
    assert r.returncode == 0, r.stderr
    if again is not None:
        return run_main(SCRIPT, *base, *again, "--resume", "--stages", "5")
    secondary = dict(zip(ids, (t[1] for t in topics)))
    return [(secondary[r["key"]], r["kept"], r["why"]) for r in map(json.loads, read(out / "5_diversity.jsonl").splitlines())]


def test_diversity_control_keeps_topics_at_the_minimum_caps_categories_and_turns_round_topics(tmp_path):
    """Stage 5: a topic seen exactly --min-label-count times is kept; --drop-unlabelled drops the rows
    whose label stayed the rule's; --max-per-category keeps exactly that many of a category, taking
    its topics in turn (a lone topic is not crowded out); a resume with another minimum is refused."""
    other = [("writing", "poems"), ("reasoning", "physics")]
    rows = diversity(tmp_path, [("math", "arith")] * 2 + [("math", "geometry")] * 2 + other, "--min-label-count", "2")
    assert [(t, kept) for t, kept, _ in rows] == [("arith", True)] * 2 + [("geometry", True)] * 2 + [("poems", False), ("physics", False)]
    assert rows[-1][2] == "rare topic (1 < 2)"
    rows = diversity(tmp_path, [("math", "arith")] * 4 + [("writing", None), ("reasoning", "physics")],
                     "--min-label-count", "1", "--drop-unlabelled")
    assert [kept for _, kept, _ in rows] == [True] * 4 + [False, True] and rows[4][2] == "unlabelled"
    rows = diversity(tmp_path, [("math", "arith")] * 4 + other, "--min-label-count", "1", "--max-per-category", "2")
    assert [kept for _, kept, _ in rows].count(True) == 4 and {why for _, kept, why in rows if not kept} == {"category cap (2)"}
    rows = diversity(tmp_path, [("math", "arith")] * 3 + [("math", "percent")] + other, "--min-label-count", "1",
                     "--max-per-category", "2")
    assert sorted(t for t, kept, _ in rows[:4] if kept) == ["arith", "percent"]
    r = diversity(tmp_path, [("math", "arith")] * 4 + other, "--min-label-count", "1", again=["--min-label-count", "10"])
    assert r.returncode != 0 and "min_label_count: 1 -> 10" in r.stderr, r.stderr


def test_teacher_cache_keys_sampling_and_failures_are_final_or_retried_with_their_kind(tmp_path):
    """The cache keys a reply on its sampling (a rerun with a larger token budget must not get the
    reply cut off at the smaller one); a 422 (the request is too long) is a final failure, not left
    for every --resume to send again; a retry tells the teacher what was wrong with its reply."""
    from nanopost.teacher import Reply, Teacher
    m = load_script(SCRIPT)

    class Scripted:
        id = "scripted"

        def __init__(self, *replies):
            self.replies, self.sent = list(replies), []

        def complete(self, requests, sampling, on_reply):
            for j, msgs in enumerate(requests):
                self.sent.append(msgs)
                on_reply(j, self.replies.pop(0))
    b = Scripted(Reply("The answer is", truncated=True), Reply("The answer is 42."))
    t = Teacher(b, str(tmp_path / "a.sqlite"), "v")
    asked = [[{"role": "user", "content": "What is 6 x 7?"}]]
    assert t.complete(asked, t.sampling(4))[0].truncated
    assert t.complete(asked, t.sampling(512))[0].text == "The answer is 42." and len(b.sent) == 2
    t = Teacher(Scripted(Reply('{"score": 7}'), Reply(None, "http_422", "too long")), str(tmp_path / "b.sqlite"), "v")
    values, failures = t.ask_json(asked + [[{"role": "user", "content": "x" * 50}]], m.check_judge, t.sampling(12), 2,
                                  m.PROMPTS["retry"])
    assert values == [(7, ""), None] and [f["kind"] for f in failures[1]] == ["http_422"] and not t.unfinished
    b = Scripted(Reply("Score: 7"), Reply('{"score": 7}'))
    t = Teacher(b, str(tmp_path / "c.sqlite"), "v")
    assert t.ask_json(asked, m.check_judge, t.sampling(12), 2, m.PROMPTS["retry"])[0] == [(7, "")]
    assert "(not_json)" in b.sent[1][-1]["content"]
