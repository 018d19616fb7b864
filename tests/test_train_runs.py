"""Runs you cannot lose: Ctrl-C at any point of a step, resume without pickle, output folders,
the preset, stale weight files, and Ctrl-C under torchrun."""
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import nanopost
import nanopost.losses
import nanopost.training
from nanopost.testing import load_script, run_main
from nanopost.training import latest_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "chat.jsonl")
TRAIN = os.path.join(ROOT, "train_sft.py")


def common(tiny, out, *extra):
    return ["--model", tiny, "--data", DATA, "--out", out, "--max-len", 64, "--batch-size", 2, "--grad-accum", 2,
            "--lr", 1e-3, "--max-steps", 4, "--save-every", 1, "--keep-last", 10, *extra]


def losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]


def weights(out):
    return nanopost.load(str(out))[0].state_dict()


@pytest.fixture(scope="module")
def baseline(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "baseline"
    r = run_main(TRAIN, *common(tiny, out))
    assert r.returncode == 0, r.stderr
    return out


def interrupt_on_call(target, attr, n):
    """Wrap target.attr so that its n-th call sends this process SIGINT (a Ctrl-C) halfway through."""
    real, calls = getattr(target, attr), [0]

    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    return wrapped


class OptimizerStepInterrupted:
    """make_optimizer whose step() is interrupted on its n-th call, after the update (before = True: before it)."""

    def __init__(self, n, before):
        self.n, self.before, self.real = n, before, nanopost.training.make_optimizer

    def __call__(self, *a, **k):
        opt = self.real(*a, **k)
        step, calls = opt.step, [0]

        def interrupted_step(*sa, **sk):
            calls[0] += 1
            if calls[0] == self.n and self.before:
                os.kill(os.getpid(), signal.SIGINT)
            out = step(*sa, **sk)
            if calls[0] == self.n and not self.before:
                os.kill(os.getpid(), signal.SIGINT)
            return out
        opt.step = interrupted_step
        return opt


@pytest.mark.parametrize("point", ["forward", "second micro-batch", "clip", "optimizer before", "optimizer after",
                                   "log", "checkpoint"])
def test_ctrl_c_anywhere_in_a_step_resumes_exactly(tiny, tmp_path, baseline, monkeypatch, point):
    """A Ctrl-C at any point of step 2 saves step 2 exactly as an uninterrupted run had it, and
    --resume then ends at the same losses and bit-identical weights."""
    patch = {"forward": (nanopost.losses, "sft_loss_sum", 3), "second micro-batch": (nanopost.losses, "sft_loss_sum", 4),
             "clip": (nanopost.training, "clip_grad_norm", 2), "log": (nanopost.training.Progress, "log", 2),
             "checkpoint": (nanopost.training, "save_checkpoint", 2)}
    if point.startswith("optimizer"):
        monkeypatch.setattr(nanopost.training, "make_optimizer", OptimizerStepInterrupted(2, point.endswith("before")))
    else:
        target, attr, n = patch[point]
        monkeypatch.setattr(target, attr, interrupt_on_call(target, attr, n))
    out = tmp_path / "run"
    r = run_main(TRAIN, *common(tiny, out))
    monkeypatch.undo()
    assert r.returncode == 130 and "interrupted: saved" in r.stdout, r.stdout + r.stderr
    assert latest_checkpoint(str(out)).endswith("step-0000002")
    r = run_main(TRAIN, *common(tiny, out, "--resume"))
    assert r.returncode == 0 and "at step 2" in r.stdout, r.stderr
    assert losses(out) == losses(baseline)
    a, b = weights(out), weights(baseline)
    assert all(torch.equal(a[k], b[k]) for k in a)


class Payload:
    """Unpickling this would run code: it creates a file named 'pwned'."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_trainer_state_is_not_a_pickle_and_old_pickles_are_refused(tiny, tmp_path, baseline):
    ckpt = latest_checkpoint(str(baseline))
    assert {"trainer_state.json", "trainer_state.safetensors"} <= set(os.listdir(ckpt))
    assert not [n for n in os.listdir(ckpt) if n.endswith((".pt", ".pkl", ".bin"))]
    state = json.load(open(os.path.join(ckpt, "trainer_state.json")))
    assert state["step"] == 4 and state["meta"]["rows_per_step"] == 4
    # an old-style checkpoint whose pickle would run code when loaded
    out = tmp_path / "old"
    old = out / "checkpoints" / "step-0000002"
    os.makedirs(old)
    for n in os.listdir(ckpt):
        if not n.startswith("trainer_state"):
            os.link(os.path.join(ckpt, n), old / n)
    pwned = tmp_path / "pwned"
    with open(old / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": 2, "x": Payload(str(pwned))}, f)
    r = run_main(TRAIN, *common(tiny, out, "--resume"))
    assert r.returncode != 0 and "trainer_state.pt: a trainer state written by an older nanopost with torch.save" in r.stderr
    assert f"--model {old}" in r.stderr  # the way out: a new run from its (safetensors) weights
    assert not pwned.exists()
    assert sorted(os.listdir(out)) == ["checkpoints"]  # nothing written


def test_grep_finds_no_unpickling():
    hits = []
    for d, dirs, files in os.walk(ROOT):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x not in ("venv", "build", "runs")]
        hits += [os.path.relpath(os.path.join(d, f), ROOT) for f in files if f.endswith(".py")
                 and re.search(r"weights_only=False|pickle", open(os.path.join(d, f), encoding="utf-8").read())]
    assert hits == ["tests/test_train_runs.py"]


def test_a_new_run_refuses_a_used_out_and_overwrite_starts_afresh(tiny, tmp_path, baseline):
    out = tmp_path / "used"
    r = run_main(TRAIN, *common(tiny, out, "--max-steps", 6))
    assert r.returncode == 0
    before = sorted(os.listdir(out / "checkpoints"))
    r = run_main(TRAIN, *common(tiny, out))  # no --resume: its checkpoints must not be pruned against ours
    assert r.returncode != 0 and "already holds" in r.stderr and "--overwrite" in r.stderr
    assert sorted(os.listdir(out / "checkpoints")) == before
    r = run_main(TRAIN, *common(tiny, out, "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out / "checkpoints")) == [f"step-{i:07d}" for i in range(1, 5)]
    assert losses(out) == losses(baseline)


def test_a_second_run_on_an_out_in_use_is_refused_and_the_first_keeps_its_work(tiny, tmp_path, baseline, monkeypatch):
    """Two runs on one --out at once (the same command twice, a --resume while the first still runs)
    overwrote each other's metrics and checkpoints. The second, started mid-run of the first (its own
    process), is refused before it writes; the first then finishes as if alone, and lets --out go."""
    out, steps, seen = tmp_path / "busy", [], []
    real = nanopost.training.clip_grad_norm

    def second_run_during_step_2(*a, **k):
        steps.append(1)
        if len(steps) == 2:  # the first run has written its step-1 checkpoint (a plain rerun: "already holds")
            seen.extend(subprocess.run([sys.executable, TRAIN, *map(str, common(tiny, out, flag))],
                                       capture_output=True, text=True) for flag in ("--resume", "--overwrite"))
        return real(*a, **k)
    monkeypatch.setattr(nanopost.training, "clip_grad_norm", second_run_during_step_2)
    r = run_main(TRAIN, *common(tiny, out))
    assert r.returncode == 0, r.stderr
    assert len(seen) == 2 and all(p.returncode == 1 and "another process is writing there now" in p.stderr
                                  and "Traceback" not in p.stderr for p in seen), [p.stderr for p in seen]
    assert losses(out) == losses(baseline) and len(os.listdir(out / "checkpoints")) == 4
    monkeypatch.undo()
    r = subprocess.run([sys.executable, TRAIN, *map(str, common(tiny, out, "--resume"))], capture_output=True, text=True)
    assert r.returncode == 0 and "already at step" not in r.stderr, r.stderr  # let go when main ended


def test_a_run_refused_at_its_first_write_deletes_nothing_of_the_run_that_holds_out(tiny, tmp_path, monkeypatch):
    """Two runs started together on an --out not there yet: neither held it at start, and the second's
    --overwrite deleted the first's metrics.jsonl and args.json before it found the folder held."""
    out = tmp_path / "race"
    real, holder = nanopost.training.prepare_out_dir, []

    def first_run_took_out_meanwhile(*a, **k):  # the other run: created --out, wrote, holds it
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"step": 1}\n')
        (out / "args.json").write_text("{}")
        holder.append(subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                                        "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                                        "time.sleep(120)", str(out)], stdout=subprocess.PIPE, text=True))
        assert holder[0].stdout.readline() == "held\n"
        return real(*a, **k)
    monkeypatch.setattr(nanopost.training, "prepare_out_dir", first_run_took_out_meanwhile)
    try:
        r = run_main(TRAIN, *common(tiny, out, "--overwrite"))
    finally:
        for p in holder:
            p.kill()
            p.wait()
    assert r.returncode == 1 and "another process is writing there now" in r.stderr, r.stderr
    assert sorted(os.listdir(out)) == ["args.json", "metrics.jsonl"] and (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_preset_paper_never_overrides_explicit_flags():
    module = load_script(TRAIN)
    base = ["--model", "m", "--data", "d", "--out", "o", "--preset", "paper"]
    a = module.parse_args(base + ["--lr=1e-4", "--batch", "8", "--precision", "fp32"])
    assert (a.lr, a.batch_size, a.precision, a.grad_accum, a.max_len) == (1e-4, 8, "fp32", 250, 1024)
    a = module.parse_args(base)
    assert (a.lr, a.batch_size, a.precision, a.epochs) == (5e-8, 4, "bf16-autocast", 3)
    assert not a.no_packing and module.parse_args(base + ["--no-packing"]).no_packing


def test_save_final_removes_an_earlier_saves_shards(tiny, tmp_path):
    model, tok = nanopost.load(tiny)
    out = tmp_path / "final"
    nanopost.save(model, tok, str(out), max_shard_bytes=20_000)  # an earlier save, sharded
    assert os.path.exists(out / "model.safetensors.index.json")
    with torch.no_grad():
        model.model.norm.weight += 1
    nanopost.training.save_final(model, tok, str(out), argparse_namespace())
    assert not [n for n in os.listdir(out) if n.startswith("model-") or n.endswith(".index.json")]
    assert torch.equal(nanopost.load(str(out))[0].model.norm.weight, model.model.norm.weight)


def argparse_namespace():
    import argparse
    return argparse.Namespace(seed=0)


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_then_resumes_in_one_process(tiny, tmp_path):
    """A terminal's Ctrl-C reaches torchrun and both ranks at slightly different times; every rank
    stops at the same step, the checkpoint is saved, nothing hangs, and a single process with the
    same rows per step (batch 1 x accum 2 x 2 processes = batch 2 x accum 2) resumes it."""
    out = tmp_path / "ddp"
    args = ["--model", tiny, "--data", DATA, "--out", out, "--max-len", 64, "--batch-size", 1, "--grad-accum", 2,
            "--max-steps", 100000, "--device", "cpu"]
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           TRAIN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(out / "metrics.jsonl")
                                          and len(open(out / "metrics.jsonl").readlines()) >= 2):
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGINT)  # what a terminal does: the whole process group
    stdout, stderr = p.communicate(timeout=120)
    assert "interrupted: saved" in stdout, stdout + stderr[-3000:]
    ckpt = latest_checkpoint(str(out))
    step = int(ckpt.rsplit("-", 1)[1])
    assert step >= 2 and json.load(open(os.path.join(ckpt, "trainer_state.json")))["step"] == step
    r = run_main(TRAIN, *[a if a != 100000 else step + 1 for a in args], "--resume", "--batch-size", 2,
                 "--grad-accum", 2)
    assert r.returncode == 0 and f"at step {step}" in r.stdout, r.stderr


