"""The engine thread: loads the model, then runs the queued generations off the
event loop and streams their records back to it.

The engine is not thread-safe, so every model call happens on this one thread.
Requests wait in a FIFO queue (bounded: a full queue is refused at once, never
left hanging); up to `pool` of them are active at a time and advance round-robin,
one record each, so a long answer does not starve a short one. Batching the
active sequences into one decode step is the later step this structure is
shaped for: the active list is the batch.

A job's `cancel()` (a client gone) is seen before its next step: the engine's
`cancel` callable is checked after every token, and the thread closes the
generation before stepping it again, so its place frees within one decode step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import anyio

from fermi.engine import Delta, Done, Engine, Prompt
from fermi.errors import ContextOverflow, FermiError
from fermi.sampling import SamplingParams
from fermi.sessions import DEFAULT_MAX, DEFAULT_TTL_MS, SessionStore

from .schemas import APIError

log = logging.getLogger("fermi.server")

IDLE_TICK = 1.0  # seconds between TTL sweeps while nothing runs


class Overloaded(APIError):
    def __init__(self, waiting: int):
        super().__init__(503, f"the server is busy: {waiting} requests are already waiting; retry later",
                         type="server_error", code="overloaded")


class ShuttingDown(FermiError):
    pass


@dataclass
class Work:
    """What one generation needs; built on the event loop, run on the engine thread."""

    messages: list[dict]
    thinking: str
    prompt: Prompt
    params: SamplingParams
    max_tokens: int
    stop: list[str] | None = None


class Job:
    def __init__(self, work: Work, loop: asyncio.AbstractEventLoop):
        self.work = work
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.finished = False  # the consumer has seen Done
        self.done: Done | bool | None = None  # False: ended by an error
        self.reply: list[str] = []  # the answer text, for the session's settle
        self.session = None
        self.gen = None
        self.enqueued = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def running(self) -> bool:
        """Holds a place in the pool: not cancelled (it leaves within a step), not
        done (what is left is the session's settle)."""
        return not self.cancelled and self.done is None

    def abandon(self) -> None:
        """The consumer stops listening (a client gone): cancel unless it saw the end."""
        if not self.finished:
            self.cancel()

    def post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            self.cancelled = True

    async def records(self) -> AsyncIterator[Delta | Done]:
        """The generation's records as they come; ends after Done. Raises what the
        engine raised."""
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Done):
                self.finished = True
            yield item
            if isinstance(item, Done):
                return

    async def collect(self, receive) -> list[Delta | Done]:
        """All the records, for a non-streaming answer; watches the ASGI `receive`
        meanwhile, so a client that hangs up cancels the generation."""

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.abandon()

        watcher = asyncio.ensure_future(watch())
        try:
            return [rec async for rec in self.records()]
        finally:
            watcher.cancel()
            self.abandon()


@dataclass
class Limits:
    pool: int = 1  # generations active at once
    queue_max: int = 64  # generations waiting beyond those
    session_max: int = DEFAULT_MAX
    session_ttl_ms: int = DEFAULT_TTL_MS


