"""The teacher: the large model that labels, writes, answers and judges for build_data.py.

Two backends with one method, complete(list of message lists, sampling, on_reply):
- LocalBackend: any checkpoint nanopost.load reads, generating through the Engine in batches.
- HTTPBackend: any OpenAI-compatible POST /v1/chat/completions (vLLM, SGLang, llama.cpp server,
  Ollama, nanopost.serve). Several URLs share the requests (request i goes to URL i mod n, its
  retries to the next ones), `concurrency` requests are in flight at once (threads), each has a
  timeout and is retried with exponential backoff; a clear error names the URLs when none answers.
  An API key, if the servers need one, is read from $NANOPOST_TEACHER_API_KEY or $OPENAI_API_KEY
  (never from a flag, so it is not saved with the run's arguments).

Teacher wraps a backend with a request cache (SQLite, stdlib): a finished request is stored under
a hash of (messages, sampling settings, teacher id, prompt version), so a rerun after a crash or a
code change never sends it again; a change to a prompt, the sampling or the teacher changes the
key. Only replies are cached, never transport failures: a timed-out request is sent again next run.
Replies are cached as each arrives, so Ctrl-C keeps every reply received before it (HTTPBackend then
cancels the queued requests and does not wait for those in flight).
The teacher id is the checkpoint (resolved path, tasks.fingerprint of its files, dtype, device) for
LocalBackend and the served model name for HTTPBackend, not the URL, so adding servers keeps every
cached reply (and so other weights served under the same name reuse them: serve new weights under
a new name).

Teacher.ask_json sends prompts whose reply must pass a check (strict JSON with allowed values):
a failing reply is retried `retries` times, each retry showing the teacher its reply and what was
wrong; what still fails is returned with every attempt's raw reply and failure kind, for the caller
to count and keep for inspection. Garbage never raises. A transport failure (timeout, no
connection, HTTP 5xx, any 4xx but 400/413/422, a reply that is not a completion) is not the teacher's answer: that
item is returned unfinished (failures None), for the caller to leave unwritten so that --resume
asks again; Teacher.unfinished counts them by kind."""
import collections
import hashlib
import http.client
import json
import os
import re
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

from nanopost.checkpoint import raise_if_disk_full, writing


class TeacherUnreachable(RuntimeError):
    pass


class CacheError(RuntimeError):
    pass


@dataclass
class Reply:
    text: str | None  # None: no reply (see error)
    error: str | None = None  # timeout | unreachable | http_NNN | bad_response
    detail: str = ""  # what came back instead of a reply, for inspection
    truncated: bool = False  # the reply stopped at max_tokens (finish_reason "length"): not a whole answer

    @property
    def transient(self) -> bool:
        """No answer because of the transport or the server's setup, not the request: asking again
        later may work. Only a status that refuses the request itself is a final failure like garbage."""
        return self.error is not None and self.error not in REFUSED


# The statuses that refuse the request itself (malformed, too long for the model, unprocessable): sending it
# again gets the same answer. Any other 4xx says the server is not set up for us yet (401/403 a key, 404 a
# model not loaded, 405 a POST turned into a GET by a redirect, 408/429 later): the item stays unfinished.
REFUSED = ("http_400", "http_413", "http_422")
SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud800" escape decodes to one; no UTF-8 text can hold it


def request_key(messages, sampling: dict, teacher_id: str, prompt_version: str) -> str:
    blob = json.dumps([messages, sampling, teacher_id, prompt_version], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class Cache:
    """key -> reply text in one SQLite file; safe to share between threads (one lock) and to
    kill at any moment (each put is its own transaction)."""

    def __init__(self, path: str):
        self.path = path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.db = sqlite3.connect(path, check_same_thread=False)
            self.db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL, "
                            "request TEXT NOT NULL, created REAL NOT NULL, truncated INTEGER)")
            if "truncated" not in [c[1] for c in self.db.execute("PRAGMA table_info(replies)")]:
                # a cache from before replies recorded whether they were cut off: its rows say NULL (unknown)
                # and are asked again rather than trusted as whole answers
                self.db.execute("ALTER TABLE replies ADD COLUMN truncated INTEGER")
            self.db.commit()
        except (sqlite3.Error, OSError) as e:  # a folder, a text file, a path under a file
            raise_if_disk_full(e, path)
            raise CacheError(f"{path}: cannot be opened as the teacher's request cache, an SQLite file ({e})") from None
        self.lock = threading.Lock()

    def get(self, key: str) -> tuple[str, bool] | None:
        """-> (reply, truncated), or None when not cached (or cached without the truncation flag)."""
        with self.lock:
            row = self.db.execute("SELECT reply, truncated FROM replies WHERE key = ? AND truncated IS NOT NULL",
                                  (key,)).fetchone()
        return (row[0], bool(row[1])) if row else None

    def put(self, key: str, reply: str, request, truncated: bool = False) -> None:
        with self.lock, writing(self.path):
            self.db.execute("INSERT OR REPLACE INTO replies (key, reply, request, created, truncated) VALUES (?, ?, ?, ?, ?)",
                            (key, reply, json.dumps(request, ensure_ascii=False), time.time(), int(truncated)))
            self.db.commit()

    def close(self):
        self.db.close()


