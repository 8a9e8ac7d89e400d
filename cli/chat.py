"""`fermi chat`: a multi-turn chat in the terminal, or one message per line
when stdin is not a terminal.

`Chat` holds the conversation (messages, a one-slot serving core whose slot
keeps the KV cache, thinking mode, system prompt, totals); `handle(line)` runs one command or turn.
`run(prompt_session)` is the interactive loop, `run_lines(lines)` the scripted
one. Drawing lives in render.py, the terminal's input side in repl.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fermi.engine import Engine
from fermi.serving import Done
from fermi.errors import ContextOverflow, FermiError
from fermi.thinking import MODES

from .common import add_generation_args, add_model_args, debug, load_engine, sampling_kwargs
if TYPE_CHECKING:
    from .render import TurnStats

# render (rich) and repl (prompt_toolkit) are imported where used: `fermi run`
# and `fermi serve` load this module for its arguments only, and start faster.

COMMANDS = {  # name: (argument, what it does)
    "/help": ("", "this help"),
    "/reset": ("", "clear the conversation and its cache"),
    "/think": ("on|off|auto", "reasoning for the next turns (alone: show the mode)"),
    "/system": ("TEXT", "set the system prompt (alone: show it; '/system -' removes it)"),
    "/retry": ("", "regenerate the last answer"),
    "/stats": ("", "session totals"),
    "/save": ("FILE", "write the conversation as JSON (OpenAI messages)"),
    "/load": ("FILE", "replace the conversation with a saved one"),
    "/exit": ("", "quit (Ctrl-D too)"),
}
ALIASES = {"/quit": "/exit", "/clear": "/reset", "/?": "/help"}
KEYS = [
    ("Enter", "send"), ("Esc-Enter, Alt-Enter", "new line"), ("Up / Down", "history"),
    ("Ctrl-R", "search the history"), ("Tab", "complete a command"),
    ("Ctrl-C", "stop the answer; clear the line"), ("Ctrl-D", "quit"), ("//text", "send a line that starts with /"),
]
POLICIES = ("error", "drop-oldest")


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat in the terminal (one message per line when stdin is not a terminal)")
    add_model_args(p)
    add_generation_args(p)
    p.add_argument("--context-policy", choices=POLICIES, default="error",
                   help="when the conversation outgrows the context: say so (error) or drop the oldest turns")
    p.set_defaults(func=run)


class Chat:
    def __init__(self, engine: Engine, args: argparse.Namespace, view):
        self.engine = engine
        self.args = args
        self.view = view
        self.core = engine.scheduler(1)  # one slot: it keeps the conversation's KV cache
        self.messages: list[dict] = []  # user and assistant turns; the system prompt is kept apart
        self.system: str | None = args.system
        self.thinking: str = args.thinking
        self.sampling = sampling_kwargs(args)
        self.totals = dict(turns=0, interrupted=0, prompt_tokens=0, cached_tokens=0, completion_tokens=0,
                           decode_seconds=0.0)
        self.last: TurnStats | None = None
        self.failed = False  # a turn ended in an error (the exit status of a script)
        self._request = None  # the request being answered, for cancel()

    # --- the conversation ---------------------------------------------------------

    def conversation(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def prompt_label(self) -> str:
        return "›" if self.thinking == "auto" else f"think {self.thinking} ›"

    def header(self) -> str:
        return f"{self.engine.describe()} · thinking {self.thinking}"

    def cancel(self) -> None:
        """Stop the answer being generated after its current token (any thread)."""
        if self._request is not None:
            self._request.cancel()

    # --- lines in -------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        """One line the user typed: a command or a message. False: the chat ends."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            name, _, arg = text.partition(" ")
            name = ALIASES.get(name.lower(), name.lower())
            if name not in COMMANDS:
                self.view.error(f"unknown command {name}; the commands are {' '.join(COMMANDS)}")
                return True
            if name == "/exit":
                return False
            getattr(self, "cmd_" + name[1:])(arg.strip())
            return True
        self.turn(text[1:] if text.startswith("//") else text)
        return True

    def run(self, prompt_session) -> int:
        """The interactive loop, on a prompt_toolkit PromptSession (see repl.py)."""
        while True:
            try:
                line = prompt_session.prompt([("class:prompt", self.prompt_label() + " ")])
            except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, nothing else
                continue
            except EOFError:  # Ctrl-D
                return 0
            if not self.line(line):
                return 0

    def run_lines(self, lines) -> int:
        """Not a terminal: one message (or command) per line, one plain answer each.
        Ctrl-C ends the script after keeping the partial answer."""
        for text in lines:
            if not self.line(text.rstrip("\r\n")):
                break
            if self.last is not None and self.last.finish == "interrupted":
                return 130
        return 1 if self.failed else 0

    def line(self, text: str) -> bool:
        """handle(), with what goes wrong told in one line and the chat kept running."""
        try:
            return self.handle(text)
        except KeyboardInterrupt:  # a second Ctrl-C while an interrupted answer was being tidied up
            self.view.warn("interrupted")
        except (FermiError, OSError, ValueError, RuntimeError) as e:
            if debug():
                raise
            self.failed = True
            self.view.error(error_line(e))
        return True

    # --- turns ----------------------------------------------------------------------

    def turn(self, text: str) -> None:
        user = {"role": "user", "content": text}
        self.messages.append(user)
        answered = False
        try:
            answered = self.reply()
        finally:
            if not answered and self.messages and self.messages[-1] is user:  # keep user/assistant pairs
                self.messages.pop()

    def fit(self):
        """The prompt for the conversation as it stands. ContextOverflow when it
        cannot fit; with --context-policy drop-oldest the oldest turns go first."""
        ctx = self.engine.context_length
        room = min(self.args.max_new_tokens, ctx // 2)  # what dropping aims to leave for the answer
        dropped = 0
        while True:
            prompt = self.engine.prompt(self.conversation(), self.thinking)
            n = len(prompt.ids)
            if self.args.context_policy != "drop-oldest" or n + room <= ctx or len(self.messages) <= 1:
                break
            self.messages.pop(0)
            dropped += 1
            while len(self.messages) > 1 and self.messages[0]["role"] != "user":
                self.messages.pop(0)
                dropped += 1
        if dropped:
            self.view.warn(f"dropped the {dropped} oldest messages to fit the context of {ctx} tokens")
        if n >= ctx:
            raise ContextOverflow(n, ctx)
        return prompt

    def reply(self) -> bool:
        """Generate the answer to the conversation as it stands and append it.
        False, with one red line, when it cannot be generated. Ctrl-C stops it at
        once: the partial answer is kept, and the footer says it was interrupted."""
        try:
            prompt = self.fit()
        except ContextOverflow as e:
            self.failed = True
            fix = ("the message alone is too long" if self.args.context_policy == "drop-oldest"
                   else "/reset to start over, or run with --context-policy drop-oldest")
            self.view.error(f"this turn does not fit: {e}; {fix}")
            return False
        request = self.engine.request(self.conversation(), self.thinking, self.args.max_new_tokens, self.args.stop,
                                      prompt=prompt, **self.sampling)
        self._request = request
        start, first = time.perf_counter(), None
        content: list[str] = []
        done: Done | None = None
        stream = self.core.run(request)
        from .render import TurnStats
        from .repl import CtrlC, no_echo

        view = self.view.reply()
        with no_echo(), CtrlC() as ctrl_c:
            try:
                for rec in stream:
                    if isinstance(rec, Done):
                        done = rec
                        break
                    first = first or time.perf_counter()
                    if rec.kind == "content":
                        content.append(rec.text)
                    with ctrl_c.held():
                        view.add(rec.kind, rec.text)
            except KeyboardInterrupt:  # Ctrl-C while generating
                pass
            finally:
                ctrl_c.ignore()  # the answer is stopped already: a second Ctrl-C must not break the tidying up
                stream.close()  # cancels an unfinished request: the core keeps its slot consistent
                self._request = None
                self.messages.append({"role": "assistant", "content": "".join(content)})
                view.close()
        if done is None:  # Ctrl-C: no Done record; the request tells how far it got
            end = time.perf_counter()
            cached = request.cached
            n = len(request.output.generated) if request.output else 0
            first = first or end
            tps = (n - 1) / (end - first) if n > 1 and end > first else 0.0
            stats = TurnStats(len(prompt.ids), cached, n, first - start, tps, "interrupted")
        else:
            finish = "interrupted" if done.finish_reason == "cancelled" else done.finish_reason
            stats = TurnStats(done.prompt_tokens, done.cached_tokens, done.completion_tokens, done.ttft,
                              done.decode_tps, finish)
        self.totals["interrupted"] += stats.finish == "interrupted"
        self.last = stats
        t = self.totals
        t["turns"] += 1
        t["prompt_tokens"] += stats.prompt_tokens
        t["cached_tokens"] += stats.cached_tokens
        t["completion_tokens"] += stats.completion_tokens
        if stats.decode_tps:
            t["decode_seconds"] += max(stats.completion_tokens - 1, 0) / stats.decode_tps
        self.view.footer(stats)
        return True

    # --- commands -------------------------------------------------------------------

    def cmd_help(self, arg: str) -> None:
        self.view.table([(f"{name} {a}".strip(), what) for name, (a, what) in COMMANDS.items()] + KEYS)

    def cmd_reset(self, arg: str) -> None:
        self.messages.clear()
        self.core.reset()
        self.view.info("conversation and cache cleared")

    def cmd_think(self, arg: str) -> None:
        if arg and arg.lower() not in MODES:
            self.view.error(f"/think takes {', '.join(MODES)}, not '{arg}'")
            return
        if arg:
            self.thinking = arg.lower()
        self.view.info(f"thinking {self.thinking}")

    def cmd_system(self, arg: str) -> None:
        if arg == "-":
            self.system = None
        elif arg:
            self.system = arg
        self.view.info(f"system prompt: {self.system}" if self.system else "no system prompt")

    def cmd_retry(self, arg: str) -> None:
        last = self.messages.pop() if self.messages and self.messages[-1]["role"] == "assistant" else None
        if not self.messages or self.messages[-1]["role"] != "user":
            if last:
                self.messages.append(last)
            self.view.error("nothing to retry")
            return
        answered = False
        try:
            answered = self.reply()
        finally:
            if not answered and last and self.messages[-1]["role"] == "user":
                self.messages.append(last)

    def cmd_stats(self, arg: str) -> None:
        t = self.totals
        tps = (t["completion_tokens"] - t["turns"]) / t["decode_seconds"] if t["decode_seconds"] else 0.0
        share = f" ({100 * t['cached_tokens'] / t['prompt_tokens']:.0f}%)" if t["prompt_tokens"] else ""
        self.view.table([
            ("model", self.engine.describe()),
            ("thinking", self.thinking),
            ("turns", f"{t['turns']}" + (f" ({t['interrupted']} interrupted)" if t["interrupted"] else "")),
            ("messages", str(len(self.conversation()))),
            ("context", f"{len(self.core.slots[0].ids)} of {self.engine.context_length} tokens in the cache"),
            ("prompt tokens", f"{t['prompt_tokens']}, {t['cached_tokens']} of them cached{share}"),
            ("generated", f"{t['completion_tokens']} tokens, {tps:.1f} tok/s"),
        ])

    def cmd_save(self, arg: str) -> None:
        if not arg:
            self.view.error("/save needs a file name")
            return
        path = Path(arg).expanduser()
        path.write_text(json.dumps(self.conversation(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        self.view.info(f"saved {len(self.conversation())} messages to {path}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            self.view.error("/load needs a file name")
            return
        path = Path(arg).expanduser()
        try:
            messages = read_messages(path)
        except ValueError as e:
            self.view.error(f"cannot load {path}: {e}")
            return
        self.system = messages.pop(0)["content"] if messages and messages[0]["role"] == "system" else None
        self.messages = messages  # the slot keeps whatever prefix of its cache still matches
        self.view.info(f"loaded {len(messages)} messages from {path}" + (" and a system prompt" if self.system else ""))


def read_messages(path: Path) -> list[dict]:
    """OpenAI chat messages from a JSON file: a list, or an object with "messages"."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = data.get("messages")
    if not isinstance(data, list):
        raise ValueError("expected a JSON list of messages")
    out = []
    for i, m in enumerate(data):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} is not a system, user or assistant message")
        content = m.get("content") or ""
        if isinstance(content, list):  # content parts: keep the text
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ValueError(f"message {i} has no text content")
        out.append({"role": m["role"], "content": content})
    return out


def error_line(e: Exception) -> str:
    if isinstance(e, FermiError):
        return str(e)
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def run(args) -> int:
    from rich.console import Console
    from rich.text import Text

    from .render import Loading, PlainView, RichView
    from .repl import history_path, no_echo, prompt_session

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    err = Console(stderr=True, highlight=False)
    try:
        if interactive:
            console = Console(highlight=False)
            name = args.model or os.environ.get("FERMI_MODEL") or "the model"
            with no_echo(), Loading(console, name) as progress:
                engine = Engine.load(args.model, args.backend, args.dtype, args.quantize, progress=progress,
                                     notice=lambda msg: console.print(Text(f"fermi: {msg}", style="yellow")))
        else:
            engine = load_engine(args)
    except (FermiError, OSError, ValueError, RuntimeError) as e:
        if debug():
            raise
        err.print(Text(f"fermi: error: {error_line(e)}", style="bold red"), soft_wrap=True)
        return 1
    if not interactive:
        return Chat(engine, args, PlainView(sys.stdout, err)).run_lines(sys.stdin)
    chat = Chat(engine, args, RichView(console))
    if not args.quiet:
        chat.view.header(chat.header())
    return chat.run(prompt_session(history_path(), COMMANDS))