def test_rows_are_packed_once_for_all_epochs(tiny, tmp_path, monkeypatch):
    import nanopost.data
    calls, real = [], nanopost.data.pack
    monkeypatch.setattr(nanopost.data, "pack", lambda *a: calls.append(1) or real(*a))
    r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--out", tmp_path / "e", "--max-len", 64, "--batch-size", 4,
                 "--epochs", 3)
    assert r.returncode == 0 and '"steps": 12' in r.stdout, r.stdout + r.stderr  # 4 steps an epoch
    assert len(calls) == 1


def test_latest_checkpoint_skips_temporary_folders_and_recovers_a_cut_replace(tmp_path, baseline):
    import shutil
    root = tmp_path / "run" / "checkpoints"
    shutil.copytree(baseline / "checkpoints", root)
    os.makedirs(root / ".tmp-step-0000009-abc")  # a save that a crash cut short
    os.rename(root / "step-0000004", root / ".old-step-0000004")  # a replace cut between its two renames
    assert latest_checkpoint(str(tmp_path / "run")) == str(root / "step-0000004")
    assert not os.path.exists(root / ".old-step-0000004")


def test_ctrl_c_during_the_final_validation_still_saves_the_model(tiny, tmp_path, monkeypatch):
    """A signal after the last step waits for the final model: the run is complete then."""
    import nanopost.training as training
    real = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint", lambda *a, **k: os.kill(os.getpid(), signal.SIGINT) or real(*a, **k))
    out = tmp_path / "final"
    r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--out", out, "--max-len", 64, "--batch-size", 4,
                 "--max-steps", 2, "--val-fraction", 0.25)
    assert r.returncode == 0 and '"steps": 2' in r.stdout, r.stdout + r.stderr
    assert os.path.exists(out / "config.json") and latest_checkpoint(str(out)).endswith("step-0000002")
    n = sum(1 for line in open(DATA) if line.strip())  # the log counts the examples trained, not those read
    assert f"data: {n - n // 4} examples, {n // 4} validation; of the {n} read" in r.stdout, r.stdout


