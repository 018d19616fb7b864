"""paper.py, the whole experiment, end to end on the tiny offline default (shrunk for CI time):
every stage's outputs, the report with every variant and benchmark, a failed stage continued by
rerunning the same command, a finished run doing no work again, and changed settings refused."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from nanopost.testing import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["base", "sft", "sft-b", "kto", "sft-kto", "linear-0.5", "linear-0.05", "slerp"]
TASKS = ["gsm8k", "mmlu", "cmmlu", "ceval", "humaneval"]


def paper(*args, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "paper.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=900, cwd=cwd)


def test_paper_runs_every_stage_resumes_and_skips_finished_work(tmp_path):
    with open(os.path.join(ROOT, "data", "seeds.jsonl"), encoding="utf-8") as f:
        rows = f.read().splitlines()
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(rows[:5] + rows[-3:]) + "\n", encoding="utf-8")  # GSM8K and general instructions
    out = tmp_path / "run"
    small = ["--out", out, "--seeds", seeds,
             "--data-args", "--max-new-tokens 12 --json-max-tokens 16 --min-label-count 1 --batch-size 16",
             "--sft-args", "--max-steps 2 --lr 1e-3 --batch-size 2",
             "--eval-args", "--limit 2 --max-new-tokens gsm8k=8,humaneval=8 --batch-size 4"]
    # a stage that fails (a flag train_kto.py does not have) stops the run; what finished stays
    r = paper(*small, "--kto-args", "--max-steps 2 --lr 1e-4 --batch-size 4 --no-such-flag")
    assert r.returncode != 0 and "stage kto failed" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(f for f in os.listdir(out / "stages") if f.endswith(".json") and not f.endswith(".running.json")) == \
        ["data.json", "sft-b.json", "sft.json", "tiny.json"]
    kto = ["--kto-args", "--max-steps 2 --lr 1e-4 --batch-size 4"]
    r = paper(*small, *kto)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("tiny", "data", "sft", "sft-b"):
        assert f"{name}: done already" in r.stdout, r.stdout
    for name in ("kto", "sft-kto", "linear-0.5", "linear-0.05", "slerp", "eval"):
        assert f"{name}: finished in" in r.stdout, r.stdout

    # every stage's outputs
    assert (out / "data" / "sft.jsonl").read_text().strip() and (out / "data" / "kto.jsonl").read_text().strip()
    for name in VARIANTS[1:]:
        assert (out / name / "config.json").exists(), name
    for name in ("sft", "sft-b", "kto", "sft-kto"):
        steps = [json.loads(line)["step"] for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 2, (name, steps)
    report = json.loads((out / "report.json").read_text())
    assert list(report["accuracy"]) == VARIANTS
    for name in VARIANTS:
        for t in TASKS:
            v = report["accuracy"][name][t]
            assert isinstance(v, float) and 0 <= v <= 100, (name, t, v)
    assert report["questions"] == {t: 2 for t in TASKS}
    assert report["data"]["sft_examples"] > 0 and report["data"]["kto_desirable"] > 0
    assert report["training"]["kto"]["loss"]["first"] is not None
    md = (out / "report.md").read_text()
    assert "as published" in md and "| slerp (" in md and "| protocol |" in md
    row = next(line for line in md.splitlines() if line.startswith("| protocol |")).split("|")[2:-1]
    assert ["mean over subjects" in c for c in row] == [t in ("cmmlu", "ceval") for t in TASKS], row

    # a finished run does nothing the second time: no stage runs, the report is not rewritten
    markers = {f: (out / "stages" / f).stat().st_mtime_ns for f in os.listdir(out / "stages")}
    before = (out / "report.json").stat().st_mtime_ns
    r = paper(*small, *kto)
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr
    assert "finished in" not in r.stdout
    assert {f: (out / "stages" / f).stat().st_mtime_ns for f in os.listdir(out / "stages")} == markers
    assert (out / "report.json").stat().st_mtime_ns == before

    # --out spelled another way (relative, from its parent folder) is the same run
    r = paper(*["run" if a == out else a for a in small], *kto, cwd=tmp_path)
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr

    # other settings for a finished stage are refused, not silently reused
    changed = [a if a != "--max-steps 2 --lr 1e-3 --batch-size 2" else "--max-steps 3 --lr 1e-3 --batch-size 2"
               for a in small]
    r = paper(*changed, *kto)
    assert r.returncode != 0 and "stage sft: finished earlier with another command" in r.stderr, r.stderr

    # sft redone (deleted, trained again): everything that read it runs again, the report is rewritten
    shutil.rmtree(out / "sft")
    os.remove(out / "stages" / "sft.json")
    r = paper(*small, *kto)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("sft-kto", "linear-0.5", "linear-0.05", "slerp", "eval"):
        assert f"{name}: " in r.stdout and "sft changed since it ran: running it again" in r.stdout, r.stdout
    for name in ("sft-b", "kto"):
        assert f"{name}: done already" in r.stdout
    assert (out / "report.json").stat().st_mtime_ns != before
    ids = json.loads((out / "report.json").read_text())["stage_ids"]
    assert ids["sft"] == json.loads((out / "stages" / "sft.json").read_text())["id"]

    # files a stage read changed by hand, its command the same: data/kto.jsonl edited, sft-b trained again
    # (here: other weights written over it) -- each stage that read them runs again, no other
    kto_rows = (out / "data" / "kto.jsonl").read_text().splitlines()
    (out / "data" / "kto.jsonl").write_text("\n".join(kto_rows[:-1]) + "\n")
    shutil.copyfile(out / "linear-0.5" / "model.safetensors", out / "sft-b" / "model.safetensors")
    r = paper(*small, *kto)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("kto", "sft-kto"):
        assert f"{name}: $OUT/data/kto.jsonl changed since it ran: running it again" in r.stdout, r.stdout
    for name in ("linear-0.5", "linear-0.05"):
        assert f"{name}: $OUT/sft-b changed since it ran: running it again" in r.stdout, r.stdout
    for name in ("tiny", "data", "sft", "sft-b"):
        assert f"{name}: done already" in r.stdout, r.stdout
    assert "slerp: sft-kto, $OUT/sft-kto changed since it ran" in r.stdout, r.stdout  # (redone, so its files too)
    assert "eval: done already" not in r.stdout and "eval: finished in" in r.stdout

    # the run folder moved: its stages are found done, but results.json names the models by their old
    # paths: the report lost every score (and claimed a 0-shot protocol) until eval runs again
    moved = tmp_path / "moved"
    os.rename(out, moved)
    r = paper(*[moved if a == out else a for a in small], *kto)
    assert r.returncode == 0 and "eval: its results.json holds no scores for base, sft" in r.stdout, r.stdout + r.stderr
    report = json.loads((moved / "report.json").read_text())
    assert all(isinstance(report["accuracy"][n][t], float) for n in VARIANTS for t in TASKS), report["accuracy"]
    results = json.loads((moved / "eval" / "results.json").read_text())  # the old paths' rows went with the redo
    assert sorted(results) == sorted(report["models"].values()) and all(str(moved) in m for m in results)


def test_a_run_inside_the_repository_is_recognised_however_out_and_model_are_spelled(tmp_path, monkeypatch):
    """With --out under the repository (runs/paper-tiny, the default), its absolute spelling, ./runs/...
    or a run from runs/ recorded the tiny stage as runs/paper-tiny/tiny, not $OUT/tiny: refused as
    "finished earlier with another command". A --model spelled runs/tiny/ or tiny (from runs/) likewise."""
    m = load_script(os.path.join(ROOT, "paper.py"))
    monkeypatch.setattr(m, "ROOT", str(tmp_path))
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    out = str(tmp_path / "runs" / "paper-tiny")
    cmd = lambda model: [m.PY, "train_sft.py", "--model", model, "--out", os.path.join(out, "sft")]  # noqa: E731
    want = ["python", "train_sft.py", "--model", "runs/tiny", "--out", "$OUT/sft"]
    for spelled, cwd in (("runs/paper-tiny", tmp_path), (out, tmp_path), ("./runs/paper-tiny/", tmp_path),
                         ("paper-tiny", tmp_path / "runs")):
        monkeypatch.chdir(cwd)
        st = m.Stages(out, spelled)
        for model in ("runs/tiny", "runs/tiny/", "./runs/tiny") if cwd == tmp_path else ("tiny", "tiny/"):
            assert st.comparable(cmd(os.path.abspath(model))) == want, (spelled, model)
    assert st.comparable(want, stored=True) == want  # a marker's command reads the same again
    # ... and one an older version wrote: --out written absolute recorded under the repository, ./ kept
    old = ["python", "train_sft.py", "--model", "./runs/tiny/", "--out", "runs/paper-tiny/sft"]
    assert st.comparable(old, stored=True) == want


def test_paper_refuses_bad_flags_and_foreign_out_before_any_work(tmp_path):
    for args, why in ((["--tasks", "gsm8k,bogus"], "--tasks: unknown bogus"), (["--limit", "-1"], "--limit must be"),
                      (["--gpus", "0"], "--gpus must be"), (["--seeds", tmp_path / "none.jsonl"], "no such file"),
                      (["--teacher-model", "x"], "give --teacher-url too"),
                      (["--data-dir", tmp_path / "nowhere"], "no such folder"),
                      (["--model", tmp_path / "nope"], "not a checkpoint directory"),
                      (["--teacher", tmp_path], "not a checkpoint directory"),
                      (["--device", "tpu"], "expected cpu, cuda"), (["--choice-shots", "-1"], "--choice-shots must be"),
                      (["--tasks", "mmlu", "--choice-shots", "6"], "--shots 6, but its dev split has 5 questions")):
        r = paper("--out", tmp_path / "run", *args)
        assert r.returncode == 2 and why in r.stderr, (args, r.stderr)
        assert not (tmp_path / "run").exists()
    bench = shutil.copytree(os.path.join(ROOT, "data", "mini"), tmp_path / "bench")  # hashed by eval: never stable
    r = paper("--out", bench / "run", "--data-dir", bench, "--tasks", "mmlu")
    assert r.returncode == 2 and "lies inside --data-dir" in r.stderr and not (bench / "run").exists(), r.stderr
    # the flags that wire the stages together are paper.py's: --sft-args "--out X" marked sft done with
    # its model elsewhere, and sft-b then failed at every rerun; an --out under a file, a traceback
    (tmp_path / "afile").write_text("")
    for args, why in ((["--sft-args", "--out elsewhere"], "--sft-args --out: paper.py sets"),
                      (["--sft-args", "--ou elsewhere"], "--sft-args --ou: paper.py sets"),  # (argparse's prefix)
                      (["--eval-args=--data-dir=x --limit 2"], "--eval-args --data-dir: paper.py sets"),
                      (["--sft-args", "--seed 5"], "--sft-args --seed: paper.py sets"),  # (sft-b's seed: two equal runs)
                      (["--sft-args"], "--sft-args: expected one argument"),
                      # evaluate.py's own --mode is no abbreviation of --model: it passes (the next check stops it)
                      (["--eval-args", "--mode generate", "--tasks", "gsm8k,bogus"], "--tasks: unknown bogus"),
                      (["--out", tmp_path / "afile" / "run"], "is a file, not a directory")):
        r = paper(*(["--out", tmp_path / "run"] if "--out" not in args else []), *args)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    r = paper("--out", tmp_path / "mine")
    assert r.returncode == 2 and "not a paper.py run" in r.stderr and os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_report_reads_training_curves_with_missing_values(tmp_path):
    """A KTO step without a desirable example logs no margin (null): first and last are the first and
    last logged values, and a metric never logged is left out (the report once crashed on a final null)."""
    paper_py = load_script(os.path.join(ROOT, "paper.py"))
    rows = [{"step": 1, "loss": 0.5, "rewards/margins": None}, {"step": 2, "loss": 0.4, "rewards/margins": 1.5},
            {"step": 3, "loss": 0.3, "rewards/margins": None}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = paper_py.training_summary(str(tmp_path))
    assert got == {"steps": 3, "loss": {"first": 0.5, "last": 0.3}, "rewards/margins": {"first": 1.5, "last": 1.5}}


def test_a_stage_reruns_when_the_files_it_reads_change(tmp_path, capsys):
    """Seeds or benchmark data edited in place keep the command the same: the stage must still run
    again (its marker holds a hash of what they held), not report numbers of the old files."""
    paper_py = load_script(os.path.join(ROOT, "paper.py"))
    seeds, data = tmp_path / "seeds.jsonl", tmp_path / "data"
    seeds.write_text('{"instruction": "a"}\n')
    (data / "mmlu").mkdir(parents=True)
    (data / "mmlu" / "test.csv").write_text("q,a,b,c,d,A\n")
    st = paper_py.Stages(str(tmp_path / "run"), str(tmp_path / "run"))
    cmd = [sys.executable, "-c", "pass"]
    runs = lambda: st.run("eval", cmd, reads=[str(seeds), str(data)]) or capsys.readouterr().out  # noqa: E731
    assert "eval: finished in" in runs()
    assert "eval: done already" in runs()
    (data / "mmlu" / "test.csv").write_text("q,a,b,c,d,B\n")  # same size, same name
    out = runs()
    assert "changed since it ran: running it again" in out and str(data) in out and "finished in" in out
    assert "eval: done already" in runs()
    seeds.write_text('{"instruction": "b"}\n')
    assert f"{seeds} changed since it ran" in runs()
    # a folder inside it that is a link (benchmarks kept on another disk): its files are read too
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "test.jsonl").write_text('{"question": "1 + 1?", "answer": "#### 2"}\n')
    (data / "gsm8k").symlink_to(tmp_path / "store")
    assert "changed since it ran" in runs()
    (tmp_path / "store" / "test.jsonl").write_text('{"question": "1 + 2?", "answer": "#### 3"}\n')
    assert "changed since it ran" in runs()
    (tmp_path / "store" / "up").symlink_to(data)  # a link up the tree: its folders read once, not a loop
    assert "done already" in runs()


def test_a_changed_base_model_reruns_its_stages_and_an_interrupted_stage_starts_afresh(tmp_path, capsys):
    """A local --model folder replaced with other weights made every stage "done already" (their
    commands name the same path); an interrupted stage whose inputs changed since was continued
    with --resume, which the script then refused at every attempt: it starts afresh instead."""
    paper_py = load_script(os.path.join(ROOT, "paper.py"))
    base, out = tmp_path / "base", tmp_path / "run" / "sft"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"1" * 10)
    st = paper_py.Stages(str(tmp_path / "run"), str(tmp_path / "run"))
    # the command records the flags it was given, and writes into its out folder
    cmd = [sys.executable, "-c", f"import sys, os; os.makedirs({str(out)!r}, exist_ok=True); "
                                 f"open(os.path.join({str(out)!r}, 'flags'), 'a').write(' '.join(sys.argv[1:]) + ';')"]
    runs = lambda c=cmd: st.run("sft", c, str(out), fresh_flag="--overwrite", models=[str(base)]) or capsys.readouterr().out  # noqa: E731
    assert "finished in" in runs() and "done already" in runs()
    (base / "model.safetensors").write_bytes(b"2" * 10)  # other weights, same size
    os.utime(base / "model.safetensors", ns=(1, 1))
    said = runs()
    assert f"{base} changed since it ran: running it again" in said and "finished in" in said
    # interrupted (exit 130) after it started writing; then the base changes again
    interrupted = [sys.executable, "-c", f"import os; os.makedirs({str(out)!r}, exist_ok=True); raise SystemExit(130)"]
    os.remove(tmp_path / "run" / "stages" / "sft.json")
    import pytest
    with pytest.raises(SystemExit):
        st.run("sft", interrupted, str(out), fresh_flag="--overwrite", models=[str(base)])
    os.utime(base / "model.safetensors", ns=(2, 2))
    said = runs()  # (another command than the interrupted one's: fine, since it starts afresh)
    assert "changed since its interrupted attempt: starting it afresh" in said
    assert open(out / "flags").read() == ";"  # the old attempt's files went first; not --resume


def load_paper():
    return load_script(os.path.join(ROOT, "paper.py"))


def test_a_refusal_spares_the_files_a_redo_reuses(tmp_path):
    """Refused for another command, the data stage said to delete OUT/data whole: its teacher cache
    (hours of a 7B teacher's replies, keyed safely on every request) with it."""
    import pytest
    st = load_paper().Stages(str(tmp_path / "run"), str(tmp_path / "run"))
    data = tmp_path / "run" / "data"
    st.run("data", [sys.executable, "-c", "pass"], str(data), keep=["teacher_cache.sqlite"])
    with pytest.raises(SystemExit, match=r"delete .*data \(all but its teacher_cache.sqlite, which the redo reuses\)"):
        st.run("data", [sys.executable, "-c", "pass", "--other"], str(data), keep=["teacher_cache.sqlite"])


def test_the_same_command_with_a_url_or_a_dot_path_is_recognised(tmp_path, capsys):
    """A marker's command is read with its paths made relative to the repository; a URL
    (http://h:8000/v1 became http:/h:8000/v1) or ./val.jsonl (became val.jsonl) then differed from
    the same command given again: "finished earlier with another command", for ever."""
    st = load_paper().Stages(str(tmp_path / "run"), str(tmp_path / "run"))
    cmd = [sys.executable, "-c", "pass", "--teacher-url", "http://gpu1:8000/v1", "--val", "./val.jsonl", "--x", "../a/b"]
    st.run("data", cmd)
    st.run("data", cmd)
    assert "data: done already" in capsys.readouterr().out
    import pytest
    with pytest.raises(SystemExit, match="finished earlier with another command"):
        st.run("data", [*cmd[:4], "http://gpu2:8000/v1", *cmd[5:]])


def test_a_redo_interrupted_before_its_script_cleared_the_old_run_starts_afresh_again(tmp_path, capsys, monkeypatch):
    """A finished stage to redo (its inputs changed) left its old files until the script's own
    --overwrite removed them, after loading everything; interrupted before that, the next run found
    them, with .running.json holding the new inputs, and continued the OLD run with --resume (an
    old model accepted as the new one). The old files now go first, and an interruption while they
    go is finished by the next run; kept files (build_data's teacher cache) stay."""
    import pytest
    m = load_paper()
    run, base = tmp_path / "run", tmp_path / "base"
    out, stop = run / "data", tmp_path / "stop-now"
    base.mkdir()
    (base / "config.json").write_text("{}")
    st = m.Stages(str(run), str(run))
    # the script: stops at once (exit 130) while stop-now exists; else records its flags and writes its output
    cmd = [sys.executable, "-c", f"import sys, os; os.path.exists({str(stop)!r}) and sys.exit(130); "
                                 f"os.makedirs({str(out)!r}, exist_ok=True); "
                                 f"open(os.path.join({str(out)!r}, 'flags'), 'a').write(' '.join(sys.argv[1:]) + ';'); "
                                 f"open(os.path.join({str(out)!r}, 'out'), 'w').write(open({str(base / 'config.json')!r}).read()); "
                                 f"open(os.path.join({str(out)!r}, 'cache'), 'a').write('x')"]
    go = lambda: st.run("data", cmd, str(out), fresh_flag="--overwrite", models=[str(base)],  # noqa: E731
                        output=[str(out / "out")], keep=["cache"]) or capsys.readouterr().out
    assert "finished in" in go()
    (base / "config.json").write_text('{"new": 1}')
    os.utime(base / "config.json", ns=(1, 1))
    stop.write_text("")
    with pytest.raises(SystemExit):
        go()
    assert sorted(os.listdir(out)) == ["cache"]  # the old run's files are gone, its cache kept
    # interrupted again, this time while the old files go: the next run finishes the job
    (out / "stale").write_text("old")
    real = m.shutil.rmtree
    monkeypatch.setattr(m.shutil, "rmtree", lambda p: (_ for _ in ()).throw(KeyboardInterrupt()))
    st2 = m.Stages(str(run), str(run))
    running = json.loads((run / "stages" / "data.running.json").read_text())
    running["clearing"] = True  # as a run cut inside clear() leaves it
    (run / "stages" / "data.running.json").write_text(json.dumps(running))
    with pytest.raises(KeyboardInterrupt):
        st2.run("data", cmd, str(out), fresh_flag="--overwrite", models=[str(base)], output=[str(out / "out")],
                keep=["cache"])
    monkeypatch.setattr(m.shutil, "rmtree", real)
    assert [p for p in os.listdir(run) if p.startswith("data.old-")]  # renamed aside, not yet removed
    stop.unlink()
    assert "finished in" in go()  # (with --resume: what it continues holds only the kept cache)
    assert sorted(os.listdir(out)) == ["cache", "flags", "out"]
    assert (out / "out").read_text() == '{"new": 1}' and (out / "cache").read_text() == "xx"
    assert not [p for p in os.listdir(run) if p.startswith("data.old-")]


SIGNALS = r"""
import os, sys, time
sys.path.insert(0, {root!r})
spec = __import__("importlib.util").util.spec_from_file_location("paper_s", os.path.join({root!r}, "paper.py"))
m = __import__("importlib.util").util.module_from_spec(spec); spec.loader.exec_module(m)
import signal; signal.signal(signal.SIGINT, signal.default_int_handler)  # as paper.py's main (pytest may run with it ignored)
st = m.Stages({run!r}, {run!r}); st.lock()
child = "import signal, sys, time, os\n" \
        "def stop(n, f): open({got!r}, 'w').write(signal.Signals(n).name); time.sleep({linger}); sys.exit({code})\n" \
        "signal.signal(signal.SIGINT, stop); signal.signal(signal.SIGTERM, stop)\n" \
        "open({pid!r}, 'w').write(str(os.getpid()))\n" \
        "[time.sleep(0.05) for _ in range(400)]"
st.run("sft", [sys.executable, "-c", child], {out!r})
"""


def start_signals_script(tmp_path, code, linger=0):
    """paper.py's Stages running one stage whose script, on SIGINT or SIGTERM, writes the signal's name
    to tmp_path/got, waits linger seconds and exits with code."""
    run = tmp_path / "run"
    script = tmp_path / "s.py"
    script.write_text(SIGNALS.format(root=ROOT, run=str(run), got=str(tmp_path / "got"), pid=str(tmp_path / "pid"),
                                     out=str(run / "sft"), code=code, linger=linger))
    # a process group of its own, whose parent (pytest) is in another group of the same session: a group that is
    # not orphaned, as a shell's job is (the kernel discards SIGTSTP to an orphaned group: CI runs in the background)
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=os.setpgrp)
    for _ in range(400):
        if (tmp_path / "pid").exists() and (tmp_path / "pid").read_text():
            break
        time.sleep(0.05)
    return p, run, int((tmp_path / "pid").read_text())


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_kill_int_to_paper_alone_stops_the_stage_and_a_finished_one_is_kept(tmp_path, sig):
    """kill -INT sent to paper.py alone (not its process group) was caught and noted, but never passed
    on: the stage ran to its end, then was thrown away as "interrupted". It is passed on, as it is (as
    SIGTERM) when paper.py gets a SIGTERM (docker stop, a scheduler); a stage that still exits 0 is
    recorded as finished."""
    import signal
    for code, finished in ((130, False), (0, True)):
        for f in ("got", "pid"):
            (tmp_path / f).unlink(missing_ok=True)
        p, run, child = start_signals_script(tmp_path, code)
        t0 = time.time()
        os.kill(p.pid, getattr(signal, sig))
        _, err = p.communicate(timeout=15)
        assert time.time() - t0 < 10 and p.returncode == 130, err  # not the child's 20 s
        assert (tmp_path / "got").read_text() == sig
        assert (run / "stages" / "sft.json").exists() == finished, err


