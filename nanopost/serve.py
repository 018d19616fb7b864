"""An OpenAI-compatible HTTP server for one or several checkpoints, on the standard library only.

    python -m nanopost.serve --model Qwen/Qwen2-0.5B-Instruct --port 8000
    python -m nanopost.serve --model base=Qwen/Qwen2-0.5B-Instruct --model sft=runs/sft --port 8000
    python -m nanopost.serve --model runs/sft --host 0.0.0.0 --port 8000 --api-key "$KEY"   # other machines
    python -m nanopost.serve --model base=Qwen/Qwen2-0.5B-Instruct --model sft=runs/sft --model kto=runs/kto \\
        --results runs/eval/results.json        # then open http://127.0.0.1:8000/ : the models side by side

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "sft", "messages": [{"role": "user", "content": "What is 17*23?"}]}'

Endpoints: POST /v1/chat/completions (JSON, or server-sent events with "stream": true),
GET /v1/models (the served names) and /v1/models/NAME, GET /health, GET /v1/results (each served model's benchmark
numbers from evaluate.py's results.json given as --results; {} without it), and GET / : a chat page
(static/compare.html) with one column per model, every reply streamed from /v1/chat/completions.
The request's "model" field picks a checkpoint.
Sampling fields: temperature (default 0: greedy), top_p (default 1), max_tokens or
max_completion_tokens (default --default-max-tokens, 512), stop, seed, and the extensions top_k and
repetition_penalty. n > 1, logprobs, logit_bias, tools, tool_choice, response_format (JSON mode)
and the OpenAI penalties are refused with a 400 (set to what changes nothing, e.g. logit_bias {},
top_logprobs 0 or response_format {"type": "text"}, they are accepted); so is any field it does not
know (a typo, another server's extension such as vLLM's min_p), as OpenAI answers; user, store,
metadata, service_tier and parallel_tool_calls are accepted and change nothing. A client that disconnects
frees its row at once (streamed: at the next write; not streamed: the server looks every 0.5 s).

How it works: each model has one worker thread, the only one that runs it. HTTP handler threads
validate a request, render its prompt and queue it; the worker takes every request waiting, runs
those sampled alike together in one Engine.generate_ids call (up to --batch-size rows at once),
and requests sampled alike that arrive meanwhile join that call as rows finish (continuous
batching across requests: a new request does not wait for the longest reply in flight). The
engine's per-step callback hands each row's new text to its own client as soon as it is final.

Security: it listens on 127.0.0.1 unless told otherwise, and refuses any other address without
--api-key (then every request needs `Authorization: Bearer KEY`; the page at / is the one thing
served without it: it holds no secret, asks for the key and sends it with each request). The page
puts model output on screen as text only, and is served with a Content-Security-Policy that runs its
own script and nothing else. It does not protect against what a client puts in a prompt (text
like <|im_start|> is read as the special token, as in transformers' chat template), does not
rate-limit, and does not speak TLS: put it behind a reverse proxy for that.

From Python (tests, build_data.py): `server = nanopost.serve.start({"base": "runs/tiny"}, port=0)`
loads and serves in the background; `server.url` is http://127.0.0.1:PORT; `server.shutdown()`."""
import argparse
import base64
import contextlib
import errno
import hashlib
import hmac
import ipaddress
import json
import math
import os
import queue
import re
import resource
import select
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import nanopost
from nanopost.engine import Engine, Sampling, cut_at_stop, resolve_dtype
from nanopost.tokenizer import ROLES, Tokenizer

MAX_BODY_BYTES = 1 << 20  # a larger body gets 413 (a 0.5B model's 32k-token context is ~130 kB of text)
MAX_MESSAGES = 1024
MAX_CONTENT_CHARS = 200_000  # per message
MAX_STOP, MAX_STOP_CHARS = 16, 256  # stop strings per request; characters per stop string
# fields we cannot honour: a request that sets one to anything but a value that changes nothing (its
# default, an empty logit_bias, top_logprobs 0) is refused, not ignored
UNSUPPORTED = {"n": (1,), "logprobs": (False,), "top_logprobs": (0,), "logit_bias": ({},), "tools": (),
               "functions": (), "presence_penalty": (0,), "frequency_penalty": (0,),
               "response_format": ({"type": "text"},), "tool_choice": ("none", "auto"),  # (no tools: auto is none)
               "function_call": ("none", "auto"), "modalities": (["text"],)}
READ = {"model", "messages", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_tokens",
        "max_completion_tokens", "stop", "stream", "stream_options"}
IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls"}  # change no reply
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "compare.html")


