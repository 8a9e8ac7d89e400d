"""`fermi chat` driven through prompt_toolkit's pipe input, on the real embedded
model (SmolLM2-135M-Instruct), and its piped (non-terminal) mode."""

import _thread
import io
import json

import pytest
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from fermi.cli.chat import COMMANDS, Chat
from fermi.cli.main import main, parser
from fermi.cli.render import RichView, stable_end
from fermi.cli.repl import SlashCompleter, prompt_session
from fermi.template import EMPTY_THINK

from conftest import BACKENDS
from models import engine

# The REPL is backend-agnostic: one backend is enough here (the engine tests cover both).
BACKEND = "torch" if "torch" in BACKENDS else BACKENDS[0]
CAPITAL = "Name the capital of France."


class Spy:
    """A view that records the deltas of each reply and can raise SIGINT (what
    Ctrl-C does in a terminal) after the n-th delta."""

    def __init__(self, view):
        self.view, self.deltas, self.interrupt_at, self.interrupt = view, [], None, _thread.interrupt_main

    def __getattr__(self, name):
        return getattr(self.view, name)

    def reply(self):
        inner, spy = self.view.reply(), self

        class Reply:
            def add(self, kind, text):
                spy.deltas.append((kind, text))
                inner.add(kind, text)
                if len(spy.deltas) == spy.interrupt_at:
                    spy.interrupt()  # by default SIGINT, as the terminal sends it for Ctrl-C

            def close(self):
                inner.close()

        return Reply()


@pytest.fixture(scope="module")
def eng():
    return engine(BACKEND)


def make_chat(eng, *flags):
    args = parser().parse_args(["chat", "--temperature", "0", "--max-new-tokens", "16", *flags])
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system=None)  # a terminal: the live view
    chat = Chat(eng, args, Spy(RichView(console)))
    chat.out = out
    return chat


def drive(chat, keys: str, history=None) -> int:
    """Type `keys` into the REPL (\r is Enter, \x1b\r Esc-Enter, \x03 Ctrl-C, \x04 Ctrl-D)."""
    with create_pipe_input() as inp:
        inp.send_text(keys)
        return chat.run(prompt_session(history, COMMANDS, input=inp, output=DummyOutput()))


def test_a_question_streams_an_answer_the_next_turn_reuses_the_cache_and_reset_clears_it(eng, tmp_path):
    chat = make_chat(eng)
    history = tmp_path / "history"
    assert drive(chat, f"{CAPITAL}\rAnd of Italy?\r\x04", history) == 0
    out = chat.out.getvalue()
    assert "Paris" in chat.messages[1]["content"] and "Paris" in out
    assert sum(kind == "content" for kind, _ in chat.view.deltas) > 3  # streamed, not printed at once
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2
    # the footer of each turn; the second prefilled only its new message
    assert out.count("tok/s") == 2 and "first token" in out
    first_prompt = len(eng.prompt(chat.messages[:1]).ids)
    assert chat.last.cached_tokens >= first_prompt - 1 and f"{chat.last.cached_tokens}/" in out
    assert CAPITAL in history.read_text()  # the persistent history

    drive(chat, "/reset\r\x04")
    slot = chat.core.slots[0]
    assert chat.messages == [] and slot.ids == [] and chat.core.cache.lengths[0] == 0


def test_think_off_changes_the_prompt(eng):
    chat = make_chat(eng)
    chat.messages = [{"role": "user", "content": "Hi"}]
    auto = eng.prompt(chat.conversation(), chat.thinking).text
    labels = []
    chat.prompt_label = lambda f=chat.prompt_label: labels.append(f()) or labels[-1]
    drive(chat, "/think off\r/think maybe\r\x04")
    assert chat.thinking == "off"
    off = eng.prompt(chat.conversation(), chat.thinking).text
    assert off != auto and off.endswith(EMPTY_THINK)  # this template has no switch: fermi closes an empty block
    assert labels[0] == "›" and labels[1] == "think off ›"
    assert "/think takes on, off, auto" in chat.out.getvalue()


def test_save_load_and_retry(eng, tmp_path):
    chat = make_chat(eng, "--max-new-tokens", "8", "--system", "Be brief.")
    saved = tmp_path / "chat.json"
    drive(chat, f"{CAPITAL}\r/retry\r/save {saved}\r\x04")
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]  # /retry replaced the answer
    assert chat.totals["turns"] == 2 and chat.last.cached_tokens > 0
    data = json.loads(saved.read_text())
    assert data == [{"role": "system", "content": "Be brief."}] + chat.messages  # OpenAI messages

    other = make_chat(eng)
    drive(other, f"/load {saved}\r/load {tmp_path / 'missing.json'}\r\x04")
    assert other.conversation() == data and other.system == "Be brief."
    assert "loaded 2 messages" in other.out.getvalue()
    assert "No such file" in other.out.getvalue()  # one line, and the REPL goes on


