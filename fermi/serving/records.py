"""What the serving core hands the front doors: text deltas and tool-call pieces,
then one Done."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass
class Delta:
    kind: str  # "content" | "reasoning"
    text: str
    logprobs: list = field(default_factory=list)  # backends.Sample of the tokens behind it, when asked
    tokens: list[int] = field(default_factory=list)  # the ids of the tokens behind it (the first delta of a token's text)


@dataclass
class ToolCall:
    """A piece of the reply's tool call `index`: its first piece carries the call's
    id and name, every piece a piece of its arguments' JSON text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None
    kind: ClassVar[str] = "tool_call"


@dataclass
class Done:
    finish_reason: str  # "stop" (EOS or stop string), "tool_calls", "length" (max tokens, context end), "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the slot's cache
    ttft: float  # seconds from submission to the first token
    decode_tps: float  # generated tokens per second after the first
    prefill_tps: float
    tokens: list[int] = field(default_factory=list)  # the generated ids (EOS not included)
    logprobs: list = field(default_factory=list)
