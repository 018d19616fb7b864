"""nanopost.serve driven by the official openai client: replies equal the engine's, streamed or not,
for each of two served models; stop strings; 4xx on bad requests; a burst of concurrent clients
batched and not mixed up; a client leaving mid-stream; Ctrl-C. float64 weights: no argmax
near-ties, so a batched row equals the same prompt run alone on every CPU."""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import openai
import pytest
import torch

import nanopost
from nanopost import serve
from nanopost.engine import Engine, Sampling
from nanopost.testing import make_tiny_checkpoint

PROMPTS = ["Hello there", "What is 2+2?", "The quick brown fox", "Natalia sold clips", "Le renard brun",
           "def add(a, b):", "Question: how many clips?", "こんにちは世界", "1234567890", "print(add(2, 3))",
           "You are a helpful assistant.", "tabs\tand spaces", "Der schnelle braune Fuchs", "quotes 'single'",
           "Let's think step by step.", "The answer is 72."]


@pytest.fixture(scope="module")
def ckpts(tiny, tmp_path_factory):
    """a and b: two tiny models; eos: a's weights with its 3rd greedy token for "Hello there" made an eos."""
    b = make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "b"), seed=1)
    engine = Engine(*nanopost.load(tiny, dtype=torch.float64))
    third = engine.generate_ids([engine.encode_prompt("Hello there")], Sampling(max_new_tokens=3))[0][2]
    eos = shutil.copytree(tiny, tmp_path_factory.mktemp("ckpt") / "eos")
    config = json.loads((eos / "generation_config.json").read_text())
    (eos / "generation_config.json").write_text(json.dumps(dict(config, eos_token_id=[third])))
    return {"a": tiny, "b": b, "eos": str(eos)}


@pytest.fixture(scope="module")
def engines(ckpts):
    return {name: Engine(*nanopost.load(path, dtype=torch.float64)) for name, path in ckpts.items()}


@pytest.fixture(scope="module")
def server(ckpts):
    with serve.start(ckpts, dtype="float64", batch_size=16, log_requests=False, log=lambda *a: None) as s:
        yield s


def client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=30, **kw)


