"""`fermi run PROMPT`: one user message, the answer streamed to stdout."""

from __future__ import annotations

import sys

from fermi.serving import Done

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
    request = engine.request(messages, args.thinking, args.max_new_tokens, args.stop, **sampling_kwargs(args))
    stream = engine.scheduler().run(request)
    out, err = sys.stdout, sys.stderr
    shown = "content"  # the kind of the text last written to stdout
    thought = False  # reasoning went to stderr without its closing newline
    for rec in stream:
        if isinstance(rec, Done):
            break
        if rec.kind == "reasoning" and not args.show_thinking:
            err.write(f"\x1b[2m{rec.text}\x1b[0m" if err.isatty() else rec.text)
            err.flush()
            thought = True
            continue
        if thought:
            err.write("\n")
            thought = False
        if args.show_thinking and rec.kind != shown:
            out.write("<think>\n" if rec.kind == "reasoning" else "\n</think>\n\n")
        shown = rec.kind
        out.write(rec.text)
        out.flush()
    out.write("\n</think>\n" if shown == "reasoning" else "\n")
    out.flush()
    if args.verbose:
        r = engine.runtime
        print(f"prompt {rec.prompt_tokens} tokens ({rec.cached_tokens} cached) · generated {rec.completion_tokens} "
              f"· ttft {rec.ttft * 1000:.0f} ms · {rec.decode_tps:.1f} tok/s · {r.backend} {r.device} {r.dtype} "
              f"· weights {r.weight_bytes / 2**20:.0f} MiB · finish {rec.finish_reason}", file=err)
    return 0