def test_ctrl_c_stops_a_long_answer_and_the_next_turn_works(eng):
    chat = make_chat(eng, "--max-new-tokens", "400")
    chat.view.interrupt_at = 3
    # the story is stopped after its third delta; then Ctrl-C at the empty prompt, harmless; then a question
    keys = "Write a long story about a dragon who learns to cook.\r" + "\x03" + f"{CAPITAL}\r\x04"
    assert drive(chat, keys) == 0
    out = chat.out.getvalue()
    assert "interrupted" in out
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2
    partial = chat.messages[1]["content"]
    assert partial and partial == "".join(t for _, t in chat.view.deltas[:3])  # the partial answer is kept
    assert chat.totals["interrupted"] == 1 and chat.totals["turns"] == 2
    assert chat.messages[3]["content"] and chat.last.finish != "interrupted"
    # the slot stayed consistent: its ids are a prefix of the conversation's tokens
    assert chat.last.cached_tokens >= len(eng.prompt(chat.messages[:1]).ids)  # the partial answer was reused
    assert chat.core.slots[0].ids[: chat.last.prompt_tokens] == eng.prompt(chat.conversation()[:-1]).ids

    # Chat.cancel (for another thread, say) stops an answer through the engine's cancel hook
    chat.view.interrupt_at, chat.view.interrupt = len(chat.view.deltas) + 2, chat.cancel
    drive(chat, "Tell me a long story about the sea.\r\x04")
    assert chat.last.finish == "interrupted" and chat.totals["interrupted"] == 2
    assert chat.messages[-1]["content"] and len(chat.messages) == 6


def test_unknown_command_and_help(eng):
    chat = make_chat(eng)
    drive(chat, "/frobnicate\r/help\r/stats\r/exit\r")
    out = chat.out.getvalue()
    assert "unknown command /frobnicate" in out and "/reset" in out and "/think" in out
    assert "Esc-Enter" in out and "turns" in out and chat.messages == []


def test_multi_line_entry_and_completion(eng):
    chat = make_chat(eng)
    sent = []
    chat.turn = sent.append
    drive(chat, "first line\x1b\rsecond line\r//etc is a directory\r\x04")
    assert sent == ["first line\nsecond line", "/etc is a directory"]

    def complete(text):
        return [c.text for c in SlashCompleter(COMMANDS).get_completions(Document(text), None)]

    assert complete("/he") == ["/help"] and complete("/s") == ["/system", "/stats", "/save"]
    assert complete("/think o") == ["on", "off"] and complete("hello") == []


def test_context_overflow(eng, monkeypatch, tmp_path):
    monkeypatch.setattr(eng, "context_length", 128)
    chat = make_chat(eng, "--max-new-tokens", "2")
    drive(chat, "word " * 200 + "\r\x04")
    assert chat.messages == [] and "/reset" in chat.out.getvalue()  # one red line; the turn is dropped

    old = [{"role": r, "content": f"turn {i}: " + "blah " * 16} for i in range(4) for r in ("user", "assistant")]
    (tmp_path / "long.json").write_text(json.dumps(old))
    chat = make_chat(eng, "--max-new-tokens", "2", "--context-policy", "drop-oldest")
    drive(chat, f"/load {tmp_path / 'long.json'}\rHi\r\x04")
    assert "oldest messages" in chat.out.getvalue()
    assert chat.messages[0]["role"] == "user" and chat.messages[-2]["content"] == "Hi"
    assert len(chat.messages) < len(old) + 2 and chat.last.prompt_tokens < 128


def test_markdown_blocks_are_final_only_after_a_blank_line():
    text = "para one\n\n```py\nx = 1\n\ny = 2\n```\n\nlast"
    assert text[: stable_end(text)] == "para one\n\n```py\nx = 1\n\ny = 2\n```\n\n"
    assert stable_end("para one\n\n") == 0  # the next block may still be an indented continuation
    assert stable_end("- a\n\n  more") == 0


def test_piped_mode_answers_each_line(eng, monkeypatch, capsys):
    monkeypatch.setattr("fermi.cli.chat.load_engine", lambda args: eng)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{CAPITAL}\n\n/think off\nWhat is the capital of Germany?\n"))
    assert main(["chat", "--temperature", "0", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    answers = out.splitlines()
    assert len(answers) == 2 and "Paris" in answers[0] and "Berlin" in answers[1]
    assert err.strip() == "fermi: thinking off"  # commands answer on stderr: stdout has only the answers
