"""KTO: the loss against TRL's KTOTrainer (its loss code, and one whole first step), chunked
log-probs against full logits and float64, memory, the reference precomputed vs live, learning,
DDP/FSDP2, resume, the two-stage SFT -> KTO run and bad input."""
import json
import os
import re
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import nanopost
from nanopost.data import (DataError, KTOExample, collate_kto, encode_kto, kto_groups, load_kto, to_kto, to_messages,
                           truncate_kto)
from nanopost.kernels.linear_logprob import linear_logprob_reference
from nanopost.losses import kl_estimate, kto_loss, reference_sequence_logps, sequence_logps
from nanopost.testing import run_main
from nanopost.tokenizer import IGNORE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KTO_DATA = os.path.join(ROOT, "tests", "data", "kto.jsonl")
SFT_DATA = os.path.join(ROOT, "tests", "data", "chat.jsonl")
TRAIN_KTO = os.path.join(ROOT, "train_kto.py")


def metrics(d):
    return [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]


# ---- the loss against TRL's code ----

def trl_compute_loss(policy, ref, policy_kl, ref_kl, labels, beta, w_d, w_u, loss_type):
    """TRL's own KTOTrainer._compute_loss on given sequence log-probs: a stand-in trainer and a
    stand-in model whose per-token log-probs sum to the given values (row r of input_ids holds
    r, KL rows r + 1000), the reference log-probs passed as TRL's precomputed ones."""
    trl = pytest.importorskip("trl")
    B = len(labels)
    table = {r: policy[r] for r in range(B)} | {1000 + r: policy_kl[r] for r in range(B)}

    def model(input_ids, labels=None, **_):
        log_probs = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float64)
        log_probs[:, 0] = torch.stack([table[int(i)] for i in input_ids[:, 0]])
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)

    self = trl.KTOTrainer.__new__(trl.KTOTrainer)
    self.__dict__.update(model=SimpleNamespace(training=True), calculate_KL=loss_type == "kto",
                         precompute_ref_logps=True, aux_loss_enabled=False, loss_type=loss_type, beta=beta,
                         desirable_weight=w_d, undesirable_weight=w_u, _metrics={"train": defaultdict(list)},
                         _total_train_tokens=0, _tp_size=1,
                         accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x))
    ids = torch.arange(B)[:, None].repeat(1, 3)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids),
             "KL_input_ids": ids + 1000, "KL_attention_mask": torch.ones_like(ids),
             "KL_completion_mask": torch.ones_like(ids), "label": labels.long(), "ref_logps": ref,
             "ref_KL_logps": ref_kl}
    loss = self._compute_loss(model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in self._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("case", ["mixed", "only desirable", "only undesirable", "kl clamped"])
def test_loss_rewards_and_kl_equal_trls_code(loss_type, case):
    g = torch.Generator().manual_seed(hash((loss_type, case)) % 1000)
    B = 6
    policy, ref = -20 * torch.rand(B, generator=g, dtype=torch.float64), -20 * torch.rand(B, generator=g, dtype=torch.float64)
    ref_kl = -20 * torch.rand(B, generator=g, dtype=torch.float64)
    policy_kl = ref_kl + (-1 if case == "kl clamped" else 1) * torch.rand(B, generator=g, dtype=torch.float64)
    labels = {"mixed": torch.tensor([1, 0, 1, 1, 0, 0]), "only desirable": torch.ones(B),
              "only undesirable": torch.zeros(B), "kl clamped": torch.tensor([0, 1, 0, 1, 1, 0])}[case].bool()
    beta, w_d, w_u = 0.3, 1.7, 0.6
    theirs, m = trl_compute_loss(policy, ref, policy_kl, ref_kl, labels, beta, w_d, w_u, loss_type)
    z0 = kl_estimate(policy_kl, ref_kl) if loss_type == "kto" else 0.0
    ours, rewards = kto_loss(policy, ref, labels, z0, beta, w_d, w_u, loss_type)
    assert abs(ours.item() - theirs.item()) <= 1e-10
    if loss_type == "kto":
        assert abs(float(z0) - m["kl"]) <= 1e-10 and (case != "kl clamped" or float(z0) == 0.0)
    for key, sel in (("rewards/chosen", labels), ("rewards/rejected", ~labels)):
        if sel.any():
            assert abs(rewards[sel].mean().item() - m[key]) <= 1e-10
        else:
            assert key not in m
    assert torch.isfinite(ours)


# ---- one whole first step against TRL's KTOTrainer ----

def test_rewards_carry_no_graph_and_z0_is_clamped_after_the_mean_over_ranks():
    """TRL detaches the rewards, and clamps z0 once the ranks' KL means are averaged: a rank at -2
    and one at +1 give z0 = 0 (clamping each first would give 0.5)."""
    p = torch.tensor([-3.0, -5.0], dtype=torch.float64, requires_grad=True)
    loss, rewards = kto_loss(p, torch.tensor([-4.0, -4.0], dtype=torch.float64), torch.tensor([True, False]),
                             torch.tensor(0.2, dtype=torch.float64))
    assert loss.requires_grad and not rewards.requires_grad
    other_rank = torch.tensor(1.0, dtype=torch.float64)
    z0 = kl_estimate(torch.tensor([-2.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64),
                     all_reduce_mean=lambda x: (x + other_rank) / 2)
    assert z0.item() == 0.0
    assert kl_estimate(torch.tensor([3.0]), torch.tensor([0.0]), all_reduce_mean=lambda x: (x + 1.0) / 2).item() == 2.0


def test_first_step_equals_trl_kto_trainer(tiny, tmp_path):
    """One optimizer step of train_kto.py and of TRL's KTOTrainer on the same tiny model, data and
    batch: loss, kl and rewards agree. By construction TRL differs in two ways, so the data is
    built for both to see the same tokens and pairs: (1) TRL's conversational path also trains the
    newline after <|im_end|>, so TRL gets the chat already rendered as text (its plain-text path:
    prompt = the template with the generation prompt, completion = content + <|im_end|>, the eos);
    (2) TRL forms its KL pairs by rotating completions within consecutive rows of the dataset,
    ours within a seeded group, so TRL's dataset is written in our group's order. With one batch
    of all examples the loss is a mean, so TRL's row shuffling does not change it. The reference
    is another random model, so r and z0 are far from 0 at the first step; after the step both
    policies have moved alike (AdamW's first step, compared relative to how far they moved)."""
    pytest.importorskip("trl")
    import datasets
    import transformers
    from trl import KTOConfig, KTOTrainer
    tok = nanopost.Tokenizer(tiny)
    examples, _ = load_kto([KTO_DATA], tok, 256)
    examples = examples[:8]
    rows = [json.loads(line) for line in open(KTO_DATA)]
    data = tmp_path / "kto8.jsonl"
    flat = []  # the records behind examples[:8], one example per record
    for r in rows:
        if "chosen" in r:
            flat += [{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                     {"prompt": r["prompt"], "completion": r["rejected"], "label": False}]
        else:
            flat.append(r)
    flat = flat[:8]
    data.write_text("".join(json.dumps(r) + "\n" for r in flat))
    order = kto_groups(8, 8, seed=0)[0]
    text = []
    for i in order:
        r = flat[i]
        prompt = [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"]
        completion = r["completion"] if isinstance(r["completion"], str) else r["completion"][0]["content"]
        text.append({"prompt": tok.render_text(prompt, add_generation_prompt=True),
                     "completion": completion + "<|im_end|>", "label": r["label"]})
        assert tok.encode(text[-1]["prompt"]) == examples[i].prompt  # the same tokens on both sides
        assert tok.encode(text[-1]["completion"]) == examples[i].completion
    from nanopost.testing import make_tiny_checkpoint
    other = make_tiny_checkpoint(str(tmp_path / "ref"), seed=1)
    out = tmp_path / "ours"
    r = run_main(TRAIN_KTO, "--model", tiny, "--ref", other, "--data", data, "--out", out, "--batch-size", 8,
                 "--max-steps", 1, "--lr", 1e-3, "--beta", 0.2, "--desirable-weight", 1.3, "--max-len", 256)
    assert r.returncode == 0, r.stderr
    ours = metrics(out)[0]

    hf_tok = transformers.AutoTokenizer.from_pretrained(tiny)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)
    cfg = KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=8, max_steps=1, learning_rate=1e-3,
                    beta=0.2, desirable_weight=1.3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                    max_length=256, seed=0, dataloader_drop_last=False, bf16=False, fp16=False)
    trainer = KTOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=datasets.Dataset.from_list(text),
                         processing_class=hf_tok)
    trainer.train()
    theirs = next(h for h in trainer.state.log_history if "loss" in h)
    assert ours["kl"] > 0.1 and abs(ours["rewards/chosen"]) > 0.1  # a first step that says something
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-4), key
    s0 = nanopost.load(tiny)[0].state_dict()
    s1, s2 = nanopost.load(str(out))[0].state_dict(), trainer.model.state_dict()
    moved = torch.cat([(s1[k] - s0[k]).flatten() for k in s0]).norm()
    assert moved > 0 and torch.cat([(s1[k] - s2[k]).flatten() for k in s0]).norm() <= 1e-3 * moved


