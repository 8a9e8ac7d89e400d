"""The terminal's input side of `fermi chat`: a prompt_toolkit PromptSession
(persistent history, Enter to send, Esc-Enter / Alt-Enter for a new line,
completion of the slash commands), and the keys while an answer streams
(Ctrl-C stops it; nothing is echoed)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.filters import is_searching
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.styles import Style

from fermi.thinking import MODES

try:
    import termios
except ImportError:  # Windows
    termios = None

STYLE = Style.from_dict({"prompt": "ansicyan bold", "continuation": "ansibrightblack"})


def state_dir() -> Path:
    """`$FERMI_STATE_DIR`, else the platform's user state directory (platformdirs)."""
    import platformdirs

    return Path(os.environ.get("FERMI_STATE_DIR") or platformdirs.user_state_dir("fermi")).expanduser()


def history_path() -> Path | None:
    """The history file, or None where the state directory cannot be written."""
    folder = state_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    path = folder / "history"
    return path if os.access(folder, os.W_OK) and (not path.exists() or os.access(path, os.W_OK)) else None


class SlashCompleter(Completer):
    """Command names after a leading "/", the modes after /think, paths after /save and /load.
    commands: {name: (argument, what it does)}."""

    def __init__(self, commands: dict[str, tuple[str, str]]):
        self.commands = commands
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        name, space, arg = text.partition(" ")
        if not space:
            for cmd, (_, what) in self.commands.items():
                if cmd.startswith(text.lower()):
                    yield Completion(cmd, -len(text), display_meta=what)
        elif name == "/think":
            for mode in MODES:
                if mode.startswith(arg):
                    yield Completion(mode, -len(arg))
        elif name in ("/save", "/load"):
            yield from self.paths.get_completions(Document(arg, len(arg)), complete_event)


def key_bindings() -> KeyBindings:
    kb = KeyBindings()
    editing = ~is_searching  # in a history search (Ctrl-R) Enter ends the search, as usual

    @kb.add("enter", filter=editing)
    def _send(event):
        event.current_buffer.validate_and_handle()

    @kb.add("escape", "enter", filter=editing)  # Alt-Enter arrives as Esc then Enter
    def _new_line(event):
        event.current_buffer.insert_text("\n")

    return kb


def prompt_session(history: Path | History | None, commands: dict, **io) -> PromptSession:
    """io: prompt_toolkit's `input` and `output` (the tests pass a pipe input)."""
    if isinstance(history, Path):
        history = FileHistory(str(history))
    return PromptSession(
        history=history or InMemoryHistory(),
        completer=SlashCompleter(commands),
        complete_while_typing=True,
        multiline=True,  # the buffer may hold several lines; Enter still sends (key_bindings)
        key_bindings=key_bindings(),
        prompt_continuation=lambda width, line, wrapped: [("class:continuation", "·" * (width - 1) + " ")],
        style=STYLE,
        **io,
    )


# --- while an answer streams ------------------------------------------------------


@contextmanager
def no_echo():
    """No echo of the keys typed while fermi draws (loading, an answer): the
    terminal's echo, "^C" included, would shift the lines being redrawn. What
    is typed still reaches the next prompt."""
    saved = None
    if termios is not None and sys.stdin.isatty():
        try:
            fd = sys.stdin.fileno()
            saved = termios.tcgetattr(fd)
            quiet = termios.tcgetattr(fd)
            quiet[3] &= ~(termios.ECHO | getattr(termios, "ECHOCTL", 0))
            termios.tcsetattr(fd, termios.TCSANOW, quiet)
        except (termios.error, OSError, ValueError):
            saved = None
    try:
        yield
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSANOW, saved)


class CtrlC:
    """SIGINT while an answer streams: KeyboardInterrupt at once, wherever the
    main thread is (the engine's generator tidies up in its `finally`), except
    while the answer is being drawn: an exception in the middle of a redraw
    leaves the terminal garbled, so there it is held until the drawing ends."""

    def __init__(self):
        self.drawing = self.pending = self.ignoring = False

    def __enter__(self) -> "CtrlC":
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._signal)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _signal(self, signum, frame) -> None:
        if self.ignoring:
            return
        if self.drawing:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextmanager
    def held(self):
        self.drawing = True
        try:
            yield
        finally:
            self.drawing = False
        if self.pending and not self.ignoring:
            self.pending = False
            raise KeyboardInterrupt

    def ignore(self) -> None:
        self.ignoring = True
