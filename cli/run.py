"""`fermi run PROMPT`: one user message, the answer streamed to stdout."""

from __future__ import annotations

import sys

from .common import add_generation_args, add_model_args, load_engine, sampling_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="answer one prompt and exit")
    p.add_argument("prompt", help="the prompt, or - to read it from stdin")
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--show-thinking", action="store_true", help="print the reasoning to stdout too")
    p.add_argument("--verbose", "-v", action="store_true", help="a stats line on stderr after the answer")
    p.set_defaults(func=run)


def run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    engine = load_engine(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    out, err = sys.stdout, sys.stderr
    dim = err.isatty()
    stream = engine.session().chat(messages, args.thinking, max_new_tokens=args.max_new_tokens,
                                   stop=args.stop, **sampling_kwargs(args))
    kind = "content"
    for rec in stream:
        if not hasattr(rec, "kind"):
            done = rec
            break
        if rec.kind == "reasoning" and not args.show_thinking:
            err.write(f"\x1b[2m{rec.text}\x1b[0m" if dim else rec.text)
            err.flush()
            kind = rec.kind
            continue
        if args.show_thinking and rec.kind != kind:
            out.write("<think>\n" if rec.kind == "reasoning" else "\n</think>\n\n")
        elif kind == "reasoning" and not args.show_thinking:
            err.write("\n")
        kind = rec.kind
        out.write(rec.text)
        out.flush()
    if args.show_thinking and kind == "reasoning":
        out.write("\n</think>\n")
    out.write("\n")
    out.flush()
    if args.verbose:
        r = engine.runtime
        print(f"prompt {done.prompt_tokens} tokens ({done.cached_tokens} cached) · generated {done.completion_tokens} "
              f"· ttft {done.ttft * 1000:.0f} ms · {done.decode_tps:.1f} tok/s · {r.backend} {r.dtype} "
              f"· finish {done.finish_reason}", file=err)
    return 0