class ApiError(Exception):
    """A 4xx/5xx reply in OpenAI's error shape."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type, "param": param, "code": code}}


class _BatchOver(Exception):
    """Raised from on_token to end a generate_ids call at once (the server is shutting down)."""


# Requests one generate_ids call takes in all (then it drains and the next call starts): the call's
# per-step bookkeeping is a list over every request it took, so under steady traffic it must end.
MAX_ROWS_PER_CALL = 1024


# ---- one request = one row of a batch ----

@dataclass(eq=False)  # compared and hashed by identity
class Request:
    model: str
    ids: list[int]  # the rendered prompt
    sampling: Sampling  # max_new_tokens unused: each row stops at its own max_tokens
    max_tokens: int
    stream: bool
    tok: Tokenizer
    include_usage: bool = False  # streaming: a last chunk with the token counts

    def __post_init__(self):
        self.events = queue.Queue()  # ("text", str) ... then ("done", reason, reply, n_tokens) or ("error", ApiError)
        self.new, self.sent, self.finished, self.cancelled = [], 0, False, False
        self.text, self.decoded = "", 0  # the text of new[:decoded], which ends on a whole character
        # a stop string that begins in the text already sent would be inside `text` in full, so
        # holding back len(longest) - 1 characters never streams text that a stop string later cuts
        self.hold = max(map(len, self.sampling.stop), default=1) - 1
        s = self.sampling  # rows run together only when they sample alike (one Sampling per call);
        # a seeded sampled request runs alone, so its reply does not depend on who else was waiting
        self.key = (s.temperature, s.top_k, s.top_p, s.repetition_penalty, tuple(s.stop),
                    id(self) if s.seed is not None and s.temperature > 0 else None)

    def push(self, token, done):
        """One decode step of this row: its token and whether the engine finished the row."""
        if self.cancelled:  # its client went away: the engine frees the row after this step, unread
            self.finished = True
            return
        eos = done and token in self.tok.eos_ids
        if not eos:  # the eos itself is not part of the reply
            self.new.append(token)
        # decode only the tokens after the last whole character: decoding the whole reply at every
        # step would cost O(length^2); bytes after a whole character never change the text before it
        tail = self.tok.decode(self.new[self.decoded:])
        text = self.text + tail
        if not tail.endswith("\ufffd"):  # an unfinished UTF-8 character decodes to U+FFFD
            self.text, self.decoded = text, len(self.new)
        seen = text if done else self.text  # stop strings match whole characters only (a "\ufffd" stop too)
        reply = cut_at_stop(seen, self.sampling.stop)
        if eos or len(reply) < len(seen) or (done and len(self.new) < self.max_tokens):
            self.finish(reply, "stop")  # eos, a stop string (the engine may see one first, mid-character)
        elif len(self.new) >= self.max_tokens:  # the engine also marks a row done at its token limit
            self.finish(reply, "length")
        elif self.stream and self.decoded == len(self.new):
            upto = len(text) - self.hold
            if upto > self.sent:
                self.events.put(("text", text[self.sent:upto]))
                self.sent = upto

    def finish(self, reply, reason):
        if self.stream and len(reply) > self.sent:
            self.events.put(("text", reply[self.sent:]))
        self.events.put(("done", reason, reply, len(self.new)))
        self.finished = True

    def fail(self, err: ApiError):
        self.events.put(("error", err))
        self.finished = True


# ---- one worker thread per model ----

class Worker:
    """One thread per model, which loads it and runs all its generation: the main thread then never
    runs torch's parallel (OpenMP) regions. With libgomp, each thread that does gets a pool of its
    own; more pool threads than cores make every pool spin only briefly before sleeping, and each of
    the ~400 parallel ops of a decode step then pays a wake-up: steps 30% slower on 2 cores when the
    model was loaded on the main thread (135 vs 104 ms; BENCHMARKS.md, the teacher's workload over
    HTTP). Several --model entries mean several pools, and that cost again (measured ~30% on one
    model's steps with a second, idle one loaded): serve one model per process where speed matters."""

    def __init__(self, name, path, batch_size, load, cuda_graphs=None):
        """load() -> (model, tokenizer), called on the worker's thread; its error is raised here.
        cuda_graphs: the Engine's (None: on for a CUDA model unless NANOPOST_CUDA_GRAPHS=0)."""
        self.name, self.path, self.batch_size, self.cuda_graphs = name, path, batch_size, cuda_graphs
        self.inbox, self.closing, self.ready, self.error = queue.Queue(), False, threading.Event(), None
        self.thread = threading.Thread(target=self.main, args=(load,), name=f"serve-{name}", daemon=True)
        try:
            self.thread.start()
            while not self.ready.wait(0.25):  # timed: a Ctrl-C meanwhile is acted on at once
                pass
        except BaseException:  # Ctrl-C while loading: the thread ends once its load returns
            self.stop()
            while self.thread.ident is not None and self.thread.is_alive():  # a thread still running
                try:  # torch at interpreter exit aborts the process, so wait for the load to end
                    self.thread.join(timeout=0.25)
                except KeyboardInterrupt:  # a second Ctrl-C: leave now (a load cannot be interrupted)
                    os._exit(130)
            raise
        if self.error is not None:
            self.thread.join()
            raise self.error

    def main(self, load):
        try:
            self.model, self.tok = load()
            self.engine = Engine(self.model, self.tok, cuda_graphs=self.cuda_graphs)
            self.context = self.model.config.max_position_embeddings
            # one short generation now: the engine's one-time work (e.g. packing CPU weights) is
            # done before the first client, and counted in the memory that load_worker reports
            self.engine.generate_ids([self.engine.encode_prompt("hi")], Sampling(max_new_tokens=1))
        except BaseException as e:
            self.error = e
            return
        finally:
            self.ready.set()
        self.loop()

    def submit(self, r: Request):
        if self.closing:
            raise ApiError(503, "the server is shutting down", type="server_error")
        self.inbox.put(r)

    def stop(self):
        """Ends the running batch after its current step; waiting requests get 503."""
        self.closing = True
        self.inbox.put(None)

    def loop(self):
        waiting = []
        while True:
            if not waiting:
                waiting.append(self.inbox.get())
            while True:  # everything that queued while the last run went on
                try:
                    waiting.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            if self.closing:
                for r in waiting:
                    if r is not None:
                        r.fail(ApiError(503, "the server is shutting down", type="server_error"))
                return
            head = waiting[0]  # every request sampled like the oldest: the engine runs batch_size at once, queues the rest
            batch = [r for r in waiting if r.key == head.key][:MAX_ROWS_PER_CALL]
            waiting[:] = [r for r in waiting if all(r is not b for b in batch)]
            batch = [r for r in batch if not r.cancelled]
            if batch:
                self.run(batch, waiting)

    def run(self, batch, waiting):
        """One Engine.generate_ids call: `batch` first, then requests sampled alike that arrive while
        it runs join as slots free up (continuous batching across requests). Once a request sampled
        otherwise waits, no more join: the run drains and that request goes next."""
        rows, key = list(batch), batch[0].key

        def more(n):
            new = []
            n = min(n, MAX_ROWS_PER_CALL - len(rows))
            while len(new) < n and not waiting and not self.closing:
                try:
                    r = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if r is None or r.key != key:
                    waiting.append(r)
                elif not r.cancelled:
                    new.append(r)
            rows.extend(new)
            return [(r.ids, r.max_tokens) for r in new]

        def on_token(step, tokens, done):
            for r, token, d in zip(rows, tokens, done):
                if token is not None and not r.finished:
                    r.push(token, d)
            if self.closing:
                raise _BatchOver
            # rows answered here (a stop string the engine has not seen whole yet) or abandoned by their client
            return [i for i, r in enumerate(rows) if (r.finished or r.cancelled) and not done[i]]

        try:
            out = self.engine.generate_ids([r.ids for r in batch], batch[0].sampling, on_token, self.batch_size,
                                           limits=[r.max_tokens for r in batch], more=more)
            for r, new in zip(rows, out):  # only if the engine ended a row without saying so
                if not r.finished:
                    r.new = new[:r.max_tokens]
                    r.finish(cut_at_stop(self.tok.decode(r.new), r.sampling.stop), "length")
        except _BatchOver:
            pass
        except Exception as e:  # one bad run must not take the model down for later requests
            traceback.print_exc()
            for r in rows:
                if not r.finished:
                    r.fail(ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error"))
        for r in rows:
            if not r.finished:
                r.fail(ApiError(503, "the server is shutting down", type="server_error"))


# ---- request validation: every check before anything is queued ----

def _number(body, key, default, ok, rule, kind=(int, float)):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, kind) or not ok(v):
        raise ApiError(400, f"{key} must be {rule}, got {v!r}", param=key)
    return v


def _content(m, i):
    content = m.get("content")
    if isinstance(content, list):  # OpenAI's content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content")
        content = "\n".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")
    if not _is_text(content):
        raise ApiError(400, f"messages[{i}].content is not valid Unicode text (a lone surrogate)",
                       param=f"messages[{i}].content")
    if len(content) > MAX_CONTENT_CHARS:
        raise ApiError(400, f"messages[{i}].content is {len(content)} characters; the limit is {MAX_CONTENT_CHARS}",
                       param=f"messages[{i}].content")
    return content


def _is_text(s: str) -> bool:
    """False for a string holding a lone surrogate ("\ud800"): valid JSON, not text a tokenizer takes."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_chat(body, workers, max_tokens_limit, default_max_tokens) -> Request:
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, f"model is required: one of {', '.join(workers)}", param="model")
    if name not in workers:
        raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(workers)}", param="model",
                       code="model_not_found")
    w, messages = workers[name], body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"{len(messages)} messages; the limit is {MAX_MESSAGES}", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}", param=f"messages[{i}].role")
    messages = [{"role": m["role"], "content": _content(m, i)} for i, m in enumerate(messages)]
    for key in body:  # as OpenAI: a typo (temprature) or another server's field (min_p, ignore_eos) is refused,
        if key not in READ | IGNORED | UNSUPPORTED.keys():  # not answered as if it were absent
            raise ApiError(400, f"Unrecognized request argument supplied: {key}", param=key)
    for key, no_op in UNSUPPORTED.items():  # of the same type, too: n true or logprobs 0 is not n 1 or logprobs false
        v = body.get(key)
        if v is not None and not any(v == x and isinstance(v, bool) == isinstance(x, bool) for x in no_op):
            raise ApiError(400, f"{key}={v!r} is not supported by nanopost.serve", param=key)
    temperature = _number(body, "temperature", 0.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")
    top_p = _number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _number(body, "top_k", 0, lambda v: v >= 0, "an integer >= 0 (0 = off)", int)
    penalty = _number(body, "repetition_penalty", 1.0, lambda v: 0 < v <= 10, "a number in (0, 10]")
    seed = _number(body, "seed", None, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)", int)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, None, lambda v: 1 <= v <= max_tokens_limit,
                         f"an integer in [1, {max_tokens_limit}] (--max-tokens-limit)", int)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in stop)):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP} non-empty strings of at most "
                       f"{MAX_STOP_CHARS} characters", param="stop")
    if not all(_is_text(x) for x in stop):
        raise ApiError(400, "stop is not valid Unicode text (a lone surrogate)", param="stop")
    stream, options = body.get("stream"), body.get("stream_options")  # null: absent; 0 or [] is not false or {}
    stream, options = False if stream is None else stream, {} if options is None else options
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r:.80}", param="stream")
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options must be an object, got {options!r:.80}", param="stream_options")
    if options and not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    usage = options.get("include_usage")
    if set(options) - {"include_usage"} or not (usage is None or isinstance(usage, bool)):
        raise ApiError(400, f"stream_options must be {{\"include_usage\": true or false}}, got {options!r:.80}",
                       param="stream_options")

    ids = w.engine.encode_prompt(messages)
    room = w.context - len(ids)
    if max_tokens is None:
        max_tokens = max(1, min(default_max_tokens, room))
    if max_tokens > room:
        raise ApiError(400, f"model {name!r} has a context of {w.context} tokens; the messages take {len(ids)} and "
                       f"{key} asks for {max_tokens} more", param="messages", code="context_length_exceeded")
    if temperature == 0:  # greedy: the other sampling fields change nothing, so they do not split batches
        top_p, top_k, seed = 1.0, 0, None
    s = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, seed=seed, stop=stop)
    return Request(name, ids, s, max_tokens, stream, w.tok, bool(usage))


# ---- HTTP ----

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connections
    server_version = "nanopost"
    timeout = 120  # seconds a socket may stall (reading a body, writing a stream) before its thread gives up

    def log_message(self, format, *args):
        if self.server.app.log_requests:
            super().log_message(format, *args)

    def send_json(self, status, obj, **headers):
        data = json.dumps(obj, ensure_ascii=False).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:  # said, so that a keep-alive client opens a new one for its next request
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # an answer to HEAD has headers only (RFC 9110 9.3.2)
            self.wfile.write(data)

    def check_auth(self):
        key = self.server.app.api_key
        if key is not None and not hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                                       f"Bearer {key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def read_body(self):
        if self.headers.get("Transfer-Encoding") is not None:  # any spelling ("Chunked" too): never read as a Content-Length
            self.close_connection = True  # body, where a request hidden in the chunks would run next
            raise ApiError(411, "send the body with a Content-Length, not a Transfer-Encoding (chunked)")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BODY_BYTES:
            self.close_connection = True
            left = min(max(n, 0), 16 * MAX_BODY_BYTES)  # read what the client sends anyway, so it sees the
            self.connection.settimeout(2)  # 413 rather than a connection reset; one sending less than it
            try:  # claims is not waited for past a 2 s pause
                while left > 0:
                    chunk = self.rfile.read(min(left, 1 << 16))
                    left = left - len(chunk) if chunk else 0
            except TimeoutError:
                pass
            raise ApiError(413 if n > 0 else 400, f"the body must be at most {MAX_BODY_BYTES} bytes with a valid "
                           f"Content-Length (got {self.headers.get('Content-Length')})")
        body = self.rfile.read(n)
        if len(body) < n:  # the client closed (or timed out) before sending it all: not a request to run
            self.close_connection = True
            raise ApiError(400, f"the body ended after {len(body)} of its Content-Length's {n} bytes")
        return body

    def send_page(self):
        """The chat page, read on each request (edit it and reload), with a Content-Security-Policy
        that lets only its own inline script run: were a reply ever inserted as HTML by mistake, a
        <script> or onerror= in it would still not execute."""
        with open(PAGE, "rb") as f:
            html = f.read()
        script = re.search(rb"<script>(.*?)</script>", html, re.DOTALL).group(1)
        digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Security-Policy", f"default-src 'none'; script-src 'sha256-{digest}'; "
                         "style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Length", str(len(html)))
        self.end_headers()
        self.wfile.write(html)

    def do_GET(self):
        app = self.server.app
        try:
            path = self.path.split("?")[0]  # a query string (?api-version=) names no other route
            if path in ("/", "/index.html"):  # before the key check: the page asks for it
                return self.send_page()
            self.check_auth()
            if path == "/v1/results":
                return self.send_json(200, app.results)
            if path == "/health":
                return self.send_json(200, {"status": "ok"})
            models = {n: {"id": n, "object": "model", "created": app.created, "owned_by": "nanopost", "root": w.path,
                          "max_model_len": w.context} for n, w in app.workers.items()}
            if path == "/v1/models":
                return self.send_json(200, {"object": "list", "data": list(models.values())})
            if path.startswith("/v1/models/"):  # the openai client's models.retrieve
                name = urllib.parse.unquote(path.removeprefix("/v1/models/"))
                if name not in models:
                    raise ApiError(404, f"model {name!r} is not served here; served: {', '.join(models)}",
                                   param="model", code="model_not_found")
                return self.send_json(200, models[name])
            raise ApiError(404, f"no route GET {path}: try /, /v1/models, /v1/results or /health")
        except ApiError as e:
            self.send_json(e.status, e.body)

    def not_allowed(self):  # (http.server's own answer is an HTML 501 page)
        self.close_connection = True  # a body it may carry is not read
        e = ApiError(405, f"method {self.command} is not allowed: GET /v1/models, /v1/results, /health or /, "
                          f"and POST /v1/chat/completions")
        self.send_json(e.status, e.body, Allow="GET, POST")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = not_allowed

    def do_POST(self):
        app = self.server.app
        try:
            raw = self.read_body()  # before any reply: an unread body would be taken for the next request
            self.check_auth()
            path = self.path.split("?")[0]  # (a query string names no other route)
            if path != "/v1/chat/completions":
                raise ApiError(404, f"no route POST {path}: try /v1/chat/completions")
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise ApiError(400, f"the body is not valid JSON: {e}")
            except RecursionError:  # within MAX_BODY_BYTES, "[" * 100000 nests past Python's recursion limit
                raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
            r = parse_chat(body, app.workers, app.max_tokens_limit, app.default_max_tokens)
            app.workers[r.model].submit(r)
        except ApiError as e:
            return self.send_json(e.status, e.body)
        app.active.add(r)
        try:
            self.reply(r, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))
        except OSError:  # the client went away (broken pipe, reset, timeout): drop its row, not the batch
            r.cancelled = True
        finally:
            app.active.discard(r)

    def reply(self, r, rid, created):
        if r.stream:
            return self.stream(r, rid, created)
        while True:  # a row that is not streamed gets no "text" events, and nothing is written until its end
            try:
                event = r.events.get(timeout=0.5)
                break
            except queue.Empty:
                if self.client_gone():  # else its row would run on to max_tokens for nobody
                    r.cancelled = True
                    return
        if event[0] == "error":
            return self.send_json(event[1].status, event[1].body)
        _, reason, reply, n = event
        self.send_json(200, {"id": rid, "object": "chat.completion", "created": created, "model": r.model,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                          "finish_reason": reason, "logprobs": None}],
                             "usage": {"prompt_tokens": len(r.ids), "completion_tokens": n,
                                       "total_tokens": len(r.ids) + n}})

    def client_gone(self) -> bool:
        """Whether the client closed its end: its socket reads as at end (a peek, nothing consumed).
        As nginx's check of a client, a connection half-closed by a client still reading counts as
        gone: the two look the same until a reply is written."""
        try:
            if hasattr(select, "poll"):  # no limit on the descriptor's number (select's is 1024)
                poll = select.poll()
                poll.register(self.connection, select.POLLIN)
                readable = bool(poll.poll(0))
            else:
                readable = bool(select.select([self.connection], [], [], 0)[0])
            return readable and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:  # reset by the peer
            return True
        except ValueError:  # cannot tell: keep the row
            return False

    def stream(self, r, rid, created):
        def sse(obj):
            self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

        def chunk(delta, reason=None):
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": r.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}],
                    **({"usage": None} if r.include_usage else {})}  # as OpenAI: null on all but the last

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end: no chunked framing
        self.end_headers()
        self.close_connection = True
        sse(chunk({"role": "assistant", "content": ""}))
        while (event := r.events.get())[0] == "text":
            sse(chunk({"content": event[1]}))
        if event[0] == "error":
            sse(event[1].body)
        else:
            _, reason, _, n = event
            sse(chunk({}, reason))
            if r.include_usage:
                sse(dict(chunk({}), choices=[], usage={"prompt_tokens": len(r.ids), "completion_tokens": n,
                                                       "total_tokens": len(r.ids) + n}))
        self.wfile.write(b"data: [DONE]\n\n")


class HTTPServer4(ThreadingHTTPServer):
    request_queue_size = 256  # the listen backlog: socketserver's 5 resets a burst of concurrent clients

    def get_request(self):
        """accept(), and on running out of file descriptors (a flood of idle connections) a pause before
        the next try: socketserver tried again at once, a core spinning while no one was served."""
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.1)
            raise

    def handle_error(self, request, client_address):
        """A client gone before its (error) reply was written is not the server's error: no traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):  # (BrokenPipeError, ConnectionResetError, ...)
            super().handle_error(request, client_address)


class HTTPServer6(HTTPServer4):
    address_family = socket.AF_INET6


class Server:
    """Loaded models' workers and the HTTP server (serving on a background thread); made by start()."""

    def __init__(self, workers, host, port, api_key=None, max_tokens_limit=4096, default_max_tokens=512,
                 log_requests=True, results=None):
        self.workers, self.api_key, self.log_requests = workers, api_key, log_requests
        # served name -> {task: {accuracy, n, settings[, differs]} or {perplexity, ...} or {stale}}, for the page
        self.results = results or {}
        self.max_tokens_limit, self.default_max_tokens = max_tokens_limit, min(default_max_tokens, max_tokens_limit)
        self.created = int(time.time())
        self.active = set()  # requests whose reply is being written (shutdown waits for them)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a thread and a descriptor per connection: the
        want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)  # usual soft limit of 1024 ran out
        if soft != resource.RLIM_INFINITY and soft < want:  # at ~1000 idle clients, every other one then refused
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        try:
            self.httpd = (HTTPServer6 if ":" in host else HTTPServer4)((host, port), Handler)
        except OSError as e:
            raise OSError(f"cannot listen on {hostport(host, port)}: {e.strerror}") from e
        self.httpd.app = self
        self.url = f"http://{hostport(host, self.httpd.server_address[1])}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="serve-http", daemon=True)
        self.thread.start()

    def shutdown(self):
        """Stop accepting, end the running batches (their clients get 503), and join the threads."""
        self.httpd.shutdown()
        self.httpd.server_close()
        for w in self.workers.values():
            w.stop()
        for w in self.workers.values():
            w.thread.join(timeout=30)
        deadline = time.time() + 10  # let handler threads send the 503s before the process exits
        while self.active and time.time() < deadline:
            time.sleep(0.02)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def hostport(host, port) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def load_worker(name, path, dtype, device, batch_size, log=print, cuda_graphs=None):
    dtype = resolve_dtype(dtype, device, log) if dtype == "auto" else DTYPES[dtype]  # auto says which and why
    worker = Worker(name, path, batch_size, lambda: nanopost.load(path, dtype=dtype, device=device), cuda_graphs)
    weights = sum(p.nbytes for p in worker.model.parameters())  # parameters() lists a tied head once
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    used = (f"{torch.cuda.memory_allocated(device) / 2**20:,.0f} MiB allocated on {device}" if str(device).startswith("cuda")
            else f"process peak so far {peak / 2**20:,.0f} MiB")
    log(f"{name}: {path}: {weights / 2**20:,.1f} MiB of {str(dtype).removeprefix('torch.')} weights on {device}; {used}")
    return worker


