"""The paper's whole experiment (arXiv 2411.02939), end to end, as one command:

    teacher-built data -> SFT, KTO from the base, SFT -> KTO -> weight fusion -> every model evaluated
    on GSM8K, MMLU, CMMLU, C-Eval and HumanEval -> OUT/report.md (+ report.json, charts)

    python paper.py                     # offline, CPU, a few minutes: a tiny random model is its own
                                        # teacher, data/seeds.jsonl, the benchmark slices in data/mini
    python paper.py --model Qwen/Qwen2-0.5B-Instruct --teacher Qwen/Qwen2.5-7B-Instruct \\
        --preset paper --device cuda --gpus 8 --data-dir data/benchmarks --limit 0 --out runs/paper
    python paper.py --model Qwen/Qwen2-0.5B-Instruct --teacher-url http://gpu1:8000/v1 ...  # a vLLM teacher

Stages, each one script run as its own process (the command is printed, so any stage can be rerun
by hand), in this order:
  tiny        (no --model) python -m nanopost.testing OUT/tiny: the tiny random model
  data        build_data.py: the teacher labels, answers, judges; OUT/data/{sft,kto}.jsonl
  sft, sft-b  train_sft.py from the base, seeds 0 and 1 (data order): the two SFT checkpoints the
              paper fuses linearly
  kto         train_kto.py from the base;   sft-kto: train_kto.py from OUT/sft (the two-stage run)
  linear-0.5  merge.py linear, sft + sft-b at 0.5 / 0.5;   linear-0.05: at 0.05 / 0.95
  slerp       merge.py slerp between sft (t = 0) and sft-kto, t = 0.5
  eval        evaluate.py, every model on the same questions, one results.json
  report      OUT/report.md, report.json, report_*.png (with matplotlib)

Every stage skips work already done: a finished stage leaves OUT/stages/NAME.json (its command,
the finished stages it read, its wall time and peak memory), and a rerun skips it; an interrupted
one (Ctrl-C, a crash, a failed stage) is continued with the script's own --resume (training from
its last checkpoint, build_data from its last finished item, evaluate.py from its prediction cache).
A stage whose inputs were redone since (say OUT/sft was deleted and trained again), or whose files
changed (the --seeds, the benchmark data, evaluate's PROTOCOL, OUT/data/sft.jsonl edited, a model a
stage starts from trained again by hand: its files' sizes and times), runs again, afresh (its old files go
first; build_data's teacher cache and evaluate.py's prediction cache kept), and so does one whose
output has gone; the report is rewritten whenever a stage ran. One paper.py at a time holds OUT
(stages/.lock, held by its stages too), and a stage never outlives it (a signal to paper.py is
passed on; killed, its stage gets SIGINT). A finished or interrupted stage asked for with other
flags is refused rather than silently reused or mixed: delete OUT/NAME and OUT/stages/NAME*.json
to redo it, or choose another --out. --sft-args, --kto-args, --data-args and --eval-args add flags
to one script's command ("--lr 1e-5 --max-steps 10"; a flag given again wins over the default), but
not the flags that wire the stages together (--out, --model, --data, ...: paper.py's own flags set them).
"""
import argparse
import fcntl
import glob
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
TASKS = ["gsm8k", "mmlu", "cmmlu", "ceval", "humaneval"]
# Qwen2-0.5B-Instruct as published by the Qwen team (not measured here); CMMLU was not published
PUBLISHED = {"gsm8k": 40.1, "mmlu": 37.9, "cmmlu": None, "ceval": 45.2, "humaneval": 17.1}
CHANCE = {"gsm8k": 0.0, "mmlu": 25.0, "cmmlu": 25.0, "ceval": 25.0, "humaneval": 0.0}
# the offline default: a tiny random model needs few tokens and a high learning rate to move
TINY = {"data": "--max-new-tokens 32 --json-max-tokens 24 --min-label-count 1 --batch-size 16",
        "sft": "--max-steps 10 --lr 1e-3 --batch-size 4", "kto": "--max-steps 10 --lr 1e-4 --batch-size 4",
        "eval": "--batch-size 8"}
TINY_BUDGET = 48  # new tokens for the tiny model's GSM8K and HumanEval replies (it never stops by itself)


