"""Talk to a checkpoint in the terminal, with streaming output.

    python -m nanopost.chat --model Qwen/Qwen2-0.5B-Instruct
    python -m nanopost.chat --model runs/sft --temperature 0.7 --top-p 0.8
    python -m nanopost.chat --model DIR --prompt "What is 17*23?"   # one turn, then exit

Commands inside the chat: /reset clears the conversation, /quit (or Ctrl-D) leaves. Each line is a
turn (a pasted text of several lines is several turns: join them first)."""
import argparse
import contextlib
import dataclasses
import sys

import torch

import nanopost
from nanopost.checkpoint import CheckpointError
from nanopost.engine import Engine, Sampling


class Streamer:
    """Prints a row's new text as tokens arrive, holding back bytes of an unfinished character."""

    def __init__(self, tok):
        self.tok, self.ids, self.printed = tok, [], 0

    def __call__(self, step, tokens, done):
        if done[0] and tokens[0] in self.tok.eos_ids:
            return
        self.ids.append(tokens[0])
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[self.printed:])
            sys.stdout.flush()
            self.printed = len(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=nanopost.HelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--system", default=None, help="system prompt (default: the checkpoint's template default)")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens per reply")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=nanopost.device_arg,
                   help="cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    try:
        s = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                     top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as e:  # (said before the model loads)
        p.error(f"--{str(e).replace('_', '-')}")
    try:
        model, tok = nanopost.load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    except (CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    engine = Engine(model, tok)
    if sys.stdin.isatty():  # input() through readline: line editing, and no 4095-character cut of a long paste
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401
    context = model.config.max_position_embeddings
    start = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages = list(start)
    while True:
        if args.prompt is not None:
            user = args.prompt
        else:
            try:
                user = input("\n> ")
            except (EOFError, KeyboardInterrupt):
                print()
                break
            if user.strip() == "/quit":
                break
            if user.strip() == "/reset":
                messages = list(start)
                continue
            if not user.strip():  # an empty line is no turn
                continue
        messages.append({"role": "user", "content": user})
        streamer = Streamer(tok)
        try:
            ids = tok.render(messages, add_generation_prompt=True)[0]
        except ValueError as e:  # a byte that is not UTF-8 in what was typed or pasted
            messages.pop()
            said = str(e).replace(f"message {len(messages)}", "the prompt" if args.prompt is not None else "your message")
            if args.prompt is not None:
                sys.exit(f"error: {said}")
            print(f"[{said}: it was not sent]", flush=True)
            continue
        if len(ids) >= context:  # past what the model was trained on: garbage, said instead (as the server does)
            messages.pop()
            msg = f"the conversation is {len(ids)} tokens, the model's context {context}"
            if args.prompt is not None:
                sys.exit(f"error: {msg}")
            print(f"[{msg}: this message was not sent; /reset starts afresh]", flush=True)
            continue
        try:  # (a reply stops at the end of the context, as the server's)
            new = engine.generate_ids([ids], dataclasses.replace(s, max_new_tokens=min(s.max_new_tokens, context - len(ids))),
                                      on_token=streamer)[0]
        except KeyboardInterrupt:  # a runaway reply: stopped; the conversation goes on without that turn
            messages.pop()
            print("\n[interrupted]", flush=True)
            if args.prompt is not None:
                sys.exit(130)
            continue
        reply = tok.decode(new)
        sys.stdout.write(reply[streamer.printed:] + "\n")
        messages.append({"role": "assistant", "content": reply})
        if args.prompt is not None:
            break


if __name__ == "__main__":
    main()