def test_a_second_paper_on_one_out_is_refused_and_a_killed_paper_stops_its_stage(tmp_path):
    """Nothing held the run folder: two paper.py on one --out ran the same stages into the same
    folders, and after kill -9 of paper.py its stage ran on alone beside the rerun."""
    import signal

    import pytest
    m = load_paper()
    p, run, child = start_signals_script(tmp_path, 130, linger=3)
    try:
        with pytest.raises(SystemExit, match="in use by another paper.py run"):
            m.Stages(str(run), str(run)).lock()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        for _ in range(200):  # the child got SIGINT when its parent died, and stops
            if (tmp_path / "got").exists():
                break
            time.sleep(0.05)
        assert (tmp_path / "got").read_text() == "SIGINT"
        with pytest.raises(SystemExit, match="in use by another paper.py run"):  # the stage, still stopping, holds it
            m.Stages(str(run), str(run)).lock()
        for _ in range(200):
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the stage is still running")
        m.Stages(str(run), str(run)).lock()  # free once the last of them ended
    finally:
        p.kill()


def test_a_stage_folder_linked_elsewhere_is_cleared_where_it_points(tmp_path, capsys):
    """Redoing a stage whose folder is a symbolic link (to another disk) renamed the link aside and
    could not delete it: every rerun failed the same way. The folder it points to is cleared; the
    link stays."""
    m = load_paper()
    run, elsewhere = tmp_path / "run", tmp_path / "disk2" / "sft"
    elsewhere.mkdir(parents=True)
    run.mkdir()
    (run / "sft").symlink_to(elsewhere)
    (elsewhere / "old.txt").write_text("old")
    (elsewhere / "cache").write_text("kept")
    m.Stages(str(run), str(run)).clear(str(run / "sft"), keep=["cache"])
    assert (run / "sft").is_symlink() and sorted(os.listdir(run / "sft")) == ["cache"]
    assert sorted(os.listdir(tmp_path / "disk2")) == ["sft"]


