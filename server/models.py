"""GET /v1/models (the loaded models first, then the others of the registry:
embedded, and those in the local Hugging Face cache), GET /v1/models/{id}, and
GET /health (503 while the server's model loads), /live and /ready."""

from __future__ import annotations

import time

import anyio
from litestar import Controller, Response, get
from litestar.openapi.datastructures import ResponseSpec

from fermi import registry

from .fleet import Fleet
from .schemas import APIError, Health, ModelCard, ModelList

STARTED = int(time.time())


async def all_models(fleet: Fleet) -> list[ModelCard]:
    loaded = [ModelCard(id=s.engine.name, created=STARTED, owned_by="fermi", loaded=True)
              for s in fleet.servings() if s.engine is not None]
    names = {m.id for m in loaded} | {a for s in fleet.servings() for a in s.aliases}
    entries = await anyio.to_thread.run_sync(registry.entries)
    return loaded + [ModelCard(id=e.name, created=int(e.modified), owned_by=(e.repo or "fermi").split("/")[0])
                     for e in entries if e.name not in names]


class ModelsController(Controller):
    path = "/models"
    tags = ["models"]

    @get(summary="List models", description="The loaded models (loaded: true) first, then the other models "
                                             "on this machine (embedded, and in the Hugging Face cache): a "
                                             "request's model may name any of them.")
    async def list_models(self, fleet: Fleet) -> ModelList:
        return ModelList(data=await all_models(fleet))

    @get("/{model_id:path}", summary="Retrieve a model")
    async def get_model(self, model_id: str, fleet: Fleet) -> ModelCard:
        model_id = model_id.lstrip("/")
        loaded = fleet.find_loaded(model_id)
        for m in await all_models(fleet):
            if m.id == model_id or (loaded is not None and loaded.engine is not None and m.id == loaded.engine.name):
                return m
        raise APIError(404, f"model '{model_id}' not found", type="not_found_error", param="model",
                       code="model_not_found")


def health_of(fleet: Fleet) -> Health:
    """What the server is doing: loading | ok | draining | error, with the counts."""
    s = fleet.primary or fleet.find_loaded(None)
    if s is None:  # no model resident: the server is up, the next request loads one
        return Health(status="draining" if fleet.draining else "ok")
    stats = s.stats()
    if s.error is not None:
        return Health(status="error", error=str(s.error), **stats)
    if s.engine is None or not s.ready.is_set():
        return Health(status="loading", **stats)
    return Health(status="draining" if s.draining or s.stopping else "ok", model=s.engine.name,
                  loaded=[x.engine.name for x in fleet.servings() if x.engine is not None], **stats)


class HealthController(Controller):
    """/health (llama.cpp's: 200 once the model answers), /live (liveness: 503 only
    when the model failed to load, which a restart may cure), /ready (readiness:
    200 only while new requests are admitted, so not while loading or draining)."""
    path = "/"
    tags = ["health"]

    @get("/health", summary="Health", description="503 while the server's model loads (or if it failed to), "
                                                  "then 200.",
         responses={503: ResponseSpec(Health, description="the model is loading, or failed to load")})
    async def health(self, fleet: Fleet) -> Response[Health]:
        h = health_of(fleet)
        return Response(h, status_code=503 if h.status in ("loading", "error") else 200)

    @get("/live", summary="Liveness", description="200 while the server runs, loading included; 503 if the model "
                                                  "failed to load.",
         responses={503: ResponseSpec(Health, description="the model failed to load")})
    async def live(self, fleet: Fleet) -> Response[Health]:
        h = health_of(fleet)
        return Response(h, status_code=503 if h.status == "error" else 200)

    @get("/ready", summary="Readiness", description="200 while new requests are admitted; 503 while the model "
                                                    "loads, if it failed to, and while the server drains "
                                                    "(shutting down).",
         responses={503: ResponseSpec(Health, description="loading, failed, or draining")})
    async def ready(self, fleet: Fleet) -> Response[Health]:
        h = health_of(fleet)
        return Response(h, status_code=200 if h.status == "ok" else 503)
