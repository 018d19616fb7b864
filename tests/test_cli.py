"""The command-line entry points run as a user runs them."""
import os
import subprocess
import sys

import nanopost
from nanopost.engine import Engine, Sampling


def run(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, **kw)


def test_chat_one_prompt_streams_the_greedy_reply(tiny):
    r = run("-m", "nanopost.chat", "--model", tiny, "--prompt", "Hello there", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    model, tok = nanopost.load(tiny)
    expected = Engine(model, tok).generate(["Hello there"], Sampling(max_new_tokens=12))[0]
    assert r.stdout.rstrip("\n") == expected.rstrip("\n")


def test_chat_interactive_reset_and_quit(tiny):
    r = run("-m", "nanopost.chat", "--model", tiny, "--max-new-tokens", "4", input="hi\n/reset\nagain\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 4


def test_chat_says_a_message_with_a_byte_that_is_not_utf8_was_not_sent_and_goes_on(tiny):
    """One pasted Latin-1 line ended the session with a TypeError traceback, its history lost."""
    r = subprocess.run([sys.executable, "-m", "nanopost.chat", "--model", tiny, "--max-new-tokens", "4"],
                       input=b"hi \xff\nhi\n/quit\n", capture_output=True, timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 0 and "Traceback" not in r.stderr.decode(), r.stderr
    assert "[your message's content is not valid Unicode text: a lone surrogate U+DCFF at character 3" in out, out
    model, tok = nanopost.load(tiny)
    assert out.count(Engine(model, tok).generate(["hi"], Sampling(max_new_tokens=4))[0]) == 1  # the next line answered
    r = subprocess.run([sys.executable, "-m", "nanopost.chat", "--model", tiny, "--prompt", b"hi \xff"],
                       capture_output=True, timeout=120)
    assert r.returncode == 1 and r.stderr.decode().startswith("error: the prompt's content is not valid Unicode"), r.stderr


def test_chat_skips_empty_lines_and_says_when_a_message_is_past_the_context(tiny):
    """An empty line was sent as an empty turn; a prompt past max_position_embeddings (2048 here) was
    answered (garbage) with no word, where the server refuses it as context_length_exceeded."""
    long = "word " * 3000
    r = run("-m", "nanopost.chat", "--model", tiny, "--max-new-tokens", "4", input=f"\n{long}\nhi\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[the conversation is ") == 1 and "the model's context 2048: this message was not sent" in r.stdout
    model, tok = nanopost.load(tiny)
    assert r.stdout.count(Engine(model, tok).generate(["hi"], Sampling(max_new_tokens=4))[0]) == 1  # answered alone
    r = run("-m", "nanopost.chat", "--model", tiny, "--prompt", long)
    assert r.returncode == 1 and "error: the conversation is" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_chat_keeps_the_reply_inside_the_context_and_the_system_prompt_after_reset(tiny, tmp_path, monkeypatch, capsys):
    """A prompt exactly the context's length is refused in one line (a reply needs room for a token);
    a reply stops at the context's end, whatever --max-new-tokens says; /reset starts again from
    --system, not from the default system prompt; a character streamed one byte token at a time is
    printed whole once its last byte arrives."""
    import io

    import pytest

    from nanopost import chat
    from nanopost.testing import make_tiny_checkpoint
    tok = nanopost.Tokenizer(tiny)
    n = len(tok.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)[0])
    sent, generate = [], chat.Engine.generate_ids

    def spy(self, prompts, s, **kw):
        out = generate(self, prompts, s, **kw)
        sent.append((self.tok.decode(prompts[0]), len(prompts[0]) + len(out[0])))
        return out
    monkeypatch.setattr(chat.Engine, "generate_ids", spy)
    full = make_tiny_checkpoint(str(tmp_path / "full"), max_position_embeddings=n)
    with pytest.raises(SystemExit, match=f"error: the conversation is {n} tokens, the model's context {n}$"):
        chat.main(["--model", full, "--prompt", "hi", "--max-new-tokens", "64"])
    room = make_tiny_checkpoint(str(tmp_path / "room"), max_position_embeddings=n + 8)
    chat.main(["--model", room, "--prompt", "hi", "--max-new-tokens", "64"])
    assert sent[-1][1] <= n + 8
    sent.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/reset\nhi\n"))
    chat.main(["--model", tiny, "--system", "You are a pirate.", "--max-new-tokens", "4"])
    assert len(sent) == 2 and sent[0][0] == sent[1][0] and "You are a pirate." in sent[0][0]
    capsys.readouterr()
    ids = tok.encode("龍!")
    assert len(ids) > 2  # (the tiny tokenizer spells 龍 in byte tokens)
    streamer, shown = chat.Streamer(tok), []
    for t in ids:
        streamer([0], [t], [False])
        shown.append(capsys.readouterr().out)
    assert "".join(shown) == "龍!" and "\ufffd" not in "".join(shown) and shown[0] == ""


def test_the_tiny_checkpoint_command_takes_only_folders_it_could_have_written(tmp_path):
    """nanopost.testing's CLI replaces a folder only if it is its own: marked, or the five files of a
    tiny checkpoint of its shape (written before the mark), or only what a killed save left; a
    user's model with the same five files and no mark is not."""
    from nanopost.testing import MARKER, make_tiny_checkpoint, ours
    users = make_tiny_checkpoint(str(tmp_path / "users"), hidden_size=32, intermediate_size=64)
    old = make_tiny_checkpoint(str(tmp_path / "old"))
    for d in (users, old):
        os.remove(os.path.join(d, MARKER))
    assert not ours(users) and ours(old)
    (tmp_path / "killed" / ".tmp-save-ab12cd34").mkdir(parents=True)
    assert ours(str(tmp_path / "killed"))


def test_chat_ctrl_c_stops_a_reply_and_the_conversation_goes_on(tiny, monkeypatch, capsys):
    """Ctrl-C during a runaway reply stops it (a traceback ended the session): the turn is dropped,
    the next prompt is answered; at the prompt it ends the session; with --prompt it exits 130."""
    import io

    import pytest

    from nanopost import chat
    real, seen = Engine.generate_ids, []

    def first_interrupted(self, prompts, *a, **kw):
        seen.append(self.tok.decode(prompts[0], skip_special_tokens=False))
        if len(seen) == 1:
            raise KeyboardInterrupt
        return real(self, prompts, *a, **kw)
    monkeypatch.setattr(Engine, "generate_ids", first_interrupted)
    monkeypatch.setattr("sys.stdin", io.StringIO("runaway question\nsecond question\n/quit\n"))

    def main(*argv):  # a Ctrl-C that escapes would stop the whole test session: a failure instead
        try:
            chat.main(list(argv))
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped nanopost.chat")
    main("--model", tiny, "--max-new-tokens", "4")
    assert "[interrupted]" in capsys.readouterr().out
    assert len(seen) == 2 and "second question" in seen[1] and "runaway question" not in seen[1]
    seen.clear()
    with pytest.raises(SystemExit) as e:
        main("--model", tiny, "--prompt", "x")
    assert e.value.code == 130

    def ctrl_c(prompt=""):
        raise KeyboardInterrupt
    monkeypatch.setattr("builtins.input", ctrl_c)
    main("--model", tiny)  # returns: the session ends


def test_help_and_bad_model(tmp_path):
    assert "--temperature" in run("-m", "nanopost.chat", "--help").stdout
    r = run("-m", "nanopost.chat", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode != 0 and "missing: no such directory" in r.stderr
    for flag, value, why in (("--max-new-tokens", 0, "at least 1"), ("--top-p", 1.5, "in (0, 1]"),
                             ("--temperature", -1, ">= 0"), ("--repetition-penalty", 0, "> 0")):
        r = run("-m", "nanopost.chat", "--model", str(tmp_path / "missing"), "--prompt", "x", flag, str(value))
        assert r.returncode == 2 and f"error: {flag} = " in r.stderr and why in r.stderr, r.stderr  # before loading
    r = run("-m", "nanopost.testing", str(tmp_path / "t"))
    assert r.returncode == 0 and nanopost.load(str(tmp_path / "t"))[0].config.hidden_size == 64


def test_the_tiny_checkpoint_command_replaces_only_its_own_folders(tmp_path):
    """The README runs `python -m nanopost.testing runs/tiny` more than once; a typo (runs/sft, runs)
    must not replace a trained run or a folder of runs with a random checkpoint."""
    tiny = str(tmp_path / "runs" / "tiny")
    for _ in range(2):  # again into its own folder: replaced, as before
        r = run("-m", "nanopost.testing", tiny)
        assert r.returncode == 0 and nanopost.load(tiny), r.stderr
    sft = tmp_path / "runs" / "sft"
    sft.mkdir()
    (sft / "metrics.jsonl").write_text("{}\n")
    for target in (sft, tmp_path / "runs"):
        r = run("-m", "nanopost.testing", str(target))
        assert r.returncode == 2 and "not a checkpoint this command wrote" in r.stderr, r.stderr
    assert (sft / "metrics.jsonl").read_text() == "{}\n" and sorted(os.listdir(tmp_path / "runs")) == ["sft", "tiny"]
    for kept in ("sft", "notes.txt"):  # its own folder, once a user keeps work inside it: refused, nothing goes
        os.makedirs(os.path.join(tiny, "sft"), exist_ok=True)
        open(os.path.join(tiny, kept if kept != "sft" else "sft/metrics.jsonl"), "w").close()
        r = run("-m", "nanopost.testing", tiny)
        assert r.returncode == 2 and f"holds {kept}" in r.stderr and "not a checkpoint this command wrote" in r.stderr, r.stderr
        assert os.path.exists(os.path.join(tiny, "sft", "metrics.jsonl"))


def test_an_out_that_cannot_be_written_is_one_line_before_any_work(tiny, tmp_path):
    """merge.py, evaluate.py and nanopost.testing found an --out they could not write by a traceback,
    after the merge had run or the model had loaded (training and build_data said so in one line):
    under a file, on a read-only mount (where this machine lets us mount one), a resume whose
    checkpoints/ is read-only."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "afile").write_text("")
    ro = tmp_path / "ro"
    ro.mkdir()
    try:
        mounted = run_cmd(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(ro)]).returncode == 0
    except OSError:
        mounted = False
    try:
        outs = [(tmp_path / "afile" / "x", "is a file, not a directory")]
        outs += [(ro / "x", "Read-only file system"), (ro, "not writable")] if mounted else []
        for out, why in outs:
            for argv in ([os.path.join(root, "merge.py"), "--method", "linear", "--models", tiny, tiny, "--out", out],
                         [os.path.join(root, "evaluate.py"), "--model", tiny, "--tasks", "gsm8k", "--limit", "2",
                          "--data-dir", os.path.join(root, "data", "mini"), "--out", out],
                         ["-m", "nanopost.testing", out]):
                r = run(*map(str, argv))
                assert r.returncode in (1, 2) and why in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
        if mounted:  # a run whose checkpoints/ cannot be written: said before a step is trained
            run_dir = tmp_path / "run"
            common = ["--model", tiny, "--data", os.path.join(root, "tests", "data", "chat.jsonl"), "--out", run_dir,
                      "--max-len", "64", "--batch-size", "2", "--max-steps", "2", "--save-every", "1"]
            assert run(os.path.join(root, "train_sft.py"), *map(str, common)).returncode == 0
            assert run_cmd(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(run_dir / "checkpoints")]).returncode == 0
            try:
                r = run(os.path.join(root, "train_sft.py"), *map(str, common), "--resume", "--max-steps", "3")
                assert r.returncode == 1 and "checkpoints not writable" in r.stderr and "Traceback" not in r.stderr, r.stderr
                assert len(open(run_dir / "metrics.jsonl").readlines()) == 2  # no step trained
            finally:
                run_cmd(["umount", str(run_dir / "checkpoints")])
    finally:
        if mounted:
            run_cmd(["umount", str(ro)])


def run_cmd(argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)