def test_overwrite_removes_the_old_final_model(tmp_path, baseline):
    import shutil
    from nanopost.training import prepare_out_dir
    out = tmp_path / "ow"
    shutil.copytree(baseline, out)
    (out / "notes.txt").write_text("mine")
    prepare_out_dir(str(out), resume=False, overwrite=True)
    left = os.listdir(out)
    assert "notes.txt" in left and not [n for n in left if n.startswith("model") or n in (
        "config.json", "checkpoints", "metrics.jsonl", "args.json")]  # nothing that passes for the new run


def test_resume_refuses_another_seed_precision_or_data(tiny, tmp_path, baseline):
    other = tmp_path / "other.jsonl"
    other.write_text(open(DATA).read().replace("Paris.", "Lyon."))
    for extra, what in ((["--seed", 1], "--seed"), (["--precision", "bf16"], "--precision"),
                        (["--data", other], "training data")):
        r = run_main(TRAIN, *common(tiny, baseline, "--resume", *extra))
        assert r.returncode != 0 and f"written with {what}" in r.stderr, r.stderr
    assert len(losses(baseline)) == 4  # untouched


def test_resume_refuses_other_optimizer_settings_and_names_them(tiny, tmp_path, baseline):
    """A resume with another lr, schedule length or weight decay would train on silently (and
    args.json would then record settings the model was not trained with)."""
    for extra, what in ((["--lr", 0.5], "optimizer settings: --lr 0.001, this run has --lr 0.5"),
                        (["--max-steps", 2], "already at step 4, this run asks for 2 steps"),
                        (["--weight-decay", 0.3], "--weight-decay 0.0, this run has --weight-decay 0.3")):
        r = run_main(TRAIN, *common(tiny, baseline, "--resume", *extra))
        assert r.returncode != 0 and what in r.stderr, r.stderr
    assert len(losses(baseline)) == 4  # untouched
    assert json.load(open(baseline / "args.json"))["lr"] == 1e-3


