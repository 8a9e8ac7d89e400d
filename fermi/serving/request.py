"""A request to the serving core: token ids, sampling params, stop rules, max
tokens, a cancel flag, and where its records go. The core owns its progress."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from fermi.errors import FermiError
from fermi.sampling import SamplingParams


class QueueFull(FermiError):
    """The waiting line is full: refused at once, never left hanging."""

    def __init__(self, waiting: int):
        self.waiting = waiting
        super().__init__(f"the server is busy: every slot is taken and the queue is full ({waiting} waiting); retry later")


class ShuttingDown(FermiError):
    pass


class TokenMask(Protocol):
    """A logits processor that allows only some tokens (a grammar, a forced tool
    call): before each sampling it fills its row of the batch's bitmask (int32
    words, bit j % 32 of word j // 32 = token j allowed), applied on the device for
    the whole batch at once; then it is told which token was chosen."""

    def fill(self, bitmask_row) -> None: ...

    def accept(self, token: int) -> None: ...


@dataclass(eq=False)
class Request:
    ids: list[int]
    params: SamplingParams
    max_tokens: int | None  # None: the core's default cap (Limits.max_tokens), else up to the context's end
    stop: list[str] | None = None
    in_reasoning: bool = False  # generation starts inside an open think block
    keep_reasoning: bool = True  # False for thinking off: a think block the model emits is stripped
    # The reply (an assistant message: content, tool calls) -> the token ids the
    # conversation's next request starts with; the slot is settled to them after Done.
    next_turn: Callable[[dict], list[int] | None] | None = None
    masks: list[TokenMask] = field(default_factory=list)
    tools: Any = None  # fermi.tools.ToolSet: the answer's tool calls are read out of it
    raw: bool = False  # a completion: the text as the model writes it (no thinking split, no trim)
    # Another choice of the same prompt, submitted with it: its prefill is copied, not redone.
    share: "Request | None" = None
    # Records (Delta, Done) or an exception, in order, called on the core's thread.
    sink: Callable[[Any], None] | None = None

    # Progress, owned by the core.
    state: str = field(default="waiting", init=False)  # waiting | prefill | decode | done
    cancelled: bool = field(default=False, init=False)
    slot: int | None = field(default=None, init=False)
    cached: int = field(default=0, init=False)  # prompt tokens found in the slot's cache
    prefilled: int = field(default=0, init=False)  # prompt tokens in the cache so far
    pending: int | None = field(default=None, init=False)  # the token the next decode feeds
    submitted: float = field(default_factory=time.perf_counter, init=False)  # set again by submit
    started: float | None = field(default=None, init=False)  # admitted into a slot
    first_at: float | None = field(default=None, init=False)
    output: Any = field(default=None, init=False)  # serving.output.Output
    sampler: Any = field(default=None, init=False)  # the backend's per-request sampling state
    settle: bool = field(default=False, init=False)  # an internal prefill that settles a slot

    def cancel(self) -> None:
        """Leave the batch before the next step (any thread)."""
        self.cancelled = True

    @property
    def finished(self) -> bool:
        return self.state == "done"
