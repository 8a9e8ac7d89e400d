"""The server's side of the serving core: the engine thread (fermi.serving)
behind the event loop, and a `Job` per request that carries its records from
the engine thread to the handler that streams them.

The core knows no HTTP: its errors (queue full, shutting down, a prompt too
long) become OpenAI error objects here. A job whose client goes away is
cancelled and leaves the batch before the next step."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

import anyio

from fermi.engine import Engine
from fermi.errors import ContextOverflow, FermiError
from fermi.serving import Delta, Done, EngineThread, Limits, QueueFull, Request, ShuttingDown

from .schemas import APIError


class Job:
    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False  # the consumer has seen Done
        request.sink = self.post

    def post(self, item) -> None:
        """Called on the engine thread; raises once the event loop is gone, and the
        core then cancels the request."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def abandon(self) -> None:
        """The consumer stops listening (a client gone): cancel unless it saw the end."""
        if not self.finished:
            self.request.cancel()

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


class Serving(EngineThread):
    """The engine thread, with the checks a request meets before it is queued,
    answered as API errors."""

    def __init__(self, load: Callable[[], Engine], limits: Limits | None = None,
                 on_ready: Callable[[Engine], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None, aliases: list[str] | None = None):
        super().__init__(load, limits, on_ready, on_error)
        self.aliases = set(aliases or [])  # names besides the engine's own that mean the loaded model

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

    async def start_job(self, messages: list[dict], thinking: str, sampling: dict, max_tokens: int | None,
                        stop: list[str] | None) -> Job:
        """Render the prompt and queue the generation. Raises APIError (400 prompt
        too long, 503 queue full or shutting down) before anything is queued."""
        engine = self.require_engine()
        request = await anyio.to_thread.run_sync(
            lambda: engine.request(messages, thinking, max_tokens, stop, **sampling))
        job = Job(request, asyncio.get_running_loop())
        try:
            self.submit(request)
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