# ---- chunked log-probs ----

def test_fused_log_prob_float64_gradcheck_and_chunks():
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 3, 10, 0, 4, 4, 9])
    assert torch.autograd.gradcheck(lambda h, w: linear_logprob_reference(h, w, y, 3), (h, w))
    full = (h @ w.T).log_softmax(-1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(linear_logprob_reference(h, w, y, 2), full, atol=1e-12)


def test_sequence_logps_equal_full_logits_and_kl_pairs_carry_no_gradient(tiny):
    tok = nanopost.Tokenizer(tiny)
    examples, _ = load_kto([KTO_DATA], tok, 256)
    model, _ = nanopost.load(tiny)
    g = [0, 3, 5, 6, 9]
    ids, labels, pos = collate_kto(g, examples, tok.pad_id, 256)
    ours = sequence_logps(model, ids, labels, pos, chunk_rows=7)
    ref = reference_sequence_logps(model, ids, labels, pos)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
    ours.sum().backward()
    g_ours = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ref.sum().backward()
    for k, p in model.named_parameters():
        assert (g_ours[k] - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-7, k
    # the KL pairs (prompt i, completion i-1) and z0 carry no gradient into the loss
    kl_ids, kl_labels, kl_pos = collate_kto(g, examples, tok.pad_id, 256, kl=True)
    assert torch.equal(kl_ids[1][:len(examples[3].prompt)], torch.tensor(examples[3].prompt))
    z0 = kl_estimate(sequence_logps(model, kl_ids, kl_labels, kl_pos), torch.full((5,), -30.0))
    assert not z0.requires_grad and z0 > 0
    policy = sequence_logps(model, ids, labels, pos)
    desirable = torch.tensor([True, False, True, False, True])
    loss, _ = kto_loss(policy, torch.full((5,), -30.0), desirable, z0)
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    loss2, _ = kto_loss(policy, torch.full((5,), -30.0), desirable, float(z0))
    for a, b in zip(grads, torch.autograd.grad(loss2, list(model.parameters()))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("max_len", [256, 24])
def test_kl_pairs_continuing_the_examples_forward_equal_two_passes(tiny, max_len):
    """The KL pairs are scored by a second forward that continues the examples' (collate_kl:
    completion i-1 after prompt i's kept keys/values, each prompt computed once): the same
    log-probs as collate_kto's two batches through full logits (float64), also where a pair's
    prompt is cut otherwise than its example's (max_len 24: that row holds its own prompt), with
    rows of unequal length, with gradients on (the examples' log-probs keep theirs, the pairs'
    have none) and under grad checkpointing."""
    from nanopost.data import collate_kl
    tok = nanopost.Tokenizer(tiny)
    examples, _ = load_kto([KTO_DATA], tok, max_len)
    model, _ = nanopost.load(tiny, dtype=torch.float64)
    g = [0, 3, 5, 6, 9, 1, 2]
    main, kl = collate_kto(g, examples, tok.pad_id, max_len), collate_kl(g, examples, tok.pad_id, max_len)
    cut = [truncate_kto(examples[i].prompt, examples[i].completion, max_len)[0]
           != truncate_kto(examples[i].prompt, examples[j].completion, max_len)[0] for i, j in zip(g, g[-1:] + g[:-1])]
    assert any(cut) == (max_len == 24) and not all(cut)  # both kinds of row where intended
    with torch.no_grad():
        two = [reference_sequence_logps(model, *collate_kto(g, examples, tok.pad_id, max_len, kl=k)) for k in (False, True)]
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        logps, kl_logps = sequence_logps(model, *main, kl=kl, chunk_rows=5)
        assert logps.requires_grad and not kl_logps.requires_grad
        for ours, want in zip((logps.detach(), kl_logps), two):
            assert (ours - want).abs().max() <= 1e-10 * want.abs().max()
        logps.sum().backward()  # the kept keys/values are detached: backward is the examples' own
        grad = model.lm_head.weight.grad.clone()
        model.zero_grad()
        sequence_logps(model, *main).sum().backward()
        assert torch.allclose(grad, model.lm_head.weight.grad, rtol=1e-10, atol=1e-12)
        model.zero_grad()
    model.grad_checkpointing = False
    assert kl[0].numel() < main[0].numel() if max_len == 256 else True  # the pairs' forward: completions only
    # edges: a group of one (its KL pair is itself), prompts cut to nothing (max_len 1: nothing is
    # scored but what collate_kto scores) and an empty completion
    odd = examples[:3] + [KTOExample(examples[0].prompt, [], False)]
    for g, n in (([2], 256), ([0, 1, 2, 3], 1), ([3, 0], 2), ([1, 3, 2], 256)):
        with torch.no_grad():
            both = torch.cat(sequence_logps(model, *collate_kto(g, odd, tok.pad_id, n), kl=collate_kl(g, odd, tok.pad_id, n)))
            two = torch.cat([reference_sequence_logps(model, *collate_kto(g, odd, tok.pad_id, n, kl=kl))
                             for kl in (False, True)])
        assert (both - two).abs().max() <= 1e-10 * max(1.0, two.abs().max()), (g, n, both, two)


@pytest.mark.parametrize("fused", [False, True])
def test_a_reference_with_bf16_linears_gives_the_same_logps_under_autocast(tiny, tmp_path, monkeypatch, fused):
    """train_kto.py keeps the reference's Linears in bf16 under bf16-autocast (frozen_for_autocast):
    autocast casts them to bf16 before every matmul anyway, so the log-probs are equal bit for bit,
    tied and untied lm_head, q/k/v and gate/up joined (the CUDA path) or not."""
    from nanopost import model as model_module
    from nanopost.testing import make_tiny_checkpoint
    from nanopost.training import frozen_for_autocast
    monkeypatch.setattr(model_module, "fuse_projections", lambda x: fused and x.shape[1] > 1)
    untied = make_tiny_checkpoint(str(tmp_path / "untied"), seed=4, tie_word_embeddings=False)
    tok = nanopost.Tokenizer(tiny)
    examples, _ = load_kto([KTO_DATA], tok, 256)
    ids, labels, pos = collate_kto([0, 3, 5, 6, 9], examples, tok.pad_id, 256)
    for ckpt in (tiny, untied):
        full, _ = nanopost.load(ckpt)
        half = frozen_for_autocast(nanopost.load(ckpt)[0])
        assert half.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        assert half.model.embed_tokens.weight.dtype == half.model.norm.weight.dtype == torch.float32
        assert (half.lm_head.weight.dtype == torch.float32) == (half.lm_head.weight is half.model.embed_tokens.weight)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = sequence_logps(full, ids, labels, pos), sequence_logps(half, ids, labels, pos)
        assert torch.equal(a, b), (ckpt, a, b)
        assert not torch.equal(a, sequence_logps(full, ids, labels, pos))  # autocast was on: not a vacuous test


def largest_tensor_bytes(fn):
    """The largest tensor any op creates while fn runs (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.peak = max(Largest.peak, t.numel() * t.element_size())
            return out
    with Largest():
        fn()
    return Largest.peak


def test_chunked_path_memory_stays_flat_as_vocab_times_length_grows(tmp_path):
    """At a large tiny-model vocabulary the largest tensor of a KTO policy step is one chunk of
    logits, whatever T; the full-logits path's grows with B x T x V."""
    from nanopost.model import Qwen2, Qwen2Config
    cfg = Qwen2Config(vocab_size=32768, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = Qwen2(cfg)
    peaks = {}
    for T in (64, 256):
        ids = torch.randint(0, 1000, (2, T))
        labels = ids.clone()
        labels[:, :T // 4] = IGNORE
        chunked = lambda: sequence_logps(model, ids, labels, chunk_rows=32).sum().backward()  # noqa: E731
        full = lambda: reference_sequence_logps(model, ids, labels).sum().backward()  # noqa: E731
        peaks[T] = largest_tensor_bytes(chunked), largest_tensor_bytes(full)
    assert peaks[64][0] == peaks[256][0] == 32 * 32768 * 4  # one chunk of float32 logits
    assert peaks[256][1] >= 2 * 256 * 32768 * 4 > 3 * peaks[256][0]  # B x T x V float32


# ---- runs ----

COMMON = ["--data", KTO_DATA, "--max-len", 64, "--batch-size", 4, "--lr", 1e-3, "--device", "cpu"]


def test_precomputed_reference_gives_the_live_losses_and_learning_happens(tiny, tmp_path):
    live, pre = tmp_path / "live", tmp_path / "pre"
    args = ["--model", tiny, *COMMON, "--max-steps", 30, "--val-fraction", 0.2, "--eval-every", 10]
    r = run_main(TRAIN_KTO, *args, "--out", live)
    assert r.returncode == 0, r.stderr
    r = run_main(TRAIN_KTO, *args, "--out", pre, "--precompute-ref")
    assert r.returncode == 0 and "reference log-probs computed once" in r.stdout, r.stderr
    m_live, m_pre = metrics(live), metrics(pre)
    for key in ("loss", "kl", "rewards/chosen", "val_loss"):
        assert [m.get(key) is None for m in m_pre] == [m.get(key) is None for m in m_live]
        assert [m[key] for m in m_pre if m.get(key) is not None] == \
            pytest.approx([m[key] for m in m_live if m.get(key) is not None], rel=1e-5, abs=1e-6), key
    assert os.listdir(pre / "ref_logps")
    # learning: the margin between desirable and undesirable rewards and rewards/chosen rise
    margins = [m["rewards/margins"] for m in m_live if m["rewards/margins"] is not None]
    chosen = [m["rewards/chosen"] for m in m_live if m["rewards/chosen"] is not None]
    assert sum(margins[-8:]) / 8 > sum(margins[:8]) / 8 + 0.3
    assert sum(chosen[-8:]) / 8 > sum(chosen[:8]) / 8
    assert all(1 <= m["n_desirable"] + m["n_undesirable"] <= 4 for m in m_live)  # (--batch-size 4; the last group may be short)


def test_bf16_autocast_runs_with_its_bf16_reference_live_and_precomputed(tiny, tmp_path):
    """--precision bf16-autocast (the reference's Linears held in bf16): the live and the precomputed
    reference give the same losses; at the first step, where the policy is its reference, both
    score exactly 0 (the reference rounds as the policy's passes do, as in TRL), also where the
    policy's KL pairs are scored before its training passes (--grad-accum 2)."""
    args = ["--model", tiny, *COMMON, "--max-steps", 4, "--precision", "bf16-autocast"]
    for out in ("live", "pre"):
        r = run_main(TRAIN_KTO, *args, "--out", tmp_path / out, *(["--precompute-ref"] if out == "pre" else []))
        assert r.returncode == 0, r.stderr
    r = run_main(TRAIN_KTO, *args, "--grad-accum", 2, "--out", tmp_path / "accum")  # z0 before the policy's passes
    assert r.returncode == 0, r.stderr
    m_live, m_pre = metrics(tmp_path / "live"), metrics(tmp_path / "pre")
    assert len(m_live) == 4 and [m["loss"] for m in m_pre] == pytest.approx([m["loss"] for m in m_live], rel=1e-6)
    for m in (m_live[0], m_pre[0], metrics(tmp_path / "accum")[0]):
        assert m["loss"] == 0.5 and m["kl"] == 0 and m["rewards/chosen"] == m["rewards/rejected"] == 0, m


def test_resume_refuses_a_reference_retrained_in_place_before_the_reference_pass(tiny, tmp_path):
    """The checkpoint records a hash of the reference's files: new weights at the same path are
    refused like another path, and before --precompute-ref spends its pass or writes a cache."""
    import shutil
    ref = shutil.copytree(tiny, tmp_path / "ref")
    args = ["--model", ref, *COMMON, "--save-every", 2, "--out", tmp_path / "run", "--precompute-ref"]
    r = run_main(TRAIN_KTO, *args, "--max-steps", 2)
    assert r.returncode == 0, r.stderr
    caches = os.listdir(tmp_path / "run" / "ref_logps")
    from nanopost.testing import make_tiny_checkpoint
    make_tiny_checkpoint(str(tmp_path / "other"), seed=9)
    shutil.copy(tmp_path / "other" / "model.safetensors", ref / "model.safetensors")  # retrained in place
    r = run_main(TRAIN_KTO, *args, "--max-steps", 4, "--resume")
    assert r.returncode != 0 and "reference model weights" in r.stderr, r.stderr
    assert os.listdir(tmp_path / "run" / "ref_logps") == caches and "computed once" not in r.stdout


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes_match_one_including_z0_and_resume_is_exact(tiny, tmp_path, fsdp):
    """2 processes x 1 micro-batch = 1 process x 2 accumulated micro-batches: the same groups, the
    same z0 (averaged over ranks there, over micro-batches here), so the same losses and weights.
    Then the 2-process step-2 checkpoint resumes in one process to the same end. Under DDP the
    reference is precomputed (each process its share of the pass, then summed): the same table."""
    from test_sft import assert_same_training, torchrun
    common = ["--model", tiny, *COMMON, "--max-steps", 3, "--save-every", 1, "--keep-last", 10,
              *([] if fsdp else ["--precompute-ref"])]
    one = run_main(TRAIN_KTO, *common, "--grad-accum", 2, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = torchrun(*common, *(["--fsdp"] if fsdp else []), "--out", tmp_path / "two", script="train_kto.py")
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("kl", "rewards/chosen", "rewards/rejected"):
        assert [m[key] for m in m2 if m[key] is not None] == \
            pytest.approx([m[key] for m in m1 if m[key] is not None], rel=1e-5, abs=1e-6), key
    assert_same_training(tmp_path / "one", tmp_path / "two", tiny)
    if not fsdp:
        from safetensors.torch import load_file
        (a,), (b,) = (list((tmp_path / d / "ref_logps").iterdir()) for d in ("one", "two"))
        a, b = load_file(a), load_file(b)
        assert a.keys() == b.keys() == {"train.ref", "train.ref_kl", "val.ref", "val.ref_kl"}
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5) for k in a) and (a["train.ref"] < 0).all()
    import shutil
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-0000003")
    r = run_main(TRAIN_KTO, *common, "--grad-accum", 2, "--out", tmp_path / "two", "--resume")
    assert r.returncode == 0 and "at step 2" in r.stdout, r.stderr
    assert metrics(tmp_path / "two")[-1]["loss"] == pytest.approx(m1[-1]["loss"], rel=1e-5)


def test_an_epochs_smaller_last_step_under_fsdp_matches_one_process(tiny, tmp_path):
    """24 examples in micro-batches of 5 are 5 groups: at 2 a step, the epoch's last step holds one
    (it was dropped). Under 2 FSDP2 processes the second runs a stand-in weighted 0 (without it, it
    would wait in a collective forever), and the step equals one process's: its loss, z0 (the mean
    of the real micro-batches' KL pairs only) and weights."""
    from test_sft import assert_same_training, torchrun
    common = ["--model", tiny, *COMMON, "--batch-size", 5, "--epochs", 1, "--save-every", 1, "--keep-last", 10]
    one = run_main(TRAIN_KTO, *common, "--grad-accum", 2, "--out", tmp_path / "one")
    assert one.returncode == 0 and "training 3 steps (3/epoch)" in one.stdout, one.stderr
    two = torchrun(*common, "--fsdp", "--out", tmp_path / "two", script="train_kto.py")
    assert two.returncode == 0, two.stderr[-3000:]
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sum(m["n_desirable"] + m["n_undesirable"] for m in m1) == 24 and len(m1) == 3  # every example, once
    for key in ("kl", "rewards/chosen", "rewards/rejected", "n_desirable"):
        assert [m[key] for m in m2] == pytest.approx([m[key] for m in m1], rel=1e-5, abs=1e-6), key
    assert_same_training(tmp_path / "one", tmp_path / "two", tiny)


def test_validation_loss_is_per_example(tiny, tmp_path):
    """6 validation examples at --batch-size 4 are groups of 4 and 2. With the policy still its
    reference (lr 1e-12) every reward and z0 is 0, so a desirable example's loss is 2 x 0.5
    (--desirable-weight 2) and an undesirable one's 0.5: per example (5 x 1 + 0.5) / 6, however the
    groups fall (a mean of the two group means gave 0.875 or 0.9375)."""
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i != 3}) + "\n"
                           for i in range(6)))
    r = run_main(TRAIN_KTO, "--model", tiny, *COMMON, "--lr", 1e-12, "--max-steps", 1, "--desirable-weight", 2,
                 "--val", val, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert metrics(tmp_path / "run")[-1]["val_loss"] == pytest.approx(5.5 / 6, abs=1e-5)


def test_sft_then_kto_two_stages_as_in_the_readme(tiny, tmp_path):
    r = run_main(os.path.join(ROOT, "train_sft.py"), "--model", tiny, "--data", SFT_DATA, "--out", tmp_path / "sft",
                 "--max-len", 64, "--batch-size", 8, "--lr", 3e-3, "--max-steps", 10)
    assert r.returncode == 0, r.stderr
    r = run_main(TRAIN_KTO, "--model", tmp_path / "sft", *COMMON, "--max-steps", 5, "--out", tmp_path / "kto")
    assert r.returncode == 0, r.stderr
    assert len(metrics(tmp_path / "kto")) == 5
    model, tok = nanopost.load(str(tmp_path / "kto"))
    assert model.config.vocab_size == nanopost.load(str(tmp_path / "sft"))[0].config.vocab_size


# ---- data ----

def test_data_formats_tokens_and_truncation(tiny):
    tok = nanopost.Tokenizer(tiny)
    examples, stats = load_kto([KTO_DATA], tok, 256)
    assert stats["examples"] == 24 and stats["desirable"] == 12  # 4 paired lines -> 8 examples, 16 unpaired
    assert stats["prompts_cut"] == stats["completions_cut"] == 0  # all fit: nothing counted as cut
    ids, mask = tok.render([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}])
    e = examples[0]
    assert e.label and e.prompt + e.completion == ids[:len(e.prompt) + len(e.completion)]
    assert e.completion == [t for t, m in zip(ids, mask) if m]  # exactly the tokens SFT trains
    assert e.completion[-1] == tok.token_id("<|im_end|>") and len(ids) == len(e.prompt) + len(e.completion) + 1
    p, c = truncate_kto(list(range(50)), list(range(100, 120)), 40)
    assert (p, c) == (list(range(30, 50)), list(range(100, 120)))  # the prompt cut from the left first
    p, c = truncate_kto(list(range(50)), list(range(100, 150)), 40)
    assert (p, c) == (list(range(30, 50)), list(range(100, 120)))  # then the completion, prompt keeps half
    p, c = truncate_kto([1, 2, 3], list(range(100, 120)), 10)
    assert (p, c) == ([1, 2, 3], list(range(100, 107)))  # a prompt under half of max_len is not cut
    g = [KTOExample([1, 2], [3], True), KTOExample([4], [5, 6], False), KTOExample([7, 8, 9], [10], True)]
    ids, labels, _ = collate_kto([0, 1, 2], g, 0, 64, kl=True)
    assert ids[0, :3].tolist() == [1, 2, 10] and ids[1, :2].tolist() == [4, 3] and ids[2, :5].tolist() == [7, 8, 9, 5, 6]
    assert labels[2, :5].tolist() == [IGNORE] * 3 + [5, 6]