def test_out_is_never_the_model_nor_a_foreign_folder_on_resume(tiny, tmp_path):
    import shutil
    model = shutil.copytree(tiny, tmp_path / "model")
    before = sorted(os.listdir(model))
    for extra in ((), ("--resume",), ("--overwrite",)):
        r = run_main(TRAIN, *common(model, model, *extra))
        assert r.returncode != 0 and "is the --model folder" in r.stderr, r.stderr
    assert sorted(os.listdir(model)) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = run_main(TRAIN, *common(tiny, other, "--resume"))
    assert r.returncode != 0 and "not a run to continue" in r.stderr, r.stderr
    assert os.listdir(other) == ["notes.txt"]


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", 0], "--batch-size must be at least 1"),
    (["--grad-accum", 0], "--grad-accum must be at least 1"),
    (["--keep-last", 0], "--keep-last must be at least 1"),
    (["--warmup-steps", 3, "--warmup-ratio", 0.1], "not both"),
    (["--lr", 0], "--lr must be a positive number"),  # (0 and nan ended in a torch traceback)
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--warmup-steps", -2], "--warmup-steps must be 0 or more"),  # (negative ones bent the schedule)
    (["--warmup-ratio", 1.5], "--warmup-ratio must be in [0, 1)"),
    (["--max-grad-norm", -1], "--max-grad-norm must be 0"),
    (["--min-lr-ratio", 2], "--min-lr-ratio must be in [0, 1]"),
    (["--val-fraction", 1], "--val-fraction must be in [0, 1)"),
    (["--save-every", -1], "--save-every must be 0 or more"),
])
def test_flags_that_cannot_work_are_refused(tiny, tmp_path, argv, message):
    r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--out", tmp_path / "x", *argv)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_preset_warmup_yields_to_an_explicit_ratio_and_val_loss_is_always_logged(tiny, tmp_path):
    module = load_script(TRAIN)
    a = module.parse_args(["--model", "m", "--data", "d", "--out", "o", "--preset", "paper", "--warmup-ratio", "0.5"])
    assert a.warmup_steps is None and a.warmup_ratio == 0.5
    for steps in ("10", "11"):  # given with the ratio, even equal to the preset's 10: refused, not dropped
        with pytest.raises(SystemExit):
            module.parse_args(["--model", "m", "--data", "d", "--out", "o", "--preset", "paper", "--warmup-ratio", "0.1",
                               "--warmup-steps", steps])
    (tmp_path / "f").write_text("")
    r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--out", tmp_path / "f")
    assert r.returncode != 0 and "is a file, not a directory" in r.stderr
    out = tmp_path / "v"
    r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--out", out, "--max-len", 64, "--batch-size", 2,
                 "--max-steps", 6, "--val-fraction", 0.25, "--eval-every", 2, "--log-every", 3)
    assert r.returncode == 0, r.stderr
    assert [m["step"] for m in map(json.loads, open(out / "metrics.jsonl")) if "val_loss" in m] == [2, 4, 6]
    # by default (--eval-every 0) once, at the end: in metrics.jsonl as well as in the final line
    r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--out", tmp_path / "end", "--max-len", 64, "--batch-size", 2,
                 "--max-steps", 3, "--val-fraction", 0.25)
    rows = list(map(json.loads, open(tmp_path / "end" / "metrics.jsonl")))
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and [m["step"] for m in rows if "val_loss" in m] == [3]
    assert rows[-1]["val_loss"] == final["val_loss"] is not None


def test_resuming_a_finished_run_reports_its_last_loss_and_keeps_its_metrics(tiny, tmp_path, baseline):
    import shutil
    out = shutil.copytree(baseline, tmp_path / "done")
    before = open(out / "metrics.jsonl").read()
    r = run_main(TRAIN, *common(tiny, out, "--resume"))
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0 and final["steps"] == 4, r.stderr
    assert final["final_loss"] == losses(baseline)[-1] is not None  # it said null: no step ran in this process
    assert open(out / "metrics.jsonl").read() == before and not os.path.exists(out / "metrics.jsonl.tmp")


def test_resume_refuses_another_max_len_packing_or_model_and_allows_a_longer_warmup_ratio_run(tiny, tmp_path, baseline):
    """--max-len and packing change the rows without always changing the data hash, and another
    --model was ignored (args.json then named it): refused. A --warmup-ratio run resumed for more
    steps follows the new length (it was refused, naming a --warmup-steps never given)."""
    import shutil
    other = shutil.copytree(tiny, tmp_path / "other")
    for extra, what in ((["--max-len", 80], "written with --max-len"),
                        (["--no-packing"], "written with packing = packed rows, this run has --no-packing"),
                        (["--model", other], "written with --model")):
        r = run_main(TRAIN, *common(tiny, baseline, "--resume", *extra))  # (the last --model given wins)
        assert r.returncode != 0 and what in r.stderr, (extra, r.stderr)
    r = run_main(TRAIN, *common(tiny, baseline, "--resume", "--model", other, "--no-packing", "--lr", 0.5, "--seed", 7))
    assert r.returncode != 0 and all(x in r.stderr for x in ("written with --model", "--no-packing", "--lr 0.5",
                                                               "--seed (it orders")), r.stderr  # all named at once
    os.symlink(tiny, tmp_path / "link")  # the same model folder by another path resumes
    r = run_main(TRAIN, *common(tiny, baseline, "--resume", "--model", tmp_path / "link"))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "ratio"
    r = run_main(TRAIN, *common(tiny, out, "--warmup-ratio", 0.25))
    assert r.returncode == 0, r.stderr
    r = run_main(TRAIN, *common(tiny, out, "--warmup-steps", 1, "--resume", "--max-steps", 6))  # another form
    assert r.returncode != 0 and "--warmup-ratio 0.25, this run has --warmup-ratio (not given), --warmup-steps 1" in r.stderr, r.stderr
    r = run_main(TRAIN, *common(tiny, out, "--warmup-ratio", 0.25, "--resume", "--max-steps", 6))
    assert r.returncode == 0 and "the lr schedule follows the new length" in r.stdout, r.stderr


