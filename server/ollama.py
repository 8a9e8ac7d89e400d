"""Ollama's API on the same server and port as /v1: POST /api/chat and
/api/generate (NDJSON streamed by default, one object with stream=false),
GET /api/tags, POST /api/show, GET /api/ps, POST /api/pull, DELETE /api/delete,
GET /api/version, GET /api/health, and GET / (clients probe it). Errors are Ollama's {"error": "…"} (app.py).

Requests go to the same serving core as /v1, with the same wire logic
(wire.py): tools, a format's grammar, stop lists. Ollama spells some things its
own way: `think` (true, false or an effort: on), `options` (num_predict is
max_tokens; hardware hints such as num_thread are accepted and have no effect
here; a sampling option fermi does not have is a 400), tool-call arguments as
objects (so a call goes out once it is whole), durations in nanoseconds."""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import time
from typing import Any, AsyncIterator

import anyio
import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.response import Response
from msgspec import Struct

from fermi import __version__, registry, sources
from fermi.engine import Engine
from fermi.errors import FermiError
from fermi.serving import Done, ToolCall

from .fleet import Fleet
from .scheduler import Job
from .schemas import APIError
from .wire import guarded, json_format, ndjson_stream, note, stop_list, tool_set

SAMPLING = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "seed": "seed",
            "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty"}
# Hints about hardware and memory that a local runtime takes and fermi decides itself.
HINTS = {"num_thread", "num_gpu", "main_gpu", "num_batch", "use_mmap", "use_mlock", "low_vram", "numa", "f16_kv",
         "vocab_only", "num_keep"}


class OllamaMessage(Struct, kw_only=True):
    role: str
    content: str | None = None
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


class OllamaChat(Struct, kw_only=True):
    model: str
    messages: list[OllamaMessage] = []
    tools: list[dict[str, Any]] | None = None
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: str | int | float | None = None
    think: bool | str | None = None


class OllamaGenerate(Struct, kw_only=True):
    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None
    suffix: str | None = None
    context: list[int] | None = None
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: str | int | float | None = None
    think: bool | str | None = None


class PullRequest(Struct, kw_only=True):
    model: str | None = None
    name: str | None = None  # the older spelling
    stream: bool = True
    insecure: bool = False


async def pull_progress(name: str) -> AsyncIterator[bytes]:
    """registry.pull on a worker thread; its steps as Ollama's status objects."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def pull() -> None:
        post = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        try:
            entry = registry.pull(name, lambda message: post({"status": message}))
            post({"status": "success", "total": entry.size, "completed": entry.size})
        except FermiError as e:
            post({"error": str(e)})
        finally:
            post(None)

    loop.run_in_executor(None, pull)  # (a client gone leaves the download to finish)
    yield ndjson({"status": "pulling manifest"})
    while (item := await queue.get()) is not None:
        yield ndjson(item)


class ShowRequest(Struct, kw_only=True):
    model: str | None = None
    name: str | None = None  # the older spelling


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat().replace("+00:00", "Z")


def thinking(think) -> str:
    if think is None:
        return "auto"
    if isinstance(think, bool):
        return "on" if think else "off"
    if think not in ("low", "medium", "high"):
        raise APIError(400, f"think must be true, false, low, medium or high, not '{think}'", param="think")
    return "on"


def options(opts: dict | None) -> tuple[dict, int | None, list[str] | None, int | None]:
    """Ollama's options -> (sampling, max_tokens, stop, num_ctx)."""
    sampling, max_tokens, stop, num_ctx = {}, None, None, None
    for key, value in (opts or {}).items():
        if key in SAMPLING:
            sampling[SAMPLING[key]] = value
        elif key == "num_predict":
            max_tokens = None if value is None or value < 0 else int(value)
        elif key == "stop":
            stop = stop_list(value)
        elif key == "num_ctx":
            num_ctx = int(value)
        elif key not in HINTS:
            raise APIError(400, f"option '{key}' is not supported by this server", param=f"options.{key}")
    if sampling.get("top_k") is not None and sampling["top_k"] <= 0:
        sampling["top_k"] = 0
    for name, value in sampling.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise APIError(400, f"option '{name}' must be a number", param=f"options.{name}")
    return sampling, max_tokens, stop, num_ctx


