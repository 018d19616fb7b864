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
wall time, peak memory), and a rerun skips it; an interrupted one (Ctrl-C, a crash) is continued
with the script's own --resume (training from its last checkpoint, build_data from its last
finished item, evaluate.py from its prediction cache). A finished stage whose command would now
differ (other flags) is refused rather than silently reused: delete OUT/NAME and
OUT/stages/NAME.json to redo it, or choose another --out. --sft-args, --kto-args, --data-args and
--eval-args pass extra flags to one script ("--lr 1e-5 --max-steps 10")."""
import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
TASKS = ["gsm8k", "mmlu", "cmmlu", "ceval", "humaneval"]
# Qwen2-0.5B-Instruct as published by the Qwen team (not measured here); CMMLU was not published
PUBLISHED = {"gsm8k": 40.1, "mmlu": 37.9, "cmmlu": None, "ceval": 45.2, "humaneval": 17.1}
CHANCE = {"gsm8k": 0.0, "mmlu": 25.0, "cmmlu": 25.0, "ceval": 25.0, "humaneval": 0.0}
# the offline default: a tiny random model needs few tokens and a high learning rate to move
TINY = {"data": "--max-new-tokens 32 --json-max-tokens 24 --min-label-count 1 --batch-size 16",
        "sft": "--max-steps 10 --lr 1e-3 --batch-size 4", "kto": "--max-steps 10 --lr 1e-4 --batch-size 4",
        "eval": "--limit 8 --max-new-tokens gsm8k=48,humaneval=48 --batch-size 8"}


def log(msg):
    print(f"[paper {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_child(cmd):
    """cmd as a child process -> (exit code, peak RSS GB of it and its descendants, interrupted).
    A Ctrl-C reaches the child too (same process group): we wait while it saves and stops."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    p = subprocess.Popen(cmd, env=env)  # in the caller's folder: their relative paths mean what they meant
    interrupted = False
    while True:
        try:
            _, status, usage = os.wait4(p.pid, 0)
            break
        except KeyboardInterrupt:
            interrupted = True
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss / 1024**2, interrupted


def comparable(cmd):
    """cmd as a stage's marker records it: the interpreter and this repository's folder left out,
    so a moved checkout or another virtualenv still recognises its finished stages."""
    return ["python" if c == PY else c.replace(ROOT + os.sep, "") for c in cmd]


def script(name):
    return os.path.join(ROOT, name)