def log(msg):
    print(f"[paper {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child_setup():
    """(In the child, before exec.) Its own process group (signals reach it through us, once), and on
    Linux a SIGINT when paper.py dies, even by SIGKILL, so the stage saves and stops instead of
    running on alone beside a rerun."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG


def run_child(cmd, keep_fds=()):
    """cmd as a child process -> (exit code, peak RSS GB of its largest process, interrupted).
    The child has its own process group: a Ctrl-C (or kill -INT, or SIGTERM) reaches paper.py, which
    passes it on once, and we wait while the child saves and stops, so no script is left running
    alone; if paper.py is killed outright, the child gets a SIGINT (child_setup). keep_fds: file
    descriptors the child holds too (the run folder's lock, held until the last of us ends). Ctrl-Z
    (SIGTSTP) stops the child with us, and it goes on when we do."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    # in the caller's folder: their relative paths mean what they meant
    p = subprocess.Popen(cmd, env=env, preexec_fn=child_setup, pass_fds=keep_fds)
    stopped = []

    def forward(signum, frame):
        stopped.append(signum)
        p.send_signal(signum)

    def suspend(signum, frame):  # Ctrl-Z reaches only us (the terminal's process group): the stage stops with us
        p.send_signal(signal.SIGTSTP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTSTP)  # stopped here until a SIGCONT (fg, bg)
        signal.signal(signal.SIGTSTP, suspend)
        p.send_signal(signal.SIGCONT)
    old = signal.signal(signal.SIGTERM, forward)
    old_tstp = signal.signal(signal.SIGTSTP, suspend)
    try:
        while True:
            try:
                _, status, usage = os.wait4(p.pid, 0)
                break
            except KeyboardInterrupt:
                stopped.append(signal.SIGINT)
                p.send_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGTSTP, old_tstp)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss / 1024**2, bool(stopped)


def script(name):
    return os.path.join(ROOT, name)


def contents(path) -> str:
    """A hash of what a file, or every file under a folder, holds (names and bytes): a stage that
    read them is stale once they change, though its command is the same."""
    h = hashlib.sha256()
    files, seen = [], set()
    for d, dirs, fs in os.walk(path, followlinks=True):  # a linked folder's files are read too, once (a
        if os.path.realpath(d) in seen:  # link up the tree would loop)
            dirs[:] = []
            continue
        seen.add(os.path.realpath(d))
        files += [os.path.join(d, f) for f in fs]
    files = [path] if os.path.isfile(path) else sorted(files)
    for f in files:
        h.update(os.path.relpath(f, path).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16] if files else "missing"


def checkpoint_stamp(path) -> str:
    """What a model a stage starts from is, cheaply: a local folder as evaluate.py's cache sees it
    (tasks.fingerprint: its files' names, sizes and mtimes, the non-weight files' bytes); a hub id
    as itself. Hashing gigabytes of weights at every run (a 7B teacher) would cost more than it
    tells: new weights are written with a new mtime."""
    if not os.path.isdir(path):
        return path
    from nanopost.tasks import fingerprint, stamp
    return stamp(fingerprint(path))


class Stages:
    """Runs each stage once. stages/NAME.json marks a finished stage: its command, the ids of the
    finished stages it read (so a redone upstream stage makes it stale), its costs, and an id of its
    own. stages/NAME.running.json holds the command of a stage started but not finished, and the
    time and memory of its attempts so far."""

    def __init__(self, out, out_spelled):
        self.out, self.dir = out, os.path.join(out, "stages")
        self.spellings = sorted({out, os.path.normpath(out_spelled)}, key=len, reverse=True)
        os.makedirs(self.dir, exist_ok=True)
        self.ran, self.fd = [], None  # fd: the run folder's lock (lock())

    def comparable(self, cmd, stored=False):
        """cmd as a marker records it: the interpreter, this repository's folder and --out written
        as python, nothing and $OUT, so another virtualenv, a moved checkout or --out spelled another
        way still recognise their finished stages. stored: a marker's command, whose relative paths
        are from this repository's folder (older versions recorded ./runs/x, or runs/x/tiny for an
        --out written absolute)."""
        def norm(c):  # --out first (the commands name it absolute), then this repository
            if stored and not c.startswith(("$OUT", "-", os.sep)) and (os.sep in c or c.startswith(".")) \
                    and "://" not in c:  # (a URL is not a path)
                c = os.path.normpath(os.path.join(ROOT, c))
            for o in self.spellings:
                if c == o or c.startswith(o + os.sep):
                    return "$OUT" + c[len(o):]
            return c.replace(ROOT + os.sep, "")
        return ["python" if c in (PY, "python") else norm(c) for c in cmd]

    def same(self, stored_cmd, key) -> bool:
        """A marker's command and this run's (comparable) one are the same command: both read as a
        marker's, so a path the user wrote relative (./val.jsonl) compares equal to itself."""
        return self.comparable(stored_cmd, stored=True) == self.comparable(key, stored=True)

    def _read(self, name, suffix=".json"):
        path = os.path.join(self.dir, name + suffix)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        return None

    def _write(self, name, rec, suffix=".json"):
        tmp = os.path.join(self.dir, f".{name}{suffix}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rec, f, indent=1)
        os.replace(tmp, os.path.join(self.dir, name + suffix))

    def done(self, name):
        return self._read(name)

    def id(self, name):
        rec = self.done(name)
        return None if rec is None else rec.get("id", rec.get("finished"))

    def run(self, name, cmd, out_dir=None, resume_flag="--resume", fresh_flag=None, needs=(), output=(), reads=(),
            models=(), versions=None, check=None, keep=()):
        """Run cmd unless it finished already. out_dir: where it writes (a non-empty one means an
        interrupted attempt, continued with resume_flag). needs: the stages whose outputs it reads.
        reads: files or folders it reads (the user's seeds and benchmark data, data/sft.jsonl): a change
        to what they hold makes it stale; models: the checkpoints it starts from (the user's, and
        earlier stages' outputs, which a user may train again by hand: checkpoint_stamp), likewise;
        versions: {name: value} of the code that changes its results (evaluate's PROTOCOL).
        A stage that runs again starts afresh: the old attempt's files in out_dir go first (but those
        named in keep: build_data's teacher cache, evaluate.py's prediction cache), then the script runs
        (with fresh_flag if kept files remain). output: the files a finished stage must have left; check(): why its output
        cannot be used (or None): either way it runs again."""
        key = self.comparable(cmd)
        inputs = {**{n: self.id(n) for n in needs}, **{self.comparable([p])[0]: contents(p) for p in reads},
                  **{self.comparable([m])[0]: checkpoint_stamp(m) for m in models}, **(versions or {})}
        old, redo = self.done(name), None
        # what to delete to redo it: the kept files may stay (a teacher's replies: hours on a 7B teacher)
        folder = (out_dir or os.path.join(self.out, name)) + (f" (all but its {', '.join(keep)}, which the redo reuses)"
                                                              if keep else "")
        if old is not None:
            if not self.same(old["cmd"], key):
                raise SystemExit(f"stage {name}: finished earlier with another command\n  then: {shlex.join(old['cmd'])}\n"
                                 f"  now:  {shlex.join(key)}\ndelete {folder} and "
                                 f"{self.dir}/{name}.json to redo it with the new settings, or choose another --out")
            then = old.get("inputs", {})  # (markers of older versions lack the files' hashes: not compared)
            if stale := [n for n in inputs if n in then and then[n] != inputs[n]]:
                redo = f"{', '.join(stale)} changed since it ran"
            elif gone := [f for f in output if not os.path.exists(f)]:
                redo = f"its output {', '.join(gone)} is gone"
            elif check and (why := check()):
                redo = why
            else:
                log(f"{name}: done already ({old['wall_s']:.0f} s), skipped")
                return
            log(f"{name}: {redo}: running it again")
            os.remove(os.path.join(self.dir, f"{name}.json"))
        running = self._read(name, ".running.json")
        started = out_dir is not None and os.path.isdir(out_dir) and bool(os.listdir(out_dir))
        then = (running or {}).get("inputs", {})
        if started and not redo and (stale := [n for n in inputs if n in then and then[n] != inputs[n]]):
            redo = f"{', '.join(stale)} changed since its interrupted attempt"  # continuing would mix the two
            log(f"{name}: {redo}: starting it afresh")
        changed = running is not None and not self.same(running["cmd"], key)
        if changed and started and not redo:  # partial work made with other flags: never mixed
            raise SystemExit(f"stage {name}: an interrupted attempt was started with another command\n"
                             f"  then: {shlex.join(running['cmd'])}\n  now:  {shlex.join(key)}\nrun paper.py with the "
                             f"settings it started with to continue it, or delete {folder}"
                             f" and {self.dir}/{name}.running.json to start it afresh")
        if redo or running is None or changed:  # (changed and nothing written: it failed before any work)
            running = {"cmd": key, "wall_s": 0.0, "peak_rss_gb": 0.0, "attempts": 0}
        if out_dir is not None and (started and redo and (fresh_flag or keep) or running.get("clearing")):
            # afresh: the old files go before the script starts (its own --overwrite deletes them only once
            # it has loaded everything: interrupted before that, a rerun would have continued the old run),
            # marked first, so an interruption while they go is finished by the next run
            running.update(clearing=True, inputs=inputs)
            self._write(name, running, ".running.json")
            self.clear(out_dir, keep)
            running["clearing"] = False
            started = bool(os.listdir(out_dir))
        flags = ([fresh_flag] if redo and started and fresh_flag else
                 [resume_flag] if started and resume_flag and not redo else [])
        full = cmd + flags
        continuing = started and not redo and resume_flag != fresh_flag  # (a merge starts over: --overwrite)
        log(f"{name}: {'continuing: ' if continuing else ''}{shlex.join(full)}")
        running["attempts"] += 1
        running["inputs"] = inputs
        self._write(name, running, ".running.json")
        t0 = time.time()
        code, peak_gb, stopped = run_child(full, keep_fds=() if self.fd is None else (self.fd,))
        running["wall_s"] = round(running["wall_s"] + time.time() - t0, 1)
        running["peak_rss_gb"] = round(max(running["peak_rss_gb"], peak_gb), 2)
        self._write(name, running, ".running.json")
        if code != 0 and (stopped or code in (130, -2, -15)):
            log(f"{name}: interrupted after {time.time() - t0:.0f} s; run the same command again to continue")
            raise SystemExit(130)
        if code != 0:
            raise SystemExit(f"stage {name} failed (exit {code}) after {time.time() - t0:.0f} s: {shlex.join(full)}\n"
                             f"fix the cause and run the same paper.py command again: finished stages are kept")
        rec = {"name": name, "cmd": key, "inputs": inputs, "id": uuid.uuid4().hex, "wall_s": running["wall_s"],
               "peak_rss_gb": running["peak_rss_gb"], "attempts": running["attempts"],
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._write(name, rec)
        os.remove(os.path.join(self.dir, f"{name}.running.json"))
        self.ran.append(name)
        log(f"{name}: finished in {running['wall_s']:.0f} s, peak RSS {running['peak_rss_gb']:.2f} GB")
        if stopped:  # it finished before the signal stopped it: recorded as done, then we stop
            log("interrupted; run the same command again to continue")
            raise SystemExit(130)

    def clear(self, out_dir, keep=()):
        """Remove out_dir's files but those named in keep: the folder is renamed aside first (one
        step), so no half-deleted folder is ever read as an attempt to continue; run again after an
        interruption, it finishes the job (the kept files of an earlier pass included). A link to a
        folder elsewhere (another disk) stays: the folder it points to is cleared."""
        real = os.path.realpath(out_dir)
        if os.path.isdir(real):
            os.rename(real, f"{real}.old-{uuid.uuid4().hex[:8]}")
        os.makedirs(real, exist_ok=True)
        for aside in sorted(glob.glob(glob.escape(real) + ".old-*")):
            for n in keep:
                if os.path.exists(os.path.join(aside, n)) and not os.path.exists(os.path.join(real, n)):
                    os.rename(os.path.join(aside, n), os.path.join(real, n))
            shutil.rmtree(aside)

    def lock(self):
        """Hold the run folder (stages/.lock) for as long as this process, or a stage it started,
        lives: a second paper.py on it stops at once. -> the descriptor, for the stages to hold."""
        fd = os.open(os.path.join(self.dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"{self.out} is in use by another paper.py run (or a stage it started, still "
                             f"stopping): wait for it to end, or choose another --out") from None
        self.fd = fd
        return fd


ARGS_FLAGS = ("--data-args", "--sft-args", "--kto-args", "--eval-args")
# the flags paper.py gives each stage's script to wire the stages together: not for --STAGE-args
WIRED = {"data": ("--out", "--student", "--sources", "--teacher", "--teacher-url", "--teacher-model", "--synthesize",
                  "--resume", "--overwrite"),
         "sft": ("--out", "--model", "--data", "--seed", "--resume", "--overwrite"),
         "kto": ("--out", "--model", "--data", "--resume", "--overwrite"),
         "eval": ("--out", "--model", "--tasks", "--data-dir")}
# a stage script's own flags that begin a wired one: argparse reads them as themselves, not as its abbreviation
OWN = {"eval": ("--mode",)}


def glue_args_flags(argv):
    """--sft-args "--lr 1e-5" as argparse would otherwise refuse it (a value that starts with --)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ARGS_FLAGS and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def check_benchmarks(p, tasks, data_dir, choice_shots):
    """Every benchmark reads with these settings (a file, --choice-shots against its dev split), before
    hours of training rather than at the last stage."""
    from nanopost import tasks as benchmarks
    for t in tasks:
        try:
            benchmarks.load(t, data_dir, shots=choice_shots if t in benchmarks.CHOICE else None)
        except (ValueError, OSError) as e:  # (a DataError is a ValueError)
            p.error(f"--data-dir {data_dir}: {e}")


def main():
    # Ctrl-C (or kill -INT) must stop us even when we were started with SIGINT ignored (a shell's
    # background job, nohup): Python would then never raise KeyboardInterrupt. The training scripts
    # install their own handler for the same reason.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="everything goes here (default runs/paper, or runs/paper-tiny without --model)")
    p.add_argument("--model", help="the student/base model: directory or hub id (default: a tiny random one)")
    teacher = p.add_mutually_exclusive_group()
    teacher.add_argument("--teacher", help="teacher model run in-process (default: --model)")
    teacher.add_argument("--teacher-url", nargs="+", help="OpenAI-compatible teacher server(s) (vLLM, SGLang, nanopost.serve)")
    p.add_argument("--teacher-model", help="with --teacher-url: the model name to ask the server for")
    p.add_argument("--seeds", nargs="+", default=[os.path.join(ROOT, "data", "seeds.jsonl")],
                   help="instruction sources for build_data.py (default: data/seeds.jsonl)")
    p.add_argument("--synthesize", type=int, default=0, help="the teacher also writes N instructions")
    p.add_argument("--data-dir", help="benchmarks in evaluate.py's layout (default: the slices shipped in data/mini; "
                                      "data/benchmarks with --download)")
    p.add_argument("--download", action="store_true", help="first fetch the benchmarks into --data-dir (evaluate.py "
                                                           "--download; needs a network)")
    p.add_argument("--tasks", default=",".join(TASKS), help="benchmarks, comma-separated")
    p.add_argument("--limit", type=int, help="questions per benchmark, a fixed seeded subset (default: 8 with the tiny "
                                             "model, else all; 0 = all)")
    p.add_argument("--choice-shots", type=int, default=5,
                   help="exemplars for MMLU, CMMLU and C-Eval (default 5: scored zero-shot by its letter, a 0.5B "
                        "model lands near or below chance on C-Eval); GSM8K is 4-shot as in the paper")
    p.add_argument("--preset", choices=["paper"], help="train_sft.py --preset paper (the paper's SFT settings, rows "
                   "packed; --sft-args --no-packing for its examples per step)")
    p.add_argument("--device", help="cpu or cuda (passed to every script)")
    p.add_argument("--gpus", type=int, default=1, help="training stages under torchrun with N processes")
    for s in ("data", "sft", "kto", "eval"):
        p.add_argument(f"--{s}-args", default="", help=f"extra flags for that stage's script, quoted, added after "
                       f"the defaults (a flag given again wins); tiny defaults: {TINY[s] or 'none'}"
                       + (f" --max-new-tokens gsm8k={TINY_BUDGET},humaneval={TINY_BUDGET}" if s == "eval" else ""))
    args = p.parse_args(glue_args_flags(sys.argv[1:]))
    for s in WIRED:  # a stage told to write or read elsewhere: marked done, its output never where the next looks
        given = [f.split("=")[0] for f in shlex.split(getattr(args, f"{s}_args")) if f.startswith("--")]
        if clash := [f for f in given if f not in OWN.get(s, ())  # (argparse takes --ou for --out)
                     and any(w.startswith(f) for w in WIRED[s])]:
            p.error(f"--{s}-args {clash[0]}: paper.py sets {', '.join(WIRED[s])} of that stage itself (they wire the "
                    f"stages together); use paper.py's own flags (--out, --model, --seeds, --tasks, --data-dir ...)")
    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))  # gsm8k,gsm8k: once
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        p.error(f"--tasks: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(TASKS)}")
    if args.limit is not None and args.limit < 0:
        p.error("--limit must be >= 0 (0 = every question)")
    if args.gpus < 1:
        p.error("--gpus must be >= 1")
    if args.teacher_model and not args.teacher_url:
        p.error("--teacher-model names a model on a --teacher-url server; give --teacher-url too")
    if args.choice_shots < 0:
        p.error("--choice-shots must be >= 0")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        p.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    for flag, m in (("--model", args.model), ("--teacher", args.teacher)):
        # a path (not a hub id like Qwen/Qwen2-0.5B-Instruct) must be a checkpoint folder now, not when its stage starts
        if m and (os.path.exists(m) or m.startswith((".", "/", "~"))) and \
                not os.path.isfile(os.path.join(os.path.expanduser(m), "config.json")):
            p.error(f"{flag} {m}: not a checkpoint directory (no config.json in it)")
    for f in args.seeds:
        if not os.path.isfile(f):
            p.error(f"--seeds: {f}: no such file")
    # local paths as absolute ones: the stages' commands (and their markers) then name a folder the same
    # however it was spelled (runs/tiny/, ./runs/tiny, tiny from runs/)
    args.seeds = [os.path.abspath(f) for f in args.seeds]
    args.model, args.teacher = (os.path.abspath(os.path.expanduser(m)) if m and os.path.exists(os.path.expanduser(m))
                                else m for m in (args.model, args.teacher))
    data_dir = os.path.abspath(args.data_dir or ("data/benchmarks" if args.download else os.path.join(ROOT, "data", "mini")))
    if not args.download and not os.path.isdir(data_dir):
        p.error(f"--data-dir {data_dir}: no such folder (add --download to fetch the benchmarks there)")
    if not args.download:
        check_benchmarks(p, tasks, data_dir, args.choice_shots)
    tiny = args.model is None
    out_spelled = args.out or ("runs/paper-tiny" if tiny else "runs/paper")
    out = os.path.abspath(out_spelled)
    if os.path.exists(out) and not os.path.isdir(out):
        p.error(f"--out {out_spelled} is a file")
    from nanopost.checkpoint import unwritable, within
    if why := unwritable(out_spelled):  # (under a file, a read-only folder): said now, not by makedirs' traceback
        p.error(why)
    if os.path.isdir(out) and os.listdir(out) and not os.path.isdir(os.path.join(out, "stages")):
        p.error(f"--out {out_spelled} holds other files and is not a paper.py run (no stages/ in it): choose another --out")
    if within(out, data_dir):  # the eval stage hashes --data-dir: the run's own files would change it at every run
        p.error(f"--out {out_spelled} lies inside --data-dir {data_dir}: choose an --out outside it")
    os.makedirs(out, exist_ok=True)
    extra = {s: (shlex.split(TINY[s]) if tiny else []) + shlex.split(getattr(args, f"{s}_args")) for s in TINY}
    limit = args.limit if args.limit is not None else (8 if tiny else 0)
    dev = ["--device", args.device] if args.device else []
    st = Stages(out, out_spelled)
    st.lock()
    d = lambda name: os.path.join(out, name)  # noqa: E731
    if args.download:  # first: a network problem should show before hours of training
        st.run("download", [PY, script("evaluate.py"), "--download", "--tasks", ",".join(tasks), "--data-dir", data_dir])
        check_benchmarks(p, tasks, data_dir, args.choice_shots)

    # 0. the base model (the tiny default makes one; it is also its own teacher)
    base = args.model
    if tiny:
        base = d("tiny")
        st.run("tiny", [PY, "-m", "nanopost.testing", base], output=[os.path.join(base, "config.json")])
    base_stage = ("tiny",) if tiny else ()
    base_model = () if tiny else (base,)  # the user's: a stage that starts from it is stale once it changes

    # 1. teacher-guided data: sft.jsonl (the best response per instruction), kto.jsonl (best/worst)
    if args.teacher_url:
        who = ["--teacher-url", *args.teacher_url] + (["--teacher-model", args.teacher_model] if args.teacher_model else [])
    else:
        who = ["--teacher", args.teacher or base]
    synth = ["--synthesize", str(args.synthesize)] if args.synthesize else []
    st.run("data", [PY, script("build_data.py"), *who, "--student", base, "--sources", *args.seeds, *synth,
                    "--out", d("data"), *dev, *extra["data"]], d("data"), fresh_flag="--overwrite", needs=base_stage,
           output=[os.path.join(d("data"), f) for f in ("sft.jsonl", "kto.jsonl")], reads=args.seeds,
           models=(*base_model, *([args.teacher] if args.teacher else [])), keep=["teacher_cache.sqlite"])
    for f in ("sft.jsonl", "kto.jsonl"):
        path = os.path.join(d("data"), f)
        with open(path, encoding="utf-8") as fh:
            if not fh.read().strip():
                raise SystemExit(f"build_data.py wrote an empty {path}: nothing to train on (see {d('data')}/report.md); "
                                 f"more or other --seeds, or other --data-args, then delete {d('data')} (all but its teacher_cache.sqlite) and "
                                 f"{d('stages')}/data.json and run again")

    # 2. training: SFT twice (two seeds: the paper fuses two SFT checkpoints), KTO from the base and
    #    from the SFT model (the paper's two-stage SFT -> KTO; the reference is the starting model)
    launch = [PY] if args.gpus == 1 else [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                          str(args.gpus)]
    preset = ["--preset", args.preset] if args.preset else []
    for name, seed in (("sft", 0), ("sft-b", 1)):
        st.run(name, [*launch, script("train_sft.py"), "--model", base, "--data", os.path.join(d("data"), "sft.jsonl"),
                      "--out", d(name), "--seed", str(seed), *preset, *dev, *extra["sft"]], d(name),
               fresh_flag="--overwrite", needs=(*base_stage, "data"), output=[os.path.join(d(name), "config.json")],
               reads=[os.path.join(d("data"), "sft.jsonl")], models=base_model)
    for name, start, needs in (("kto", base, base_stage), ("sft-kto", d("sft"), ("sft",))):
        st.run(name, [*launch, script("train_kto.py"), "--model", start, "--data", os.path.join(d("data"), "kto.jsonl"),
                      "--out", d(name), *dev, *extra["kto"]], d(name), fresh_flag="--overwrite",
               needs=(*needs, "data"), output=[os.path.join(d(name), "config.json")],
               reads=[os.path.join(d("data"), "kto.jsonl")], models=base_model if start == base else (start,))

    # 3. weight fusion (merge.py writes its output atomically; --overwrite lets a rerun replace an older one)
    fusions = {"linear-0.5": (["--method", "linear", "--models", d("sft"), d("sft-b"), "--weights", "0.5", "0.5"],
                              ("sft", "sft-b")),
               "linear-0.05": (["--method", "linear", "--models", d("sft"), d("sft-b"), "--weights", "0.05", "0.95"],
                               ("sft", "sft-b")),
               "slerp": (["--method", "slerp", "--models", d("sft"), d("sft-kto"), "--t", "0.5"], ("sft", "sft-kto"))}
    for name, (flags, needs) in fusions.items():
        st.run(name, [PY, script("merge.py"), *flags, "--out", d(name)], d(name), resume_flag="--overwrite",
               fresh_flag="--overwrite", needs=needs, output=[os.path.join(d(name), "config.json")],
               models=[d(n) for n in needs])

    # 4. every model on the same questions (evaluate.py resumes from its own cache, keyed on each
    #    checkpoint's files, so a retrained model is never scored from old predictions)
    variants = {"base": base, "sft": d("sft"), "sft-b": d("sft-b"), "kto": d("kto"), "sft-kto": d("sft-kto"),
                **{n: d(n) for n in fusions}}
    choice = [t for t in tasks if t in ("mmlu", "cmmlu", "ceval")]
    shots = ["--shots", ",".join(f"{t}={args.choice_shots}" for t in choice)] if choice else []
    budget = [f"{t}={TINY_BUDGET}" for t in tasks if t in ("gsm8k", "humaneval")] if tiny else []
    models = [a for m in variants.values() for a in ("--model", m)]

    def unscored():  # results.json is keyed by each model's path: a moved run folder's names none of ours
        try:
            with open(os.path.join(d("eval"), "results.json"), encoding="utf-8") as f:
                results = json.load(f)
        except (OSError, ValueError) as e:
            return f"its results.json cannot be read ({e})"
        missing = [n for n, m in variants.items() if not isinstance(results.get(m), dict)]
        return f"its results.json holds no scores for {', '.join(missing)} (a moved run folder?)" if missing else None
    from nanopost.tasks import PROTOCOL
    st.run("eval", [PY, script("evaluate.py"), *models, "--tasks", ",".join(tasks), "--data-dir", data_dir,
                    *(["--limit", str(limit)] if limit else []), *shots,
                    *(["--max-new-tokens", ",".join(budget)] if budget else []), "--out", d("eval"), *dev,
                    *extra["eval"]], d("eval"), resume_flag=None,
           needs=(*base_stage, "sft", "sft-b", "kto", "sft-kto", *fusions), output=[os.path.join(d("eval"), "results.json")],
           reads=[data_dir], models=(*base_model, *[m for n, m in variants.items() if n != "base"]),
           versions={"evaluate.py PROTOCOL": PROTOCOL}, check=unscored,
           keep=["cache"])  # (its predictions are keyed on everything that changes them)

    # 5. the report: rewritten when any stage ran, or when it was made from other stages than these
    ids = {n: st.id(n) for n in ("tiny", "data", "sft", "sft-b", "kto", "sft-kto", *fusions, "eval")}
    current = None
    if os.path.exists(os.path.join(out, "report.json")):
        with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
            current = json.load(f).get("stage_ids")
    if st.ran or current != ids or not os.path.exists(os.path.join(out, "report.md")):
        write_report(args, tasks, tiny, out, variants, st, ids)
        log(f"report: {os.path.join(out_spelled, 'report.md')}")
    else:
        log(f"nothing to do: every stage is done; the report is {os.path.join(out_spelled, 'report.md')}")


# ---- the report ----

def read_jsonl(path):
    """The objects of a JSONL file, [] when it does not exist (a malformed line: DataError, file:line)."""
    from nanopost.data import read_jsonl as rows
    return [obj for _, obj in rows(path)] if os.path.exists(path) else []


def hardware():
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpus": gpus, "torch": torch.__version__, "python": platform.python_version()}


def git_commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def training_summary(run_dir):
    """First and last logged values of a training run's metrics.jsonl."""
    rows = [m for m in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "loss" in m]
    if not rows:
        return {}
    out = {"steps": rows[-1].get("step")}
    for k in ["loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins"]:
        vals = [m[k] for m in rows if m.get(k) is not None]  # a KTO step without a desirable row logs no margin
        if vals:
            out[k] = {"first": vals[0], "last": vals[-1]}
    return out


def write_report(args, tasks, tiny, out, variants, st, ids):
    with open(os.path.join(out, "eval", "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    table = {name: {t: results.get(path, {}).get(t, {}).get("accuracy") for t in tasks} for name, path in variants.items()}
    n = {t: results.get(variants["base"], {}).get(t, {}).get("n") for t in tasks}
    settings = {t: results.get(variants["base"], {}).get(t, {}).get("settings", {}) for t in tasks}
    data_dir = os.path.join(out, "data")
    sft_rows, kto_rows = read_jsonl(os.path.join(data_dir, "sft.jsonl")), read_jsonl(os.path.join(data_dir, "kto.jsonl"))
    data = {"sft_examples": len(sft_rows), "kto_examples": len(kto_rows),
            "kto_desirable": sum(bool(r.get("label")) for r in kto_rows),
            "kto_undesirable": sum(r.get("label") is False for r in kto_rows)}
    curves = {name: training_summary(os.path.join(out, name)) for name in ("sft", "sft-b", "kto", "sft-kto")}
    stages = [st.done(s) for s in ("tiny", "data", "sft", "sft-b", "kto", "sft-kto", "linear-0.5", "linear-0.05",
                                   "slerp", "download", "eval")]
    report = {"command": shlex.join([sys.executable, *sys.argv]), "git_commit": git_commit(), "hardware": hardware(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "models": variants, "accuracy": table, "questions": n,
              "settings": settings, "published_qwen2_0.5b_instruct": PUBLISHED, "data": data, "training": curves,
              "stages": [s for s in stages if s], "stage_ids": ids}
    wall = sum(s["wall_s"] for s in report["stages"])
    charts = draw_charts(out, table, tasks, curves)

    def cell(name, t):
        v = table[name][t]
        if v is None:
            return "-"
        base = table["base"][t]
        delta = "" if name == "base" or base is None else f" ({v - base:+.1f})"
        flag = " ⚠" if t in CHANCE and CHANCE[t] and v <= CHANCE[t] else ""
        return f"{v:.1f}{delta}{flag}"

    def protocol(t):
        s = settings[t]
        if not s:  # no results for the base: say nothing rather than a default that may not be what ran
            return "-"
        if t == "gsm8k":
            return f"{s.get('shots', 4)}-shot CoT, generate, last number"
        if t == "humaneval":
            return "pass@1, greedy, run in a sandbox"
        from nanopost.tasks.choice import OVER_SUBJECTS
        how = 'option-letter log-probs' if s.get('mode', 'logprob') == 'logprob' else 'generate + extract'
        return f"{s.get('shots', 0)}-shot, {how}" + (", mean over subjects" if t in OVER_SUBJECTS else "")

    lines = ["# The paper's experiment: " + ("the tiny offline run" if tiny else f"`{args.model}`"), "",
             f"`{report['command']}`", ""]
    if tiny:
        lines += ["**A tiny random model, its own teacher, a few training steps, a handful of questions: these "
                  "numbers only show that every stage ran end to end. They measure nothing** (a random model's "
                  "scores are chance or zero, and its teacher replies all fail their checks: see data/report.md).", ""]
    lines += [
             f"git {report['git_commit']} · {report['date']} · {report['hardware']['cpu']}, {report['hardware']['cores']} "
             f"cores, CPU capability {report['hardware']['cpu_capability']}" +
             (f" · GPUs: {', '.join(report['hardware']['gpus'])}" if report["hardware"]["gpus"] else " · no GPU") +
             f" · torch {report['hardware']['torch']} · wall time of all stages {wall / 60:.1f} min", "",
             "## Accuracy (%) per benchmark; in parentheses the change against the base model", "",
             "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks),
             "| Qwen2-0.5B-Instruct, **as published** (not measured here) | " +
             " | ".join("-" if PUBLISHED.get(t) is None else f"{PUBLISHED[t]:.1f}" for t in tasks) + " |"]
    lines += [f"| {name} (`{variants[name]}`) | " + " | ".join(cell(name, t) for t in tasks) + " |" for name in variants]
    lines += ["| questions per benchmark | " + " | ".join("-" if n[t] is None else str(n[t]) for t in tasks) + " |",
              "| protocol | " + " | ".join(protocol(t) for t in tasks) + " |", "",
              "⚠ = at or below chance (25% for the four-option benchmarks): the score says nothing about the model. "
              + "".join(f"With {k} questions one question moves a score by {100 / k:.1f} points; " for k in
                        sorted({v for v in n.values() if v})) +
              "differences of a few such steps are noise. The published row comes from the Qwen team's own "
              "protocol and full benchmarks, not from the protocol row above. Every prediction is in "
              "eval/results.json.", ""]
    if charts.get("accuracy"):
        lines += [f"![accuracy]({charts['accuracy']})", ""]
    lines += ["## Variants", "",
              "- **sft**, **sft-b**: full fine-tuning of the base on data/sft.jsonl, seeds 0 and 1 (data order)",
              "- **kto**: KTO from the base on data/kto.jsonl (the reference model is the base)",
              "- **sft-kto**: the paper's two stages, KTO starting from sft (the reference is sft)",
              "- **linear-0.5**, **linear-0.05**: linear fusion of sft and sft-b at 0.5/0.5 and 0.05/0.95",
              "- **slerp**: SLERP between sft (t=0) and sft-kto, t=0.5", "",
              "## Data (build_data.py; details in data/report.md)", "",
              f"{data['sft_examples']} SFT examples; {data['kto_examples']} KTO examples ({data['kto_desirable']} "
              f"desirable, {data['kto_undesirable']} undesirable).", "",
              "## Training", "", "| run | steps | loss first → last | kl | rewards/margins first → last |",
              "|---|---|---|---|---|"]
    for name, c in curves.items():
        if not c:
            continue
        fmt = lambda k: f"{c[k]['first']:.4g} → {c[k]['last']:.4g}" if k in c else "-"  # noqa: E731
        lines.append(f"| {name} | {c.get('steps')} | {fmt('loss')} | {fmt('kl')} | {fmt('rewards/margins')} |")
    if charts.get("training"):
        lines += ["", f"![training]({charts['training']})"]
    lines += ["", "## Stages", "", "| stage | wall time | peak RSS (GB) | attempts | finished |", "|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['wall_s'] / 60:.1f} min | {s['peak_rss_gb']:.2f} | {s.get('attempts', 1)} | "
              f"{s['finished']} |" for s in report["stages"]]
    lines += ["", "Wall time sums a stage's attempts (an interrupted stage continues where it stopped). Peak RSS is "
              "the resident memory of the stage's largest single process (under torchrun: of one rank); on a GPU "
              "the training scripts' own logs give CUDA memory. Each stage's exact command is in stages/NAME.json.", ""]
    tmp = os.path.join(out, ".report.tmp")
    # report.md first, report.json last: report.json (with the stage ids it was made from) marks a finished report
    for name, text in (("report.md", "\n".join(lines)), ("report.json", json.dumps(report, indent=1, ensure_ascii=False))):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(out, name))


def draw_charts(out, table, tasks, curves):
    """report_accuracy.png and report_training.png when matplotlib is installed (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    charts = {}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks)), 3.5))
    width = 0.8 / len(table)
    for i, (name, row) in enumerate(table.items()):
        # a missing score is no bar (NaN), never a bar at 0
        ax.bar([c + i * width for c in range(len(tasks))], [float("nan") if row[t] is None else row[t] for t in tasks],
               width, label=name)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(tasks))], tasks)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "report_accuracy.png"), dpi=110, bbox_inches="tight")
    plt.close(fig)
    charts["accuracy"] = "report_accuracy.png"
    runs = [n for n, c in curves.items() if c]
    if runs:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for name in runs:
            rows = [m for m in read_jsonl(os.path.join(out, name, "metrics.jsonl")) if "loss" in m]
            axes[0].plot([m["step"] for m in rows], [m["loss"] for m in rows], label=name)
            if any("rewards/margins" in m for m in rows):
                pts = [(m["step"], m["rewards/margins"]) for m in rows if m.get("rewards/margins") is not None]
                axes[1].plot([s for s, _ in pts], [v for _, v in pts], label=f"{name} margins")
                axes[1].plot([m["step"] for m in rows if "kl" in m], [m["kl"] for m in rows if "kl" in m], "--",
                             label=f"{name} kl")
        axes[0].set_title("training loss")
        axes[1].set_title("KTO rewards/margins and kl")
        for a in axes:
            a.set_xlabel("step")
            a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "report_training.png"), dpi=110)
        plt.close(fig)
        charts["training"] = "report_training.png"
    return charts


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # between stages, or while the report is written (its files are replaced whole)
        log("interrupted; run the same command again to continue")
        sys.exit(130)