def test_ctrl_z_stops_the_stage_with_paper_and_it_goes_on_after(tmp_path):
    """The stage runs in a process group of its own (signals reach it through paper.py, once), so a
    terminal's Ctrl-Z (SIGTSTP to paper.py's group) stopped paper.py but not the stage."""
    import signal

    def state(pid):
        for _ in range(100):
            with open(f"/proc/{pid}/stat") as f:
                s = f.read().rsplit(")", 1)[1].split()[0]
            if s in want:
                return s
            time.sleep(0.05)
        return s
    p, run, child = start_signals_script(tmp_path, 130)
    try:
        os.kill(p.pid, signal.SIGTSTP)
        want = "T"
        assert state(p.pid) == "T" and state(child) == "T"
        os.kill(p.pid, signal.SIGCONT)
        want = "RS"
        assert state(child) in "RS" and state(p.pid) in "RS"
        os.kill(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=15)
        assert p.returncode == 130 and (tmp_path / "got").read_text() == "SIGINT", err
    finally:
        p.kill()


def fake_stage(cmd, keep_fds=()):
    """run_child for the wiring tests: each stage writes what its script would (no model trained)."""
    def after(flag):
        return cmd[cmd.index(flag) + 1]
    line = " ".join(cmd)
    if "nanopost.testing" in line:  # the tiny base model
        os.makedirs(cmd[-1], exist_ok=True)
        open(os.path.join(cmd[-1], "config.json"), "w").write("{}")
    elif "build_data.py" in line:
        os.makedirs(after("--out"), exist_ok=True)
        open(os.path.join(after("--out"), "sft.jsonl"), "w").write('{"prompt": "a", "completion": "b"}\n')
        open(os.path.join(after("--out"), "kto.jsonl"), "w").write('{"prompt": "a", "completion": "b", "label": true}\n')
    elif "evaluate.py" in line:
        os.makedirs(after("--out"), exist_ok=True)
        models = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--model"]
        json.dump({m: {t: {"accuracy": 25.0 if os.path.basename(m) == "tiny" else 30.0, "n": 8, "settings": {}}
                       for t in after("--tasks").split(",")} for m in models},  # (the base at MMLU's chance)
                  open(os.path.join(after("--out"), "results.json"), "w"))
    else:  # a training run or a merge
        os.makedirs(after("--out"), exist_ok=True)
        for name, text in (("config.json", "{}"), ("model.safetensors", "w"), ("metrics.jsonl", '{"step": 1, "loss": 1.0}\n')):
            open(os.path.join(after("--out"), name), "w").write(text)
    return 0, 0.0, False


