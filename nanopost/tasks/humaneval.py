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
inherited file descriptors, a time limit (wall-clock time less the time spent waiting for a CPU
other work held, so a busy machine fails no solution; the whole process group is killed), CPU-time,
address-space (memory), file-size, open-file and core-dump limits, and a Python-level guard that
refuses writes outside the scratch directory through Python's file calls (open, io.FileIO, os.open,
os.mkdir, a Unix socket's file, and modules that use them, bz2 and tarfile included; a path relative
to another folder's descriptor, dir_fd, is refused) and disables sqlite3, new processes (subprocess,
multiprocessing), calls that act on other processes (signals, pidfd ones included, resource limits,
scheduling), file-removal and permission calls, on os and on posix (the same functions).
It is NOT a security boundary: the guard is Python code that determined code can undo (ctypes,
re-importing internals, other C code that opens files itself); the process runs as the same user, can read any file that user can read,
and can use the network; there is no seccomp, namespace, container or chroot; code that reads its
own program file, or finds the token in its own running code (frames, constants), can print the pass
token without passing, and a function returning an object
whose __eq__ always answers True, or code that replaces a builtin or library function the tests
call (`builtins.abs = ...`), passes the tests' comparisons (as in OpenAI's human-eval). Run
untrusted models' code inside a container or VM if that matters."""
import ast
import builtins
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time

from nanopost.data import DataError, read_jsonl

RAW_STOP = ["\ndef ", "\nclass ", "\nif ", "\nprint(", "\n#", "\nassert ", "\n```"]  # generation stops early
TOP_LEVEL = re.compile(r"(?:^|\n)(?=[^\s])")  # a line that starts with neither a space, a tab nor a line end


def raw_body(reply: str, prompt: str) -> str:
    """A raw completion up to its first top-level line: the function the prompt opened ends there
    (a self-test loop, a closing code fence or an `if` after it is not the solution; the Codex
    paper's stop list cuts at def, class, if, print and #). A line at column 0 is top-level only
    where prompt + what comes before it compiles: inside a string, brackets or after a backslash
    it is not."""
    for m in TOP_LEVEL.finditer(reply):
        head = reply[:m.start()]
        try:
            compile_solution(prompt + head)
        except Exception:  # SyntaxError, null bytes, nesting too deep
            continue
        return head
    return reply


def compile_solution(solution: str) -> None:
    """Compile prompt + completion as run_program will read it (line ends made \n, a `from
    __future__` import moved away): raises what compile() raises."""
    compile(FUTURE.sub("", python_lines(solution)), "<solution>", "exec")


def python_lines(code: str) -> str:
    """Python ends a line at \r\n and at a lone \r too: said as \n, so that FUTURE sees the lines
    Python sees."""
    return code.replace("\r\n", "\n").replace("\r", "\n")