def test_a_completion_that_starts_with_a_newline_is_what_sft_trains(tiny):
    """"assistant\n" + "\n```..." encodes the two newlines as one token, which SFT trains: the prompt
    ends before it, as TRL's common prefix does (the line was refused: not a prefix)."""
    tok = nanopost.Tokenizer(tiny)
    msgs = [{"role": "user", "content": "Code?"}]
    gen, _ = tok.render(msgs, add_generation_prompt=True)
    for comp in ("\n```x```", "\n\nTwo", "Plain", " space"):
        p, c = encode_kto(tok, msgs, comp)
        ids, mask = tok.render(msgs + [{"role": "assistant", "content": comp}])
        assert c == [t for t, m in zip(ids, mask) if m]  # exactly the tokens SFT trains
        assert p + c == ids[:len(p) + len(c)] and p == gen[:len(p)]
        assert len(p) == len(gen) - comp.startswith("\n")  # (the tiny tokenizer merges "\n\n" as Qwen2's does)


def test_tool_calls_are_refused_not_dropped(tiny):
    """Only role and content are rendered: an assistant turn that is a tool call trained as an empty reply."""
    call = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    with pytest.raises(ValueError, match="message 1: has 'tool_calls'"):
        to_messages({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": call}]})
    with pytest.raises(ValueError, match="'completion': has 'tool_calls'"):
        to_kto({"prompt": "x", "completion": [{"role": "assistant", "content": "", "tool_calls": call}], "label": True})
    with pytest.raises(ValueError, match="prompt message 0: has 'function_call'"):
        to_kto({"prompt": [{"role": "user", "content": "x", "function_call": {"name": "f"}}], "completion": "y",
                "label": True})
    assert to_messages({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y",
                                                                          "tool_calls": []}]})  # none: fine