def test_killed_saves_leave_no_temporary_copies_and_flags_out_of_range_are_refused(tiny, tmp_path, baseline):
    import shutil
    out = shutil.copytree(baseline, tmp_path / "run")
    (out / "checkpoints" / ".tmp-step-0000005-abc").mkdir()  # a save a kill cut short: a model + optimizer state
    (tmp_path / ".tmp-run-abc_1234").mkdir()  # the final save's, beside --out (mkdtemp: 8 characters)
    (tmp_path / ".tmp-run-b-abc_1234").mkdir()  # run-b's, maybe being written now: not ours
    r = run_main(TRAIN, *common(tiny, out, "--resume"))
    assert r.returncode == 0, r.stderr
    assert not (out / "checkpoints" / ".tmp-step-0000005-abc").exists() and not (tmp_path / ".tmp-run-abc_1234").exists()
    assert (tmp_path / ".tmp-run-b-abc_1234").exists()
    for argv, message in ((["--max-steps", 0], "--max-steps must be at least 1"), (["--log-every", 0], "--log-every must be"),
                          (["--data-weights", -1], "--data-weights must all be more than 0"),
                          (["--data-weights", "inf"], "at most 10000"), (["--epochs", "inf"], "--epochs must be"),
                          (["--weight-decay", "inf"], "--weight-decay must be")):
        r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--out", tmp_path / "x", *argv)
        assert r.returncode == 2 and message in r.stderr, r.stderr


def test_resume_checks_max_len_before_the_data_and_no_warmup_is_one_setting(tiny, tmp_path, baseline):
    """A resume with a --max-len too small for the data stopped on the data check ("no trained
    token left") instead of naming the change; --warmup-steps 0 on a run started with the default
    ratio 0 (no warmup either way) was refused, naming a warmup_ratio never typed."""
    r = run_main(TRAIN, *common(tiny, baseline, "--resume", "--max-len", 3))
    assert r.returncode != 0 and "written with --max-len (it cuts the examples, and SFT packs rows to it) = 64, this run has 3" in r.stderr, \
        r.stderr
    r = run_main(TRAIN, *common(tiny, baseline, "--resume", "--warmup-steps", 0))
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 4, r.stderr
    import shutil  # a checkpoint that recorded --warmup-steps 0 as such (before it was the ratio 0) resumes too
    out = shutil.copytree(baseline, tmp_path / "old")
    for state in (out / "checkpoints").glob("step-*/trainer_state.json"):
        info = json.loads(state.read_text())
        info["meta"]["schedule"].update(warmup_steps=0, warmup_ratio=None)
        state.write_text(json.dumps(info))
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    r = run_main(TRAIN, *common(tiny, out, "--resume", "--warmup-steps", 0))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    r = run_main(TRAIN, *common(tiny, out, "--resume", "--warmup-steps", 2))
    assert r.returncode != 0 and "--warmup-ratio 0.0, this run has --warmup-ratio (not given), --warmup-steps 2" \
        in r.stderr, r.stderr


def test_max_grad_norm_0_clips_nothing_and_logs_the_real_norm(tiny, tmp_path):
    """--max-grad-norm 0 (no clipping) logged grad_norm 0."""
    norms = {}
    for clip in (0, 1e9):
        out = tmp_path / f"clip{clip}"
        r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--out", out, "--max-len", 64, "--batch-size", 2,
                     "--max-steps", 2, "--max-grad-norm", clip)
        assert r.returncode == 0, r.stderr
        norms[clip] = [json.loads(line)["grad_norm"] for line in open(out / "metrics.jsonl")]
    assert norms[0] == norms[1e9] and all(n > 0 for n in norms[0]), norms


def test_a_diverged_run_stops_at_the_first_nan_and_writes_no_final_model(tiny, tmp_path):
    """A NaN loss (here: --lr 1e30 blows the weights up after one step) trained on to the end and
    saved a final model of NaN weights."""
    out = tmp_path / "nan"
    r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--out", out, "--max-len", 64, "--batch-size", 2,
                 "--max-steps", 4, "--lr", 1e30, "--save-every", 1)
    assert r.returncode != 0 and "step 2: loss nan" in r.stderr and "training diverged" in r.stderr, r.stderr
    assert not (out / "config.json").exists() and os.listdir(out / "checkpoints") == ["step-0000001"]