GUARD = r'''
import builtins, io, os, posix, sys, _io
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
builtins.open = io.open = _io.open = _guarded_open
class _GuardedFileIO(io.FileIO):
    def __init__(self, file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and not _inside(file):
            raise PermissionError(f"write outside the scratch directory: {file!r}")
        super().__init__(file, mode, *a, **k)
io.FileIO = _io.FileIO = _GuardedFileIO
# imported after open is guarded: bz2, tarfile, zipfile (through shutil) keep a reference to it
import shutil, subprocess, signal, socket, _posixsubprocess
def _outside(path, dir_fd):  # a path relative to another folder's descriptor: never checked, so refused
    return not _inside(path) or (dir_fd is not None and not os.path.isabs(os.fsdecode(path)))
_os_open, _mkdir = os.open, os.mkdir
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def _guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
    if flags & _WRITE and _outside(path, dir_fd):
        raise PermissionError(f"write outside the scratch directory: {path!r}")
    return _os_open(path, flags, mode, dir_fd=dir_fd)
def _guarded_mkdir(path, mode=0o777, *, dir_fd=None):
    if _outside(path, dir_fd):
        raise PermissionError(f"write outside the scratch directory: {path!r}")
    return _mkdir(path, mode, dir_fd=dir_fd)
os.open, os.mkdir = posix.open, posix.mkdir = _guarded_os_open, _guarded_mkdir
_bind = socket.socket.bind
def _guarded_bind(self, address):  # a Unix socket's path is a file
    if self.family == getattr(socket, "AF_UNIX", None) and isinstance(address, (str, bytes, os.PathLike)) \
            and os.fsencode(address)[:1] != b"\0" and not _inside(address):
        raise PermissionError(f"a socket file outside the scratch directory: {address!r}")
    return _bind(self, address)
socket.socket.bind = _guarded_bind
_posixsubprocess.fork_exec = _deny  # every new process (subprocess, multiprocessing's spawn and forkserver)
try:  # its C code opens files itself (ATTACH, VACUUM INTO: from any connection): no solution needs it
    import sqlite3, sqlite3.dbapi2
    sqlite3.connect = sqlite3.Connection = sqlite3.dbapi2.connect = sqlite3.dbapi2.Connection = _deny
except ImportError:
    pass
import resource
resource.prlimit = resource.setrlimit = _deny  # prlimit(parent, RLIMIT_CPU, (1, 1)) kills the evaluator
for _n in ("system", "popen", "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "kill",
           "killpg", "fork", "forkpty", "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve", "putenv",
           "chmod", "chown", "lchown", "truncate", "ftruncate", "symlink", "link", "chdir", "setuid", "setgid",
           "posix_spawn", "posix_spawnp", "setsid", "setpgid", "setpgrp",  # (a new session outlives killpg)
           "fchmod", "fchown", "lchmod", "chflags", "lchflags", "utime", "mkfifo", "mknod", "pidfd_open",
           "setpriority", "sched_setscheduler", "sched_setparam", "sched_setaffinity", "unshare", "setns"):
    for _m in (os, posix):  # (os's functions are posix's)
        if hasattr(_m, _n):
            setattr(_m, _n, _deny)
shutil.rmtree = shutil.move = shutil.chown = _deny
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = _deny
signal.signal = signal.pidfd_send_signal = _deny
del _n, _m
'''


