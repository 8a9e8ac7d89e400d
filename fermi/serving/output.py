"""A request's output processor: sampled tokens in, records out.

detokenizer (UTF-8 safe) -> stop strings (found across tokens, never emitted) ->
thinking splitter (reasoning | content) -> Delta records. It decides when the
request is finished (EOS, a stop string, max tokens) and what its Done says."""

from __future__ import annotations

from fermi.stops import StopStrings
from fermi.thinking import ThinkingSplitter
from fermi.tokenizer import Detokenizer

from .records import Delta


class Output:
    def __init__(self, tokenizer, eos_ids: set[int], max_tokens: int, stop: list[str] | None,
                 in_reasoning: bool, keep_reasoning: bool, logprobs: bool):
        self.eos_ids, self.max_tokens, self.want_logprobs = eos_ids, max_tokens, logprobs
        self.detok = Detokenizer(tokenizer)
        self.stops = StopStrings(stop)
        self.splitter = ThinkingSplitter(in_reasoning, keep_reasoning)
        self.generated: list[int] = []
        self.samples: list = []  # logprobs not yet attached to a delta
        self.content: list[str] = []  # the answer's text (for the slot's settle)
        self.hit_stop = False

    def feed(self, sample) -> tuple[list[Delta], str | None]:
        """One sampled token -> (records, finish reason or None while it goes on)."""
        if sample.token in self.eos_ids:
            return [], "stop"
        self.generated.append(sample.token)
        if self.want_logprobs:
            self.samples.append(sample)
        text, self.hit_stop = self.stops.feed(self.detok.add(sample.token))
        records = self._records(text)
        if self.hit_stop:
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
            records.append(self._delta(kind, piece, []))
        return records, finish

    def _records(self, text: str) -> list[Delta]:
        out = []
        for kind, piece in self.splitter.feed(text):
            out.append(self._delta(kind, piece, self.samples[:]))
            self.samples.clear()
        return out

    def _delta(self, kind: str, text: str, samples: list) -> Delta:
        if kind == "content":
            self.content.append(text)
        return Delta(kind, text, samples)
