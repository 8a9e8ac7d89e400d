"""Stop strings on streamed text: found even when cut across tokens, never emitted."""

from __future__ import annotations

from .thinking import held_suffix


class StopStrings:
    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        keep = max(held_suffix(buf, s) for s in self.stops)
        self.pending = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