# ---- backends ----

class LocalBackend:
    """In-process generation through the Engine: every request in one continuous-batching call,
    `batch_size` rows at a time; each reply is handed back (to the cache) the moment its row ends."""

    def __init__(self, model, tok, checkpoint_dir: str, batch_size: int = 16):
        from nanopost.engine import Engine
        self.engine, self.batch_size = Engine(model, tok), batch_size
        from nanopost.tasks import fingerprint, stamp
        w = next(model.parameters())  # the dtype and device change greedy replies too
        self.id = f"local:{os.path.abspath(checkpoint_dir)}:{stamp(fingerprint(checkpoint_dir))}:{w.dtype}:{w.device.type}"

    def complete(self, requests, sampling: dict, on_reply):
        from nanopost.engine import Sampling
        s = Sampling(max_new_tokens=sampling["max_tokens"], temperature=sampling["temperature"],
                     top_p=sampling["top_p"], seed=sampling["seed"])
        def done(i, new):
            text, truncated = self.engine.reply(new, s)
            on_reply(i, Reply(text, truncated=truncated))
        self.engine.generate_ids([self.engine.encode_prompt(m) for m in requests], s, batch_size=self.batch_size,
                                 on_done=done)


class HTTPBackend:
    def __init__(self, urls: list[str], model: str | None = None, concurrency: int = 8, timeout: float = 120,
                 retries: int = 2, backoff: float = 1.0):
        # accept http://host:8000, http://host:8000/ and http://host:8000/v1
        self.urls = [u.rstrip("/").removesuffix("/v1") for u in urls]
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.api_key = os.environ.get("NANOPOST_TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY")
        served, why, code = {}, {}, {}
        for u in self.urls:
            try:
                served[u] = [m["id"] for m in self._call(u, "/v1/models", None, min(timeout, 10))["data"]]
            except Exception as e:  # noqa: BLE001 - any failure here means "not usable", said below
                why[u], code[u] = f"{type(e).__name__}: {e}", getattr(e, "code", None)
        keyed = [u for u in why if code[u] in (401, 403)]
        if not served and keyed:  # servers that answered: the key is what is missing (or wrong), not a server
            raise TeacherUnreachable(
                f"the teacher server at {keyed[0]} refused GET /v1/models ({why[keyed[0]]}): "
                f"{'its key is wrong' if self.api_key else 'it wants a key'}; set NANOPOST_TEACHER_API_KEY "
                f"(or OPENAI_API_KEY) to the key it serves with (--api-key of nanopost.serve)")
        if not served:
            raise TeacherUnreachable(
                "no teacher server answered GET /v1/models at " + ", ".join(self.urls) + " (" +
                "; ".join(f"{u}: {w}" for u, w in why.items()) + "). Start one (e.g. `python -m nanopost.serve "
                "--model M --port 8000`, or vLLM: `vllm serve Qwen/Qwen2.5-7B-Instruct`) or fix --teacher-url.")
        serves = "; ".join(f"{u} serves {ms or 'no model'}" for u, ms in served.items())
        if model is None:  # the one model the servers serve (each server's first): the teacher's identity
            firsts = {ms[0] for ms in served.values() if ms}
            if len(firsts) != 1:
                raise TeacherUnreachable(f"the teacher servers serve {'no model' if not firsts else 'different models'} "
                                         f"({serves}): name the teacher with --teacher-model")
            model = firsts.pop()
        for u, ms in served.items():
            if model not in ms:  # every request sent there would be refused (404): a silent half of the data
                why[u] = f"does not serve {model!r} (it serves {ms or 'no model'})"
        self.urls = [u for u in self.urls if u in served and model in served[u]]  # the others are left out
        if not self.urls:
            raise TeacherUnreachable(f"no teacher server serves the model {model!r} ({serves}): fix --teacher-model")
        self.model = model
        self.id = f"http:{self.model}"
        self.unreachable_urls = sorted(f"{u} ({why[u]})" for u in why)

    def _call(self, url, path, body, timeout):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url + path, data=data, headers=headers, method="GET" if body is None else "POST")
        deadline = time.monotonic() + timeout  # for the whole reply: the socket's timeout bounds each read
        with urllib.request.urlopen(req, timeout=timeout) as r:  # only, and a server may trickle bytes
            body = []
            while chunk := r.read1(1 << 16):
                body.append(chunk)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the reply was still arriving after {timeout}s")
            return json.loads(b"".join(body).decode("utf-8"))

    def _one(self, i, messages, sampling) -> Reply:
        body = {"model": self.model, "messages": messages, **sampling}
        reply = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            url = self.urls[(i + attempt) % len(self.urls)]
            try:
                out = self._call(url, "/v1/chat/completions", body, self.timeout)
            except urllib.error.HTTPError as e:
                reply = Reply(None, f"http_{e.code}", f"{url}: " + e.read()[:2000].decode("utf-8", "replace"))
                if not reply.transient:
                    return reply  # the request itself is refused: sending it again will not help
                wait_s = e.headers.get("Retry-After", "") if e.headers else ""
                if wait_s.strip().isdigit() and attempt < self.retries:  # a rate limit that says how long: wait
                    time.sleep(min(int(wait_s), 60))  # that (up to a minute) before the next try
                continue
            except (TimeoutError, socket.timeout) as e:
                reply = Reply(None, "timeout", f"{url}: no reply within {self.timeout}s ({e})")
                continue
            except urllib.error.URLError as e:
                kind = "timeout" if isinstance(e.reason, (TimeoutError, socket.timeout)) else "unreachable"
                reply = Reply(None, kind, f"{url}: {e.reason}")
                continue
            except (ConnectionError, ValueError, OSError, http.client.HTTPException) as e:
                # reset connections, a body that is not JSON or is cut short, a reply that is not HTTP
                reply = Reply(None, "bad_response", f"{url}: {type(e).__name__}: {e}")
                continue
            try:
                message, finish = out["choices"][0]["message"], out["choices"][0].get("finish_reason")
                text = message.get("content")
                if text is None:  # a completion without text (a reasoning model that spent max_tokens thinking):
                    text = ""  # the teacher's answer (empty, cut off or not), not a transport error to ask again
                if not isinstance(text, str):
                    raise TypeError(f"content is {type(text).__name__}, not a string")
                return Reply(SURROGATE.sub("\ufffd", text), truncated=finish == "length")
            except (KeyError, IndexError, TypeError, AttributeError) as e:
                reply = Reply(None, "bad_response", f"{url}: {e}: {json.dumps(out)[:2000]}")
        return reply

    def complete(self, requests, sampling: dict, on_reply):
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            futures = {pool.submit(self._one, i, m, sampling): i for i, m in enumerate(requests)}
            pending = set(futures)
            while pending:  # replies are handed back (and cached) in this thread, as each arrives
                # timed waits, so a Ctrl-C that the kernel hands to a client thread still stops us promptly
                finished, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                for f in finished:
                    on_reply(futures[f], f.result())
        finally:  # on Ctrl-C: drop the queued requests instead of sending them all first (a `with` would wait)
            pool.shutdown(wait=False, cancel_futures=True)


