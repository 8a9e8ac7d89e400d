"""What `fermi chat` draws: the streamed reply (reasoning, then Markdown), the
footer after it, and one-line notes. `RichView` draws on a terminal; `PlainView`
writes bare answers for scripts."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.rule import Rule
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

FPS = 15  # redraws of the answer being written, at most, per second


@dataclass
class TurnStats:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft: float  # seconds
    decode_tps: float
    finish: str  # "stop" | "length" | "interrupted"


def footer_text(s: TurnStats) -> Text:
    text = Text(style="dim")
    if s.finish == "interrupted":
        text.append("interrupted", style="yellow not dim")
        text.append(" · ")
    tokens = f"{s.completion_tokens} token" + ("" if s.completion_tokens == 1 else "s")
    text.append(f"{tokens} · {s.decode_tps:.1f} tok/s · first token {s.ttft * 1000:.0f} ms"
                f" · {s.cached_tokens}/{s.prompt_tokens} prompt tokens cached")
    if s.finish == "length":
        text.append(" · token limit", style="yellow not dim")
    return text


# --- Markdown while it streams ------------------------------------------------

FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")


def stable_end(text: str) -> int:
    """Where the finished blocks of a growing Markdown text end: just after the
    last blank line that lies outside a code fence and is followed by a new,
    unindented block. Nothing before it can change as more text arrives."""
    end, fence, pos, blank = 0, None, 0, False
    for line in text.split("\n")[:-1]:  # complete lines; the last piece is still being written
        start, pos = pos, pos + len(line) + 1
        if blank and fence is None and line[:1] not in ("", " ", "\t"):
            end = start
        m = FENCE.match(line)
        if m and fence is None:
            fence = m.group(1)
        elif m and set(line.strip()) == {fence[0]} and len(line.strip()) >= len(fence):
            fence = None
        blank = not line.strip()
    rest = text[pos:]
    if blank and fence is None and rest[:1] not in ("", " ", "\t"):
        end = pos
    return end


def _blank(line: list[Segment]) -> bool:
    return all(not seg.text.strip() and not (seg.style and seg.style.bgcolor) for seg in line)


class _Block:
    """Markdown without the blank lines around it (code blocks keep their
    padding), so blocks printed one by one are spaced like one document; `tail`
    keeps only the last lines, for a live region that must fit the screen."""

    def __init__(self, text: str, lead: bool, tail: int | None = None):
        self.md, self.lead, self.tail = Markdown(text), lead, tail

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lines = console.render_lines(self.md, options, pad=False)
        while lines and _blank(lines[0]):
            lines.pop(0)
        while lines and _blank(lines[-1]):
            lines.pop()
        if self.lead and lines:
            lines.insert(0, [])
        if self.tail is not None:
            lines = lines[-self.tail:]
        for line in lines:
            yield from line
            yield Segment.line()


class MarkdownStream:
    """The answer rendered as Markdown while it streams. Finished blocks are
    printed once, for good; only the block being written stays in a live region,
    cut to the screen's height, so a long answer never redraws the scrollback."""

    def __init__(self, console: Console):
        self.console = console
        self.text = ""
        self.done = 0  # characters of text printed for good
        self.blocks = 0
        self.live = None
        self.drawn = 0.0
        if console.is_terminal:
            self.live = Live(console=console, auto_refresh=False, transient=True, vertical_overflow="visible")
            self.live.start()

    def add(self, text: str) -> None:
        self.text += text
        end = self.done + stable_end(self.text[self.done:])
        if end > self.done:
            self._print(self.text[self.done:end])
            self.done = end
        if self.live is not None and time.monotonic() - self.drawn > 1 / FPS:
            self._draw()

    def _draw(self) -> None:
        tail = self.text[self.done:]
        height = max(self.console.height - 2, 3)
        self.live.update(_Block(tail, self.blocks > 0, tail=height) if tail.strip() else Text(), refresh=True)
        self.drawn = time.monotonic()

    def _print(self, text: str) -> None:
        if text.strip():
            self.console.print(_Block(text, self.blocks > 0))
            self.blocks += 1

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
        self._print(self.text[self.done:])
        self.done = len(self.text)


# --- The views ------------------------------------------------------------------