def test_a_warmup_as_long_as_the_run_is_warned_of(tiny, tmp_path):
    """--warmup-steps 100000 with --max-steps 3 trained the whole run at a near-zero lr, silently."""
    r = run_main(TRAIN, *common(tiny, tmp_path / "w", "--warmup-steps", 5, "--save-every", 0))
    assert r.returncode == 0 and "warning: a warmup of 5 steps is longer than the run's 4" in r.stdout, r.stdout
    r = run_main(TRAIN, *common(tiny, tmp_path / "v", "--warmup-steps", 4, "--save-every", 0))  # its last step at --lr
    assert r.returncode == 0 and "warning: a warmup" not in r.stdout, r.stdout


def test_unwritable_out_inputs_inside_an_overwritten_out_and_damaged_metrics(tiny, tmp_path, baseline):
    """An --out that cannot be made is refused before the data and model are read; --model inside
    the --out that --overwrite empties (as a diverged run's checkpoint) is refused, the checkpoint
    kept; a damaged metrics.jsonl line is dropped with a warning, not a traceback on every resume."""
    import shutil
    (tmp_path / "afile").write_text("x")
    r = run_main(TRAIN, *common(tiny, tmp_path / "afile" / "sub"))
    assert r.returncode != 0 and "is a file, not a directory" in r.stderr and "Traceback" not in r.stderr, r.stderr
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    for out in (tmp_path / "dangling", tmp_path / "dangling" / "run"):
        r = run_main(TRAIN, *common(tiny, out))
        assert r.returncode != 0 and "a symbolic link to a folder that does not exist" in r.stderr, r.stderr
    if os.path.isdir("/proc/self"):  # a folder nobody may create anything in, root included
        r = run_main(TRAIN, *common(tiny, "/proc/self/nanopost-out"))
        assert r.returncode != 0 and "cannot write in" in r.stderr, r.stderr
    out = shutil.copytree(baseline, tmp_path / "run")
    step = latest_checkpoint(str(out))
    r = run_main(TRAIN, *common(step, out, "--overwrite"))
    assert r.returncode != 0 and "lies inside --out" in r.stderr and os.path.isdir(step), r.stderr
    out2 = shutil.copytree(baseline, tmp_path / "run2")
    mine = shutil.copytree(tiny, out2 / "mine")  # a folder --overwrite leaves alone: a model there is fine
    r = run_main(TRAIN, *common(str(mine), out2, "--overwrite"))
    assert r.returncode == 0 and os.path.isfile(mine / "config.json"), r.stderr
    before = open(out / "metrics.jsonl").read()
    with open(out / "metrics.jsonl", "a") as f:
        f.write(before.splitlines()[-1][:30])
    r = run_main(TRAIN, *common(tiny, out, "--resume"))
    assert r.returncode == 0 and "dropped 1 damaged line" in r.stderr, r.stderr
    assert open(out / "metrics.jsonl").read() == before


def test_no_packing_resume_refuses_another_micro_batch_split(tiny, tmp_path):
    """Without packing, rows are batched by --batch-size before the shuffle: resuming with another
    split of the same rows per step would train on other rows."""
    args = ["--model", tiny, "--data", DATA, "--max-len", 64, "--no-packing", "--save-every", 1, "--out", tmp_path / "np"]
    r = run_main(TRAIN, *args, "--batch-size", 2, "--max-steps", 2)
    assert r.returncode == 0, r.stderr
    r = run_main(TRAIN, *args, "--batch-size", 1, "--grad-accum", 2, "--max-steps", 4, "--resume")
    assert r.returncode != 0 and "examples per micro-batch" in r.stderr, r.stderr
    r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--data-weights", 0.01, "--max-len", 64, "--out", tmp_path / "w")
    assert r.returncode != 0 and "--data-weights below 1" in r.stderr, r.stderr


def test_validation_split_rounds_up_and_keeps_a_prompts_completions_together(tiny):
    """--val-fraction 0.05 of 16 holds out 1 (datasets' train_test_split rounds up; int() held out
    none, silently); KTO's two halves of a pair (one prompt) land on the same side; one example
    always stays to train."""
    from types import SimpleNamespace
    from nanopost.data import load_kto
    args = SimpleNamespace(val=None, val_fraction=0.05, seed=0)
    files = [list(range(16))]
    assert len(nanopost.training.split_validation(files, args, [])) == 1 and len(files[0]) == 15
    files = [[0]]
    assert nanopost.training.split_validation(files, SimpleNamespace(val=None, val_fraction=0.9, seed=0), []) == [] \
        and files == [[0]]
    for max_len in (256, 24):  # 24: the prompts are cut from the left, a pair's two halves to other tails
        examples, stats = load_kto([os.path.join(ROOT, "tests", "data", "kto.jsonl")], nanopost.Tokenizer(tiny), max_len)
        assert stats["prompts_cut"] if max_len == 24 else not stats["prompts_cut"]
        for seed in range(5):
            train = examples[:]
            val = nanopost.training.split_validation([train], SimpleNamespace(val=None, val_fraction=0.3, seed=seed),
                                                     [], key=lambda e: e.source)
            assert val and not {e.source for e in val} & {e.source for e in train}
            assert len(val) + len(train) == len(examples) and len({e.source for e in examples}) < len(examples)