def chat(c, prompt, model="a", stream=False, **kw):
    msgs = [{"role": "user", "content": prompt}]
    if not stream:
        r = c.chat.completions.create(model=model, messages=msgs, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    text, reasons = "", []
    for chunk in c.chat.completions.create(model=model, messages=msgs, stream=True, **kw):
        text += chunk.choices[0].delta.content or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert all(r is None for r in reasons[:-1])
    return text, reasons[-1], None


def greedy(engine, prompt, n, stop=()):
    return engine.generate([prompt], Sampling(max_new_tokens=n, stop=list(stop)))[0]


def post(server, raw: bytes, headers=None):
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    conn.request("POST", "/v1/chat/completions", body=raw, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_replies_streamed_or_not_equal_the_engine_for_each_model(server, engines):
    c = client(server)
    assert sorted(m.id for m in c.models.list()) == ["a", "b", "eos"]
    replies = {}
    # b's reply to "Le renard brun" has a character split across tokens: a stream must not send it half-made
    for name, prompt in [(name, p) for name in engines for p in ("Hello there", "Le renard brun")]:
        engine = engines[name]
        want = greedy(engine, prompt, 20)
        text, reason, usage = chat(c, prompt, model=name, max_tokens=20)
        prompt_ids = engine.encode_prompt(prompt)
        n_new = len(engine.generate_ids([prompt_ids], Sampling(max_new_tokens=20))[0])
        assert (text, reason) == (want, "length" if n_new == 20 else "stop")
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (len(prompt_ids), n_new,
                                                                                      len(prompt_ids) + n_new)
        assert chat(c, prompt, model=name, stream=True, max_tokens=20)[:2] == (text, reason)
        replies[name] = replies.get(name, text)
    assert replies["a"] != replies["b"]  # each name reaches its own model
    assert replies["eos"] == replies["a"][:len(replies["eos"])] and 0 < len(replies["eos"]) < len(replies["a"])
    # OpenAI's list-of-parts content reads as the text; a seeded sampled request is reproducible
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    assert c.chat.completions.create(model="a", messages=parts, max_tokens=20).choices[0].message.content == replies["a"]
    s = Sampling(max_new_tokens=12, temperature=1.0, seed=7)
    sampled = engines["a"].tok.decode(engines["a"].generate_ids([engines["a"].encode_prompt("Hello there")], s)[0])
    assert chat(c, "Hello there", temperature=1.0, seed=7, max_tokens=12)[0] == sampled
    assert chat(c, "Hello there", temperature=1.0, seed=7, max_tokens=12, stream=True)[0] == sampled


def test_stop_strings_cut_exactly_as_the_engine_does(server, engines):
    c, engine = client(server), engines["a"]
    ids = engine.generate_ids([engine.encode_prompt("Hello there")], Sampling(max_new_tokens=30))[0]
    full, first = engine.tok.decode(ids), len(engine.tok.decode(ids[:1]))
    across = full[first - 1:first + 1]  # spans the first two tokens: a stream must not send its first half
    assert full.find(across) == first - 1 and "\ufffd" not in across
    for stop in (across, [full[first + 1:first + 3], across], [full[first + 4]]):
        want = greedy(engine, "Hello there", 30, [stop] if isinstance(stop, str) else stop)
        assert len(want) < len(full)
        assert chat(c, "Hello there", max_tokens=30, stop=stop)[:2] == (want, "stop")
        assert chat(c, "Hello there", max_tokens=30, stop=stop, stream=True)[:2] == (want, "stop")


@pytest.mark.parametrize("change, status, param", [
    ({"temperature": 3}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
    ({"n": 2}, 400, "n"),
    ({"logit_bias": {"5": 10}}, 400, "logit_bias"),
    ({"logprobs": True, "top_logprobs": 2}, 400, "logprobs"),
    ({"model": "nope"}, 404, "model"),
    ({"model": ""}, 400, "model"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages"),  # > the 2048-token context
    ({"stop": ["", "x"]}, 400, "stop"),
    # fields nanopost cannot honour are refused, not ignored (a client asking for JSON got free text)
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    # a field it does not read at all was answered as if absent: a typo (the reply ran to 512 tokens),
    # another server's sampling field (vLLM's min_p, ignore_eos), an option for a stream not asked for
    ({"extra_body": {"max_token": 1}}, 400, "max_token"),
    ({"extra_body": {"temprature": 2.0}}, 400, "temprature"),
    ({"extra_body": {"min_p": 0.9}}, 400, "min_p"),
    ({"extra_body": {"ignore_eos": True}}, 400, "ignore_eos"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "no"}}, 400, "stream_options"),
    ({"stream": True, "stream_options": {"include_uage": True}}, 400, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": 0}}, 400, "stream_options"),
    # the ranges' other ends, and values of another type (JSON true is no number, 0 no false)
    ({"extra_body": {"repetition_penalty": 10.5}}, 400, "repetition_penalty"),
    ({"extra_body": {"repetition_penalty": 0}}, 400, "repetition_penalty"),
    ({"extra_body": {"top_k": -1}}, 400, "top_k"),
    ({"temperature": True}, 400, "temperature"),
    ({"stop": ["x" * 257]}, 400, "stop"),
    ({"stop": [str(i) for i in range(17)]}, 400, "stop"),
    ({"n": True}, 400, "n"),
    ({"logprobs": 0}, 400, "logprobs"),
    ({"presence_penalty": False}, 400, "presence_penalty"),
    ({"extra_body": {"stream": 0}}, 400, "stream"),
    ({"extra_body": {"stream_options": []}}, 400, "stream_options"),
    ({"extra_body": {"stream_options": False}}, 400, "stream_options"),
    ({"stream": True, "stream_options": 0}, 400, "stream_options"),
])
def test_bad_requests_get_openai_shaped_4xx(server, change, status, param):
    body = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **change}
    with pytest.raises(openai.APIStatusError) as e:
        client(server).chat.completions.create(**body)
    assert e.value.status_code == status and e.value.body["param"] == param, e.value.body
    if status == 404:
        assert "a, b" in e.value.body["message"]  # lists the served names


def test_fields_set_to_what_changes_nothing_are_accepted(server, engines):
    """Clients that always send logit_bias {} or top_logprobs 0 (no bias, no log-probs) get answers;
    extreme but valid sampling values decode (temperature 1e-40 greedily) instead of a 500."""
    c, want = client(server), greedy(engines["a"], "hi", 4)
    for kw in ({"logit_bias": {}}, {"top_logprobs": 0}, {"logprobs": False, "n": 1, "presence_penalty": 0},
               {"response_format": {"type": "text"}, "tool_choice": "none"}, {"tool_choice": "auto"},
               {"temperature": 1e-40, "top_p": 0.5}, {"user": "u1", "store": False, "metadata": {"k": "v"}},
               {"modalities": ["text"]}, {"stream_options": None}):
        assert chat(c, "hi", max_tokens=4, **kw)[0] == want, kw
    assert chat(c, "hi", max_tokens=4, stream=True, stream_options={"include_usage": None})[0] == want  # null: false
    assert chat(c, "hi", max_tokens=4, temperature=1.0, seed=1, extra_body={"repetition_penalty": 1e-300})[0] is not None


def test_limits_and_the_default_max_tokens_are_where_the_docs_put_them(server):
    """Each documented range holds both of its ends (temperature [0, 2], top_p (0, 1], top_k >= 0,
    repetition_penalty (0, 10], max_tokens [1, --max-tokens-limit], 16 stop strings of 256 characters,
    1024 messages of 200,000 characters): a model with a long context would meet the message limits
    before its context, so they are checked here on a worker with a context of 10**7. Without
    max_tokens a reply gets --default-max-tokens cut to the room left in the context; a prompt
    that leaves no room, or max_tokens past the room, is context_length_exceeded."""
    w = server.workers["a"]
    roomy = types.SimpleNamespace(engine=w.engine, tok=w.tok, context=10**7)

    def parse(worker=roomy, limit=64, default=16, messages=None, **change):
        body = {"model": "a", "messages": messages or [{"role": "user", "content": "hi"}], **change}
        return serve.parse_chat(body, {"a": worker}, limit, default)

    def refused(param, **kw):
        with pytest.raises(serve.ApiError) as e:
            parse(**kw)
        assert e.value.status == 400 and e.value.body["error"]["param"] == param, e.value.body
    r = parse(temperature=2, top_p=1, top_k=0, repetition_penalty=10, max_tokens=64, stop=["x" * 256] * 16)
    assert (r.sampling.temperature, r.sampling.top_p, r.sampling.repetition_penalty, r.max_tokens) == (2, 1, 10, 64)
    assert parse(temperature=0.7, top_k=3, top_p=0.5).sampling.top_k == 3 and parse(max_tokens=1).max_tokens == 1
    for key, value in (("temperature", 2.001), ("temperature", -0.001), ("top_p", 1.001), ("top_k", -1),
                       ("repetition_penalty", 10.001), ("max_tokens", 65), ("max_completion_tokens", 65)):
        refused(key, **{key: value})
    assert len(parse(messages=[{"role": "user", "content": "hi"}] * 1024).ids) > 1024
    refused("messages", messages=[{"role": "user", "content": "hi"}] * 1025)
    assert parse(messages=[{"role": "user", "content": "ab" * 100_000}]).max_tokens == 16
    refused("messages[1].content", messages=[{"role": "user", "content": "hi"}, {"role": "user", "content": "x" * 200_001}])
    # the context: this tiny model's 2048 tokens
    assert w.context == 2048 and parse(worker=w).max_tokens == 16
    def words(k):
        return [{"role": "user", "content": "hi" + " hi" * k}]
    lo, hi = 0, 2048  # the shortest prompt leaving at most 10 tokens of room (each " hi" takes at least one)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if 2048 - len(w.engine.encode_prompt(words(mid)[0]["content"])) > 10 else (lo, mid)
    long, room = words(lo), 2048 - len(w.engine.encode_prompt(words(lo)[0]["content"]))
    assert 1 <= room <= 10
    assert parse(worker=w, messages=long).max_tokens == room  # the default, cut to the room
    assert parse(worker=w, messages=long, max_tokens=room).max_tokens == room
    with pytest.raises(serve.ApiError) as e:
        parse(worker=w, messages=long, max_tokens=room + 1)
    assert e.value.body["error"]["code"] == "context_length_exceeded"
    with pytest.raises(serve.ApiError) as e:  # no room at all, none asked for: refused, not run with max_tokens <= 0
        parse(worker=w, messages=words(2100))
    assert e.value.body["error"]["code"] == "context_length_exceeded"
    capped = serve.Server(server.workers, "127.0.0.1", 0, max_tokens_limit=8, default_max_tokens=600, log_requests=False)
    try:  # a default past the limit is the limit
        assert capped.default_max_tokens == 8
    finally:
        capped.httpd.shutdown()
        capped.httpd.server_close()


def test_oversize_and_malformed_bodies(server):
    big = "x" * (serve.MAX_BODY_BYTES + 1000)
    with pytest.raises(openai.APIStatusError) as e:
        client(server).chat.completions.create(model="a", messages=[{"role": "user", "content": big}])
    assert e.value.status_code == 413
    status, body = post(server, b'{"model": "a", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert post(server, b'["a list"]')[0] == 400
    # a lone surrogate is valid JSON but not text: a 400, not a dropped connection
    status, body = post(server, b'{"model": "a", "messages": [{"role": "user", "content": "hi \\ud800 x"}]}')
    assert status == 400 and body["error"]["param"] == "messages[0].content", body
    status, body = post(server, b'{"model": "a", "messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}')
    assert status == 400 and body["error"]["param"] == "stop", body  # a 500 from the engine's encode
    status, body = post(server, b"[" * 100_000 + b"]" * 100_000)  # nests past Python's recursion limit
    assert status == 400 and "nested too deeply" in body["error"]["message"]  # was no reply at all
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)  # one keep-alive client
    conn.request("POST", "/v1/chat/completions", body=b"x" * (serve.MAX_BODY_BYTES + 1))
    r = conn.getresponse()
    assert r.status == 413 and r.getheader("Connection") == "close" and r.read()  # the server closes: it says so
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    got = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
    assert got.startswith(b"HTTP/1.1 400 ") and b"valid Content-Length" in got, got[:200]  # malformed, not too large
    body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    status, reply = post(server, body + b" " * (serve.MAX_BODY_BYTES - len(body)))  # exactly the limit: taken
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length"), reply
    assert server.httpd.request_queue_size >= 64  # socketserver's default backlog of 5 resets bursts
    assert chat(client(server), "hi", max_tokens=2)[0] is not None  # the server still answers


def test_api_key_is_required_when_set(ckpts):
    with pytest.raises(ValueError, match="api-key"):
        serve.start(ckpts, host="0.0.0.0", dtype="float64")
    with pytest.raises(SystemExit, match="api-key"):
        serve.main(["--model", ckpts["a"], "--host", "192.168.1.2", "--port", "0"])
    for empty in ("", "  "):  # an empty key would let 'Authorization: Bearer ' in
        with pytest.raises(ValueError, match="empty"):
            serve.start(ckpts, host="0.0.0.0", api_key=empty, dtype="float64")
    with serve.start({"a": ckpts["a"]}, api_key="sekret", dtype="float64", log_requests=False, log=lambda *a: None) as s:
        for key in ("none", "sekret2", "sekre"):
            with pytest.raises(openai.AuthenticationError):
                chat(client(s, api_key=key), "hi", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            client(s).models.list()
        assert chat(client(s, api_key="sekret"), "hi", max_tokens=2)[0] is not None
        assert [m.id for m in client(s, api_key="sekret").models.list()] == ["a"]
        conn = http.client.HTTPConnection(s.url.removeprefix("http://"), timeout=30)
        for path, headers, status in (("/v1/results", {}, 401), ("/health", {}, 401), ("/v1/models", {"Authorization": "sekret"}, 401),
                                      ("/v1/models", {"Authorization": "bearer sekret"}, 401), ("/", {}, 200),
                                      ("/v1/results", {"Authorization": "Bearer sekret"}, 200)):
            conn.request("GET", path, headers=headers)  # only the page is served without the key
            r = conn.getresponse()
            r.read()
            assert r.status == status, (path, headers)
    with serve.start({"a": ckpts["a"]}, host="localhost", dtype="float64", log_requests=False, log=lambda *a: None) as s:
        assert chat(client(s), "hi", max_tokens=2)[0] is not None  # localhost is loopback: no key needed


def test_the_api_key_defaults_to_the_environment(tiny, monkeypatch):
    """--api-key's default is $NANOPOST_API_KEY (--help says so): with it set, serving on another
    address starts, and the key is asked for."""
    monkeypatch.setenv("NANOPOST_API_KEY", "from-env")
    started = {}

    def fake_start(models, host, port, api_key, *a, **kw):
        started.update(host=host, api_key=api_key)
        raise SystemExit(0)
    monkeypatch.setattr(serve, "start", fake_start)
    with pytest.raises(SystemExit):
        serve.main(["--model", tiny, "--host", "0.0.0.0", "--port", "0"])
    assert started == {"host": "0.0.0.0", "api_key": "from-env"}
    with pytest.raises(SystemExit):
        serve.main(["--model", tiny, "--host", "0.0.0.0", "--port", "0", "--api-key", "given"])
    assert started["api_key"] == "given"  # the flag wins


def spy_on(server, name, n):
    """Plug the model's worker until n requests wait, so they deterministically share the next
    batch; record each batch it runs and each decode step (how many rows it gave a token)."""
    worker, batches, steps, plugged = server.workers[name], [], [], threading.Event()
    plug = serve.parse_chat({"model": name, "messages": [{"role": "user", "content": "plug"}]}, server.workers, 9, 9)
    run, generate_ids = worker.run, worker.engine.generate_ids

    def spying_run(batch, waiting):
        if batch[0] is not plug:
            batches.append(batch)
            return run(batch, waiting)
        plugged.set()
        t0 = time.time()
        while worker.inbox.qsize() < n and time.time() - t0 < 20:
            time.sleep(0.01)
    worker.run = spying_run
    worker.engine.generate_ids = lambda p, s, on_token, *a, **kw: generate_ids(
        p, s, lambda *x: (steps.append(sum(t is not None for t in x[1])), on_token(*x))[1], *a, **kw)
    worker.submit(plug)
    assert plugged.wait(10)
    return batches, steps, lambda: (worker.__dict__.pop("run"), worker.engine.__dict__.pop("generate_ids"))


def run_threads(targets, timeout=60):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads)


def test_a_burst_of_16_clients_is_batched_and_each_gets_its_own_answer(server, engines):
    """10 greedy requests (different max_tokens) share one batch, 2 unseeded sampled ones another;
    4 seeded sampled ones run alone (their replies do not depend on who else was waiting)."""
    engine, limits = engines["a"], [8 + 8 * (i % 3) for i in range(16)]
    seeds = {i: 100 + i for i in (3, 6, 9, 12)}
    want = [engine.tok.decode(engine.generate_ids([engine.encode_prompt(p)], Sampling(
        max_new_tokens=n, temperature=1.0 if i in seeds else 0.0, seed=seeds.get(i)))[0])
        for i, (p, n) in enumerate(zip(PROMPTS, limits))]  # one at a time
    batches, _, restore = spy_on(server, "a", n=16)
    got = [None] * 16

    def one(i):
        sampled = dict(temperature=1.0, seed=seeds[i]) if i in seeds else dict(temperature=0.7) if i >= 14 else {}
        got[i] = chat(client(server), PROMPTS[i], stream=i % 2 == 1, max_tokens=limits[i], **sampled)[0]
    try:
        run_threads([lambda i=i: one(i) for i in range(16)])
    finally:
        restore()
    assert got[:14] == want[:14] and all(isinstance(g, str) for g in got[14:])
    assert sorted(len(b) for b in batches) == [1, 1, 1, 1, 2, 10]


def test_requests_sampled_otherwise_never_share_a_batch(server, engines):
    """A batch runs one Sampling: requests that differ in stop strings, top_p, top_k or the repetition
    penalty run apart (in one batch, B's reply was cut at A's stop string, or sampled with A's top_p);
    and --batch-size caps the rows decoded at once."""
    engine, prompt = engines["a"], "Hello there"
    full = greedy(engine, prompt, 30)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    asks = [{}, {"stop": [stop]}, {"temperature": 1.0}, {"temperature": 1.0, "top_p": 1e-9},
            {"temperature": 1.0, "extra_body": {"top_k": 1}}, {"extra_body": {"repetition_penalty": 1.3}}]
    batches, _, restore = spy_on(server, "a", n=len(asks))
    got = {}
    try:
        run_threads([lambda i=i: got.update({i: chat(client(server), prompt, max_tokens=30, **asks[i])[0]})
                     for i in range(len(asks))])
    finally:
        restore()
    assert sorted(len(b) for b in batches) == [1] * len(asks)
    assert got[0] == full and got[1] == greedy(engine, prompt, 30, [stop]) != full
    assert got[3] == got[4] == full  # top_p 1e-9 and top_k 1 keep only the argmax: greedy
    want = engine.tok.decode(engine.generate_ids([engine.encode_prompt(prompt)],
                                                 Sampling(max_new_tokens=30, repetition_penalty=1.3))[0])
    assert got[5] == want != full


def test_batch_size_caps_the_rows_decoded_at_once(server, engines, monkeypatch):
    monkeypatch.setattr(server.workers["a"], "batch_size", 2)
    batches, steps, restore = spy_on(server, "a", n=5)
    got = {}
    try:
        run_threads([lambda i=i: got.update({i: chat(client(server), PROMPTS[i], max_tokens=6)[0]}) for i in range(5)])
    finally:
        restore()
    assert [len(b) for b in batches] == [5] and max(steps) == 2  # one call, two rows at a time
    assert [got[i] for i in range(5)] == [greedy(engines["a"], PROMPTS[i], 6) for i in range(5)]


def raw(server, request: bytes, shut_write=False, timeout=30) -> bytes:
    """What the server answers on one connection to a request sent as bytes (until it closes)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    return got


def test_request_framing_a_proxy_could_be_fooled_by(server):
    """A Transfer-Encoding spelled "Chunked" was ignored, its chunks read as a Content-Length body and
    the request hidden in them run next; a body shorter than its Content-Length (the client closed)
    was run as a whole request; a Content-Length far past the limit waited 120 s for bytes never sent."""
    hidden = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    for te in (b"Chunked", b"gzip, chunked"):
        got = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: " + te +
                  b"\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(hidden), hidden))
        assert got.startswith(b"HTTP/1.1 411") and got.count(b"HTTP/1.1 ") == 1, got[:300]
    body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()
    got = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
              % (len(body) + 100, body), shut_write=True)
    assert got.startswith(b"HTTP/1.1 400") and b"the body ended after" in got, got[:300]
    t0 = time.time()
    got = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n{}")
    assert got.startswith(b"HTTP/1.1 413") and time.time() - t0 < 10, (got[:300], time.time() - t0)


def test_a_client_leaving_mid_stream_does_not_break_the_batch(server, engines):
    batches, steps, restore = spy_on(server, "a", n=4)
    results = {}

    def leaver():
        body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 1000,
                           "stream": True}).encode()
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            f = sock.makefile("rb")
            lines = iter(f.readline, b"")
            results["leaver"] = [next(x for x in lines if x.startswith(b"data: ")) for _ in range(2)]  # role, text
            f.close()
            sock.shutdown(socket.SHUT_RDWR)  # gone mid-stream

    def stayer(i):
        results[i] = chat(client(server), PROMPTS[i], stream=i == 1, max_tokens=24)[0]
    try:
        run_threads([leaver] + [lambda i=i: stayer(i) for i in (1, 2, 3)])
    finally:
        restore()
    assert [results[i] for i in (1, 2, 3)] == [greedy(engines["a"], PROMPTS[i], 24) for i in (1, 2, 3)]
    assert b'"role": "assistant"' in results["leaver"][0] and b'"content"' in results["leaver"][1]
    assert [len(b) for b in batches] == [4]
    leaver_row = next(r for r in batches[0] if r.max_tokens == 1000)
    assert leaver_row.cancelled
    assert len(steps) < 1000  # its batch ended once it was gone, not after its 1000 tokens
    assert chat(client(server), "Hello there", max_tokens=20)[0] == greedy(engines["a"], "Hello there", 20)


def test_a_client_leaving_before_its_whole_reply_frees_its_row(server, engines):
    """Not streamed, nothing is written until the reply's end, so no failed write tells the server
    the client left: it watches the socket, and the row ends instead of running to max_tokens."""
    batches, steps, restore = spy_on(server, "a", n=4)
    results = {}

    def leaver():
        body = json.dumps({"model": "a", "messages": [{"role": "user", "content": "Hello there"}],
                           "max_tokens": 1000}).encode()
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            t0 = time.time()
            while len(steps) < 3 and time.time() - t0 < 20:  # its batch is decoding
                time.sleep(0.005)
            sock.shutdown(socket.SHUT_RDWR)

    def stayer(i):
        results[i] = chat(client(server), PROMPTS[i], max_tokens=24)[0]
    try:
        run_threads([leaver] + [lambda i=i: stayer(i) for i in (1, 2, 3)])
    finally:
        restore()
    assert [results[i] for i in (1, 2, 3)] == [greedy(engines["a"], PROMPTS[i], 24) for i in (1, 2, 3)]
    assert [len(b) for b in batches] == [4]
    leaver_row, t0 = next(r for r in batches[0] if r.max_tokens == 1000), time.time()
    while not leaver_row.finished and time.time() - t0 < 30:  # the server looks every 0.5 s
        time.sleep(0.01)
    assert leaver_row.cancelled
    assert len(steps) < 1000  # the batch ended once it was gone, not after its 1000 tokens


def test_client_gone_reads_the_socket_without_consuming_it():
    """What a non-streamed request's handler checks every 0.5 s: a peer that closed (or half-closed,
    as nginx counts it) is gone; one that is quiet, or already sent its next request, is not; and a
    descriptor past select()'s 1024 works (select raised there, taken for gone: no reply was sent)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1500:
        if hard != resource.RLIM_INFINITY and hard < 1500:
            pytest.skip("cannot open descriptor 1500 here")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1500 if hard == resource.RLIM_INFINITY else min(hard, 4096), hard))
    gone = lambda sock: serve.Handler.client_gone(types.SimpleNamespace(connection=sock))  # noqa: E731
    a, b = socket.socketpair()
    high = socket.socket(fileno=os.dup2(a.fileno(), 1499))
    try:
        assert not gone(a) and not gone(high)  # quiet
        b.sendall(b"GET /health HTTP/1.1\r\n\r\n")
        assert not gone(a) and not gone(high) and a.recv(4, socket.MSG_PEEK) == b"GET "  # a next request: kept
        a.recv(100)
        b.shutdown(socket.SHUT_WR)
        assert gone(a) and gone(high)
    finally:
        for x in (a, b, high):
            x.close()


