"""The `fermi` command."""

from __future__ import annotations

import argparse
import sys

from fermi import __version__
from fermi.errors import FermiError
from fermi.sampling import check

from . import bench, chat, models, run, serve
from .common import debug, sampling_kwargs

VERBS = [run, chat, serve, models, bench]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fermi", description="Local LLM inference: Qwen3 and friends.")
    p.add_argument("--version", action="version", version=f"fermi {__version__}")
    sub = p.add_subparsers(dest="verb", required=True)
    for verb in VERBS:
        verb.add_parser(sub)
    sub.metavar = "{" + ",".join(sub.choices) + "}"
    p.verbs = sub.choices
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:  # told by the verb's own parser, with its usage
        p.verbs[args.verb].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if hasattr(args, "temperature"):  # bad values: one line now, before a model loads
            check(sampling_kwargs(args))
            if getattr(args, "max_new_tokens", 1) < 1:
                raise FermiError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except FermiError as e:
        if debug():
            raise
        print(f"fermi: error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as e:  # a readable line, not a traceback
        if debug():
            raise
        print(f"fermi: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