def fmt(value) -> dict | bool | None:
    """`format`: "json" (any JSON object) or a JSON schema."""
    if value in (None, ""):
        return None
    if value == "json":
        return True
    if isinstance(value, dict):
        return json_format({"type": "json_schema", "schema": value}, "format", flat=True)
    raise APIError(400, f"format must be \"json\" or a JSON schema, not '{value}'", param="format")


def chat_messages(data: OllamaChat) -> list[dict]:
    out = []
    for i, m in enumerate(data.messages):
        if m.images:
            raise APIError(400, "images are not supported: this server runs text models", param=f"messages[{i}]")
        if m.role not in ("system", "user", "assistant", "tool"):
            raise APIError(400, f"a message's role must be system, user, assistant or tool, not '{m.role}'",
                           param=f"messages[{i}].role")
        message = {"role": m.role, "content": m.content or ""}
        if m.thinking and m.role == "assistant":
            message["reasoning_content"] = m.thinking
        if m.tool_calls and m.role == "assistant":
            message["tool_calls"] = [{"type": "function", "function": c.get("function", c)} for c in m.tool_calls]
        if m.tool_name:
            message["name"] = m.tool_name
        out.append(message)
    if not out:
        raise APIError(400, "messages must not be empty", param="messages")
    return out


def stats(done: Done, started: float) -> dict:
    """Ollama's counts and durations (nanoseconds)."""
    ns = lambda s: int(s * 1e9)  # noqa: E731
    evaluated = done.prompt_tokens - done.cached_tokens
    eval_s = (done.completion_tokens - 1) / done.decode_tps if done.decode_tps else 0.0
    return {"done_reason": "length" if done.finish_reason == "length" else "stop",
            "total_duration": ns(time.perf_counter() - started), "load_duration": 0,
            "prompt_eval_count": done.prompt_tokens,
            "prompt_eval_duration": ns(evaluated / done.prefill_tps) if done.prefill_tps else 0,
            "eval_count": done.completion_tokens, "eval_duration": ns(eval_s)}


class Answer:
    """Records -> Ollama's pieces: text, thinking, and tool calls once each is whole."""

    def __init__(self):
        self.content, self.thinking, self.calls = [], [], []
        self.open: dict | None = None  # the call being generated

    def add(self, rec) -> dict:
        """The record as a chunk's fields (empty when nothing goes out yet)."""
        if isinstance(rec, ToolCall):
            out = self.close_call() if rec.name is not None else {}
            if rec.name is not None:
                self.open = {"name": rec.name, "arguments": ""}
            self.open["arguments"] += rec.arguments
            return out
        out = self.close_call()
        (self.thinking if rec.kind == "reasoning" else self.content).append(rec.text)
        return {**out, ("thinking" if rec.kind == "reasoning" else "content"): rec.text}

    def close_call(self) -> dict:
        if self.open is None:
            return {}
        try:
            arguments = json.loads(self.open["arguments"] or "{}")
        except ValueError:  # cut off (max tokens): the text as it stands
            arguments = {"_raw": self.open["arguments"]}
        call = {"function": {"name": self.open["name"], "arguments": arguments}}
        self.calls.append(call)
        self.open = None
        return {"tool_calls": [call]}

    def whole(self) -> dict:
        self.close_call()
        out = {"content": "".join(self.content)}
        if self.thinking:
            out["thinking"] = "".join(self.thinking)
        if self.calls:
            out["tool_calls"] = self.calls
        return out


def ndjson(obj) -> bytes:
    return msgspec.json.encode(obj) + b"\n"


async def answer(request: Request, job: Job, engine: Engine, shape, stream: bool, started: float):
    """The reply, streamed as NDJSON or whole; shape(fields) -> the object's own fields."""
    log = request.scope.get("fermi.log", {})
    if stream:
        return ndjson_stream(guarded(job, log, ndjson_chunks(job, engine, shape, started, log),
                                     lambda message: [ndjson({"error": message})]))
    records = (await job.collect(request.receive))[0]
    reply = Answer()
    for rec in records[:-1]:
        reply.add(rec)
    note(log, records[-1])
    return {"model": engine.name, "created_at": now(), **shape(reply.whole()), "done": True,
            **stats(records[-1], started)}