def wired(tmp_path, monkeypatch, capsys):
    """paper.py with its stages' scripts faked (fake_stage) -> (module, seeds, bench, out, run): run(into, *flags)
    runs its main in this process and returns (the stages it said changed since they ran, its output)."""
    paper_py = load_paper()
    monkeypatch.setattr(paper_py, "run_child", fake_stage)
    monkeypatch.setattr(paper_py, "draw_charts", lambda *a: {})
    seeds = shutil.copy(os.path.join(ROOT, "data", "seeds.jsonl"), tmp_path / "seeds.jsonl")
    bench = shutil.copytree(os.path.join(ROOT, "data", "mini"), tmp_path / "bench")
    out = tmp_path / "run"
    held, lock = [], paper_py.Stages.lock
    monkeypatch.setattr(paper_py.Stages, "lock", lambda self: held.append(lock(self)) or held[-1])

    def run(into=out, *flags):  # (the lock is the process's until it ends: let go of it as an ended paper.py would)
        monkeypatch.setattr(sys, "argv", ["paper.py", "--out", str(into), "--seeds", str(seeds), "--data-dir", str(bench),
                                          *flags])
        try:
            paper_py.main()
        finally:
            while held:
                os.close(held.pop())
        said = capsys.readouterr().out
        return {line.split("] ", 1)[-1].split(":")[0] for line in said.splitlines() if "changed since it ran" in line}, said
    return paper_py, seeds, bench, out, run