@pytest.mark.parametrize("line,pattern", [
    ('{"prompt": "x", "completion": "y"}', r"bad.jsonl:2: expected 'completion' and a boolean 'label'"),
    ('{"prompt": "x", "completion": "y", "label": "yes"}', r"bad.jsonl:2: expected 'completion' and a boolean"),
    ('{"prompt": "x", "chosen": "y"}', r"bad.jsonl:2: paired format without 'rejected'"),
    ('{"prompt": "x", "chosen": "y", "rejected": 3}', r"bad.jsonl:2: 'rejected' must be a string"),
    ('{"prompt": "x", "chosen": "y", "rejected": "z", "label": false}', r"bad.jsonl:2: has both 'chosen'/'rejected' and"),
    ('{"prompt": [{"role": "robot", "content": "x"}], "completion": "y", "label": true}', r"bad.jsonl:2: prompt message 0"),
    ('{"completion": "y", "label": true}', r"bad.jsonl:2: 'prompt' must be"),
    ('not json', r"bad.jsonl:2: not valid JSON"),
])
def test_bad_lines_stop_before_anything_is_written(tiny, tmp_path, line, pattern):
    import re
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(KTO_DATA).readline() + line + "\n")
    r = run_main(TRAIN_KTO, "--model", tiny, "--data", bad, "--out", tmp_path / "out", "--max-steps", 1)
    assert r.returncode != 0 and re.search(pattern, r.stderr), r.stderr
    assert not (tmp_path / "out").exists()
    r = run_main(TRAIN_KTO, "--model", tiny, "--data", bad, "--out", tmp_path / "out2", "--max-steps", 1,
                 "--batch-size", 1, "--loss-type", "apo_zero_unpaired", "--skip-bad-lines")  # (kto needs 2 a batch)
    assert r.returncode == 0 and "skipped 1 bad line" in r.stdout, r.stderr
    with pytest.raises(DataError, match="empty file"):
        (tmp_path / "empty.jsonl").write_text("\n")
        load_kto([str(tmp_path / "empty.jsonl")], nanopost.Tokenizer(tiny), 64)
    # --max-len 1 leaves no completion token predicted from a prompt one: refused, not trained at log-prob 0
    with pytest.raises(DataError, match="no completion token left after truncation to --max-len 1"):
        load_kto([KTO_DATA], nanopost.Tokenizer(tiny), 1)
    assert len(load_kto([KTO_DATA], nanopost.Tokenizer(tiny), 2)[0]) == 24


