"""`fermi chat` end to end in a real terminal: tmux runs it, send-keys types,
capture-pane reads the screen."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import BACKENDS

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")

BACKEND = "torch" if "torch" in BACKENDS else BACKENDS[0]


class Tmux:
    """One chat in a private tmux server (its own socket: no user config, no other sessions)."""

    def __init__(self, tmp_path, command: str):
        self.socket = f"fermi-test-{os.getpid()}"
        env = {"FERMI_OFFLINE": "1", "FERMI_STATE_DIR": str(tmp_path / "state"), "TERM": "xterm-256color"}
        # COLUMNS and LINES, when the test runner leaves them about, would pin rich to their size
        self.cmd = " ".join(["env", "-u", "COLUMNS", "-u", "LINES", *(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                             command])

    def tmux(self, *args, check=True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], capture_output=True, text=True,
                              check=check, timeout=30)

    def start(self) -> None:
        self.tmux("new-session", "-d", "-s", "chat", "-x", "120", "-y", "40", self.cmd)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "chat", "-S", "-200").stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "chat", *keys)

    def type(self, text: str) -> None:
        self.keys("-l", text)
        self.keys("Enter")

    def wait(self, predicate, what: str, timeout: float = 120) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.alive():
                raise AssertionError(f"fermi chat ended while waiting for {what}")
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.screen()}")

    def alive(self) -> bool:
        return self.tmux("has-session", "-t", "chat", check=False).returncode == 0

    def close(self) -> None:
        self.tmux("kill-server", check=False)


def prompts(screen: str) -> int:
    """Prompts drawn and waiting (an empty "›" line)."""
    return sum(1 for line in screen.splitlines() if line.rstrip() == "›")


def last_line(screen: str) -> str:
    lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def after(screen: str, start: str) -> str:
    """The screen's text after the line that starts with `start`."""
    lines = screen.splitlines()
    i = max((i for i, line in enumerate(lines) if line.startswith(start)), default=len(lines))
    return "\n".join(lines[i + 1 :])


def _held() -> str:
    """The weights' label on the startup line: torch on a CPU keeps the GGUF's blocks
    (with its kernels built), MLX on its CPU build runs float32 activations."""
    if BACKEND != "torch":
        return "float32"
    from fermi.backends.torch import weights

    return "q4_1+q8_0" if weights.kernels else "float32"


HELD = _held()


def test_chat_in_a_real_terminal(tmp_path):
    chat = Tmux(tmp_path, f"{shlex.quote(sys.executable)} -m fermi.cli.main chat --model smollm2-135m "
                          f"--backend {BACKEND} --temperature 0 --max-new-tokens 200")
    try:
        chat.start()
        screen = chat.wait(lambda s: prompts(s) == 1, "the first prompt")
        header = screen.splitlines()[0]
        assert all(w in header for w in ("smollm2-135m", BACKEND, HELD, "context 8192", "thinking auto"))

        chat.type("Name the capital of France.")
        screen = chat.wait(lambda s: "tok/s" in s and prompts(s) == 1, "the answer and its footer")
        lines = screen.splitlines()
        asked = next(i for i, line in enumerate(lines) if "Name the capital of France." in line)
        assert "Paris" in " ".join(lines[asked + 1 : asked + 3])
        footer = next(line for line in lines if "tok/s" in line)
        assert re.search(r"\d+ tokens · [\d.]+ tok/s · first token \d+ ms · 0/\d+ prompt tokens cached", footer)

        # Up recalls it, Ctrl-R finds it; Ctrl-C at the prompt drops the line and nothing else
        question = "› Name the capital of France."
        chat.keys("Up")
        chat.wait(lambda s: last_line(s) == question, "Up to recall the question")
        chat.keys("C-c")
        chat.wait(lambda s: last_line(s) == "›" and s.count(question) == 2, "Ctrl-C to drop the line")
        chat.keys("C-r")
        chat.keys("-l", "capit")
        chat.keys("Enter")  # ends the search
        chat.wait(lambda s: last_line(s) == question, "Ctrl-R to find the question")
        chat.keys("C-c")
        chat.wait(lambda s: last_line(s) == "›" and s.count(question) == 3, "Ctrl-C to drop the line")

        # Ctrl-C stops a long answer: the partial answer stays, the next prompt comes back.
        chat.type("Write a long story about a dragon who learns to cook.")
        chat.wait(lambda s: len(after(s, "› Write a long story").strip()) > 10, "the story to start")
        chat.keys("C-c")
        screen = chat.wait(lambda s: "interrupted" in s and prompts(s) == 1, "the interruption")
        story = after(screen, "› Write a long story").split("interrupted")[0]
        assert story.strip() and "^C" not in screen

        chat.keys("-l", "/sta")
        chat.keys("Tab")  # completes the command
        chat.wait(lambda s: "› /stats" in (line.rstrip() for line in s.splitlines()), "/sta to complete to /stats")
        chat.keys("Enter")
        screen = chat.wait(lambda s: "2 (1 interrupted)" in s and prompts(s) == 1, "the stats")
        assert re.search(r"prompt tokens +\d+, [1-9]\d* of them cached", screen)  # the second turn reused the cache

        chat.type("/exit")
        end = time.monotonic() + 30
        while chat.alive() and time.monotonic() < end:
            time.sleep(0.1)
        assert not chat.alive(), "fermi chat did not exit on /exit"
    finally:
        chat.close()
