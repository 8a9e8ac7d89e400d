"""The server's side of the serving core: the engine thread (fermi.serving)
behind the event loop, and a `Job` per request that carries its records from
the engine thread to the handler that streams them.

The core knows no HTTP: its errors (queue full, shutting down, a prompt too
long) become OpenAI error objects here. A job whose client goes away is
cancelled and leaves the batch before the next step."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Callable

import anyio

from fermi.engine import Engine
from fermi.errors import ContextOverflow, FermiError
from fermi.grammar import GrammarError
from fermi.serving import Delta, Done, EngineThread, Limits, QueueFull, Request, ShuttingDown

from .schemas import APIError


class Cut(APIError):
    """An answer the server cut short (shutting down): it must not look complete."""

    def __init__(self, done: Done):
        super().__init__(503, f"the answer was cut short after {done.completion_tokens} tokens: the server is "
                              "shutting down", type="server_error", code="shutting_down")
        self.done = done


class Job:
    """One API request: its core requests (one per choice, n of them) and their
    records, tagged with the choice's index, in one queue."""

    def __init__(self, requests: list[Request], loop: asyncio.AbstractEventLoop):
        self.requests = requests
        self.request = requests[0]
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.open = len(requests)  # choices whose Done the consumer has not seen
        self.on_end: Callable[[], None] | None = None  # called once, when the consumer is done with it
        self.abandoned = False  # its consumer stopped listening
        self.on_done: Callable[[Done], None] | None = None  # each choice's Done, as it comes (the metrics)
        for i, r in enumerate(requests):
            r.sink = self._post(i)

    def _post(self, index: int) -> Callable:
        def post(item) -> None:
            """Called on the engine thread; raises once the event loop is gone, and the
            core then cancels the request."""
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))
        return post

    @property
    def finished(self) -> bool:
        return self.open == 0

    def abandon(self) -> None:
        """The consumer stops listening (a client gone): cancel what has not ended."""
        self.abandoned = True
        for r in self.requests:
            if not r.finished:
                r.cancel()
        end, self.on_end = self.on_end, None
        if end is not None:
            end()

    async def records(self) -> AsyncIterator[tuple[int, Delta | Done]]:
        """(choice, record) as they come; ends after every choice's Done. Raises what
        the engine raised, and Cut for an answer cancelled by the server (not by its
        consumer)."""
        while self.open:
            index, item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, Done):
                self.open -= 1
                if self.on_done is not None:
                    self.on_done(item)
                if item.finish_reason == "cancelled" and not self.abandoned:
                    raise Cut(item)
            yield index, item

    async def collect(self, receive) -> list[list[Delta | Done]]:
        """All the records, per choice, for a non-streaming answer; watches the ASGI
        `receive` meanwhile, so a client that hangs up cancels the generation."""

        async def watch():
            while (await receive())["type"] != "http.disconnect":
                pass
            self.abandon()

        watcher = asyncio.ensure_future(watch())
        out: list[list] = [[] for _ in self.requests]
        try:
            async for index, rec in self.records():
                out[index].append(rec)
            return out
        finally:
            watcher.cancel()
            self.abandon()


class Serving(EngineThread):
    """The engine thread, with the checks a request meets before it is queued,
    answered as API errors."""

    def __init__(self, load: Callable[[], Engine], limits: Limits | None = None,
                 on_ready: Callable[[Engine], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None, aliases: list[str] | None = None):
        super().__init__(load, limits, on_ready, on_error)
        self.aliases = set(aliases or [])  # names besides the engine's own that mean the loaded model
        self.inflight = 0  # jobs whose consumer has not finished (an unload waits for none)
        self.last_used = time.monotonic()
        self.keep_alive_s: float | None = None  # idle time before it is unloaded (fleet.py); None: never
        self.handed = 0.0  # when the fleet last handed it to a request (fleet.py)
        self.on_done: Callable[[str, Done], None] | None = None  # (model, Done) of every answer (the metrics)
        self.draining = False  # shutting down: nothing new is admitted, what runs may finish

    def require_engine(self) -> Engine:
        if self.error is not None:
            raise APIError(503, f"the model failed to load: {self.error}", type="server_error",
                           code="model_load_failed")
        if self.engine is None or not self.ready.is_set():
            raise APIError(503, "the model is still loading; retry shortly", type="server_error", code="model_loading")
        if self.stopping or self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        return self.engine

    def _job_ended(self) -> None:
        self.inflight -= 1
        self.last_used = time.monotonic()

    async def start_job(self, messages: list[dict], thinking: str, sampling: dict, max_tokens: int | None,
                        stop: list[str] | None, n: int = 1, **constraints) -> Job:
        """Render the prompt and queue the generation (n choices of it, prefilled once).
        constraints: Engine.request's tools, json_schema (and prompt). Raises APIError
        (400 prompt too long or a constraint that cannot be enforced, 503 queue full
        or shutting down) before anything is queued."""

        def build(engine: Engine) -> list[Request]:
            first = engine.request(messages, thinking, max_tokens, stop, **constraints, **sampling)
            return [first] + [engine.fork(first, i) for i in range(1, n)]

        return await self.start_requests(build, "tools" if constraints.get("tools") else "response_format")

    async def start_requests(self, build: Callable[[Engine], list[Request]], constraint_param: str = "response_format") -> Job:
        """Queue the requests `build` makes (on a worker thread: it renders and
        tokenizes) as one job, all or none."""
        engine = self.require_engine()
        try:
            requests = await anyio.to_thread.run_sync(lambda: build(engine))
        except GrammarError as e:
            raise APIError(400, str(e), param=constraint_param, code="invalid_json_schema") from None
        job = Job(requests, asyncio.get_running_loop())
        if self.on_done is not None:
            job.on_done = lambda done, report=self.on_done, name=engine.name: report(name, done)
        try:
            self.submit_all(requests)
            self.inflight += 1
            job.on_end = self._job_ended
        except ContextOverflow as e:
            raise APIError(400, f"{e}: the prompt must be shorter than the context to leave room for an answer",
                           param="messages", code="context_length_exceeded") from None
        except QueueFull as e:
            raise APIError(503, str(e), type="server_error", code="overloaded") from None
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None
        except FermiError as e:
            raise APIError(400, str(e)) from None
        return job
