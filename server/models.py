"""GET /v1/models (the loaded model first, then the models in the local Hugging
Face cache), GET /v1/models/{id}, and GET /health (503 while the model loads)."""

from __future__ import annotations

import time

import anyio
from litestar import Controller, Response, get

from .scheduler import Serving
from .schemas import APIError, Health, ModelCard, ModelList

STARTED = int(time.time())


def cached_models() -> list[ModelCard]:
    """The model repos in the local Hugging Face cache; none when it cannot be read."""
    try:
        from huggingface_hub import scan_cache_dir

        repos = scan_cache_dir().repos
    except Exception:  # noqa: BLE001 - no cache, or one we cannot read: nothing to list
        return []
    return [
        ModelCard(id=r.repo_id, created=int(r.last_modified or 0), owned_by=r.repo_id.split("/")[0])
        for r in sorted(repos, key=lambda r: r.repo_id)
        if r.repo_type == "model"
    ]


async def all_models(serving: Serving) -> list[ModelCard]:
    engine = serving.require_engine()
    loaded = ModelCard(id=engine.name, created=STARTED, owned_by="fermi", loaded=True)
    others = await anyio.to_thread.run_sync(cached_models)
    return [loaded] + [m for m in others if m.id != engine.name]


class ModelsController(Controller):
    path = "/models"
    tags = ["models"]

    @get(summary="List models", description="The loaded model (loaded: true) first, then the models "
                                             "found in the local Hugging Face cache.")
    async def list_models(self, serving: Serving) -> ModelList:
        return ModelList(data=await all_models(serving))

    @get("/{model_id:path}", summary="Retrieve a model")
    async def get_model(self, model_id: str, serving: Serving) -> ModelCard:
        model_id = model_id.lstrip("/")
        for m in await all_models(serving):
            if m.id == model_id or (m.loaded and model_id in serving.aliases):
                return m
        raise APIError(404, f"model '{model_id}' not found", type="not_found_error", param="model",
                       code="model_not_found")


class HealthController(Controller):
    path = "/health"
    tags = ["health"]

    @get(summary="Health", description="503 while the model loads (or if it failed to), then 200.")
    async def health(self, serving: Serving) -> Response[Health]:
        stats = serving.stats()
        if serving.error is not None:
            return Response(Health(status="error", error=str(serving.error), **stats), status_code=503)
        if serving.engine is None or not serving.ready.is_set():
            return Response(Health(status="loading", **stats), status_code=503)
        return Response(Health(status="ok", model=serving.engine.name, **stats), status_code=200)