async def ndjson_chunks(job: Job, engine: Engine, shape, started: float, log: dict) -> AsyncIterator[bytes]:
    reply = Answer()
    log.update(prompt_tokens=len(job.request.ids))
    async for _, rec in job.records():
        if isinstance(rec, Done):
            if closing := reply.close_call():
                yield ndjson({"model": engine.name, "created_at": now(), **shape(closing), "done": False})
            note(log, rec)
            yield ndjson({"model": engine.name, "created_at": now(), **shape({"content": ""}), "done": True,
                          **stats(rec, started)})
            return
        fields = reply.add(rec)
        if fields:
            yield ndjson({"model": engine.name, "created_at": now(), **shape(fields), "done": False})


def chat_shape(fields: dict) -> dict:
    return {"message": {"role": "assistant", "content": fields.pop("content", ""), **fields}}


def generate_shape(fields: dict) -> dict:
    out = {"response": fields.pop("content", "")}
    if "thinking" in fields:
        out["thinking"] = fields["thinking"]
    return out


def limit(max_tokens: int | None, num_ctx: int | None, prompt_tokens: int) -> int | None:
    """num_ctx caps prompt and answer together (below the model's own context)."""
    if num_ctx is None:
        return max_tokens
    if prompt_tokens >= num_ctx:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens, num_ctx is {num_ctx}", param="options.num_ctx")
    room = num_ctx - prompt_tokens
    return room if max_tokens is None else min(max_tokens, room)