def _waited_for_cpu(pid: int) -> float:
    """Seconds process `pid` has spent ready to run but waiting for a CPU that other work held
    (Linux's /proc/PID/schedstat, second field); 0 where the kernel does not say."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _wait(p: subprocess.Popen, timeout: float) -> bool:
    """Wait for `p` to end -> False if it ran out of time first. The limit counts the time the
    program ran or slept, not the time it waited for a CPU: a solution that needs 3 s must not fail
    (and be cached as failed) because the machine was busy with other work. A backstop of 10x the
    limit in plain wall-clock time holds where the kernel does not report the wait."""
    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        left = min(timeout - (elapsed - _waited_for_cpu(p.pid)), 10 * timeout - elapsed)
        if left <= 0:
            return False
        try:
            p.wait(timeout=left)
            return True
        except subprocess.TimeoutExpired:
            pass


def run_program(code: str, timeout: float = 10.0, memory_mb: int = 2048) -> tuple[bool, str]:
    """Run `code` in the sandbox described above -> (passed, status): passed only if the code ran
    to its end (the token printed after it arrived); status is "passed", "timeout", or the last
    line of the error."""
    token = secrets.token_hex(16)
    code = python_lines(code)

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
            open(os.path.join(scratch, "stdout"), "wb+") as out, \
            open(os.path.join(scratch, "stderr"), "wb+") as err:  # files: bounded by RLIMIT_FSIZE, unlike pipes,
        # which the parent would have to hold whole, and which a grandchild could keep open past the timeout
        with open(os.path.join(scratch, "program.py"), "w", encoding="utf-8") as f:
            # a `from __future__` import is legal only at the top of the file: above the guard
            future = "".join(line if line.endswith("\n") else line + "\n" for line in FUTURE.findall(code))
            f.write(f"{future}{GUARD}\n{FUTURE.sub('', code)}\n__import__('os').write(1, b'{token}\\n')\n")
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        run = "import runpy; runpy.run_path('program.py', run_name='sandbox')"  # not __main__, as in human-eval
        p = subprocess.Popen([sys.executable, "-I", "-c", run], cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=err, close_fds=True, preexec_fn=limits)
        try:
            in_time = _wait(p, timeout)
        finally:  # at the end, a timeout, or Ctrl-C while waiting: nothing of the program outlives this call
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        if not in_time:
            return False, "timeout"
        out.seek(0)
        ended = token.encode() in out.read()
        err.seek(max(0, os.fstat(err.fileno()).st_size - 4096))
        tail = err.read()
    if ended:
        return True, "passed"
    if p.returncode in (-signal.SIGXCPU, -signal.SIGKILL):  # past the CPU-time limit (several threads)
        return False, "timeout"
    lines = tail.decode("utf-8", "replace").strip().splitlines()
    return False, lines[-1][:300] if lines else f"stopped before the end (exit status {p.returncode})"


# A fenced block: ``` or ~~~ (not a longer run of them: a separator line), possibly indented (inside
# a list item), a language tag or none; the last block may lack its closing fence (the reply was
# cut off by the token limit)
FENCE = re.compile(r"^([ \t]*)(```|~~~)(?![`~])[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:^[ \t]*\2|\Z)", re.DOTALL | re.MULTILINE)
PYTHON = ("", "python", "python3", "py")
CODE_START = re.compile(r"^(?:(?:async )?def \w+\s*\(|class \w+|import [\w.]+|from [\w.]+ import |@\w)", re.MULTILINE)
# only a plain `from __future__ import a, b  # comment` line moves above the sandbox's guard
# (or its parenthesized form, which may span lines: only names, commas and blanks inside)
_NAMES = r"[A-Za-z_]\w*(?:{ws}*,{ws}*[A-Za-z_]\w*)*"
FUTURE = re.compile(r"^from __future__ import (?:" + _NAMES.format(ws=r"[ \t]") + r"|\([ \t\n]*" + _NAMES.format(ws=r"[ \t\n]")
                    + r"[ \t\n]*(?:,[ \t\n]*)?\))[ \t]*(?:#[^\r\n]*)?(?:\n|\Z)", re.MULTILINE)
DEFINES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _parse(code: str):
    try:
        return ast.parse(code)
    except Exception:  # SyntaxError, null bytes, nesting too deep: not code we can use
        return None


def _compiles(code: str) -> bool:
    try:
        compile(code, "<reply>", "exec")
        return True
    except Exception:
        return False


def source_lines(code: str) -> list[str]:
    """code's lines, ends kept, as Python numbers them (ast's lineno): at \n, \r\n or \r only.
    str.splitlines also breaks at a form feed, U+2028, U+0085, ..., which would shift every later line."""
    return re.split(r"(?<=\n)|(?<=\r)(?!\n)", code)


def _blocks(reply: str) -> list[str]:
    """The python code blocks of a reply, each without the indentation of its fence."""
    out = []
    for indent, _, lang, code in FENCE.findall(reply):
        if lang.lower() in PYTHON:
            out.append("".join(line[len(indent):] if line.startswith(indent) else line
                               for line in source_lines(code)))
    return out


def _bound(node) -> set:
    """The top-level names a statement binds."""
    if isinstance(node, DEFINES):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        # `x = ...`, `a, b = ...`, not `result[0] = ...` or `obj.attr = ...` (they bind nothing)
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return set()


def _anywhere(node) -> set:
    """Every name a tree binds at any depth: assignments, loop and with targets, arguments,
    definitions, imports, except and match names (a name used but bound nowhere comes from outside)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            out.add(n.id)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, DEFINES):
            out.add(n.name)
        elif isinstance(n, ast.alias):
            out.add((n.asname or n.name).split(".")[0])
        elif isinstance(n, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and n.name:
            out.add(n.name)
        elif isinstance(n, ast.MatchMapping) and n.rest:
            out.add(n.rest)
    return out


def _star(node) -> bool:
    """`from x import *`"""
    return isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names)