def results_entry(results: dict, name: str, spec: str) -> tuple[str | None, str | None]:
    """The results.json entry evaluated from the checkpoint served as `name` from `spec`, and the
    checkpoint's stamp as it is now (None for a hub id) -> (key or None, stamp). A local folder's:
    first the entry with the most numbers carrying its current stamp (these files, evaluated under
    any path: a relative --model from another directory, before a move, or after an older entry of
    the same folder); else the entry of the same folder (the path its numbers record, else its key
    from here); else one named as it is served. The stamps say which of its numbers are this one's.
    A hub id's only the entry under its id (its cache's file times are download times: no stamp)."""
    from nanopost import tasks  # (the task modules only when the page shows numbers)
    if not os.path.isdir(spec):
        return (spec if spec in results else None), None
    current = tasks.stamp(tasks.fingerprint(spec))
    count = {k: sum(v.get("checkpoint") == current for v in r.values()) for k, r in results.items()}
    best = max(count, key=count.get, default=None)  # the first of the most
    if best is not None and count[best]:
        return best, current
    folder = os.path.realpath(spec)
    return next((k for k in results if tasks.entry_folder(k, results[k]) == folder),
                name if name in results else None), current


def load_results(path, models: dict, log=print) -> dict:
    """evaluate.py's results.json ({evaluated model: {task: {accuracy, n, settings, ..., predictions}}})
    -> {served name: {task: {accuracy, n, settings} or {perplexity, settings}}}. evaluate.py keys each
    model by the --model it was given (runs/sft, a hub id), so an entry belongs to a served model whose
    name or path is that key. Two rules keep the page honest, as results.md is: a local checkpoint
    changed since it was evaluated (retrained, re-merged into the same folder) has its old numbers
    left out, and where the served models' numbers for one task were made with other settings or
    questions (shots, limit, protocol...) each is marked "differs" (a † on the page). The
    predictions are dropped: the page shows the numbers; a left-out one is {"stale": true}."""
    from nanopost import tasks
    try:
        results = tasks.read_results(path)
    except ValueError as e:
        raise ValueError(f"--results {e} (evaluate.py --out DIR writes DIR/results.json)") from None
    out, made = {}, {}  # made: task -> {served name: tasks.protocol of its number}
    for name, spec in models.items():
        key, current = results_entry(results, name, spec)
        if key is None:
            log(f"note: --results {path} has no entry for {name} ({spec}); it has {', '.join(results) or 'none'}")
            continue
        stale = [t for t, v in results[key].items() if current and v.get("checkpoint") not in (None, current)]
        if stale:
            log(f"note: --results {path}: {name}'s {', '.join(stale)} (the entry {key!r}) were measured on a checkpoint "
                f"other than {spec} as it is now (another one, or this one rewritten since): shown as left out")
        out[name] = {}
        for task, v in results[key].items():
            if task in stale:  # the page says a number was left out, and why, instead of hiding that there was one
                out[name][task] = {"stale": True}
                continue
            settings = v.get("settings", {})
            shown = {k: settings[k] for k in tasks.PROTOCOL_KEYS if settings.get(k) is not None}
            if v.get("data"):  # the questions asked (or the perplexity file): a hash, enough to tell two apart
                shown["data"] = v["data"][:8]
            # a non-finite number (a model whose perplexity is NaN) as null: NaN is not JSON, and the page's
            # JSON.parse of it failed, every column with it
            out[name][task] = {**{k: None if isinstance(v[k], float) and not math.isfinite(v[k]) else v[k]
                                  for k in ("accuracy", "n", "perplexity") if k in v}, "settings": shown}
            made.setdefault(task, {})[name] = tasks.protocol(v)
    for task, by in made.items():
        if len({json.dumps(p) for p in by.values()}) > 1:
            for name in by:
                out[name][task]["differs"] = True
            log(f"note: --results {path}: the {task} numbers of {', '.join(by)} were made with other settings or "
                f"questions (marked † on the page; compare their settings in the file)")
    return out