def test_each_stage_reruns_when_what_it_reads_changes(tmp_path, monkeypatch, capsys):
    """The wiring of paper.py's stages (their scripts faked): a stage is done again when a file it
    reads changes, and only then: the seeds (data), a benchmark file or the scoring protocol (eval),
    the data a training stage reads, a merged model evaluated; sft-b trains with another seed."""
    import nanopost.tasks
    paper_py, seeds, bench, out, run = wired(tmp_path, monkeypatch, capsys)
    run()
    report = open(out / "report.md", encoding="utf-8").read()
    cells = lambda name: [c.strip() for c in next(x for x in report.splitlines() if x.startswith(f"| {name} ("))  # noqa: E731
                          .split("|")[2:-1]]  # gsm8k, mmlu, cmmlu, ceval, humaneval
    assert cells("base")[1] == "25.0 ⚠" and cells("base")[0] == "25.0"  # at MMLU's chance (GSM8K has none)
    assert cells("sft")[1] == "30.0 (+5.0)" and cells("slerp")[0] == "30.0 (+5.0)"  # against the base
    assert run()[0] == set() and "nothing to do" in run()[1]
    assert json.load(open(out / "stages" / "sft-b.json"))["cmd"] != json.load(open(out / "stages" / "sft.json"))["cmd"]
    seed_of = lambda s: (lambda c: c[c.index("--seed") + 1])(json.load(open(out / "stages" / f"{s}.json"))["cmd"])  # noqa: E731
    assert (seed_of("sft"), seed_of("sft-b")) == ("0", "1")
    with open(seeds, "a", encoding="utf-8") as f:
        f.write('{"instruction": "one more"}\n')
    assert "data" in run()[0]
    first = sorted((bench / "gsm8k").iterdir())[0]
    first.write_text(first.read_text(encoding="utf-8").replace("1", "7", 1), encoding="utf-8")
    assert run()[0] == {"eval"}
    monkeypatch.setattr(nanopost.tasks, "PROTOCOL", nanopost.tasks.PROTOCOL + 1)
    assert run()[0] == {"eval"}
    with open(out / "data" / "sft.jsonl", "a") as f:
        f.write('{"prompt": "c", "completion": "d"}\n')
    assert {"sft", "sft-b"} <= run()[0]
    (out / "slerp" / "model.safetensors").write_text("other")
    assert run()[0] == {"eval"}
    # --limit 0 is every question (its --help), also on the tiny default that otherwise asks 8
    run(tmp_path / "all", "--limit", "0")
    assert "--limit" not in json.load(open(tmp_path / "all" / "stages" / "eval.json"))["cmd"]
    assert "--limit" in json.load(open(out / "stages" / "eval.json"))["cmd"]
    # a benchmark file moved to another task's folder, its bytes the same, is other data
    (tmp_path / "c" / "a").mkdir(parents=True)
    (tmp_path / "c" / "a" / "x.csv").write_text("same")
    before = paper_py.contents(str(tmp_path / "c"))
    (tmp_path / "c" / "b").mkdir()
    os.rename(tmp_path / "c" / "a" / "x.csv", tmp_path / "c" / "b" / "x.csv")
    assert paper_py.contents(str(tmp_path / "c")) != before
    # a --model folder retrained in place: every stage that reads it runs again, not "done already"
    from nanopost.testing import make_tiny_checkpoint
    base = make_tiny_checkpoint(str(tmp_path / "base"))
    run(tmp_path / "own", "--model", base)
    make_tiny_checkpoint(base, seed=5)
    said = run(tmp_path / "own", "--model", base)[1]
    assert {line.split("] ", 1)[-1].split(":")[0] for line in said.splitlines()
            if f"{base} changed since it ran" in line} >= {"data", "sft", "sft-b", "kto"}, said[-3000:]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "exit 130"])