def test_streamed_usage_is_null_until_the_last_chunk(server, engines):
    """OpenAI's spec with stream_options.include_usage: every chunk carries "usage", null but on the
    last (a choices-less chunk with the counts). Server-sent events are sent as text/event-stream."""
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"}, body=json.dumps(
        {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True,
         "stream_options": {"include_usage": True}}))
    r = conn.getresponse()
    assert r.getheader("Content-Type") == "text/event-stream"
    lines = [x for x in r.read().decode().split("\n\n") if x]
    conn.close()
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1]) and len(chunks) >= 3
    n = len(engines["a"].encode_prompt("hi"))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": n, "completion_tokens": 5,
                                                                   "total_tokens": n + 5}


def test_requests_arriving_mid_run_join_it_and_are_answered_first(server, engines, monkeypatch):
    """Continuous batching across requests: short requests sent while a long one decodes join the
    running engine call (no second call) and their replies come back while the long one goes on.
    Two of them with batch_size 2: the second waits for the first's slot, not for the long reply."""
    worker, calls, times = server.workers["a"], [], {}
    generate_ids = worker.engine.generate_ids
    monkeypatch.setattr(worker, "batch_size", 2)

    def slow(prompts, s, on_token, *a, **kw):  # 50 steps/s, so the long reply surely outlasts the short ones
        calls.append(len(prompts))
        return generate_ids(prompts, s, lambda *x: (time.sleep(0.02), on_token(*x))[1], *a, **kw)
    monkeypatch.setattr(worker.engine, "generate_ids", slow)
    started, got = threading.Event(), {}

    def long():
        text = ""
        for chunk in client(server).chat.completions.create(
                model="a", messages=[{"role": "user", "content": PROMPTS[0]}], stream=True, max_tokens=150):
            text += chunk.choices[0].delta.content or ""
            started.set()
        got["long"], times["long"] = text, time.time()

    def short(i):
        assert started.wait(20)
        got[i] = chat(client(server), PROMPTS[i], max_tokens=10)[0]
        times[i] = time.time()  # when the reply is back
    run_threads([long, lambda: short(2), lambda: short(5)])
    assert calls == [1]  # one engine call; the short requests joined it
    assert got[2] == greedy(engines["a"], PROMPTS[2], 10) and got[5] == greedy(engines["a"], PROMPTS[5], 10)
    assert got["long"] == greedy(engines["a"], PROMPTS[0], 150)
    assert len(engines["a"].tok.encode(got["long"])) > 100  # the long reply really ran long (about 3 s here)
    assert max(times[2], times[5]) < times["long"] - 1.0  # both answered well before the long one ended