def test_validation_split_of_kto_pairs_whose_completion_starts_with_a_newline(tiny, tmp_path):
    """Such a completion's prompt ends before the "\n\n" token (TRL's common prefix), so its ids
    differ from the other half's: the pair is grouped by its prompt's messages (it was split). A
    share is counted in examples; one prompt alone cannot be split, and the run says so."""
    from types import SimpleNamespace
    from nanopost.data import load_kto
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"\nAnswer {i}.", "rejected": f"No {i}."})
                            + "\n" for i in range(10)))
    examples, _ = load_kto([str(path)], nanopost.Tokenizer(tiny), 256)
    assert len({tuple(e.prompt) for e in examples}) == 20 and len({e.source for e in examples}) == 10
    same = tmp_path / "same.jsonl"  # one prompt written two ways that render alike: one group
    system = nanopost.Tokenizer(tiny).default_system
    same.write_text(json.dumps({"prompt": "Hi?", "completion": "a", "label": True}) + "\n" + json.dumps(
        {"prompt": [{"role": "system", "content": system}, {"role": "user", "content": "Hi?", "name": "x"}],
         "completion": "b", "label": False}) + "\n")
    assert len({e.source for e in load_kto([str(same)], nanopost.Tokenizer(tiny), 256)[0]}) == 1
    for seed in range(5):
        train, notes = examples[:], []
        val = nanopost.training.split_validation([train], SimpleNamespace(val=None, val_fraction=0.3, seed=seed), [],
                                                 key=lambda e: e.source, log=notes.append)
        assert len(val) == 6 and sum(e.label for e in val) == 3 and not notes
    one = [e for e in examples if e.source == examples[0].source]
    notes = []
    nanopost.training.split_validation([one], SimpleNamespace(val=None, val_fraction=0.3, seed=0), [],
                                       key=lambda e: e.source, log=notes.append)
    assert len(one) == 2 and len(notes) == 1 and "holds out 0, not 1: what is left must stay to train" in notes[0]


def test_flags_a_new_user_gets_wrong(tiny, tmp_path):
    """A seed past 64 bits (a traceback), --resume with --overwrite (--overwrite was ignored), and
    --warmup-ratio rounded up as transformers does (0.15 of 10 steps is 2, int() gave 1)."""
    for flags, why in ((["--seed", 2**64], "--seed must be in"), (["--seed", -2**63 - 1], "--seed must be in"),
                       (["--resume", "--overwrite"], "not both")):
        r = run_main(TRAIN, *common(tiny, tmp_path / "x"), *flags)
        assert r.returncode == 2 and why in r.stderr, r.stderr
    r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--out", tmp_path / "w", "--max-len", 64, "--max-steps", 10,
                 "--warmup-ratio", 0.15, "--lr-schedule", "constant", "--lr", 1e-3)
    assert r.returncode == 0, r.stderr
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "w" / "metrics.jsonl")]
    assert lrs == pytest.approx([5e-4] + [1e-3] * 9)  # nanopost's warmup: step s (from 0) at (s + 1) / warmup
    r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--out", tmp_path / "w2", "--max-len", 64, "--max-steps", 10,
                 "--warmup-ratio", 0.95, "--lr-schedule", "constant", "--lr", 1e-3)  # 10 steps of warmup reach --lr
    assert r.returncode == 0 and "never reaches" not in r.stdout + r.stderr, r.stderr


