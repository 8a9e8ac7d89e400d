"""What the serving core hands the front doors: text deltas, then one Done."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Delta:
    kind: str  # "content" | "reasoning"
    text: str
    logprobs: list = field(default_factory=list)  # backends.Sample of the tokens behind it, when asked


@dataclass
class Done:
    finish_reason: str  # "stop" (EOS or stop string), "length" (max tokens or context end), "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the slot's cache
    ttft: float  # seconds from submission to the first token
    decode_tps: float  # generated tokens per second after the first
    prefill_tps: float
    tokens: list[int] = field(default_factory=list)  # the generated ids (EOS not included)
    logprobs: list = field(default_factory=list)