class RichReply:
    """One reply on a terminal: reasoning streamed dimmed under a "thinking"
    rule, then the answer as Markdown."""

    def __init__(self, console: Console):
        self.console = console
        self.thinking = False
        self.answer: MarkdownStream | None = None

    def add(self, kind: str, text: str) -> None:
        if kind == "reasoning":
            if self.answer is not None:  # a model that goes back to thinking: show it after what it said
                self.answer.close()
                self.answer = None
            if not self.thinking:
                self.console.print(Rule("thinking", style="dim", align="left", characters="╌"))
                self.thinking = True
            self.console.out(text, style="dim italic", end="", highlight=False)
            self.console.file.flush()
            return
        self._end_thinking()
        if self.answer is None:
            self.answer = MarkdownStream(self.console)
        self.answer.add(text)

    def _end_thinking(self) -> None:
        if self.thinking:
            self.console.out("")
            self.console.print(Rule(style="dim", characters="╌"))
            self.thinking = False

    def close(self) -> None:
        self._end_thinking()
        if self.answer is not None:
            self.answer.close()
            self.answer = None


class RichView:
    def __init__(self, console: Console):
        self.console = console

    def header(self, text: str) -> None:
        self.console.print(Text(text, style="bold cyan"))
        self.console.print(Text("/help for commands · Enter sends · Esc-Enter adds a line · Ctrl-C stops"
                                " an answer · Ctrl-D quits", style="dim"))

    def reply(self) -> RichReply:
        return RichReply(self.console)

    def footer(self, stats: TurnStats) -> None:
        self.console.print(footer_text(stats))

    def info(self, text: str) -> None:
        self.console.print(Text(text, style="dim"))

    def warn(self, text: str) -> None:
        self.console.print(Text(text, style="yellow"))

    def error(self, text: str) -> None:
        self.console.print(Text(text, style="bold red"))

    def table(self, rows: list[tuple[str, str]]) -> None:
        t = Table.grid(padding=(0, 2))
        t.add_column(style="cyan")
        t.add_column()
        for row in rows:
            t.add_row(*row)
        self.console.print(t)


class PlainReply:
    def __init__(self, out):
        self.out = out

    def add(self, kind: str, text: str) -> None:
        if kind == "content":  # a script gets the answer only
            self.out.write(text)
            self.out.flush()

    def close(self) -> None:
        self.out.write("\n")
        self.out.flush()


class PlainView:
    """Not a terminal: answers on stdout, one per turn; everything else on
    stderr, a line each (red where stderr is a terminal)."""

    def __init__(self, out=None, err: Console | None = None):
        self.out = out or sys.stdout
        self.err = err or Console(stderr=True, highlight=False)

    def _line(self, text: str, style: str = "") -> None:
        self.err.print(Text(text, style=style), soft_wrap=True)

    def header(self, text: str) -> None:
        self._line(f"fermi: {text}")

    def reply(self) -> PlainReply:
        return PlainReply(self.out)

    def footer(self, stats: TurnStats) -> None:
        if stats.finish == "interrupted":
            self._line("fermi: interrupted", "yellow")

    def info(self, text: str) -> None:
        self._line(f"fermi: {text}")

    def warn(self, text: str) -> None:
        self._line(f"fermi: {text}", "yellow")

    def error(self, text: str) -> None:
        self._line(f"fermi: error: {text}", "bold red")

    def table(self, rows: list[tuple[str, str]]) -> None:
        for k, v in rows:
            self._line(f"{k}: {v}")


class Loading:
    """While the model loads: a spinner, and a bar for each step that reports
    its progress (the GGUF conversion). Nothing is left on the screen after."""

    def __init__(self, console: Console, what: str):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self.what = what
        self.steps: dict[str, int] = {}
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                 TimeElapsedColumn(), console=console, transient=True,
                                 disable=not console.is_terminal)

    def __enter__(self) -> "Loading":
        self.progress.start()
        self.progress.add_task(f"loading {self.what}", total=None)
        return self

    def __call__(self, done: int, total: int, what: str = "converting weights") -> None:
        if what not in self.steps:
            self.steps[what] = self.progress.add_task(what, total=total)
        self.progress.update(self.steps[what], completed=done, total=total)

    def __exit__(self, *exc) -> None:
        self.progress.stop()