@pytest.mark.parametrize("launched", ["foreground", "with SIGINT ignored"])
def test_command_line_serves_and_stops_cleanly_on_ctrl_c(tiny, capsys, launched):
    """Ctrl-C mid-reply; also when started as a shell's background job or under nohup, which start
    programs with SIGINT ignored (Python then raises no KeyboardInterrupt unless told to)."""
    with pytest.raises(SystemExit):
        serve.main(["--help"])
    assert "--api-key" in capsys.readouterr().out
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if launched != "foreground" else None
    p = subprocess.Popen([sys.executable, "-m", "nanopost.serve", "--model", tiny, "--port", "0", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=ignore)
    try:
        lines = [p.stdout.readline() for _ in range(3)]
        assert re.match(r"--dtype auto: (float32|bfloat16) \(CPU has .*\)", lines[0]), lines  # which and why
        assert re.match(r"tiny: .* MiB of (float32|bfloat16) weights on cpu", lines[1]), lines
        url = lines[2].split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        stream = client(types.SimpleNamespace(url=url.removesuffix("/v1"))).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_tokens=2000, stream=True)
        assert next(stream).choices[0].delta.role == "assistant"
        t0 = time.time()
        p.send_signal(signal.SIGINT)  # mid-reply (this random model does not end its reply early)
        with pytest.raises(openai.APIError, match="shutting down"):  # the stream ends with an error, not a cut
            list(stream)
        assert p.wait(timeout=30) == 0 and time.time() - t0 < 10
        assert "shutting down" in p.stdout.read()
    finally:
        p.kill()