class OllamaController(Controller):
    path = "/api"
    tags = ["ollama"]

    @post("/chat", summary="Ollama: chat", status_code=200)
    async def chat(self, request: Request, data: OllamaChat, fleet: Fleet) -> Any:
        started = time.perf_counter()
        serving = await fleet.get(data.model, data.keep_alive)
        engine = serving.require_engine()
        sampling, max_tokens, stop, num_ctx = options(data.options)
        messages = chat_messages(data)
        tools = tool_set(data.tools, None, None)
        schema = fmt(data.format)
        if num_ctx is not None:
            max_tokens = limit(max_tokens, num_ctx, len(engine.prompt(messages, thinking(data.think), tools).ids))
        job = await serving.start_job(messages, thinking(data.think), sampling, max_tokens, stop, tools=tools,
                                     json_schema=schema)
        return await answer(request, job, engine, chat_shape, data.stream, started)

    @post("/generate", summary="Ollama: generate", status_code=200)
    async def generate(self, request: Request, data: OllamaGenerate, fleet: Fleet) -> Any:
        started = time.perf_counter()
        serving = await fleet.get(data.model, data.keep_alive)
        engine = serving.require_engine()
        for name in ("images", "suffix", "context"):
            if getattr(data, name):
                raise APIError(400, f"'{name}' is not supported by this server", param=name)
        sampling, max_tokens, stop, num_ctx = options(data.options)
        mode, schema = thinking(data.think), fmt(data.format)
        messages = ([{"role": "system", "content": data.system}] if data.system else []) + \
            [{"role": "user", "content": data.prompt}]
        prompt = None
        if data.raw:  # the text as it is, no template
            prompt = engine.raw_prompt(data.prompt)
            messages = []
        if num_ctx is not None:
            ids = prompt.ids if prompt else engine.prompt(messages, mode).ids
            max_tokens = limit(max_tokens, num_ctx, len(ids))
        job = await serving.start_job(messages, mode, sampling, max_tokens, stop, json_schema=schema, prompt=prompt)
        return await answer(request, job, engine, generate_shape, data.stream, started)

    @get("/tags", summary="Ollama: the models here")
    async def list_tags(self, fleet: Fleet) -> dict:
        entries = await anyio.to_thread.run_sync(registry.entries)
        loaded = [loaded_card(s) for s in fleet.servings() if s.engine is not None]
        names = {c["name"] for c in loaded}
        return {"models": loaded + [entry_card(e) for e in entries if e.name not in names and not
                                    any(e.name in s.aliases for s in fleet.servings())]}

    @get("/ps", summary="Ollama: the models loaded")
    async def ps(self, fleet: Fleet) -> dict:
        out = []
        for s in fleet.servings():
            if s.engine is None:
                continue
            until = "0001-01-01T00:00:00Z" if s.keep_alive_s is None else _dt.datetime.fromtimestamp(
                time.time() + s.keep_alive_s - (time.monotonic() - s.last_used), _dt.timezone.utc).isoformat()
            out.append({**loaded_card(s), "expires_at": until, "size_vram": 0,
                        "context_length": s.engine.context_length})
        return {"models": out}

    @post("/show", summary="Ollama: a model's details", status_code=200)
    async def show(self, data: ShowRequest, fleet: Fleet) -> dict:
        name = data.model or data.name or ""
        s = fleet.find_loaded(name) if name else None
        if s is not None and s.engine is not None:
            model = s.engine.model
        else:
            entry = await anyio.to_thread.run_sync(registry.find, name)
            if entry is None:
                raise APIError(404, f"model '{name}' is not on this machine", param="model")
            model = await anyio.to_thread.run_sync(sources.resolve, entry.spec)
        c, template = model.config, model.chat_template or ""
        capabilities = ["completion", "tools"] + (["thinking"] if "enable_thinking" in template else [])
        info = {"general.architecture": c.model_type, f"{c.model_type}.context_length": c.max_position_embeddings,
                f"{c.model_type}.embedding_length": c.hidden_size, f"{c.model_type}.block_count": c.num_hidden_layers}
        return {"modelfile": "", "parameters": "", "template": template, "details": details(model),
                "model_info": info, "capabilities": capabilities, "modified_at": now()}

    @get("/version", summary="Ollama: the server's version")
    async def get_version(self) -> dict:
        return {"version": __version__}

    @get("/health", summary="Ollama: liveness")
    async def liveness(self) -> dict:
        return {"status": "ok"}

    @post("/pull", summary="Ollama: pull a model from the Hugging Face hub", status_code=200)
    async def pull_model(self, data: PullRequest) -> Any:
        """REPO_ID, REPO_ID:FILE or REPO_ID:QUANT into the Hugging Face cache; progress
        objects streamed (NDJSON), then {"status": "success"}, or an error object."""
        name = data.model or data.name or ""
        if not data.stream:
            try:
                await anyio.to_thread.run_sync(registry.pull, name)
            except FermiError as e:
                raise APIError(400, str(e), param="model") from None
            return {"status": "success"}
        return ndjson_stream(pull_progress(name))

    @delete("/delete", summary="Ollama: delete a model from the Hugging Face cache", status_code=200)
    async def delete_model(self, data: PullRequest, fleet: Fleet) -> None:
        name = data.model or data.name or ""
        if not name:
            raise APIError(400, "name the model to delete: 'model'", param="model")
        loaded = fleet.find_loaded(name)
        if loaded is not None:
            if not fleet.idle(loaded):
                raise APIError(409, f"model '{name}' is answering requests: delete it once they are done")
            await fleet.unload(next(k for k, v in fleet.loaded.items() if v is loaded), "deleted")
        if await anyio.to_thread.run_sync(registry.find, name) is None:
            raise APIError(404, f"model '{name}' is not on this machine", param="model")
        try:
            await anyio.to_thread.run_sync(registry.remove, name)
        except FermiError as e:
            raise APIError(400, str(e), param="model") from None


def details(model, quantization: str = "") -> dict:
    return {"format": "gguf" if model.gguf else "safetensors", "family": model.config.model_type,
            "parameter_size": "", "quantization_level": quantization}


def loaded_card(s) -> dict:
    engine = s.engine
    size = engine.model.gguf.stat().st_size if engine.model.gguf else int(getattr(engine.runtime, "weight_bytes", 0))
    return {"name": engine.name, "model": engine.name, "modified_at": now(), "size": size, "digest": "",
            "details": details(engine.model, str(engine.runtime.dtype))}


def entry_card(e: registry.Entry) -> dict:
    return {"name": e.name, "model": e.name, "size": e.size, "digest": "",
            "modified_at": _dt.datetime.fromtimestamp(e.modified, _dt.timezone.utc).isoformat(),
            "details": {"format": e.format, "family": "", "parameter_size": "", "quantization_level": e.quantization}}


@get("/", summary="Ollama clients probe this", media_type="text/plain", include_in_schema=False)
async def root() -> Response:
    return Response("fermi is running", media_type="text/plain")