def test_imbalance_warning_suggests_weights(tiny, tmp_path):
    r = run_main(TRAIN_KTO, "--model", tiny, *COMMON, "--max-steps", 1, "--out", tmp_path / "w",
                 "--desirable-weight", 3)
    assert r.returncode == 0 and "outside [1, 4/3]: use --desirable-weight in [1.00, 1.33]" in r.stdout, r.stdout
    assert "cut to --max-len" not in r.stdout
    r = run_main(TRAIN_KTO, "--model", tiny, *COMMON, "--max-steps", 1, "--out", tmp_path / "c", "--max-len", 2)
    assert r.returncode == 0 and "warning: 24 of 24 completions were cut to --max-len 2 tokens" in r.stdout, r.stdout


def test_defaults_are_trls_and_the_balance_rule_and_its_advice_hold(tiny, tmp_path):
    """lr and beta default to TRL's KTOConfig; no warning inside [1, 4/3] (both ends); outside it,
    either suggested range, taken at its ends, lands inside; one-sided data is named as such."""
    trl = pytest.importorskip("trl")
    from nanopost.testing import load_script
    kto = load_script(TRAIN_KTO)
    args = kto.parse_args(["--model", tiny, "--data", KTO_DATA, "--out", str(tmp_path / "x")])
    import dataclasses
    config = {f.name: f.default for f in dataclasses.fields(trl.KTOConfig)}  # (an instance asks for a GPU's bf16)
    assert (args.lr, args.beta, args.desirable_weight, args.undesirable_weight, args.loss_type) == \
        tuple(config[k] for k in ("learning_rate", "beta", "desirable_weight", "undesirable_weight", "loss_type"))
    for n_d, n_u, w_d, w_u in ((4, 3, 1, 1), (3, 3, 1, 1), (12, 12, 1, 0.75), (3, 4, 4 / 3, 1)):
        assert kto.balance_note(n_d, n_u, SimpleNamespace(desirable_weight=w_d, undesirable_weight=w_u)) is None
    notes = 0
    for n_d in range(1, 40, 3):  # every printed end, given as the flag, passes the check itself
        for n_u in range(1, 60, 4):
            for w_d, w_u in ((1, 1), (3, 1), (1, 0.3), (1e-9, 1), (1e307, 1)):
                note = kto.balance_note(n_d, n_u, SimpleNamespace(desirable_weight=w_d, undesirable_weight=w_u))
                if note is None or w_d == 1e307:  # (1e307: past what printing inward takes on; it must not crash)
                    continue
                notes += 1
                d = re.search(r"--desirable-weight in \[(\S+), (\S+)\]", note).groups()
                u = re.search(r"--undesirable-weight in \[(\S+), (\S+)\]", note).groups()
                assert float(d[0]) < float(d[1]) and float(u[0]) < float(u[1]), note
                for x in d:
                    assert kto.balance_note(n_d, n_u, SimpleNamespace(desirable_weight=float(x), undesirable_weight=w_u)) \
                        is None, (n_d, n_u, w_d, w_u, note)
                for x in u:
                    assert kto.balance_note(n_d, n_u, SimpleNamespace(desirable_weight=w_d, undesirable_weight=float(x))) \
                        is None, (n_d, n_u, w_d, w_u, note)
    assert notes > 500
    assert kto.balance_note(7, 25, SimpleNamespace(desirable_weight=1, undesirable_weight=1)).endswith(
        "use --desirable-weight in [3.58, 4.76] or --undesirable-weight in [0.21, 0.27] (not both)")  # 0.28: ratio 0.99999...
    one = SimpleNamespace(desirable_weight=1, undesirable_weight=1)
    assert "only desirable examples" in kto.balance_note(4, 0, one)
    assert "only undesirable examples" in kto.balance_note(0, 4, one)


