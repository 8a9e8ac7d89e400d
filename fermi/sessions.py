"""The session store: KV caches kept across requests, so a request that extends
a conversation prefills only its new tokens.

HTTP clients send the whole conversation every time; the store finds the cached
session whose tokens the new prompt continues. It keeps at most `max_sessions`,
evicts the least recently used, and drops any idle longer than `ttl_ms`. A
session in use is never handed to a second request.

After a turn, `settle` brings the session's cache to what the next request will
send: the assistant reply as the template renders a *past* turn (Qwen3's drops
its reasoning). Without it, every follow-up of a thinking model would re-prefill
from the start of the last reply.

Not thread-safe by itself beyond its own bookkeeping: `settle` runs the model, so
the caller holds the engine (the server's engine thread does)."""

from __future__ import annotations

import threading
import time
from typing import Callable

from .engine import Engine, Session
from .errors import FermiError

DEFAULT_MAX = 4
DEFAULT_TTL_MS = 30 * 60 * 1000

# A cached session is "continued" by a prompt that shares all its tokens but
# these last few: re-tokenizing at a turn boundary may cut one token differently.
SLACK = 2

# Stands in for the next user message when rendering the history as the next
# request will render it; everything before it is the predictable prefix.
NEXT_TURN = "FERMI_NEXT_TURN_d41d8cd9"


class SessionStore:
    def __init__(self, engine: Engine, max_sessions: int = DEFAULT_MAX, ttl_ms: int = DEFAULT_TTL_MS,
                 clock: Callable[[], float] = time.monotonic):
        if max_sessions < 1:
            raise FermiError(f"the session store needs room for at least one session, not {max_sessions}")
        if ttl_ms < 0:
            raise FermiError(f"session TTL must be >= 0 ms (0 = none), not {ttl_ms}")
        self.engine = engine
        self.max_sessions = max_sessions
        self.ttl = ttl_ms / 1000 if ttl_ms else None
        self.clock = clock
        self.sessions: list[Session] = []  # most recently used last
        self.busy: set[int] = set()  # id() of the sessions handed out
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.sessions)

    def acquire(self, ids: list[int]) -> Session:
        """The free session `ids` continues (the longest common prefix), else a new
        one, else the least recently used one, evicted. Marked busy until release."""
        with self.lock:
            self._expire()
            free = [s for s in self.sessions if id(s) not in self.busy]
            best, shared = None, -1
            for s in free:  # least recently used first: ties go to the most recent
                n = s.common_prefix(ids)
                if n >= shared:
                    best, shared = s, n
            if best is not None and shared >= min(len(best.ids), len(ids)) - SLACK:
                chosen = best  # the prompt continues this conversation (or repeats it)
            elif len(self.sessions) < self.max_sessions or not free:
                chosen = self.engine.session()
            else:
                # Evict the least recently used: its cache memory is reused as is; the
                # engine keeps whatever prefix it happens to share with the new prompt.
                chosen = free[0]
            if chosen in self.sessions:
                self.sessions.remove(chosen)
            self.sessions.append(chosen)
            self.busy.add(id(chosen))
            chosen.last_used = self.clock()
            return chosen

    def release(self, session: Session) -> None:
        with self.lock:
            self.busy.discard(id(session))
            session.last_used = self.clock()
            if session in self.sessions:  # most recently used goes last
                self.sessions.remove(session)
                self.sessions.append(session)
            while len(self.sessions) > self.max_sessions:
                victim = next((s for s in self.sessions if id(s) not in self.busy), None)
                if victim is None:
                    break
                self.sessions.remove(victim)

    def discard(self, session: Session) -> None:
        """Forget a session whose cache can no longer be trusted (an error mid-step)."""
        with self.lock:
            self.busy.discard(id(session))
            if session in self.sessions:
                self.sessions.remove(session)

    def expire(self) -> int:
        """Drop the free sessions idle longer than the TTL; returns how many."""
        with self.lock:
            return self._expire()

    def _expire(self) -> int:
        if self.ttl is None:
            return 0
        now = self.clock()
        old = [s for s in self.sessions if id(s) not in self.busy and now - s.last_used > self.ttl]
        for s in old:
            self.sessions.remove(s)
        return len(old)

    def next_turn_ids(self, messages: list[dict], reply: str, thinking: str = "auto") -> list[int] | None:
        """The tokens the next request of this conversation starts with: the history,
        the reply rendered as a past assistant turn (content only), and the opening
        of the next user turn. None when the template cannot say."""
        history = list(messages) + [{"role": "assistant", "content": reply}, {"role": "user", "content": NEXT_TURN}]
        try:
            text = self.engine.template.render(history, thinking, add_generation_prompt=False)
        except FermiError:
            return None
        cut = text.find(NEXT_TURN)
        if cut < 0:
            return None
        return self.engine.tokenizer.encode(text[:cut])

    def settle(self, session: Session, messages: list[dict], reply: str, thinking: str = "auto") -> int:
        """Bring the session's cache to the next request's prefix: keep the common
        prefix, prefill what differs. Returns the number of tokens prefilled.
        Runs the model: the caller holds the engine."""
        ids = self.next_turn_ids(messages, reply, thinking)
        if not ids or len(ids) >= self.engine.context_length:
            return 0
        keep = session.common_prefix(ids)
        if keep == len(ids):
            return 0
        session.cache.truncate(0, keep)
        session.ids = session.ids[:keep]
        try:
            self.engine.runtime.prefill(ids[keep:], session.cache, 0)
        except FermiError:
            session.reset()
            return 0
        session.ids = list(ids)
        session.last_used = self.clock()
        return len(ids) - keep