def test_a_stage_stopped_by_a_signal_is_an_interruption_not_a_failure(tmp_path, capsys, how):
    """A stage ended by SIGTERM (docker stop, a scheduler's kill) or Ctrl-C is interrupted: the same
    command continues it (exit 130), not "failed, fix the cause"."""
    paper_py = load_paper()
    st = paper_py.Stages(str(tmp_path / "run"), str(tmp_path / "run"))
    end = {"SIGTERM": "os.kill(os.getpid(), signal.SIGTERM)", "SIGINT": "signal.signal(signal.SIGINT, signal.SIG_DFL); "
           "os.kill(os.getpid(), signal.SIGINT)", "exit 130": "raise SystemExit(130)"}[how]
    with pytest.raises(SystemExit) as e:
        st.run("sft", [sys.executable, "-c", f"import os, signal; {end}"], str(tmp_path / "run" / "sft"))
    assert e.value.code == 130 and "interrupted after" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # another exit: a failure, named
        st.run("sft", [sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path / "run" / "sft"))
    assert "stage sft failed (exit 3)" in str(e.value.code)


def test_a_report_rewrite_cut_between_its_two_files_is_redone(tmp_path, monkeypatch, capsys):
    """The report is two files; report.json (with the stages it was made from) is written last, so a
    run stopped between the two leaves a report.json that no longer matches and the next run writes
    the report again, instead of "nothing to do" beside a report.md of the stages before."""
    paper_py, seeds, bench, out, run = wired(tmp_path, monkeypatch, capsys)
    run()
    with open(seeds, "a", encoding="utf-8") as f:
        f.write('{"instruction": "one more"}\n')
    replace, calls = os.replace, []

    def cut(src, dst):  # the second of the report's two renames never happens
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        replace(src, dst)
    monkeypatch.setattr(paper_py.os, "replace", lambda src, dst: (cut if str(src).endswith(".report.tmp") else replace)(src, dst))
    with pytest.raises(KeyboardInterrupt):
        run()
    assert len(calls) == 2
    monkeypatch.setattr(paper_py.os, "replace", replace)
    said = run()[1]
    assert "nothing to do" not in said and "report: " in said, said[-2000:]
    ids = json.load(open(out / "report.json", encoding="utf-8"))["stage_ids"]
    assert ids["data"] == json.load(open(out / "stages" / "data.json"))["id"]
