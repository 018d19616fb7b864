"""The side-by-side page at nanopost.serve's / in real headless Chromium (Debian's chromium, driven
by Playwright): each column's streamed reply equals its model's greedy reply from the engine, turn
after turn; stop; reload; model output shown as text, never run; the API key; --results numbers in
the headers; a screenshot. Skipped only when playwright or /usr/bin/chromium is missing (.ci/run
installs both). float64 weights: greedy replies without argmax near-ties on any CPU."""
import json
import os
import time
import urllib.request

import pytest
import torch

import nanopost
from nanopost import serve
from nanopost.engine import Engine, Sampling
from nanopost.testing import make_tiny_checkpoint

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
FIXTURE = os.path.join(os.path.dirname(__file__), "data", "results.json")
EVIL = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
NONE_STREAMING = "() => !document.querySelector('.assistant[data-state=streaming]')"


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None:
        pytest.skip("playwright is not installed (pip install playwright; the browser is Debian's chromium)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-background-networking"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def ckpts(tiny, tmp_path_factory):
    return {"a": tiny, "b": make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "b"), seed=1),
            "c": make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "c"), seed=2)}


@pytest.fixture(scope="module")
def engines(ckpts):
    return {name: Engine(*nanopost.load(path, dtype=torch.float64)) for name, path in ckpts.items()}


def start(models, **kw):
    return serve.start(models, dtype="float64", log_requests=False, **{"log": lambda *a: None, **kw})


@pytest.fixture(scope="module")
def server(ckpts):
    with start({"a": ckpts["a"], "b": ckpts["b"]}) as s:
        yield s


def open_page(browser, url, columns=2, **kw):
    page = browser.new_page(**kw)
    page.goto(url + "/")
    page.locator(".column").nth(columns - 1).wait_for()
    return page


def send(page, prompt, wait=True):
    page.fill("#prompt", prompt)
    page.click("#send")
    if wait:
        page.wait_for_function(NONE_STREAMING, timeout=20_000)


def replies(page):
    return page.eval_on_selector_all(".column", "cs => cs.map(c => [...c.querySelectorAll('.assistant .text')]"
                                                 ".map(e => e.textContent))")


def greedy(engine, messages, n):
    return engine.generate([messages], Sampling(max_new_tokens=n))[0]


def test_two_turns_equal_the_engine_then_reload(browser, server, engines):
    page = open_page(browser, server.url, permissions=["clipboard-read", "clipboard-write"])
    assert page.eval_on_selector_all(".column h2", "hs => hs.map(h => h.textContent)") == ["a", "b"]
    page.fill("#max-tokens", "24")
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "Hello there")
    body = request.value.post_data_json
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["stream"]) == (0, 1, 24, True)
    assert body["stream_options"] == {"include_usage": True} and "seed" not in body
    first = {n: greedy(engines[n], "Hello there", 24) for n in "ab"}
    assert first["a"] != first["b"]
    assert replies(page) == [[first["a"]], [first["b"]]]
    e = engines["a"]  # the usage chunk's count, shown under the reply
    n = len(e.generate_ids([e.encode_prompt("Hello there")], Sampling(max_new_tokens=24))[0])
    assert page.locator(".column").first.locator(".meta").inner_text().startswith(f"{n} tokens · ")

    send(page, "What is 2+2?")  # each column sends its own history
    second = {n: greedy(engines[n], [{"role": "user", "content": "Hello there"},
                                     {"role": "assistant", "content": first[n]},
                                     {"role": "user", "content": "What is 2+2?"}], 24) for n in "ab"}
    assert replies(page) == [[first["a"], second["a"]], [first["b"], second["b"]]]
    page.locator(".column").nth(1).locator(".meta button").last.click()
    assert page.evaluate("() => navigator.clipboard.readText()") == second["b"]

    page.reload()  # a fresh page: no history, and it still answers
    page.locator(".column").nth(1).wait_for()
    assert replies(page) == [[], []]
    page.fill("#max-tokens", "24")
    send(page, "What is 2+2?")
    assert replies(page) == [[greedy(engines[n], "What is 2+2?", 24)] for n in "ab"]
    page.click("#clear")
    assert replies(page) == [[], []]
    page.close()


