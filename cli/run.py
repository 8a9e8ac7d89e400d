"""`fermi run PROMPT`: one user message, the answer streamed to stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fermi.errors import FermiError
from fermi.grammar import check, json_grammar
from fermi.serving import Done

from .common import add_generation_args, add_model_args, load_engine, sampling_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="answer one prompt and exit")
    p.add_argument("prompt", help="the prompt, or - to read it from stdin")
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--show-thinking", action="store_true", help="print the reasoning to stdout too")
    p.add_argument("--verbose", "-v", action="store_true", help="a stats line on stderr after the answer")
    p.add_argument("--raw", action="store_true", help="the prompt as it is, no chat template (a base model)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true", help="the answer is a JSON object (grammar-constrained)")
    g.add_argument("--json-schema", metavar="FILE", type=Path,
                   help="the answer is JSON valid against the JSON schema in FILE (grammar-constrained)")
    p.set_defaults(func=run)


def json_schema(args) -> dict | bool | None:
    """--json: any object; --json-schema FILE: that schema, checked before the model loads."""
    if args.json_schema is None:
        return True if args.json else None
    try:
        schema = json.loads(args.json_schema.read_text(encoding="utf-8"))
    except ValueError as e:
        raise FermiError(f"{args.json_schema} is not JSON: {e}") from None
    check(json_grammar(schema), f"the JSON schema in {args.json_schema}")
    return schema


def run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.raw and args.system:
        raise FermiError("--raw sends the prompt as it is: a --system message has no place in it")
    schema = json_schema(args)
    engine = load_engine(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    raw = engine.raw_prompt(prompt) if args.raw else None
    request = engine.request([] if raw else messages, args.thinking, args.max_new_tokens, args.stop, prompt=raw,
                             json_schema=schema, **sampling_kwargs(args))
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