@pytest.mark.parametrize("flag,value", [("--port", "99999"), ("--batch-size", "0"), ("--max-tokens-limit", "0"),
                                        ("--default-max-tokens", "0")])
def test_bad_option_values_are_refused_at_startup(tiny, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        serve.main(["--model", tiny, flag, value])
    assert e.value.code == 2 and f"{flag} must be" in capsys.readouterr().err


def test_help_shows_defaults_but_never_the_api_key(monkeypatch, capsys):
    monkeypatch.setenv("NANOPOST_API_KEY", "sekret-123")
    with pytest.raises(SystemExit):
        serve.main(["--help"])
    out = capsys.readouterr().out
    assert "(default: 16)" in out and "sekret-123" not in out


def test_a_model_that_fails_to_load_exits_cleanly(tiny):
    """The models loaded before it are stopped and their threads joined: a worker thread alive at
    interpreter exit made the process abort (SIGABRT, 'terminate called without an active exception')."""
    out = subprocess.run([sys.executable, "-m", "nanopost.serve", "--model", f"a={tiny}", "--model", f"b={tiny}",
                          "--model", "c=not a repo id", "--port", "0"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert out.returncode == 1 and "error: not a repo id" in out.stderr, (out.returncode, out.stderr[-2000:])
    assert "terminate called" not in out.stderr


def test_a_worker_loads_and_runs_its_model_on_its_own_thread(tiny):
    """The worker's thread loads the model and runs every generation, so the main thread never
    starts an OpenMP pool of its own (a second pool on a 2-core machine made decode steps 30%
    slower); a load that fails raises in the caller, with the thread gone."""
    seen = []

    def load():
        seen.append(threading.current_thread())
        return nanopost.load(tiny)
    w = serve.Worker("m", tiny, 2, load)
    try:
        generate_ids = w.engine.generate_ids
        w.engine.generate_ids = lambda *a, **kw: seen.append(threading.current_thread()) or generate_ids(*a, **kw)
        r = serve.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
                             {"m": w}, 4096, 16)
        w.submit(r)
        assert r.events.get(timeout=30)[0] == "done"
        assert seen == [w.thread, w.thread]
    finally:
        w.stop()
        w.thread.join(10)

    def interrupted():  # Ctrl-C lands while the model loads: the caller gets it once the load has ended
        import _thread
        _thread.interrupt_main()
        time.sleep(0.5)
        return nanopost.load(tiny)
    with pytest.raises(KeyboardInterrupt):
        serve.Worker("m", tiny, 2, interrupted)
    assert not any(t.name == "serve-m" and t.is_alive() for t in threading.enumerate())

    def bad():
        raise ValueError("no such checkpoint")
    with pytest.raises(ValueError, match="no such checkpoint"):
        serve.Worker("m", tiny, 2, bad)
    assert not any(t.name == "serve-m" and t.is_alive() for t in threading.enumerate())


def test_several_models_decode_without_cuda_graphs(server, tiny):
    """A graph's capture forbids CUDA work on other threads, and each model decodes on its own
    thread: with several models no engine captures; one model keeps the default (on for CUDA)."""
    assert all(w.engine.cuda_graphs is False for w in server.workers.values())
    with serve.start({"one": tiny}, dtype="float32", log_requests=False, log=lambda *a: None) as s:
        assert [w.engine.cuda_graphs for w in s.workers.values()] == [None]


def test_a_taken_port_is_named_before_any_model_loads(tiny):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            serve.start({"a": "/no/such/model"}, port=port, log=lambda *a: None)  # refused before loading it


def test_model_arg_names(tiny, tmp_path):
    """--model NAME=PATH (a NAME may hold "/", as a hub id does), a bare folder named after itself
    (also one whose own name holds "="), a bare hub id as itself."""
    from nanopost.serve import model_arg
    odd = tmp_path / "lr=1e-3"
    odd.mkdir()
    assert model_arg(f"runs/kto={tiny}") == ("runs/kto", tiny)
    assert model_arg(str(odd)) == ("lr=1e-3", str(odd))
    assert model_arg(tiny) == (os.path.basename(os.path.normpath(tiny)), tiny)
    assert model_arg("Qwen/Qwen2-0.5B-Instruct") == ("Qwen/Qwen2-0.5B-Instruct",) * 2
    assert model_arg("runs/lr=1e-3") == ("runs/lr=1e-3",) * 2  # a missing folder: its error names it whole
    assert model_arg("base=Qwen/Qwen2-0.5B-Instruct") == ("base", "Qwen/Qwen2-0.5B-Instruct")


def test_a_stop_string_matches_whole_characters_only(tiny):
    """A character split over byte tokens decodes to U+FFFD until its last byte: a "\\ufffd" stop
    matched that placeholder and cut "a🙂b" to "a" (finish_reason stop) in both the server's row and
    the engine's window; and the window's start may cut a character too."""
    from nanopost.engine import stop_in_tail
    tok = nanopost.Tokenizer(tiny)
    ids = tok.encode("a🙂b")
    assert len(ids) > 3 and tok.decode(ids[:2]).endswith("\ufffd")  # the emoji is several byte tokens here
    r = serve.Request("m", [1], Sampling(stop=["\ufffd"]), 64, True, tok)
    for i, t in enumerate(ids):
        r.push(t, i == len(ids) - 1)
    events = []
    while not r.events.empty():
        events.append(r.events.get())
    assert "".join(e[1] for e in events if e[0] == "text") == "a🙂b" and events[-1][:3] == ("done", "stop", "a🙂b")
    assert not any(stop_in_tail(tok, ids[:n], ["\ufffd"], 8) for n in range(1, len(ids) + 1))
    assert not stop_in_tail(tok, ids, ["\ufffd"], len(ids) - 2)  # a window starting mid-emoji
    assert stop_in_tail(tok, ids, ["🙂b"], 8) and stop_in_tail(tok, tok.encode("x\ufffdy"), ["\ufffd"], 8)


def test_models_retrieve_query_strings_and_other_methods(server):
    """models.retrieve (GET /v1/models/{id}) was a 404 for a served model, a query string (a proxy's
    ?api-version=) a 404 for every route, and PUT/OPTIONS/DELETE an HTML 501 page."""
    c = client(server)
    assert c.models.retrieve("a").id == "a"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found"
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    conn.request("GET", "/v1/models?limit=5")
    r = conn.getresponse()
    assert r.status == 200 and {"a", "b"} <= {m["id"] for m in json.loads(r.read())["data"]}
    conn.request("POST", "/v1/chat/completions?api-version=1", json.dumps(
        {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["choices"][0]["finish_reason"] in ("stop", "length")
    conn.request("GET", "/health")
    r = conn.getresponse()
    assert (r.status, json.loads(r.read())) == (200, {"status": "ok"})
    for path in ("/v1/completions", "/v1/embeddings", "/v1/chat/completions/x"):  # not read as a chat request
        conn.request("POST", path, json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}]}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 404 and "no route POST" in json.loads(r.read())["error"]["message"], path
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    conn.request("HEAD", "/health")  # a 405 with headers only: a body after them would be read as the next reply
    r = conn.getresponse()
    assert r.status == 405 and r.getheader("Allow") == "GET, POST" and r.read() == b""
    conn.request("GET", "/health")  # it said the connection closes: the client opens another, not a dead one
    assert conn.getresponse().status == 200
    got = raw(server, b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 405") and got.endswith(b"\r\n\r\n"), got
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    for method in ("PUT", "OPTIONS", "DELETE", "PATCH"):  # one keep-alive client: each reply says it closes
        conn.request(method, "/v1/chat/completions")
        r = conn.getresponse()
        assert r.status == 405 and r.getheader("Content-Type") == "application/json" and r.getheader("Allow") == "GET, POST"
        assert json.loads(r.read())["error"]["type"] == "invalid_request_error" and r.getheader("Connection") == "close"