@pytest.mark.parametrize("line,why", [
    ({"prompt": "x", "completion": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
      "label": True}, "'completion' must be a string or a list of one assistant message"),
    ({"prompt": "x", "completion": [{"role": "user", "content": "a"}], "label": True}, "one assistant message"),
    ({"prompt": "x", "completion": "y", "label": 1}, "a boolean 'label'"),
    ({"prompt": "x", "completion": "y", "label": 0}, "a boolean 'label'"),
    ({"prompt": [], "completion": "y", "label": True}, "'prompt' must be a string or a non-empty list"),
])
def test_completions_labels_and_prompts_of_another_shape_are_refused(tiny, tmp_path, line, why):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(KTO_DATA).readline() + json.dumps(line) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:2: .*" + re.escape(why)):
        load_kto([str(bad)], nanopost.Tokenizer(tiny), 64)


def test_a_cut_prompt_is_not_counted_as_a_cut_completion(tiny, tmp_path):
    tok = nanopost.Tokenizer(tiny)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "word " * 80, "completion": "Short answer.", "label": True}) + "\n" +
                    json.dumps({"prompt": "Hi?", "completion": "word " * 80, "label": False}) + "\n")
    examples, stats = load_kto([str(data)], tok, 80)
    assert (stats["prompts_cut"], stats["completions_cut"]) == (1, 1), stats  # one of each, each counted once
    assert all(len(e.prompt) + len(e.completion) <= 80 for e in examples)
    assert examples[0].completion == encode_kto(tok, to_kto(json.loads(data.read_text().splitlines()[0]))[0][0],
                                                "Short answer.")[1]  # the first one's completion whole