def test_stop_halts_every_stream(browser, server, engines, monkeypatch):
    """Decoding slowed to 20 steps/s: both columns are seen filling at once, then stop freezes them."""
    for w in server.workers.values():
        def slow(prompts, s, on_token, *args, generate_ids=w.engine.generate_ids, **kw):
            return generate_ids(prompts, s, lambda *a: (time.sleep(0.05), on_token(*a))[1], *args, **kw)
        monkeypatch.setattr(w.engine, "generate_ids", slow)
    page = open_page(browser, server.url)
    send(page, "The quick brown fox", wait=False)
    page.wait_for_function("() => [...document.querySelectorAll('.assistant')].every(t => "
                           "t.dataset.state === 'streaming' && t.textContent.length > 2)", timeout=20_000)
    page.click("#stop")
    page.wait_for_function(NONE_STREAMING)
    stopped = replies(page)
    time.sleep(0.5)
    assert replies(page) == stopped
    assert page.eval_on_selector_all(".assistant", "ts => ts.map(t => t.dataset.state)") == ["stopped", "stopped"]
    for n, (text,) in zip("ab", stopped):  # the part shown is the start of the greedy reply
        assert text and greedy(engines[n], "The quick brown fox", 256).startswith(text)
    # the next turn's history holds each column's stopped reply as far as it got
    page.fill("#max-tokens", "2")
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "Second")
    first = request.value.post_data_json
    column = next(i for i, n in enumerate("ab") if first["model"] == n)
    assert first["messages"] == [{"role": "user", "content": "The quick brown fox"},
                                 {"role": "assistant", "content": stopped[column][0]}, {"role": "user", "content": "Second"}]
    # Clear while replies stream: they stop, and nothing of them reaches the next turn; Enter while
    # they stream sends nothing
    page.fill("#max-tokens", "200")
    send(page, "Third", wait=False)
    page.wait_for_function("() => [...document.querySelectorAll('.assistant[data-state=streaming]')].some(t => "
                           "t.textContent.length > 2)", timeout=20_000)
    page.fill("#prompt", "Not now")
    page.press("#prompt", "Enter")
    assert page.locator(".user").count() == 2 * 3 and page.input_value("#prompt") == "Not now"
    page.click("#clear")
    page.wait_for_function("() => !document.querySelector('.msg')")
    time.sleep(0.5)  # (a stream's abort may reach its reader only with the server's next chunk)
    page.fill("#max-tokens", "2")
    asked = []
    page.on("request", lambda r: asked.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    send(page, "Fourth")
    assert [r["messages"] for r in asked] == [[{"role": "user", "content": "Fourth"}]] * 2
    deadline = time.time() + 10  # the server dropped the rows whose client went away
    while server.active and time.time() < deadline:
        time.sleep(0.05)
    assert not server.active
    page.close()


def sse(*chunks):
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def answering(status, body, content_type="application/json"):
    """A route handler answering every request with this reply."""
    return lambda route: route.fulfill(status=status, headers={"Content-Type": content_type}, body=body)


def test_the_page_sends_what_is_set_and_shows_what_the_server_says(browser, server):
    """The request carries the fields as typed (a number the field takes in exponent form too: parseInt
    read "1e3" as 1); Enter sends, Shift+Enter starts a line, a blank prompt sends nothing, the box
    empties; a reply cut at max tokens says so; the server's own error message is shown, for an HTTP
    error and for an error event mid-stream; a 401 asks for the key; a reply stopped before its first
    token is left out of the history."""
    page = open_page(browser, server.url)
    sent, answer = [], [sse({"choices": [{"index": 0, "delta": {"content": "one two"}, "finish_reason": None}]},
                            {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
                            {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})]

    def reply(route):
        sent.append(route.request.post_data_json)
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=answer[0])
    page.route("**/v1/chat/completions", reply)
    for field, value in (("#temperature", "0.7"), ("#top-p", "0.9"), ("#max-tokens", "1e3"), ("#seed", "42")):
        page.fill(field, value)
    page.fill("#prompt", "line1")
    page.press("#prompt", "Shift+Enter")
    page.type("#prompt", "line2")
    page.press("#prompt", "Enter")
    page.wait_for_function(NONE_STREAMING)
    assert [(b["temperature"], b["top_p"], b["max_tokens"], b["seed"]) for b in sent] == [(0.7, 0.9, 1000, 42)] * 2
    assert sent[0]["messages"] == [{"role": "user", "content": "line1\nline2"}] and page.input_value("#prompt") == ""
    assert page.locator(".meta").first.inner_text().startswith("2 tokens · ") and "hit max tokens" in page.locator(".meta").first.inner_text()
    send(page, "   ")
    assert len(sent) == 2
    page.unroute("**/v1/chat/completions")
    for status, body, said in ((400, {"error": {"message": "max_tokens must be an integer in [1, 4096]"}},
                                "max_tokens must be an integer in [1, 4096]"),
                               (200, None, "CUDA out of memory: try a smaller batch")):
        events = sse({"choices": [{"index": 0, "delta": {"content": "par"}, "finish_reason": None}]},
                     {"error": {"message": "CUDA out of memory: try a smaller batch"}})
        page.route("**/v1/chat/completions", answering(status, json.dumps(body) if body else events,
                                                       "application/json" if body else "text/event-stream"))
        send(page, "Again")
        assert page.locator(".meta").last.inner_text() == said and page.locator(".assistant").last.get_attribute("data-state") == "error"
        page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", answering(401, json.dumps({"error": {"message": "bad key"}})))
    send(page, "Hello")
    assert page.locator("#key-form").is_visible() and page.inner_text("#status") == "wrong API key"
    page.unroute("**/v1/chat/completions")
    held = []
    page.route("**/v1/chat/completions", lambda route: held.append(route))  # no answer at all: stopped before its first token
    send(page, "Silence", wait=False)
    page.wait_for_function("() => document.querySelectorAll('.assistant[data-state=streaming]').length === 2")
    page.click("#stop")
    page.wait_for_function(NONE_STREAMING)
    page.unroute("**/v1/chat/completions")
    sent.clear()
    page.route("**/v1/chat/completions", reply)
    send(page, "After")
    assert [m["content"] for m in sent[0]["messages"]] == ["line1\nline2", "one two", "After"]
    page.close()


def test_the_page_says_why_it_cannot_load_and_shows_a_missing_number_as_a_dash(browser, server):
    """/v1/models failing: its message in the status line, not a blank page. A perplexity served as null
    (NaN in results.json) shows as "–". /index.html is the page too."""
    page = browser.new_page()
    page.route("**/v1/models", answering(502, json.dumps({"error": {"message": "the server is restarting"}})))
    page.goto(server.url + "/")
    page.wait_for_function("() => document.getElementById('status').textContent === 'the server is restarting'")
    assert page.locator("#key-form").is_hidden()
    page.unroute("**/v1/models")
    page.route("**/v1/results", answering(200, json.dumps({"a": {"ppl:chat.jsonl": {"perplexity": None}}})))
    page.goto(server.url + "/index.html")
    page.locator(".column").nth(1).wait_for()
    assert page.eval_on_selector_all(".scores", "ss => ss.map(s => s.textContent)") == ["ppl:chat.jsonl –", ""]
    page.close()


def test_a_stream_cut_before_its_end_is_an_error_not_a_reply(browser, server):
    """A server that dies mid-reply closes the stream without its "data: [DONE]": the columns say so,
    and the cut text is not carried into the next turn's history."""
    page = open_page(browser, server.url)
    chunk = {"choices": [{"index": 0, "delta": {"content": "half a rep"}, "finish_reason": None}]}
    page.route("**/v1/chat/completions", answering(200, f"data: {json.dumps(chunk)}\n\n", "text/event-stream"))
    send(page, "Hello")
    assert page.eval_on_selector_all(".assistant", "ts => ts.map(t => t.dataset.state)") == ["error", "error"]
    assert "cut off" in page.locator(".column").first.locator(".meta").inner_text()
    page.unroute("**/v1/chat/completions")
    with page.expect_request("**/v1/chat/completions") as request:
        send(page, "Again")
    assert [m["content"] for m in request.value.post_data_json["messages"]] == ["Again"]
    page.close()


def serve_headers(url):
    with urllib.request.urlopen(url + "/") as r:
        return {k.lower(): v for k, v in r.headers.items()}


def test_model_output_is_text_not_html(browser, ckpts):
    def run(batch, waiting):  # the worker "generates" EVIL, streamed in pieces that split its tags
        for r in batch:
            for i in range(0, len(EVIL), 7):
                r.events.put(("text", EVIL[i:i + 7]))
            r.events.put(("done", "stop", EVIL, 9))
            r.finished = True

    with start({"evil": ckpts["a"]}) as s:
        s.workers["evil"].run = run
        # the page's Content-Security-Policy would block EVIL's script even if it were inserted as
        # HTML: bypassed here, so what is tested is that it is inserted as text
        assert "script-src 'sha256-" in serve_headers(s.url)["content-security-policy"]
        page = open_page(browser, s.url, columns=1, bypass_csp=True)
        send(page, EVIL)  # the prompt, shown in the user's bubble, is text too
        assert replies(page) == [[EVIL]]
        assert page.locator(".user").inner_text() == EVIL
        assert page.locator(".column img").count() == 0 and page.locator("script").count() == 1
        assert page.evaluate("window.__pwned") is None
        page.close()


def test_api_key(browser, ckpts, engines):
    with start({"a": ckpts["a"]}, api_key="sekrit") as s:
        page = browser.new_page()
        page.goto(s.url + "/")
        page.locator("#key").wait_for()  # without the key: no models, nothing to send to
        assert page.locator(".column").count() == 0 and page.locator("#send").is_disabled()
        assert page.inner_text("#status") == ""  # no key given yet: none is wrong
        page.fill("#key", "wrong")
        page.click("#key-form button")
        page.wait_for_function("() => document.getElementById('status').textContent === 'wrong API key'")
        assert page.locator(".column").count() == 0
        page.fill("#key", "sekrit")
        page.click("#key-form button")
        page.locator(".column").wait_for()
        assert page.locator("#key-form").is_hidden()
        page.fill("#max-tokens", "12")
        send(page, "Hello there")
        assert replies(page) == [[greedy(engines["a"], "Hello there", 12)]]
        page.reload()  # the key is kept for the tab (sessionStorage)
        page.locator(".column").wait_for()
        assert page.locator("#key-form").is_hidden()
        page.close()


def test_results_in_headers_and_screenshot(browser, ckpts, tmp_path):
    """Three columns; evaluate.py's numbers found by served name (base) and by checkpoint path (sft);
    each model's memory printed as it loads."""
    with open(FIXTURE) as f:  # evaluate.py keyed sft by its checkpoint path; base's gsm8k asked 5 questions
        results = json.loads(f.read().replace('"runs/sft"', json.dumps(ckpts["b"])).replace('"limit": 3', '"limit": 5', 1))
    # and one number measured on another state of sft's folder: shown as left out, not hidden
    results[ckpts["b"]]["humaneval"] = {"accuracy": 12.5, "n": 8, "checkpoint": "0" * 16, "settings": {}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    log = []
    models = {"base": ckpts["a"], "sft": ckpts["b"], "kto": ckpts["c"]}
    with start(models, results=str(tmp_path / "results.json"), log=log.append) as s:
        for name in models:
            assert any(line.startswith(f"{name}: ") and "MiB of float64 weights" in line and "peak" in line for line in log)
        assert "sft's humaneval" in log[0] and "no entry for kto" in log[1]
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(s.url + "/")
        page.locator(".column").nth(2).wait_for()
        scores = page.eval_on_selector_all(".scores", "ss => ss.map(s => s.textContent)")
        assert scores == ["gsm8k 33.33%†mmlu 50%ppl:chat.jsonl 18.2031",
                          "gsm8k 66.67%†mmlu 100%ppl:chat.jsonl 9.8712humaneval left out", ""]
        titles = page.eval_on_selector_all(".scores span", "ss => ss.map(s => s.title)")
        assert page.locator(".scores span.stale").count() == 1 and "retrained or re-merged" in titles[-1]
        assert "limit 5" in titles[0] and "another column's number" in titles[0] and "limit 3" in titles[3]
        assert titles[1] == "2 examples\nshots 0, mode logprob, limit 2, protocol 1, dtype float32"  # mmlu: the same, no †
        page.fill("#max-tokens", "40")
        send(page, "Natalia sold clips to 48 of her friends in April. How many clips did she sell?")
        page.screenshot(path=str(tmp_path / "compare.png"))
        assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        page.close()


def test_results_errors(tmp_path):
    (tmp_path / "r.json").write_text('{"base": {"gsm8k": 31.5}}')
    with pytest.raises(ValueError, match="r.json is not an evaluate.py results.json"):
        serve.load_results(str(tmp_path / "r.json"), {"base": "x"})


def test_results_leave_out_a_changed_checkpoint_and_mark_other_settings(tmp_path):
    """The page's numbers follow results.md's rules: a served folder whose files changed since
    evaluate.py measured it (retrained into the same --out) shows none of its old numbers, and one
    task's numbers made with other settings or questions (or another perplexity file) are marked."""
    from nanopost import tasks
    a, b = (make_tiny_checkpoint(str(tmp_path / n), seed=i) for i, n in enumerate("ab"))
    now = {n: tasks.stamp(tasks.fingerprint(str(tmp_path / n))) for n in "ab"}
    cell = lambda acc, stamp, **settings: {"accuracy": acc, "n": 4, "checkpoint": stamp, "data": "q1",  # noqa: E731
                                            "settings": {"shots": 0, "limit": 4, "protocol": tasks.PROTOCOL, **settings}}
    results = {a: {"gsm8k": cell(50.0, now["a"]), "mmlu": cell(25.0, now["a"]), "ceval": cell(75.0, now["a"]),
                   "cmmlu": cell(50.0, now["a"], dtype="float32"),
                   "ppl:chat.jsonl": {"perplexity": 9.5, "checkpoint": now["a"], "data": "f1"}},
               b: {"gsm8k": cell(75.0, now["b"], limit=100),  # 100 of 4 questions: the same 4 (data), not marked
                   "mmlu": cell(50.0, now["b"], shots=5), "ceval": cell(25.0, "0" * 16),
                   "cmmlu": cell(50.0, now["b"], dtype="bfloat16"),
                   "ppl:chat.jsonl": {"perplexity": 8.5, "checkpoint": now["b"], "data": "f2"}},
               "sft": {"gsm8k": cell(0.0, now["a"])}}  # named as served, but b's own entry (by path) wins
    (tmp_path / "results.json").write_text(json.dumps(results))
    log = []
    out = serve.load_results(str(tmp_path / "results.json"), {"base": a, "sft": b}, log.append)
    assert set(out["base"]) == {"gsm8k", "mmlu", "ceval", "cmmlu", "ppl:chat.jsonl"}
    assert set(out["sft"]) == {"gsm8k", "mmlu", "ceval", "cmmlu", "ppl:chat.jsonl"}
    assert out["sft"]["ceval"] == {"stale": True}  # another state of the folder: said, with no number
    assert out["sft"]["gsm8k"]["accuracy"] == 75.0
    assert any("sft's ceval (the entry" in line and "other than" in line for line in log)
    assert [t for t in out["base"] if out["base"][t].get("differs")] == ["mmlu", "cmmlu", "ppl:chat.jsonl"]
    assert [t for t in out["sft"] if out["sft"][t].get("differs")] == ["mmlu", "cmmlu", "ppl:chat.jsonl"]
    assert out["sft"]["mmlu"]["settings"] == {"shots": 5, "limit": 4, "protocol": tasks.PROTOCOL, "data": "q1"}
    assert out["sft"]["ppl:chat.jsonl"]["settings"] == {"data": "f2"}  # they differ only there: it is shown
    assert "gsm8k" not in "".join(line for line in log if "other settings" in line)
    # ceval is only base's now: nothing to differ from. Retraining base too drops its numbers.
    assert "differs" not in out["base"]["ceval"]
    (tmp_path / "a" / "config.json").write_text((tmp_path / "a" / "config.json").read_text() + " ")
    out = serve.load_results(str(tmp_path / "results.json"), {"base": a, "sft": b}, log.append)
    assert out["base"] == {t: {"stale": True} for t in results[a]}
    assert "differs" not in out["sft"]["mmlu"]  # nothing left to differ from
    # evaluated as a relative --model from another directory (or before a move): found by its stamp
    moved = {"runs/b": results[b], "sft": results["sft"]}
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    out = serve.load_results(str(tmp_path / "moved.json"), {"sft": b}, log.append)
    assert out["sft"]["gsm8k"]["accuracy"] == 75.0 and out["sft"]["ceval"] == {"stale": True}
    # an older entry under the served path itself (measured before a retrain, listed first) loses to
    # the entry whose numbers were measured on these files
    (tmp_path / "moved.json").write_text(json.dumps({b: {"gsm8k": cell(10.0, "1" * 16)}, "runs/b": results[b]}))
    out = serve.load_results(str(tmp_path / "moved.json"), {"sft": b}, log.append)
    assert out["sft"]["gsm8k"]["accuracy"] == 75.0
    # a model whose perplexity is NaN (python's json writes it, a browser's JSON.parse fails on it, and
    # the page with every column): served as null
    nan = {b: dict(results[b], **{"ppl:chat.jsonl": {"perplexity": float("nan"), "checkpoint": now["b"], "data": "f2"}})}
    (tmp_path / "nan.json").write_text(json.dumps(nan))
    out = serve.load_results(str(tmp_path / "nan.json"), {"sft": b}, log.append)
    assert out["sft"]["ppl:chat.jsonl"]["perplexity"] is None and "NaN" not in json.dumps(out)
    # a hub id served under a name that another checkpoint's entry has: only its own id's entry counts
    out = serve.load_results(str(tmp_path / "results.json"), {"sft": "acme/tiny"}, log.append)
    assert out == {} and "no entry for sft (acme/tiny)" in log[-1]
    # a results.json whose cells are not evaluate.py's shape is refused as a whole, before any use
    (tmp_path / "odd.json").write_text(json.dumps({"x": {"mmlu": {"accuracy": 50, "settings": None}}}))
    with pytest.raises(ValueError, match="is not an evaluate.py results.json"):
        serve.load_results(str(tmp_path / "odd.json"), {"x": a})
    # lm-evaluation-harness's results.json has the same nesting, and no number of ours in its cells
    (tmp_path / "lm_eval.json").write_text(json.dumps({"results": {"mmlu": {"acc,none": 0.5, "alias": "mmlu"}},
                                                        "configs": {"mmlu": {"num_fewshot": 5}}}))
    with pytest.raises(ValueError, match="is not an evaluate.py results.json"):
        serve.load_results(str(tmp_path / "lm_eval.json"), {"results": a})