def test_a_log_line_averages_the_steps_since_the_last(tiny, tmp_path, baseline):
    """--log-every N logs the mean loss of those N steps (as transformers' Trainer), not the N-th
    step's alone; KTO's rewards and log-probs average over the window's examples of their kind."""
    r = run_main(TRAIN, *common(tiny, tmp_path / "every2", "--log-every", 2))
    assert r.returncode == 0, r.stderr
    each = losses(baseline)
    rows = [json.loads(line) for line in open(tmp_path / "every2" / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [2, 4]
    assert [row["loss"] for row in rows] == pytest.approx([(each[0] + each[1]) / 2, (each[2] + each[3]) / 2], rel=1e-6)
    assert json.loads(r.stdout.strip().splitlines()[-1])["final_loss"] == pytest.approx(rows[-1]["loss"])
    steps = [{"loss": 1.0, "kl": 0.5, "rewards/chosen": 2.0, "rewards/rejected": None, "rewards/margins": None,
              "logps/chosen": -3.0, "logps/rejected": None, "n_desirable": 3, "n_undesirable": 0, "tokens": 100,
              "seconds": 1.0, "lr": 1.0, "grad_norm": 5.0},
             {"loss": 3.0, "kl": None, "rewards/chosen": -2.0, "rewards/rejected": 1.0, "rewards/margins": -3.0,
              "logps/chosen": -1.0, "logps/rejected": -7.0, "n_desirable": 1, "n_undesirable": 2, "tokens": 300,
              "seconds": 3.0, "lr": 2.0, "grad_norm": 6.0}]
    m = nanopost.training.window_metrics(steps)
    assert nanopost.training.window_metrics([dict(steps[0], trained_tokens=10), dict(steps[1], trained_tokens=30)])[
        "trained_tokens"] == 40  # counts summed
    assert m == pytest.approx({"loss": 2.0, "kl": 0.5, "rewards/chosen": (3 * 2.0 - 2.0) / 4, "rewards/rejected": 1.0,
                               "rewards/margins": 0.0, "logps/chosen": (3 * -3.0 - 1.0) / 4, "logps/rejected": -7.0,
                               "n_desirable": 4, "n_undesirable": 2, "tokens_per_s": 100.0, "lr": 2.0, "grad_norm": 6.0})


def test_pure_bf16_at_a_fine_tuning_lr_is_warned_of(tiny, tmp_path):
    """Pure bf16 rounds most updates at lr 1e-5 away (weights ~0.05: a rounding step ~2e-4): said at start."""
    r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--out", tmp_path / "b", "--max-len", 64, "--batch-size", 2,
                 "--max-steps", 1, "--precision", "bf16", "--lr", 1e-5)
    assert r.returncode == 0 and "many updates are smaller than a weight's rounding step" in r.stdout, r.stdout + r.stderr
    r = run_main(TRAIN, "--model", tiny, "--data", DATA, "--out", tmp_path / "f", "--max-len", 64, "--batch-size", 2,
                 "--max-steps", 1, "--lr", 1e-5)
    assert r.returncode == 0 and "rounding step" not in r.stdout


def test_schedule_values_equal_transformers_and_fractional_epochs_round_up():
    """After warmup, lr_at is transformers' cosine schedule (with a floor: its min_lr_rate); a run of
    0.5 epochs of 3 steps trains 2 (transformers: ceil), 0.1 epoch of 5 trains 1, not 0."""
    from types import SimpleNamespace
    from transformers.optimization import get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for warmup, total, floor in ((2, 10, 0.0), (3, 17, 0.1), (0, 7, 0.25)):
        ref = (get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=floor) if floor
               else get_cosine_schedule_with_warmup(opt, warmup, total)).lr_lambdas[0]
        for s in range(warmup, total):
            assert nanopost.training.lr_at(s, total, warmup, 1.0, "cosine", floor) == pytest.approx(ref(s), abs=1e-12), (warmup, total, s)
    plan = nanopost.training.plan_steps
    assert plan(3, 1, SimpleNamespace(max_steps=None, epochs=0.5)) == (3, 2)
    assert plan(5, 1, SimpleNamespace(max_steps=None, epochs=0.1)) == (5, 1)


@pytest.mark.parametrize("field,then,now", [("max_grad_norm", 1.0, 0.0), ("lr_schedule", "cosine", "constant"),
                                            ("min_lr_ratio", 0.0, 0.5)])
def test_a_resume_with_another_optimizer_setting_is_refused(field, then, now):
    from types import SimpleNamespace
    base = dict(lr=1e-3, lr_schedule="cosine", min_lr_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
                warmup_steps=None, warmup_ratio=0.0)
    saved = {"schedule": nanopost.training.schedule_meta(SimpleNamespace(**{**base, field: then}))}
    meta = {"schedule": nanopost.training.schedule_meta(SimpleNamespace(**{**base, field: now}))}
    with pytest.raises(nanopost.training.StateError, match=f"--{field.replace('_', '-')} {then}"):
        nanopost.training.check_resume(meta, saved, "ckpt")


def test_a_nan_loss_stops_the_run_even_with_a_finite_gradient_and_epochs_count_finished_steps(tmp_path, monkeypatch):
    """train() on a stand-in model: a step whose loss is NaN is not applied (the gradient alone was
    checked in the CLI tests, where a NaN loss always came with a NaN gradient); the logged epoch of
    an epoch's last step is 1.0, as transformers logs it."""
    from types import SimpleNamespace
    T = nanopost.training
    monkeypatch.setattr(T, "full_model_state", lambda module, rank: None)
    monkeypatch.setattr(T, "full_optimizer_state", lambda module, opt, rank: None)
    monkeypatch.setattr(T, "save_checkpoint", lambda *a, **k: str(tmp_path / "ckpt"))
    monkeypatch.setattr(T, "save_final", lambda *a, **k: None)
    lin = torch.nn.Linear(2, 1)
    args = SimpleNamespace(warmup_steps=0, warmup_ratio=0.0, lr=0.1, resume=False, overwrite=False, precision="fp32",
                           lr_schedule="constant", min_lr_ratio=0.0, max_grad_norm=1.0, eval_every=0, log_every=1,
                           save_every=0, keep_last=1, max_len=8)

    def go(out, losses):
        run = SimpleNamespace(saved=None, module=lin, optimizer=torch.optim.SGD(lin.parameters(), lr=0.1), model=lin,
                              fsdp=False, ckpt=None)

        def step_fn(step, epoch, k):
            lin(torch.ones(1, 2)).sum().backward()  # a finite gradient
            return {"loss": losses[step], "tokens": 2}
        T.train(SimpleNamespace(**vars(args), out=str(out)), run, None, len(losses), 2, {"rows_per_step": 1}, step_fn,
                lambda: None, 0, 1, torch.device("cpu"), lambda *a, **k: None)
    go(tmp_path / "ok", [1.0, 1.0, 1.0, 1.0])
    rows = [json.loads(line) for line in open(tmp_path / "ok" / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [0.5, 1.0, 1.5, 2.0]
    before = [p.detach().clone() for p in lin.parameters()]
    with pytest.raises(T.StateError, match="step 1: loss nan, .*training diverged"):
        go(tmp_path / "nan", [float("nan"), 1.0])
    assert all(torch.equal(a, b) for a, b in zip(before, lin.parameters()))