# ---- the cached teacher ----

class Teacher:
    def __init__(self, backend, cache_path: str, prompt_version: str, progress=None):
        self.backend, self.cache, self.prompt_version = backend, Cache(cache_path), prompt_version
        self.progress = progress  # tqdm class or None
        self.sent = self.cached = 0
        self.unfinished = collections.Counter()  # transport failure kind -> items ask_json left unfinished

    def sampling(self, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> dict:
        """(Greedy decoding takes no seed: it is sent and keyed as 0, so another --seed reuses its cached replies.)"""
        return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed if temperature > 0 else 0}

    def complete(self, requests: list[list[dict]], sampling: dict, desc: str = "teacher",
                 stop_if_down: bool = True) -> list[Reply]:
        """-> a Reply per request, cached ones without asking. Raises TeacherUnreachable when not one
        request sent got a reply, for a reason not of the requests' own (stop_if_down=False: a retry of a
        few items that another call's replies already showed the teacher answers; its failures are the
        items' own, returned unfinished)."""
        keys = [request_key(m, sampling, self.backend.id, self.prompt_version) for m in requests]
        out = [None] * len(requests)
        for i, k in enumerate(keys):
            hit = self.cache.get(k)
            out[i] = Reply(hit[0], truncated=hit[1]) if hit is not None else None
        todo = [i for i, r in enumerate(out) if r is None]
        self.cached += len(requests) - len(todo)
        self.sent += len(todo)
        if not todo:
            return out
        bar = self.progress(total=len(todo), desc=desc, leave=False) if self.progress else None

        def on_reply(j, reply):
            i = todo[j]
            out[i] = reply
            if reply.text is not None:
                self.cache.put(keys[i], reply.text, {"messages": requests[i], "sampling": sampling,
                                                    "teacher": self.backend.id, "prompt_version": self.prompt_version},
                               reply.truncated)
            if bar:
                bar.update(1)
        self.backend.complete([requests[i] for i in todo], sampling, on_reply)
        if bar:
            bar.close()
        # not one reply, and not for a reason of the requests' own (a 5xx, garbage): the servers are down or
        # not set up for us (a key, a model): stop, do not drop rows
        if stop_if_down and all(out[i].error in ("unreachable", "timeout") or
                                out[i].transient and out[i].error.startswith("http_4") for i in todo):
            raise TeacherUnreachable(f"the teacher stopped answering: none of {len(todo)} requests got a reply "
                                     f"({out[todo[0]].error}: {out[todo[0]].detail[:500]}); finished work is saved: "
                                     f"rerun with --resume when it is back")
        return out

    def ask_json(self, requests, check, sampling: dict, retries: int, retry_prompt: str, desc: str = "teacher"):
        """check(reply text) -> (value, None) or (None, failure kind). -> (values, failures): values[i]
        is None where every attempt failed; failures[i] lists {attempt, kind, raw} of each failed try.
        A reply cut off at max_tokens fails as "truncated" whatever check says (half an answer, or a
        JSON object that happens to parse before the cut, is not the teacher's answer), and is not retried.
        A retry shows the teacher its reply and retry_prompt.format(why=kind). A transport failure (the
        backend has already retried it) is not retried here: the item is unfinished, failures[i] None."""
        values, failures = [None] * len(requests), [[] for _ in requests]
        convo, pending = [list(m) for m in requests], list(range(len(requests)))
        for attempt in range(retries + 1):
            if not pending:
                break
            # a retry's requests are the few whose first reply failed its check: that none of them gets an
            # answer does not mean the teacher is down (the first try's replies said it is up)
            replies = self.complete([convo[i] for i in pending], sampling, f"{desc} (try {attempt + 1})",
                                    stop_if_down=attempt == 0)
            still = []
            for i, r in zip(pending, replies):
                if r.transient:
                    values[i], failures[i] = None, None
                    self.unfinished[r.error] += 1
                    continue
                value, kind = check(r.text) if r.text is not None else (None, r.error)
                if r.text is not None and r.truncated:  # final: the same budget would cut a retry too,
                    failures[i].append({"attempt": attempt, "kind": "truncated", "raw": r.text})  # and a retry
                    continue  # shown its own cut-off text invites a continuation, not a whole answer
                if kind is None:
                    values[i] = value
                    continue
                failures[i].append({"attempt": attempt, "kind": kind, "raw": r.text if r.text is not None else r.detail})
                if r.text is not None:
                    convo[i] = convo[i] + [{"role": "assistant", "content": r.text},
                                           {"role": "user", "content": retry_prompt.format(why=kind)}]
                    still.append(i)
            pending = still
        return values, failures

    def close(self):
        self.cache.close()
