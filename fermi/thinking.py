"""The thinking splitter: streamed text in, (reasoning | content) deltas out.

Works on text deltas of any size: a `<think>` or `</think>` cut across two
deltas is held back until it can be decided."""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
MODES = ("on", "off", "auto")


def opens_in_thinking(prompt: str) -> bool:
    """True when the rendered prompt leaves a think block open (the template
    wrote `<think>` itself), so generation starts inside the reasoning."""
    return prompt.rfind(OPEN) > prompt.rfind(CLOSE)


def held_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkingSplitter:
    """feed(text) -> [(kind, text)] with kind "reasoning" or "content".

    With keep_reasoning False (thinking off) reasoning is dropped: a think block
    the model still emits is stripped from the answer."""

    def __init__(self, in_reasoning: bool = False, keep_reasoning: bool = True, split: bool = True):
        """split False: the text as it comes, all content (a raw completion)."""
        self.split = split
        self.in_reasoning = in_reasoning
        self.keep_reasoning = keep_reasoning
        self.pending = ""
        self.trim = True  # drop the whitespace that opens a reasoning or an answer

    def feed(self, text: str) -> list[tuple[str, str]]:
        if not self.split:
            return [("content", text)] if text else []
        out: list[tuple[str, str]] = []
        buf = self.pending + text
        while buf:
            tag = CLOSE if self.in_reasoning else OPEN
            i = buf.find(tag)
            if i < 0:
                keep = held_suffix(buf, tag)
                self._emit(out, buf[: len(buf) - keep])
                buf = buf[len(buf) - keep :]
                break
            self._emit(out, buf[:i])
            buf = buf[i + len(tag) :]
            self.in_reasoning = not self.in_reasoning
            self.trim = True
        self.pending = buf
        return out

    def flush(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._emit(out, self.pending)
        self.pending = ""
        return out

    def _emit(self, out: list, text: str) -> None:
        if self.trim:
            text = text.lstrip()
            self.trim = not text
        if not text:
            return
        kind = "reasoning" if self.in_reasoning else "content"
        if kind == "reasoning" and not self.keep_reasoning:
            return
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
