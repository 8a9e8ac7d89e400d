"""Several models behind one server: each loaded model an engine thread
(Serving) of its own, loaded on first use of its name (any model of the
registry, fermi/registry.py: never a path from a request).

At most `max_loaded` stay resident: the least recently used idle one is unloaded
when another is needed (a model with requests in flight is never cut: the new
one waits). A model idle past its keep_alive (per request, Ollama's spelling:
"5m", seconds, 0 = right after the answer, negative = forever; else
FERMI_KEEP_ALIVE) is unloaded. The model `fermi serve --model` names loads at
startup and stays until a request says otherwise or another must take its place."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Callable

import anyio

from fermi import registry
from fermi.engine import Engine
from fermi.serving import Limits

from .scheduler import Serving
from .schemas import APIError

log = logging.getLogger("fermi.server")

# A model handed to a request counts as busy this long, so nothing unloads it
# between the handing and the request's job (or while it waits for the load).
GRACE_S = 2.0


def keep_alive_seconds(value) -> float | None:
    """Ollama's keep_alive -> seconds (None: forever)."""
    if value is None or isinstance(value, bool):
        raise APIError(400, "keep_alive must be a duration (\"5m\", \"30s\") or a number of seconds",
                       param="keep_alive")
    if isinstance(value, (int, float)):
        return None if value < 0 else float(value)
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value))
    if not m:
        raise APIError(400, f"keep_alive '{value}' is not a duration (\"5m\", \"30s\", \"1h\", 0, -1)",
                       param="keep_alive")
    n = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return None if n < 0 else n


class Fleet:
    def __init__(self, load_primary: Callable[[], Engine] | None, load_model: Callable[[str], Engine],
                 limits: Limits, max_loaded: int = 1, keep_alive_s: float | None = 300.0,
                 aliases: list[str] | None = None, on_ready=None, on_error=None):
        self.load_model, self.limits = load_model, limits
        self.max_loaded, self.keep_alive_s = max_loaded, keep_alive_s
        self.loaded: dict[str, Serving] = {}  # least recently used first
        self.primary: Serving | None = None
        if load_primary is not None:
            self.primary = Serving(load_primary, limits, on_ready=on_ready, on_error=on_error, aliases=aliases)
            self.primary.keep_alive_s = None
        self.lock = asyncio.Lock()
        self.on_done = None  # (model, Done) of every answer, set on each serving (the metrics)
        self.draining = False  # shutting down (drain)

    # --- lifetime

    def start(self) -> None:
        if self.primary is not None:
            self.primary.on_done = self.on_done
            self.primary.start()
            self.loaded["(primary)"] = self.primary

    def stop(self) -> None:
        for s in list(self.loaded.values()):
            s.stop()

    def drain(self) -> None:
        """Shutting down: refuse new requests (503), end the queued ones now (503),
        let the running ones go on."""
        self.draining = True
        for s in list(self.loaded.values()):
            s.draining = True
            if s.scheduler is not None:
                s.scheduler.cancel_waiting()

    def cancel_all(self) -> None:
        for s in list(self.loaded.values()):
            s.cancel_all()

    async def reap(self) -> None:
        """Unload the idle models whose keep_alive has run out (every half second)."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for key, s in list(self.loaded.items()):
                if s.keep_alive_s is not None and self.idle(s) and now - s.last_used >= s.keep_alive_s:
                    await self.unload(key, "idle past its keep_alive")

    # --- requests

    def servings(self) -> list[Serving]:
        return list(self.loaded.values())

    @staticmethod
    def idle(s: Serving) -> bool:
        return (s.inflight == 0 and s.ready.is_set() and not (s.scheduler and s.scheduler.busy)
                and time.monotonic() - s.handed >= GRACE_S)

    def find_loaded(self, name: str | None) -> Serving | None:
        if not name:
            return self.primary if self.primary in self.loaded.values() else next(reversed(self.loaded.values()),
                                                                                  None)
        name = name[:-len(":latest")] if name.endswith(":latest") else name
        for s in self.loaded.values():
            if name in s.aliases or (s.engine is not None and name == s.engine.name):
                return s
        return None

    async def get(self, name: str | None, keep_alive=None) -> Serving:
        """The serving of the model `name` means (loaded now if need be)."""
        async with self.lock:
            s = self.find_loaded(name)
            if s is None:
                if not name:
                    raise APIError(400, "name a model: none is loaded (GET /v1/models lists them)", param="model",
                                   code="model_not_found")
                s = await self.load(name)
            key = next(k for k, v in self.loaded.items() if v is s)
            self.loaded[key] = self.loaded.pop(key)  # the most recently used now
            s.handed = time.monotonic()
        if keep_alive is not None:
            s.keep_alive_s = keep_alive_seconds(keep_alive)
        if s is self.primary or s.ready.is_set():
            return s  # (the primary answers 503 while it loads or after it failed, as before)
        while not s.ready.is_set() and s.error is None:
            s.handed = time.monotonic()
            await asyncio.sleep(0.05)
        s.handed = time.monotonic()
        if s.error is not None:  # a failed load leaves: the next request tries again
            async with self.lock:
                if self.loaded.get(key) is s:
                    del self.loaded[key]
            raise APIError(503, f"the model {name} failed to load: {s.error}", type="server_error",
                           code="model_load_failed")
        return s

    async def load(self, name: str) -> Serving:
        entry = await anyio.to_thread.run_sync(registry.find, name)
        if entry is None:
            raise APIError(404, f"model '{name}' is not on this machine (GET /v1/models lists the models here)",
                           type="not_found_error", param="model", code="model_not_found")
        while len(self.loaded) >= self.max_loaded:
            idle = [k for k, v in self.loaded.items() if self.idle(v) or v.error is not None]
            if idle:
                await self.unload(idle[0], f"to make room for {entry.name}")
            else:  # every resident model is answering: wait for one to finish
                await asyncio.sleep(0.1)
        log.info("loading %s", entry.name)
        s = Serving(lambda: self.load_model(entry.spec), self.limits, aliases=[name, entry.name],
                    on_ready=lambda e: log.info("ready: %s", entry.name),
                    on_error=lambda e: log.error("%s failed to load: %s", entry.name, e))
        s.keep_alive_s, s.on_done = self.keep_alive_s, self.on_done
        s.start()
        self.loaded[entry.name] = s
        return s

    async def unload(self, key: str, why: str) -> None:
        s = self.loaded.pop(key, None)
        if s is None:
            return
        if s is self.primary:
            self.primary = None
        log.info("unloading %s (%s)", s.engine.name if s.engine else key, why)
        await anyio.to_thread.run_sync(s.stop)