def _used(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _helpers(main: str, others: list[str], prompt: str) -> tuple[str, str]:
    """The definitions the main block needs from the reply's other blocks: functions, classes,
    imports and literal constants bound to a name that the main block (or a definition carried for
    it) uses and that neither it, the prompt nor Python's builtins define, to go after it in the
    order the reply wrote them (an import before the decorator using it, a base class before its
    subclass); and another block's star imports of the standard library (`from math import *`), to
    go before it, only when some name it uses is bound nowhere at all and it has none of its own
    -> (before, after). Nothing else: a test block's
    imports, example calls, asserts and prints, and a redefinition of a prompt's helper (which the
    tests may call) stay out."""
    tree = _parse(main)
    if tree is None:
        return "", ""
    prompt_tree = _parse(prompt) or ast.Module(body=[])
    known = set(dir(builtins)) | {n for node in prompt_tree.body for n in _bound(node)}
    known |= {n for node in tree.body for n in _bound(node)}
    offered, stars = {}, []  # name -> [(place, source, names used, names bound)], in reply order
    place = 0  # reply order: block by block, statement by statement
    for code in others:
        other = _parse(code)
        if other is None:
            continue
        lines = source_lines(code)
        for node in other.body:
            if isinstance(node, ast.Assign):
                try:
                    ast.literal_eval(node.value)
                except Exception:  # not a literal (a call, a name): example code
                    continue
            elif not isinstance(node, DEFINES + (ast.Import, ast.ImportFrom)):
                continue
            first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            source = "".join(lines[first - 1:node.end_lineno])
            place += 1
            if _star(node):
                if node.level == 0 and (node.module or "").split(".")[0] in sys.stdlib_module_names:
                    stars.append(source)  # never `from solution import *`: only the standard library's
            for name in _bound(node) - {"*"}:
                offered.setdefault(name, []).append((place, source, _used(node), _anywhere(node),
                                                     isinstance(node, (ast.Import, ast.ImportFrom))))
    # each name takes its last definition (a function body looks names up when called: a helper fixed
    # in a later block is the one used), except that an import repeated further down (in a usage
    # example) is taken where it was first written before the definition that needs it
    needed, carried, todo = set(), {}, [(n, place + 1) for n in sorted(_used(tree) - known)]
    missing, bound = set(), _anywhere(tree)
    while todo:
        name, before = todo.pop()
        if name in needed or name in known:
            continue
        if name not in offered:
            missing.add(name)
            continue
        needed.add(name)
        last = offered[name][-1]
        if last[4]:  # an import: the last one before the definition needing it, if any
            last = ([d for d in offered[name] if d[4] and d[0] < before] or [last])[-1]
        where, source, uses, binds, _ = last
        carried[source] = where
        bound |= binds
        todo += [(n, where) for n in sorted(uses - known - needed)]
    # a name used but bound nowhere we can see (not even as a local): perhaps a star import's, unless
    # the main block or the prompt has one of its own
    own_star = any(_star(n) for t in (tree, prompt_tree) for n in ast.walk(t))
    before = "\n".join(dict.fromkeys(stars)) if missing - bound and not own_star else ""
    return before, "\n".join(sorted(carried, key=carried.get))


def extract_code(reply: str, entry_point: str = "", prompt: str = "") -> str:
    """The code of a chat reply. Of its python blocks (```python, ```py, a bare ``` or ~~~; indented
    fences too), the last that defines entry_point (a reply often ends with a block of example calls),
    else the last; then what that block needs from the other blocks (a helper the model wrote in a
    block of its own: _helpers). A reply without a fence: itself if it compiles after the prompt,
    else its code from the first line that starts a definition or import, cut after the last line
    where it still compiles (prose before and after)."""
    blocks = _blocks(reply)
    if not blocks:
        if _compiles(prompt + reply):
            return reply
        for start in list(CODE_START.finditer(reply))[:8]:  # prose may start with "from ..." too
            lines = source_lines(reply[start.start():])
            for end in range(len(lines), 0, -1):
                code = "".join(lines[:end])
                if _compiles(prompt + code):
                    return code
        return reply
    defining = [i for i, b in enumerate(blocks) if re.search(rf"^\s*def {re.escape(entry_point)}\b", b, re.MULTILINE)]
    main = (defining or [len(blocks) - 1])[-1]
    # a star import goes before the main block (whose definitions then win), the rest after it
    before, after = _helpers(blocks[main], blocks[:main] + blocks[main + 1:], prompt)
    return "".join([f"{before}\n\n" if before else "", blocks[main], f"\n\n{after}\n" if after else ""])


def prompt_helpers(prompt: str, entry_point: str, test: str) -> str:
    """The prompt's top-level functions and classes (with decorators) that the test code itself
    calls, other than entry_point: the tests' oracle. A helper only the solution uses stays the
    reply's own (a reply may redefine is_palindrome for its make_palindrome)."""
    tree, test_tree = _parse(prompt), _parse(test)
    if tree is None or test_tree is None:
        return ""
    oracle, lines = _used(test_tree), source_lines(prompt)
    return "\n".join("".join(lines[min([n.lineno] + [d.lineno for d in n.decorator_list]) - 1:n.end_lineno])
                     for n in tree.body if isinstance(n, DEFINES) and n.name != entry_point and n.name in oracle)


class Unfinished(ValueError):
    """The solution (prompt + completion) is not a complete program of its own."""


def program(ex, reply: str) -> str:
    """prompt + completion + the prompt's helpers again + tests + check(entry_point). A chat reply
    that restates the whole function simply redefines it after the prompt (the prompt keeps its
    imports and helpers; a `from __future__` import anywhere moves to the top of the file in
    run_program). The prompt's functions that the tests call (poly, encode_cyclic, ...) are
    restated after the completion: they are the tests' oracle, and a reply that redefined them (an
    identity encode_cyclic with an identity decode_cyclic) would pass those tests wrongly.
    prompt + completion must compile on their own (else Unfinished): the text after them would
    otherwise finish what they left open, e.g. a trailing `@lambda f: lambda c: None` decorating
    the tests' `def check` into a function that checks nothing, or an open string swallowing them."""
    completion = extract_code(reply, ex["entry_point"], ex["prompt"]) if ex["mode"] == "chat" else raw_body(reply, ex["prompt"])
    try:
        compile_solution(ex["prompt"] + completion)
    except Exception as e:  # SyntaxError, null bytes, nesting too deep
        raise Unfinished(f"the solution does not compile on its own ({type(e).__name__}: {e})"[:300]) from None
    helpers = prompt_helpers(ex["prompt"], ex["entry_point"], ex["test"])
    return (f"{ex['prompt']}{completion}\n\n" + (f"{helpers}\n\n" if helpers else "")
            + f"{ex['test']}\n\ncheck({ex['entry_point']})\n")


def load(data_dir: str, mode: str = "chat"):
    path = os.path.join(data_dir, "humaneval", "HumanEval.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    examples, seen = [], {}
    for n, r in read_jsonl(path):
        bad = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(r.get(k), str)]
        if bad:
            raise DataError(f"{path}:{n}: no string {', '.join(bad)} (a HumanEval row has task_id, prompt, test, entry_point)")
        if r["task_id"] in seen:  # results are keyed by it: one problem would be reported with the other's answer
            raise DataError(f"{path}:{n}: task_id {r['task_id']!r} again (first on line {seen[r['task_id']]})")
        seen[r["task_id"]] = n
        ex = {"id": r["task_id"], "prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"],
              "canonical_solution": r.get("canonical_solution", ""), "answer": "pass", "mode": mode}
        if mode == "chat":
            ex["messages"] = [{"role": "user", "content": "Complete the following Python function. Reply with the "
                               f"complete function in a ```python code block.\n\n```python\n{r['prompt']}```"}]
        else:
            ex["raw"], ex["stop"] = r["prompt"], RAW_STOP
        examples.append(ex)
    if not examples:  # a score of nothing would read as a result
        raise DataError(f"{path}: no problems in it")
    return examples


def score(ex, reply: str, cut: bool = False):
    """cut (the reply hit its token limit): run as it stands (a program cut short fails on its own)."""
    try:
        code = program(ex, reply)
    except Unfinished as e:
        return str(e), False
    except Exception as e:  # a reply no extraction rule foresaw fails its question, never the whole run
        return f"no program from the reply ({type(e).__name__}: {e})"[:300], False
    passed, status = run_program(code)
    if passed:
        return "pass", True
    return (status if status != "pass" else "failed (its last error line reads 'pass')"), False
