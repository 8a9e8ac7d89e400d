"""The conversations the gRPC service keeps: at most `max_sessions` (the least
recently used idle one is evicted for a new one), each dropped once idle past
`ttl_s`. A session holds its history; its KV cache is the serving core's (the
slot that answered its last turn keeps the prefix, settled to the history)."""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

GONE_KEPT = 4096  # ids of dropped sessions remembered, to say why one is gone


class SessionError(Exception):
    """A request the sessions cannot take: `code` is "not_found", "busy" or "full"."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(eq=False)
class Session:
    id: str
    model: str | None  # its model's name (set by its first request)
    names: set[str] = field(default_factory=set)  # the names that mean that model
    system: str = ""
    messages: list[dict] = field(default_factory=list)  # user and assistant turns
    busy: bool = False  # a turn is being generated
    used: float = 0.0

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages


class Sessions:
    def __init__(self, max_sessions: int = 256, ttl_s: float | None = 1800.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_sessions, self.ttl_s, self.clock = max_sessions, ttl_s, clock
        self.live: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self.gone: OrderedDict[str, str] = OrderedDict()  # id -> why it is gone

    def __len__(self) -> int:
        return len(self.live)

    def create(self, model: str | None = None) -> Session:
        self.expire()
        while len(self.live) >= self.max_sessions:
            idle = next((s for s in self.live.values() if not s.busy), None)
            if idle is None:
                raise SessionError("full", f"all {self.max_sessions} sessions are generating; retry later")
            self._drop(idle, f"was evicted: the server keeps {self.max_sessions} sessions (FERMI_SESSION_MAX) "
                             "and this one was the least recently used")
        s = Session(uuid.uuid4().hex, model, used=self.clock())
        self.live[s.id] = s
        return s

    def get(self, session_id: str) -> Session:
        """The session, now the most recently used; SessionError not_found."""
        self.expire()
        s = self.live.get(session_id)
        if s is None:
            why = self.gone.get(session_id, "is not known here")
            raise SessionError("not_found", f"session {session_id} {why}; send an empty session_id to start a new one")
        self.live.move_to_end(session_id)
        s.used = self.clock()
        return s

    def close(self, session_id: str) -> Session:
        s = self.get(session_id)
        self._drop(s, "was closed")
        return s

    def touch(self, s: Session) -> None:
        s.used = self.clock()

    def expire(self) -> list[Session]:
        """Drop the idle sessions past the TTL."""
        if not self.ttl_s:
            return []
        now = self.clock()
        old = [s for s in self.live.values() if not s.busy and now - s.used >= self.ttl_s]
        for s in old:
            self._drop(s, f"expired: it was idle over {self.ttl_s:g} s (FERMI_SESSION_TTL_MS)")
        return old

    def _drop(self, s: Session, why: str) -> None:
        self.live.pop(s.id, None)
        self.gone[s.id] = why
        while len(self.gone) > GONE_KEPT:
            self.gone.popitem(last=False)
