"""paper.py, the whole experiment, end to end on the tiny offline default (shrunk for CI time):
every stage's outputs, the report with every variant and benchmark, a failed stage continued by
rerunning the same command, a finished run doing no work again, and changed settings refused."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["base", "sft", "sft-b", "kto", "sft-kto", "linear-0.5", "linear-0.05", "slerp"]
TASKS = ["gsm8k", "mmlu", "cmmlu", "ceval", "humaneval"]


def paper(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "paper.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)


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
    assert sorted(os.listdir(out / "stages")) == ["data.json", "sft-b.json", "sft.json", "tiny.json"]
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

    # a finished run does nothing the second time: no stage runs, the report is not rewritten
    markers = {f: (out / "stages" / f).stat().st_mtime_ns for f in os.listdir(out / "stages")}
    before = (out / "report.json").stat().st_mtime_ns
    r = paper(*small, *kto)
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr
    assert "finished in" not in r.stdout
    assert {f: (out / "stages" / f).stat().st_mtime_ns for f in os.listdir(out / "stages")} == markers
    assert (out / "report.json").stat().st_mtime_ns == before

    # other settings for a finished stage are refused, not silently reused
    changed = [a if a != "--max-steps 2 --lr 1e-3 --batch-size 2" else "--max-steps 3 --lr 1e-3 --batch-size 2"
               for a in small]
    r = paper(*changed, *kto)
    assert r.returncode != 0 and "stage sft: finished earlier with another command" in r.stderr, r.stderr