def start(models: dict, host="127.0.0.1", port=0, api_key=None, dtype="auto", device="cpu", batch_size=16,
          max_tokens_limit=4096, default_max_tokens=512, log_requests=True, log=print, results=None) -> Server:
    """Load {name: checkpoint dir or hub id} and serve them; returns the running Server (`.url`,
    `.shutdown()`, usable as a context manager). port=0 picks a free port. results: evaluate.py's
    results.json, whose numbers the page at / shows in each model's column."""
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty: give a real one, or none to serve 127.0.0.1 only")
    if api_key is None and not is_loopback(host):  # before loading anything
        raise ValueError(f"refusing to listen on {host} without --api-key: anyone who can reach it could use the "
                         "models (the default, 127.0.0.1, is this machine only)")
    results = load_results(results, models, log) if results else {}
    if port:  # a taken port is said before minutes of loading, not after
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds
            try:
                probe.bind((host, port))
            except OSError as e:
                raise OSError(f"cannot listen on {hostport(host, port)}: {e.strerror}") from e
    workers = {}
    # a CUDA graph's capture forbids CUDA work on any other thread, and each model decodes on its own
    graphs = None if len(models) == 1 else False
    if graphs is False and str(device).startswith("cuda"):
        log(f"{len(models)} models: decoding without CUDA graphs (one model per process decodes faster)")
    try:
        for name, path in models.items():
            workers[name] = load_worker(name, path, dtype, device, batch_size, log, graphs)
        return Server(workers, host, port, api_key, max_tokens_limit, default_max_tokens, log_requests, results)
    except BaseException:  # a bad checkpoint or a taken port: free the models already loaded
        for w in workers.values():
            w.stop()
        for w in workers.values():  # a worker thread still alive at interpreter exit aborts the process
            w.thread.join(timeout=10)
        raise