def test_precomputed_reference_cache_is_keyed_on_everything_it_holds(tiny, tmp_path):
    """The cache of reference log-probs is found again only for the same reference (its config and
    weights), tokens (--max-len: also where only a KL pair, a prompt with another's completion, is
    cut), precision, loss type (kto also holds the KL pairs') and validation set."""
    import shutil
    from nanopost.testing import make_tiny_checkpoint
    other = make_tiny_checkpoint(str(tmp_path / "other"), seed=1)
    ref = shutil.copytree(tiny, tmp_path / "ref")
    out, args = tmp_path / "k", ["--model", tiny, *COMMON, "--max-steps", 1, "--precompute-ref"]

    def caches_after(*extra):
        r = run_main(TRAIN_KTO, *args, "--out", out, "--overwrite", *extra)
        assert r.returncode == 0, r.stderr
        return len(os.listdir(out / "ref_logps")), "computed once" in r.stdout
    assert caches_after() == (1, True)
    assert caches_after() == (1, False)  # the same run reuses it
    assert caches_after("--ref", other) == (2, True)
    assert caches_after("--max-len", 48) == (3, True)
    assert caches_after("--precision", "bf16-autocast") == (4, True)
    assert caches_after("--loss-type", "apo_zero_unpaired") == (5, True)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}.", "label": i % 2 == 0}) + "\n"
                           for i in range(4)))
    assert caches_after("--val", val) == (6, True)
    val.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}.", "label": i % 2 == 0}) + "\n"
                           for i in range(3)))
    assert caches_after("--val", val) == (7, True)
    assert caches_after("--ref", ref) == (7, False)  # a copy of the reference: its files, so its cache
    cfg = json.load(open(ref / "config.json"))
    json.dump({**cfg, "rope_theta": 50.0}, open(ref / "config.json", "w"))  # the same weights, another model
    assert caches_after("--ref", ref) == (8, True)
    # a KL pair cut where its two examples are not: prompt A (long) with completion B (long)
    tok = nanopost.Tokenizer(tiny)
    rows = [{"prompt": "word " * 30, "completion": "Yes.", "label": True},
            {"prompt": "Hi?", "completion": "word " * 30, "label": False}] * 2
    lens = [sum(map(len, encode_kto(tok, [{"role": "user", "content": r["prompt"]}], r["completion"]))) for r in rows]
    long_pair = sum(map(len, encode_kto(tok, [{"role": "user", "content": rows[0]["prompt"]}], rows[1]["completion"])))
    assert max(lens) < 120 < long_pair < 200, (lens, long_pair)
    kl = tmp_path / "kl.jsonl"
    kl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", tiny, "--ref", other, "--data", kl, "--batch-size", 4, "--lr", 1e-12, "--max-steps", 1,
            "--precompute-ref", "--device", "cpu"]
    for max_len in (200, 120):
        assert run_main(TRAIN_KTO, *args, "--max-len", max_len, "--out", out, "--overwrite").returncode == 0
        pre = metrics(out)[0]
        assert run_main(TRAIN_KTO, *args[:-3], "--device", "cpu", "--max-len", max_len, "--out", tmp_path / "live",
                        "--overwrite").returncode == 0
        assert pre["kl"] == pytest.approx(metrics(tmp_path / "live")[0]["kl"], rel=1e-5), max_len


def test_resume_refuses_other_loss_settings_or_labels(tiny, tmp_path):
    flipped = tmp_path / "flipped.jsonl"
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 3 != 0} for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flipped.write_text("".join(json.dumps({**r, "label": not r["label"]}) + "\n" for r in rows))  # same text
    args = ["--model", tiny, "--max-len", 64, "--batch-size", 4, "--save-every", 1, "--out", tmp_path / "run"]
    assert run_main(TRAIN_KTO, *args, "--data", data, "--max-steps", 1).returncode == 0
    for extra, why in ((["--data", data, "--beta", 0.5], "--beta 0.1, this run has --beta 0.5"),
                       (["--data", data, "--undesirable-weight", 2], "undesirable"),
                       (["--data", flipped], "training data")):
        r = run_main(TRAIN_KTO, *args, *extra, "--max-steps", 2, "--resume")
        assert r.returncode != 0 and why in r.stderr, (extra, r.stderr)
    assert run_main(TRAIN_KTO, *args, "--data", data, "--max-steps", 2, "--resume").returncode == 0