class Scheduler:
    def __init__(self, load: Callable[[], Engine], limits: Limits | None = None,
                 on_ready: Callable[[Engine], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None, aliases: list[str] | None = None):
        self.aliases = set(aliases or [])  # names besides the engine's own that mean the loaded model
        self.limits = limits or Limits()
        if self.limits.pool < 1:
            raise FermiError(f"the engine pool needs at least 1 slot, not {self.limits.pool}")
        if self.limits.queue_max < 0:
            raise FermiError(f"the queue limit must be >= 0, not {self.limits.queue_max}")
        self._load = load
        self._on_ready, self._on_error = on_ready, on_error
        self.engine: Engine | None = None
        self.store: SessionStore | None = None
        self.error: BaseException | None = None
        self.ready = threading.Event()
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._main, name="fermi-engine", daemon=True)

    # --- the event loop's side

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and end the engine thread."""
        with self.cv:
            self.stopping = True
            for job in list(self.waiting) + list(self.active):
                job.cancel()
            self.cv.notify_all()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            # A generation ends within a step; a model still loading is left behind (daemon thread).
            self.thread.join(timeout if self.ready.is_set() else 0.5)

    def cancel_all(self) -> None:
        with self.cv:
            for job in list(self.waiting) + list(self.active):
                job.cancel()
            self.cv.notify_all()

    def stats(self) -> dict:
        with self.cv:
            waiting = sum(not j.cancelled for j in self.waiting)
            return {"active": sum(j.running for j in self.active), "waiting": waiting,
                    "sessions": len(self.store) if self.store is not None else 0}

    def require_engine(self) -> Engine:
        if self.error is not None:
            raise APIError(503, f"the model failed to load: {self.error}", type="server_error",
                           code="model_load_failed")
        if self.engine is None or not self.ready.is_set():
            raise APIError(503, "the model is still loading; retry shortly", type="server_error", code="model_loading")
        if self.stopping:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        return self.engine

    def require_model(self, name: str | None) -> Engine:
        """The engine, when `name` means the loaded model: left out, empty, its id
        (engine.name) or one of the aliases (the --model spec as typed)."""
        engine = self.require_engine()
        if name and name != engine.name and name not in self.aliases:
            raise APIError(404, f"model '{name}' is not served here; this server runs '{engine.name}'",
                           type="not_found_error", param="model", code="model_not_found")
        return engine

    async def submit(self, messages: list[dict], thinking: str, sampling: dict, max_tokens: int | None,
                     stop: list[str] | None) -> Job:
        """Render the prompt, check it fits, and queue the generation. Raises APIError
        (400 prompt too long, 503 queue full) before anything is queued."""
        engine = self.require_engine()
        prompt = await anyio.to_thread.run_sync(engine.prompt, messages, thinking)
        if len(prompt.ids) >= engine.context_length:
            e = ContextOverflow(len(prompt.ids), engine.context_length)
            raise APIError(400, f"{e}: the prompt must be shorter than the context to leave room for an answer",
                           param="messages", code="context_length_exceeded")
        params = engine.sampling(prompt, **sampling)
        room = engine.context_length - len(prompt.ids)
        work = Work(messages, thinking, prompt, params, min(max_tokens or room, room), stop)
        job = Job(work, asyncio.get_running_loop())
        with self.cv:
            if self.stopping:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            waiting = sum(not j.cancelled for j in self.waiting)
            running = sum(j.running for j in self.active)
            free = max(0, self.limits.pool - running)  # slots the first waiting jobs will take
            if waiting >= self.limits.queue_max + free:
                raise Overloaded(waiting)
            self.waiting.append(job)
            self.cv.notify_all()
        return job

    # --- the engine thread

    def _main(self) -> None:
        try:
            engine = self._load()
            self.store = SessionStore(engine, max(self.limits.session_max, self.limits.pool),
                                      self.limits.session_ttl_ms)
            self.engine = engine
        except BaseException as e:  # noqa: BLE001 - reported through /health and the CLI
            self.error = e
            if self._on_error:
                self._on_error(e)
            return
        self.ready.set()
        if self._on_ready:
            self._on_ready(engine)
        try:
            self._loop()
        finally:
            for job in list(self.active):
                self._finish(job)
            with self.cv:
                for job in self.waiting:
                    job.post(ShuttingDown("the server is shutting down"))
                self.waiting.clear()

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.active and not self._admissible():
                    self.cv.wait(IDLE_TICK)
                    if not self.waiting:
                        self.store.expire()
                if self.stopping:
                    return
                admit = []
                while self.waiting and len(self.active) + len(admit) < self.limits.pool:
                    job = self.waiting.popleft()
                    if not job.cancelled:
                        admit.append(job)
            for job in admit:
                self._admit(job)
            for job in list(self.active):
                self._step(job)

    def _admissible(self) -> bool:
        while self.waiting and self.waiting[0].cancelled:  # clients gone while queued
            self.waiting.popleft()
        return bool(self.waiting) and len(self.active) < self.limits.pool

    def _admit(self, job: Job) -> None:
        w = job.work
        try:
            job.session = self.store.acquire(w.prompt.ids)
            job.gen = job.session.generate(w.prompt, w.params, max_new_tokens=w.max_tokens, stop=w.stop,
                                           cancel=lambda: job.cancelled)
        except Exception as e:  # noqa: BLE001 - the request fails, the engine thread goes on
            if not isinstance(e, FermiError):
                log.exception("could not start a generation")
                e = FermiError(f"could not start the generation: {type(e).__name__}: {e}")
            if job.session is not None:
                self.store.discard(job.session)
                job.session = None
            job.post(e)
            return
        with self.cv:
            self.active.append(job)

    def _step(self, job: Job) -> None:
        if job.cancelled:
            self._finish(job)
            return
        try:
            rec = next(job.gen)
        except StopIteration:
            self._finish(job)
            return
        except Exception as e:  # noqa: BLE001 - the request fails, the server keeps serving
            log.exception("generation failed")
            job.post(e if isinstance(e, FermiError) else FermiError(f"generation failed: {type(e).__name__}: {e}"))
            job.done = False  # the consumer got the error instead
            self._finish(job, broken=True)
            return
        job.post(rec)
        if isinstance(rec, Delta):
            if rec.kind == "content":
                job.reply.append(rec.text)
            return
        job.done = rec
        if rec.finish_reason != "cancelled":
            # The answer is out; now ready the cache for the conversation's next turn.
            try:
                w = job.work
                self.store.settle(job.session, w.messages, "".join(job.reply), w.thinking)
            except Exception:  # noqa: BLE001 - only the next request's speed is at stake
                log.exception("could not settle the session")
                self.store.discard(job.session)
                job.session = None
        self._finish(job)

    def _finish(self, job: Job, broken: bool = False) -> None:
        if job.gen is not None:
            try:
                job.gen.close()
            except Exception:  # noqa: BLE001
                broken = True
        if job.session is not None:
            (self.store.discard if broken else self.store.release)(job.session)
            job.session = None
        with self.cv:
            if job in self.active:
                self.active.remove(job)
        if job.done is None:  # cancelled before Done: tell a consumer still listening
            job.post(Done("cancelled", len(job.work.prompt.ids), 0, 0, 0.0, 0.0, 0.0))