def model_arg(spec):
    """NAME=DIR_OR_HUB_ID, or a bare one named after its directory's basename (a hub id: itself).
    A NAME may hold "/" (org/model, runs/kto) where PATH is a folder; else a "/" before the "="
    says the whole is one path (runs/lr=1e-3), and an existing folder is always a bare one."""
    if os.path.isdir(spec):
        return os.path.basename(os.path.normpath(spec)), spec
    name, eq, path = spec.partition("=")
    if eq and name and path and (os.path.isdir(path) or ("/" not in name and os.sep not in name)):
        return name, path
    return spec, spec


def main(argv=None):
    # Ctrl-C (or kill -INT) must stop us even when we were started with SIGINT ignored (a shell's
    # background job, nohup): Python would then never raise KeyboardInterrupt. The training scripts
    # install their own handler for the same reason.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=nanopost.HelpFormatter)
    # ---- models ----
    p.add_argument("--model", action="append", required=True, type=model_arg, metavar="[NAME=]DIR_OR_HUB_ID",
                   help="a checkpoint to serve; repeat for several. A bare one is named after its directory "
                   "(runs/sft -> sft) or is its hub id; the request's model field picks one")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weights dtype; auto: bfloat16 on a GPU or a CPU with native bf16 (AVX512-BF16/AMX), else float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=nanopost.device_arg,
                   help="cpu, cuda or cuda:N")
    p.add_argument("--results", metavar="RESULTS_JSON",
                   help="evaluate.py's results.json: the page at / shows each model's benchmark numbers")
    # ---- network ----
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; any but loopback needs --api-key")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed)")
    p.add_argument("--api-key", default=argparse.SUPPRESS,  # not shown in --help: it may hold the real key
                   help="require 'Authorization: Bearer KEY' on every request (default: $NANOPOST_API_KEY)")
    # ---- generation ----
    p.add_argument("--batch-size", type=int, default=16, help="most requests one model runs together")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="max_tokens when a request gives none (cut to the room left in the context); "
                   "temperature defaults to 0 (greedy)")
    p.add_argument("--quiet", action="store_true", help="do not log each request")
    args = p.parse_args(argv)
    args.api_key = getattr(args, "api_key", None) or os.environ.get("NANOPOST_API_KEY") or None
    for flag, v, lo, hi in (("--port", args.port, 0, 65535), ("--batch-size", args.batch_size, 1, None),
                            ("--max-tokens-limit", args.max_tokens_limit, 1, None),
                            ("--default-max-tokens", args.default_max_tokens, 1, None)):
        if v < lo or (hi is not None and v > hi):
            p.error(f"{flag} must be {f'in [{lo}, {hi}]' if hi is not None else f'>= {lo}'}, got {v}")
    names = [n for n, _ in args.model]
    if len(set(names)) != len(names):
        p.error(f"two --model entries share a name ({', '.join(names)}): name them, e.g. --model base=DIR")
    try:
        server = start(dict(args.model), args.host, args.port, args.api_key, args.dtype, args.device, args.batch_size,
                       args.max_tokens_limit, args.default_max_tokens, log_requests=not args.quiet,
                       results=args.results)
    except (ValueError, FileNotFoundError, OSError) as e:  # CheckpointError is a ValueError
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("\ninterrupted while loading", flush=True)
        sys.exit(130)
    print(f"serving {', '.join(names)} at {server.url}/v1 (OpenAI-compatible), side by side at {server.url}/ "
          "(Ctrl-C stops)", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill`, docker stop: shut down as on Ctrl-C
    try:
        # timed waits: a signal may land on any thread (a worker's, the kernel picks), and Python
        # runs its handler only when the main thread next runs; an untimed join would never wake up
        while server.thread.is_alive():
            server.thread.join(timeout=0.25)
    except KeyboardInterrupt:
        print("\nshutting down", flush=True)
        server.shutdown()


if __name__ == "__main__":
    main()
