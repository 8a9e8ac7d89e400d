"""A request's output processor: sampled tokens in, records out.

detokenizer (UTF-8 safe) -> stop strings (found across tokens, never emitted) ->
thinking splitter (reasoning | content) -> tool-call parser (content | calls, when
the request has tools) -> Delta and ToolCall records. It decides when the request
is finished (EOS, a stop string, max tokens) and what its Done says."""

from __future__ import annotations

from fermi.stops import StopStrings
from fermi.thinking import ThinkingSplitter
from fermi.tokenizer import Detokenizer

from .records import Delta


class Output:
    def __init__(self, tokenizer, eos_ids: set[int], max_tokens: int, stop: list[str] | None,
                 in_reasoning: bool, keep_reasoning: bool, logprobs: bool, calls=None, raw: bool = False):
        """calls: a toolcalls.CallParser, or None (no tools: all content is text); raw:
        the text as the model writes it (a completion: no think blocks, no trim)."""
        self.eos_ids, self.max_tokens, self.want_logprobs = eos_ids, max_tokens, logprobs
        self.detok = Detokenizer(tokenizer)
        self.stops = StopStrings(stop)
        self.splitter = ThinkingSplitter(in_reasoning, keep_reasoning, split=not raw)
        self.generated: list[int] = []
        self.samples: list = []  # logprobs not yet attached to a delta
        self.ids: list[int] = []  # token ids not yet attached to a delta
        self.content: list[str] = []  # the answer's text (for the slot's settle)
        self.calls = calls
        self.hit_stop = False

    def feed(self, sample) -> tuple[list[Delta], str | None]:
        """One sampled token -> (records, finish reason or None while it goes on)."""
        if sample.token in self.eos_ids:
            return [], "stop"
        self.generated.append(sample.token)
        self.ids.append(sample.token)
        if self.want_logprobs:
            self.samples.append(sample)
        text, self.hit_stop = self.stops.feed(self.detok.add(sample.token))
        records = self._records(text)
        if self.hit_stop or (self.calls is not None and self.calls.finished):
            return records, "stop"
        return records, "length" if len(self.generated) >= self.max_tokens else None

    def close(self, finish: str) -> tuple[list[Delta], str]:
        """What is held back, as records, and the final finish reason: text held as a
        possible stop string's start is answer after all, unless it completes one."""
        records = []
        if not self.hit_stop:
            text, self.hit_stop = self.stops.feed(self.detok.flush())
            records = self._records(text if self.hit_stop else text + self.stops.flush())
            finish = "stop" if self.hit_stop else finish
        for kind, piece in self.splitter.flush():
            records += self._deltas(kind, piece, [], [])
        if self.calls is not None:
            records += self._calls(self.calls.flush(), [], [])
            if self.calls.calls and finish == "stop":
                finish = "tool_calls"
        return records, finish

    def reply(self) -> dict:
        """The answer as an assistant message of the history (for the slot's settle)."""
        message = {"role": "assistant", "content": "".join(self.content)}
        if self.calls is not None and self.calls.calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["name"], "arguments": c["arguments"]}}
                                     for c in self.calls.calls]
        return message

    def _records(self, text: str) -> list[Delta]:
        out = []
        for kind, piece in self.splitter.feed(text):
            out += self._deltas(kind, piece, self.samples[:], self.ids[:])
            self.samples.clear()
            self.ids.clear()
        return out

    def _deltas(self, kind: str, text: str, samples: list, ids: list[int]) -> list:
        if kind == "content" and self.calls is not None:
            return self._calls(self.calls.feed(text), samples, ids)
        if kind == "content":
            self.content.append(text)
        return [Delta(kind, text, samples, ids)]

    def _calls(self, pieces: list, samples: list, ids: list[int]) -> list:
        out = []
        for p in pieces:
            if isinstance(p, tuple):
                self.content.append(p[1])
                out.append(Delta("content", p[1], samples, ids))
                samples, ids = [], []
            else:
                out.append(p)
        return out
