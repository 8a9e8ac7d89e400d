"""The engine thread: loads the model, then steps the scheduler while there is
work, so the front doors (an event loop, a gRPC pool) only submit requests and
read records. Every model call happens on this one thread."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from fermi.errors import FermiError

from .request import Request, ShuttingDown
from .scheduler import PREFILL_BUDGET, Scheduler

log = logging.getLogger("fermi.serving")

IDLE_TICK = 1.0  # seconds between TTL sweeps while nothing runs
DEFAULT_TTL_MS = 30 * 60 * 1000


def default_slots(device: str) -> int:
    """Sequences decoded together: 4 on a CPU (a step is bound by reading the
    weights, so more rows cost little more, up to the cores' compute), 8 on a GPU."""
    return 4 if device == "cpu" else 8


@dataclass
class Limits:
    slots: int | None = None  # None: default_slots for the device
    queue_max: int = 64  # requests waiting beyond the slots; more are refused
    session_ttl_ms: int = DEFAULT_TTL_MS  # a slot's kept prefix is forgotten after this idle time; 0 = never
    prefill_budget: int = PREFILL_BUDGET
    max_tokens: int | None = None  # the output cap of a request that sets none; None: up to the context's end


class EngineThread:
    def __init__(self, load: Callable[[], object], limits: Limits | None = None,
                 on_ready: Callable[[object], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None):
        self.limits = limits or Limits()  # checked by the Scheduler (the server's Settings check them first)
        self._load, self._on_ready, self._on_error = load, on_ready, on_error
        self.engine = self.scheduler = self.error = None
        self.load_seconds: float | None = None
        self.ready = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._main, name="fermi-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, request: Request) -> Request:
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[Request]) -> list[Request]:
        if self.stopping:
            raise ShuttingDown("the server is shutting down")
        return self.scheduler.submit_all(requests)

    def cancel_all(self) -> None:
        if self.scheduler is not None:
            self.scheduler.cancel_all()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and end the thread: each request ends within a step."""
        self.stopping = True
        if self.scheduler is not None:
            self.scheduler.cancel_all()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            # A model still loading is left behind (daemon thread).
            self.thread.join(timeout if self.ready.is_set() else 0.5)

    def stats(self) -> dict:
        s = self.scheduler
        if s is None:
            return {"active": 0, "waiting": 0, "slots": 0}
        return {"active": s.active(), "waiting": s.queued(), "slots": len(s.slots)}

    def _main(self) -> None:
        try:
            began = time.perf_counter()
            engine = self._load()
            self.load_seconds = time.perf_counter() - began
            lim = self.limits
            slots = lim.slots or default_slots(engine.runtime.device)
            ttl = lim.session_ttl_ms / 1000 if lim.session_ttl_ms else None
            self.scheduler = Scheduler(engine, slots, lim.queue_max, lim.prefill_budget, ttl, max_tokens=lim.max_tokens)
            self.engine = engine
        except BaseException as e:  # noqa: BLE001 - reported through /health and the CLI
            self.error = e
            if self._on_error:
                self._on_error(e)
            return
        self.ready.set()
        if self._on_ready:
            self._on_ready(engine)
        s = self.scheduler
        try:
            while True:
                with s.lock:
                    while not self.stopping and not s.busy:
                        if not s.lock.wait(IDLE_TICK):
                            s.slots.expire()
                if self.stopping:
                    s.cancel_all()
                    s.reap()
                    return
                try:
                    s.step()
                except Exception:  # noqa: BLE001 - never die with requests waiting on us
                    log.exception("scheduler step failed")
                    for r in list(s.running):
                        s._fail(r, FermiError("the engine step failed"))
        finally:
            s.cancel_all()
            s.reap()
