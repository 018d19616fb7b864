"""HumanEval: greedy completion, pass@1 by running prompt + completion + tests + check(entry_point)
in a separate process. A program passes only if check(entry_point) returned: a random token
printed after it must reach the parent. The exit status proves nothing, since model code that
calls sys.exit(0), os._exit(0) or unittest.main() stops the program before the tests run with
status 0. As in OpenAI's human-eval (which exec()s the program), the code does not run as
__main__, so a reply's `if __name__ == "__main__":` block is skipped.

Two prompt modes: "chat" (the default; the chat template, the model asked to complete the function
in a python code block, the code block extracted) and "raw" (the prompt text itself, no template,
cut at the next top-level statement).

The sandbox (run_program), and what it does NOT protect against. Model-written code never runs in
the evaluating process. It runs in a child process in a new session, in a fresh scratch directory
that is deleted afterwards, with a scrubbed environment (no inherited secrets), no stdin, no
inherited file descriptors, a wall-clock limit (the whole process group is killed), CPU-time,
address-space (memory), file-size, open-file and core-dump limits, and a Python-level guard that
refuses writes outside the scratch directory and disables process, signal and file-removal calls.
It is NOT a security boundary: the guard is Python code that determined code can undo (ctypes,
re-importing internals); the process runs as the same user, can read any file that user can read,
and can use the network; there is no seccomp, namespace, container or chroot; code that reads its
own program file can print the pass token without passing, and a function returning an object
whose __eq__ always answers True, or code that replaces a builtin or library function the tests
call (`builtins.abs = ...`), passes the tests' comparisons (as in OpenAI's human-eval). Run
untrusted models' code inside a container or VM if that matters."""
import json
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile

RAW_STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]

GUARD = r'''
import builtins, io, os, shutil, subprocess, signal, sys
_root = os.path.realpath(os.getcwd())
def _inside(p):
    try:
        return os.path.realpath(os.fsdecode(p)).startswith(_root + os.sep)
    except TypeError:
        return True  # a file descriptor: already open
def _deny(*a, **k):
    raise PermissionError("blocked by the nanopost HumanEval sandbox")
_open = builtins.open
def _guarded_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+") and not _inside(file):
        raise PermissionError(f"write outside the scratch directory: {file!r}")
    return _open(file, mode, *a, **k)
builtins.open = io.open = _guarded_open
_os_open = os.open
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _guarded_os_open(path, flags, *a, **k):
    if flags & _WRITE and not _inside(path):
        raise PermissionError(f"write outside the scratch directory: {path!r}")
    return _os_open(path, flags, *a, **k)
os.open = _guarded_os_open
for _n in ("system", "popen", "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "kill",
           "killpg", "fork", "forkpty", "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve", "putenv",
           "chmod", "chown", "lchown", "truncate", "ftruncate", "symlink", "link", "chdir", "setuid", "setgid"):
    if hasattr(os, _n):
        setattr(os, _n, _deny)
shutil.rmtree = shutil.move = shutil.chown = _deny
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = _deny
signal.signal = _deny
del _n
'''


def run_program(code: str, timeout: float = 10.0, memory_mb: int = 2048) -> tuple[bool, str]:
    """Run `code` in the sandbox described above -> (passed, status): passed only if the code ran
    to its end (the token printed after it arrived); status is "passed", "timeout", or the last
    line of the error."""
    token = secrets.token_hex(16)

    def limits():
        os.setsid()
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024,) * 2)
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    with tempfile.TemporaryDirectory(prefix="nanopost-humaneval-") as scratch, \
            open(os.path.join(scratch, "stdout"), "wb+") as out:  # a file: bounded by RLIMIT_FSIZE, unlike a pipe
        with open(os.path.join(scratch, "program.py"), "w", encoding="utf-8") as f:
            f.write(f"{GUARD}\n{code}\n__import__('os').write(1, b'{token}\\n')\n")
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        run = "import runpy; runpy.run_path('program.py', run_name='sandbox')"  # not __main__, as in human-eval
        p = subprocess.Popen([sys.executable, "-I", "-c", run], cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.PIPE, close_fds=True, preexec_fn=limits)
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            return False, "timeout"
        out.seek(0)
        ended = token.encode() in out.read()
    if ended:
        return True, "passed"
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return False, lines[-1][:300] if lines else f"stopped before the end (exit status {p.returncode})"


FENCE = re.compile(r"^```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^```|\Z)", re.DOTALL | re.MULTILINE)


def extract_code(reply: str, entry_point: str = "") -> str:
    """The code of a chat reply: of its python blocks (```python, ```python3, ```py or a bare ```;
    the last one may lack its closing fence, cut off by the token limit), the last that defines
    entry_point (a reply often ends with a block of example calls), else the last; else the reply."""
    blocks = [code for lang, code in FENCE.findall(reply) if lang.lower() in ("", "python", "python3", "py")]
    defining = [b for b in blocks if re.search(rf"^\s*def {re.escape(entry_point)}\b", b, re.MULTILINE)]
    return (defining or blocks or [reply])[-1]


def program(ex, reply: str) -> str:
    """prompt + completion + tests + check(entry_point). A chat reply that restates the whole
    function simply redefines it after the prompt (the prompt keeps its imports and helpers)."""
    completion = extract_code(reply, ex["entry_point"]) if ex["mode"] == "chat" else reply
    return f"{ex['prompt']}{completion}\n\n{ex['test']}\n\ncheck({ex['entry_point']})\n"


def load(data_dir: str, mode: str = "chat"):
    rows = [json.loads(line) for line in open(os.path.join(data_dir, "humaneval", "HumanEval.jsonl"), encoding="utf-8")
            if line.strip()]
    examples = []
    for r in rows:
        ex = {"id": r["task_id"], "prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"],
              "canonical_solution": r["canonical_solution"], "answer": "pass", "mode": mode}
        if mode == "chat":
            ex["messages"] = [{"role": "user", "content": "Complete the following Python function. Reply with the "
                               f"complete function in a ```python code block.\n\n```python\n{r['prompt']}```"}]
        else:
            ex["raw"], ex["stop"] = r["prompt"], RAW_STOP
        examples.append(ex)
    return examples


def score(ex, reply: str):
    passed, status = run_program(program(ex, reply))
    return ("pass" if passed else status), passed