def test_epochs_reshuffle_the_same_groups_and_count_each_kind(tiny, tmp_path):
    """Each epoch runs the same micro-batches in another order (seeded by the epoch); a step's
    n_desirable and n_undesirable count its examples of each kind (7 of 12 desirable here)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i} " * (1 + i % 4),
                                        "label": i < 7}) + "\n" for i in range(12)))
    r = run_main(TRAIN_KTO, "--model", tiny, "--data", data, "--max-len", 64, "--batch-size", 2, "--lr", 1e-12,
                 "--epochs", 2, "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    m = metrics(tmp_path / "run")
    assert len(m) == 12 and m[5]["epoch"] == 1 and m[11]["epoch"] == 2
    per_step = [(x["n_desirable"], x["n_undesirable"], round(x["logps/chosen"] or 0, 3), round(x["logps/rejected"] or 0, 3))
                for x in m]
    assert sorted(per_step[:6]) == sorted(per_step[6:]) and per_step[:6] != per_step[6:]
    assert sum(x["n_desirable"] for x in m[:6]) == 7 and sum(x["n_undesirable"] for x in m[:6]) == 5


def test_an_epochs_smaller_last_step_is_a_step_of_its_own_micro_batches(tiny, tmp_path):
    """24 examples in micro-batches of 5 are 5 groups: with --grad-accum 2 the epoch's last step holds
    one, and it is that group's step as --grad-accum 1 runs it (lr 1e-12: the policy does not move):
    its loss, z0 (the KL term) and gradient norm, not halved as if a second micro-batch were there."""
    import shutil
    policy = shutil.copytree(tiny, tmp_path / "policy")  # another model than its reference: nothing is 0
    json.dump({**json.load(open(policy / "config.json")), "rope_theta": 50.0}, open(policy / "config.json", "w"))
    common = ["--model", policy, "--ref", tiny, *COMMON, "--batch-size", 5, "--epochs", 1, "--lr", 1e-12]
    for accum in (1, 2):
        r = run_main(TRAIN_KTO, *common, "--grad-accum", accum, "--out", tmp_path / f"a{accum}")
        assert r.returncode == 0, r.stderr
    one, two = metrics(tmp_path / "a1"), metrics(tmp_path / "a2")
    assert len(one) == 5 and len(two) == 3
    for key in ("loss", "kl", "grad_norm", "rewards/chosen", "rewards/rejected", "n_desirable"):
        assert two[-1][key] == pytest.approx(one[-1][key], rel=1e-4), key
    assert one[-1]["kl"] > 0.01


def test_a_precompute_ref_run_killed_before_its_first_checkpoint_resumes(tiny, tmp_path):
    """A kill before the first checkpoint leaves ref_logps/ beside args.json and metrics.jsonl:
    --resume refused that folder as "not a run to continue"; it starts from step 0, reusing the cache."""
    import shutil
    out = tmp_path / "k"
    args = ["--model", tiny, *COMMON, "--max-steps", 2, "--precompute-ref", "--out", out]
    r = run_main(TRAIN_KTO, *args)
    assert r.returncode == 0, r.stderr
    for name in os.listdir(out):  # what the kill would have left
        if name not in ("ref_logps", "args.json", "metrics.jsonl"):
            shutil.rmtree(out / name) if (out / name).is_dir() else os.remove(out / name)
    r = run_main(TRAIN_KTO, *args, "--resume")
    assert r.returncode == 0 and "starting from step 0" in r.stdout, r.stderr
    assert "reference log-probs: " in r.stdout and "computed once" not in r.stdout


@pytest.mark.parametrize("argv,message", [
    (["--beta", 0], "--beta, --desirable-weight and --undesirable-weight must be positive numbers"),
    (["--beta", "nan"], "must be positive numbers"),  # (trained to a NaN loss and saved NaN weights)
    (["--desirable-weight", "inf"], "must be positive numbers"),
    (["--undesirable-weight", 0], "must be positive numbers"),  # (a ZeroDivisionError in the balance note)
    (["--lr", "nan"], "--lr must be a positive number"),  # the flags both scripts share, checked here too
    (["--batch-size", 1], "--batch-size 1: KTO pairs each prompt"),  # (its KL term was the implied reward itself)
])
def test_kto_flags_that_cannot_work_are_refused(tiny, tmp_path, argv, message):
    r = run_main(TRAIN_KTO, "--model", tiny, *COMMON, "--out", tmp_path / "x", *argv)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_out_is_never_the_ref_a_symlinked_ref_resumes_and_cut_counts_are_of_what_was_read(tiny, tmp_path):
    import shutil
    ref = shutil.copytree(tiny, tmp_path / "ref")
    before = open(ref / "model.safetensors", "rb").read()
    for extra in ((), ("--overwrite",)):
        r = run_main(TRAIN_KTO, "--model", tiny, "--ref", ref, *COMMON, "--max-steps", 1, "--out", ref, *extra)
        assert r.returncode != 0 and "is the --ref folder" in r.stderr, r.stderr
    assert open(ref / "model.safetensors", "rb").read() == before
    link = tmp_path / "link"
    os.symlink(ref, link)  # the same reference, spelled another way, resumes (as --model does)
    args = ["--model", tiny, *COMMON, "--save-every", 1, "--out", tmp_path / "run"]
    r = run_main(TRAIN_KTO, *args, "--ref", link, "--max-steps", 1)
    assert r.returncode == 0, r.stderr
    r = run_main(TRAIN_KTO, *args, "--ref", ref, "--max-steps", 2, "--resume")
    assert r.returncode == 0, r.stderr
    r = run_main(TRAIN_KTO, "--model", tiny, "--data", KTO_DATA, "--max-len", 3, "--batch-size", 2, "--max-steps", 1,
                 "--val-fraction", 0.5, "--out", tmp_path / "cut")
    assert r.returncode == 0, r.stderr
    m = re.search(r"of the (\d+) read, \d+ prompts and (\d+) completions cut", r.stdout)
    assert m and int(m.group(2)) <= int(m.group(1)), r.stdout
    assert re.search(rf"warning: {m.group(2)} of {m.group(1)} completions", r.stdout), r.stdout


def test_no_micro_batch_holds_one_example_alone(tiny, tmp_path):
    """An example alone in its micro-batch is its own KL pair (z0 its own log-ratio): the last of a
    cut that leaves one over joins the group before it, and a set of one example is refused."""
    for n in range(2, 30):
        for bs in range(2, 9):
            groups = kto_groups(n, bs, seed=n)
            assert sorted(sum(groups, [])) == list(range(n)) and min(map(len, groups)) >= 2, (n, bs, groups)
            assert max(map(len, groups)) <= bs + 1 and sum(len(g) == bs + 1 for g in groups) <= 1
    assert [len(g) for g in kto_groups(7, 3, seed=0)] == [3, 4]
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "hi", "completion": "hello", "label": True}) + "\n")
    r = run_main(TRAIN_KTO, "--model", tiny, "--data", one, "--out", tmp_path / "x", "--max-steps", 1)
    assert r.returncode == 1 and "--data holds one example" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_sft_data_given_to_kto_says_so(tiny, tmp_path):
    r = run_main(TRAIN_KTO, "--model", tiny, "--data", os.path.join(ROOT, "tests", "data", "chat.jsonl"),
                 "--out", tmp_path / "x", "--max-steps", 1)
    assert r.returncode != 0 and "chat.jsonl:1: an SFT chat line ('messages'): train_sft.py reads these" in r.stderr, r.stderr


def test_a_checkpoint_from_before_the_regrouping_is_not_resumed_into_other_micro_batches(tiny, tmp_path):
    """7 examples in micro-batches of 2 left the 7th alone (its own KL pair); now it joins the group
    before. A checkpoint written under the old grouping (its meta has no micro_batches) would resume
    with other groups and the same step count: an example skipped that epoch, silently."""
    rows = [json.loads(x) for x in open(KTO_DATA, encoding="utf-8").read().splitlines() if x.strip()]
    flat = []
    for r in rows:
        flat += ([{"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                  {"prompt": r["prompt"], "completion": r["rejected"], "label": False}] if "chosen" in r else [r])
    data = tmp_path / "seven.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in flat[:7]))
    common = ["--model", tiny, "--data", data, "--max-len", 64, "--batch-size", 2, "--grad-accum", 2, "--lr", 1e-3,
              "--save-every", 1, "--out", tmp_path / "run"]
    assert run_main(TRAIN_KTO, *common, "--max-steps", 1).returncode == 0
    state = next((tmp_path / "run" / "checkpoints").iterdir()) / "trainer_state.json"
    saved = json.loads(state.read_text())
    text = state.read_text()
    state.write_text(json.dumps({**saved, "meta": {k: v for k, v in saved["meta"].items() if k != "micro_batches"}}))
    r = run_main(TRAIN_KTO, *common, "--max-steps", 3, "--resume")
    assert r.returncode != 0 and "KTO's micro-batches" in r.stderr, r.stderr
    state.write_text(text)
    r = run_main(TRAIN_KTO, *common, "--max-steps", 3, "--resume")  # the same grouping resumes
    assert r.returncode == 0 and "at step 1" in r.stdout, r.stderr
