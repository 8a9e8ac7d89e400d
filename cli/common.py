"""Flags and helpers shared by the `fermi` verbs (run, chat, serve, bench)."""

from __future__ import annotations

import argparse
import os
import sys

from fermi.engine import Engine
from fermi.thinking import MODES

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "seed")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", help="hub repo id, model directory, .gguf file, or smollm2-135m "
                   "(default: $FERMI_MODEL or Qwen/Qwen3-1.7B)")
    g.add_argument("--backend", choices=["auto", "mlx", "torch"], help="default: $FERMI_BACKEND or auto")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the backend's")
    g.add_argument("--quantize", type=int, choices=[0, 4, 8], help="quantize float weights at load time to 4 or 8 "
                   "bits; 0 dequantizes a GGUF's quantized tensors")
    g.add_argument("--quiet", "-q", action="store_true", help="no startup line")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=1024)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--min-p", type=float)
    g.add_argument("--repeat-penalty", dest="repetition_penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float)
    g.add_argument("--frequency-penalty", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--thinking", choices=MODES, default="auto")
    g.add_argument("--system", help="system message")


def sampling_kwargs(args) -> dict:
    return {k: getattr(args, k) for k in SAMPLING_FLAGS}


def load_engine(args, notice=None) -> Engine:
    """Load the model named by the flags, with a progress bar on a terminal and
    the one startup line on stderr (or to `notice`)."""
    notice = notice or (lambda msg: print(f"fermi: {msg}", file=sys.stderr))
    with progress_bar() as progress:
        engine = Engine.load(args.model, args.backend, args.dtype, args.quantize, progress=progress, notice=notice)
    if not args.quiet:
        notice(engine.describe())
    return engine


class progress_bar:
    """A rich progress bar on stderr for slow loading steps (GGUF conversion);
    nothing when stderr is not a terminal."""

    def __enter__(self):
        self.bar = self.task = None
        return self

    def __call__(self, done: int, total: int, what: str = "converting weights") -> None:
        if not sys.stderr.isatty():
            return
        if self.bar is None:
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task(what, total=total)
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def debug() -> bool:
    return bool(os.environ.get("FERMI_DEBUG"))