class Stages:
    """Runs each stage once: a marker file per finished stage holds its command and costs."""

    def __init__(self, out):
        self.dir = os.path.join(out, "stages")
        os.makedirs(self.dir, exist_ok=True)
        self.ran = []

    def done(self, name):
        path = os.path.join(self.dir, f"{name}.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        return None

    def run(self, name, cmd, out_dir=None, resume_flag="--resume"):
        old = self.done(name)
        key = comparable(cmd)
        if old is not None:
            if old["cmd"] != key:
                raise SystemExit(f"stage {name}: finished earlier with another command\n  then: {shlex.join(old['cmd'])}\n"
                                 f"  now:  {shlex.join(key)}\ndelete {out_dir or name} and {self.dir}/{name}.json to "
                                 f"redo it with the new settings, or choose another --out")
            log(f"{name}: done already ({old['wall_s']:.0f} s), skipped")
            return
        again = out_dir is not None and os.path.isdir(out_dir) and os.listdir(out_dir) and resume_flag
        full = cmd + ([resume_flag] if again else [])
        log(f"{name}: {'continuing: ' if again else ''}{shlex.join(full)}")
        t0 = time.time()
        code, peak_gb, interrupted = run_child(full)
        wall = time.time() - t0
        if interrupted or code in (130, -2):
            log(f"{name}: interrupted after {wall:.0f} s; run the same command again to continue")
            raise SystemExit(130)
        if code != 0:
            raise SystemExit(f"stage {name} failed (exit {code}) after {wall:.0f} s: {shlex.join(full)}\n"
                             f"fix the cause and run the same paper.py command again: finished stages are kept")
        rec = {"name": name, "cmd": key, "wall_s": round(wall, 1), "peak_rss_gb": round(peak_gb, 2),
               "resumed": bool(again), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = os.path.join(self.dir, f".{name}.json.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rec, f, indent=1)
        os.replace(tmp, os.path.join(self.dir, f"{name}.json"))
        self.ran.append(name)
        log(f"{name}: finished in {wall:.0f} s, peak RSS {peak_gb:.2f} GB")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="everything goes here (default runs/paper, or runs/paper-tiny without --model)")
    p.add_argument("--model", help="the student/base model: directory or hub id (default: a tiny random one)")
    teacher = p.add_mutually_exclusive_group()
    teacher.add_argument("--teacher", help="teacher model run in-process (default: --model)")
    teacher.add_argument("--teacher-url", nargs="+", help="OpenAI-compatible teacher server(s) (vLLM, SGLang, nanopost.serve)")
    p.add_argument("--teacher-model", help="model name to ask the teacher server for")
    p.add_argument("--seeds", nargs="+", default=[os.path.join(ROOT, "data", "seeds.jsonl")],
                   help="instruction sources for build_data.py (default: data/seeds.jsonl)")
    p.add_argument("--synthesize", type=int, default=0, help="the teacher also writes N instructions")
    p.add_argument("--data-dir", default=os.path.join(ROOT, "data", "mini"),
                   help="benchmarks in evaluate.py's layout (default: the slices shipped in data/mini)")
    p.add_argument("--download", action="store_true", help="evaluate.py --download first (needs a network)")
    p.add_argument("--tasks", default=",".join(TASKS), help="benchmarks, comma-separated")
    p.add_argument("--limit", type=int, help="questions per benchmark (a fixed seeded subset; 0 = all)")
    p.add_argument("--choice-shots", type=int, default=5,
                   help="exemplars for MMLU, CMMLU and C-Eval (default 5: zero-shot letter scoring puts a 0.5B "
                        "model near or below chance on C-Eval, DESIGN.md); GSM8K is 4-shot as in the paper")
    p.add_argument("--preset", choices=["paper"], help="train_sft.py --preset paper (the paper's SFT settings)")
    p.add_argument("--device", help="cpu or cuda (passed to every script)")
    p.add_argument("--gpus", type=int, default=1, help="training stages under torchrun with N processes")
    for s in ("data", "sft", "kto", "eval"):
        p.add_argument(f"--{s}-args", default=None, help="extra flags for that stage's script (quoted; replaces the "
                       "tiny default's)")
    args = p.parse_args()
    out = args.out or ("runs/paper-tiny" if args.model is None else "runs/paper")
    os.makedirs(out, exist_ok=True)
    tiny = args.model is None
    extra = {s: shlex.split(getattr(args, f"{s}_args") if getattr(args, f"{s}_args") is not None
                            else (TINY[s] if tiny else "")) for s in ("data", "sft", "kto", "eval")}
    dev = ["--device", args.device] if args.device else []
    st = Stages(out)
    started = time.time()

    # 0. the base model (the tiny default makes one; it is also its own teacher)
    base = args.model
    if tiny:
        base = os.path.join(out, "tiny")
        st.run("tiny", [PY, "-m", "nanopost.testing", base])
    d = lambda name: os.path.join(out, name)  # noqa: E731

    # 1. teacher-guided data: sft.jsonl (the best response per instruction), kto.jsonl (best/worst)
    if args.teacher_url:
        who = ["--teacher-url", *args.teacher_url] + (["--teacher-model", args.teacher_model] if args.teacher_model else [])
    else:
        who = ["--teacher", args.teacher or base]
    synth = ["--synthesize", str(args.synthesize)] if args.synthesize else []
    st.run("data", [PY, script("build_data.py"), *who, "--student", base, "--sources", *args.seeds, *synth,
                    "--out", d("data"), *dev, *extra["data"]], d("data"))
    for f in ("sft.jsonl", "kto.jsonl"):
        if not os.path.exists(os.path.join(d("data"), f)) or not open(os.path.join(d("data"), f)).read().strip():
            raise SystemExit(f"build_data.py wrote no {f} in {d('data')}: nothing to train on (see {d('data')}/report.md)")

    # 2. training: SFT twice (two seeds: the paper fuses two SFT checkpoints), KTO from the base and
    #    from the SFT model (the paper's two-stage SFT -> KTO; the reference is the starting model)
    launch = [PY] if args.gpus <= 1 else [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                         str(args.gpus)]
    preset = ["--preset", args.preset] if args.preset else []
    for name, seed in (("sft", 0), ("sft-b", 1)):
        st.run(name, [*launch, script("train_sft.py"), "--model", base, "--data", os.path.join(d("data"), "sft.jsonl"),
                      "--out", d(name), "--seed", str(seed), *preset, *dev, *extra["sft"]], d(name))
    for name, start in (("kto", base), ("sft-kto", d("sft"))):
        st.run(name, [*launch, script("train_kto.py"), "--model", start, "--data", os.path.join(d("data"), "kto.jsonl"),
                      "--out", d(name), *dev, *extra["kto"]], d(name))

    # 3. weight fusion (merge.py writes its output atomically: a folder there is a finished merge)
    fusions = {"linear-0.5": ["--method", "linear", "--models", d("sft"), d("sft-b"), "--weights", "0.5", "0.5"],
               "linear-0.05": ["--method", "linear", "--models", d("sft"), d("sft-b"), "--weights", "0.05", "0.95"],
               "slerp": ["--method", "slerp", "--models", d("sft"), d("sft-kto"), "--t", "0.5"]}
    for name, flags in fusions.items():
        st.run(name, [PY, script("merge.py"), *flags, "--out", d(name)], None)

    # 4. every model on the same questions
    variants = {"base": base, "sft": d("sft"), "sft-b": d("sft-b"), "kto": d("kto"), "sft-kto": d("sft-kto"),
                **{n: d(n) for n in fusions}}
    if args.download:
        st.run("download", [PY, script("evaluate.py"), "--download", "--tasks", args.tasks, "--data-dir", args.data_dir])
    limit = ["--limit", str(args.limit)] if args.limit else []
    choice = [t for t in args.tasks.split(",") if t in ("mmlu", "cmmlu", "ceval")]
    shots = ["--shots", ",".join(f"{t}={args.choice_shots}" for t in choice)] if choice else []
    models = [a for m in variants.values() for a in ("--model", m)]
    st.run("eval", [PY, script("evaluate.py"), *models, "--tasks", args.tasks, "--data-dir", args.data_dir, *limit,
                    *shots, "--out", d("eval"), *dev, *extra["eval"]], None)

    # 5. the report (rewritten whenever a stage ran, or when it is missing)
    if st.ran or not os.path.exists(os.path.join(out, "report.json")):
        write_report(args, out, variants, st, time.time() - started)
        log(f"report: {os.path.join(out, 'report.md')}")
    else:
        log(f"nothing to do: every stage is done; the report is {os.path.join(out, 'report.md')}")


# ---- the report ----

def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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
    keys = ["loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins"]
    return {"steps": rows[-1].get("step"), **{k: {"first": rows[0].get(k), "last": rows[-1].get(k)}
                                                for k in keys if rows[0].get(k) is not None}}


def write_report(args, out, variants, st, wall):
    with open(os.path.join(out, "eval", "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    tasks = [t for t in args.tasks.split(",") if t]
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
              "stages": [s for s in stages if s]}
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
        if t == "gsm8k":
            return f"{s.get('shots', 4)}-shot CoT, generate, last number"
        if t == "humaneval":
            return "pass@1, greedy, run in a sandbox"
        return f"{s.get('shots', 0)}-shot, {'option-letter log-probs' if s.get('mode', 'logprob') == 'logprob' else 'generate + extract'}"

    lines = ["# The paper's experiment, reproduced", "",
             f"`{report['command']}`", "",
             f"git {report['git_commit']} · {report['date']} · {report['hardware']['cpu']}, {report['hardware']['cores']} "
             f"cores, CPU capability {report['hardware']['cpu_capability']}" +
             (f" · GPUs: {', '.join(report['hardware']['gpus'])}" if report["hardware"]["gpus"] else " · no GPU") +
             f" · torch {report['hardware']['torch']} · total wall time of this invocation {wall / 60:.1f} min", "",
             "## Accuracy (%) per benchmark; in parentheses the change against the base model", "",
             "| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks),
             "| Qwen2-0.5B-Instruct, **as published** (not measured here) | " +
             " | ".join("-" if PUBLISHED.get(t) is None else f"{PUBLISHED[t]:.1f}" for t in tasks) + " |"]
    lines += [f"| {name} (`{variants[name]}`) | " + " | ".join(cell(name, t) for t in tasks) + " |" for name in variants]
    lines += ["| questions per benchmark | " + " | ".join(str(n[t]) for t in tasks) + " |",
              "| protocol | " + " | ".join(protocol(t) for t in tasks) + " |", "",
              "⚠ = at or below chance (25% for the four-option benchmarks): the score says nothing about the model. "
              "With n questions, one question moves a score by 100/n points; differences smaller than a few "
              "such steps are noise. Every prediction is in eval/results.json.", ""]
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
    lines += ["", "## Stages", "", "| stage | wall time | peak RSS (GB) | finished |", "|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['wall_s'] / 60:.1f} min | {s['peak_rss_gb']:.2f} | {s['finished']}"
              f"{' (resumed)' if s.get('resumed') else ''} |" for s in report["stages"]]
    lines += ["", "Peak RSS is the stage process's (and its children's) resident memory; on a GPU the training "
              "scripts' own logs give CUDA memory. Each stage's exact command is in stages/NAME.json.", ""]
    tmp = os.path.join(out, ".report.tmp")
    for name, text in (("report.json", json.dumps(report, indent=1, ensure_ascii=False)), ("report.md", "\n".join(lines))):
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
        ax.bar([c + i * width for c in range(len(tasks))], [row[t] or 0 for t in tasks], width, label=name)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(tasks))], tasks)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "report_accuracy.png"), dpi=110)
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
    main()
