"""The Litestar application: `create_app()` wires the controllers, the engine
thread (started by the lifespan, which loads the model there so the port answers
/health with 503 meanwhile), the API key guard, and the one error shape every
failure answers with: {"error": {"message", "type", "param", "code"}} (on
Ollama's /api routes, Ollama's {"error": "…"})."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Callable

import anyio
from litestar import Litestar, Request, Response, Router
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.exceptions import HTTPException, NotAuthorizedException, SerializationException, ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin, YamlRenderPlugin
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType
from litestar.static_files import create_static_files_router
from swagger_ui_bundle import swagger_ui_path

from fermi import __version__
from fermi.engine import Engine
from fermi.errors import ContextOverflow, FermiError
from fermi.serving import DEFAULT_TTL_MS, Limits

from .chat import ChatController
from .completions import CompletionsController
from .metrics import Metrics, metrics_route
from .models import HealthController, ModelsController
from .ollama import OllamaController, root
from .responses import ResponsesController
from .fleet import Fleet, keep_alive_seconds
from .wire import loggable
from .schemas import APIError, ErrorResponse, OllamaError

log = logging.getLogger("fermi.server")

MAX_BODY = 8 * 1024 * 1024  # bytes: far more than any context's worth of text


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    parallel: int | None = None  # FERMI_ENGINE_POOL: slots, sequences decoded together (None: 4 on a CPU, else 8)
    queue_max: int = 64  # FERMI_QUEUE_MAX: generations waiting beyond those; more are refused (503)
    session_ttl_ms: int = DEFAULT_TTL_MS  # FERMI_SESSION_TTL_MS: a slot's kept prefix is forgotten after; 0 = never
    max_body: int = MAX_BODY  # FERMI_MAX_BODY: bytes; larger request bodies are refused (413)
    max_tokens: int = 4096  # FERMI_MAX_TOKENS: the output cap of a request that sets none; 0: the context's end
    max_loaded: int = 1  # FERMI_MAX_LOADED: models resident at once
    keep_alive: str = "5m"  # FERMI_KEEP_ALIVE: idle time before a model loaded on demand is unloaded
    metrics_public: bool = False  # GET /metrics without the API key
    allowed_hosts: str = ""  # FERMI_ALLOWED_HOSTS: Host names served besides IP literals and localhost; "*": any
    cors_origins: str = ""  # FERMI_CORS_ORIGINS: web origins whose pages may call the server; "" none, "*" any
    grpc_port: int | None = None  # FERMI_GRPC_PORT: the gRPC service (server/rpc/), on the same host; None: off
    session_max: int = 256  # FERMI_SESSION_MAX: gRPC conversations kept; the least recently used goes first
    aliases: list[str] = field(default_factory=list)  # names besides the model's own that mean it

    ENV = {"host": "FERMI_HOST", "port": "FERMI_PORT", "api_key": "FERMI_API_KEY", "parallel": "FERMI_ENGINE_POOL",
           "queue_max": "FERMI_QUEUE_MAX", "session_ttl_ms": "FERMI_SESSION_TTL_MS", "max_body": "FERMI_MAX_BODY",
           "max_loaded": "FERMI_MAX_LOADED", "keep_alive": "FERMI_KEEP_ALIVE", "grpc_port": "FERMI_GRPC_PORT",
           "session_max": "FERMI_SESSION_MAX", "max_tokens": "FERMI_MAX_TOKENS",
           "allowed_hosts": "FERMI_ALLOWED_HOSTS", "cors_origins": "FERMI_CORS_ORIGINS"}
    INTS = ("port", "parallel", "queue_max", "session_ttl_ms", "max_body", "max_loaded", "grpc_port", "session_max",
            "max_tokens")

    @classmethod
    def from_env(cls, env=None, **flags) -> "Settings":
        """Defaults, then environment variables, then `flags` that are not None."""
        env = os.environ if env is None else env
        s = cls()
        for name, var in cls.ENV.items():
            raw = (env.get(var) or "").strip()
            value = flags.get(name)
            if value is None and raw:
                value = raw
            if value is None:
                continue
            if name in cls.INTS and not isinstance(value, int):
                try:
                    value = int(value)
                except ValueError:
                    raise FermiError(f"{var} must be an integer, not '{value}'") from None
            setattr(s, name, value)
        s.api_key = s.api_key or None
        try:
            keep_alive_seconds(s.keep_alive)
        except APIError as e:
            raise FermiError(f"FERMI_KEEP_ALIVE: {e.message}") from None
        for name, least in (("parallel", 1), ("queue_max", 0), ("session_ttl_ms", 0), ("max_body", 0),
                            ("max_loaded", 1), ("grpc_port", 0), ("session_max", 1), ("max_tokens", 0)):
            if getattr(s, name) is not None and getattr(s, name) < least:
                spelled = cls.ENV[name] if name == "max_body" else f"--{name.replace('_', '-')} / {cls.ENV[name]}"
                raise FermiError(f"{spelled} must be at least {least}, not {getattr(s, name)}")
        return s


def create_app(load: Callable[[], Engine] | Engine | None, settings: Settings | None = None,
               on_ready: Callable[[Engine], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None,
               load_model: Callable[[str], Engine] | None = None) -> Litestar:
    """The app. `load` makes the server's model (it runs on an engine thread, after
    the server is up), or is an engine already loaded, or None (none until a request
    names one); load_model(spec) makes the others a request names (fleet.py)."""
    settings = settings or Settings()
    loader = load if callable(load) and not isinstance(load, Engine) else (None if load is None else lambda: load)
    fleet = Fleet(loader, load_model or (lambda spec: Engine.load(spec)),
                  Limits(settings.parallel, settings.queue_max, settings.session_ttl_ms,
                         max_tokens=settings.max_tokens or None), settings.max_loaded,
                  keep_alive_seconds(settings.keep_alive), settings.aliases, on_ready, on_error)

    @asynccontextmanager
    async def lifespan(app: Litestar):
        fleet.start()
        reaper = asyncio.ensure_future(fleet.reap())
        rpc = None
        try:
            if settings.grpc_port is not None:  # the gRPC service, on this event loop and fleet
                from .rpc.service import RpcServer

                ttl = settings.session_ttl_ms / 1000 if settings.session_ttl_ms else None
                rpc = app.state.rpc = RpcServer(fleet, settings.host, settings.grpc_port, settings.api_key,
                                                settings.session_max, ttl)
                try:
                    await rpc.start()
                except RuntimeError as e:  # the port: one line where the CLI says why it stops
                    if on_error is None:
                        raise
                    rpc = None
                    on_error(FermiError(str(e)))
            yield
        finally:
            reaper.cancel()
            if rpc is not None:
                await rpc.stop()
            await anyio.to_thread.run_sync(fleet.stop)

    def api_key_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        if not settings.api_key:
            return
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise NotAuthorizedException("missing or wrong API key: send 'Authorization: Bearer <key>'")

    v1 = Router(path="/v1", route_handlers=[ChatController, CompletionsController, ResponsesController, ModelsController],
                guards=[api_key_guard])
    ollama = Router(path="/", route_handlers=[OllamaController], guards=[api_key_guard])
    metrics = Metrics(fleet)
    fleet.on_done = metrics.done
    scrape = Router(path="/", route_handlers=[metrics_route], guards=[] if settings.metrics_public else [api_key_guard])
    origins = names(settings.cors_origins)
    app = Litestar(
        route_handlers=[v1, ollama, scrape, HealthController, root, SCHEMA_ASSETS],
        before_request=web_guard(names(settings.allowed_hosts)),
        cors_config=CORSConfig(allow_origins=origins, allow_methods=["*"], allow_headers=["*"],
                               expose_headers=["x-request-id"]) if origins else None,
        dependencies={"fleet": Provide(lambda: fleet, sync_to_thread=False),
                      "request_metrics": Provide(lambda: metrics, sync_to_thread=False)},
        lifespan=[lifespan],
        exception_handlers={Exception: error_response},
        request_max_body_size=settings.max_body,
        openapi_config=OpenAPIConfig(title="fermi", version=__version__,
                                     description="An OpenAI-compatible server for local models.",
                                     render_plugins=[SCHEMA_PAGE, JsonRenderPlugin(), YamlRenderPlugin()]),
        debug=False,
    )
    document_errors(app, bool(settings.api_key))
    app.state.fleet = fleet
    app.state.metrics = metrics
    app.state.settings = settings
    return app


# /schema: Swagger UI from the swagger-ui-bundle package, served here (a CDN would leave it blank offline)
SCHEMA_ASSETS = create_static_files_router(path="/schema/assets", directories=[swagger_ui_path],
                                           include_in_schema=False)
SCHEMA_PAGE = SwaggerRenderPlugin(path=["/", "/swagger"], js_url="/schema/assets/swagger-ui-bundle.js",
                                  css_url="/schema/assets/swagger-ui.css",
                                  standalone_preset_js_url="/schema/assets/swagger-ui-standalone-preset.js",
                                  favicon="<link rel='icon' type='image/png' href='/schema/assets/favicon-32x32.png'>")


ERRORS = {400: "bad input: the message and the offending field (param)",
          401: "no API key, or a wrong one (when the server has one)",
          403: "a Host that is not an IP address, localhost or an allowed name",
          404: "a model (or route) not here", 413: "the body is larger than FERMI_MAX_BODY",
          415: "a body not sent as application/json", 503: "the model is loading, the queue is full, or the "
          "server is shutting down (Retry-After)"}


STREAMS = {"/v1/chat/completions": "text/event-stream", "/v1/responses": "text/event-stream",
           "/v1/completions": "text/event-stream", "/api/chat": "application/x-ndjson",
           "/api/generate": "application/x-ndjson", "/api/pull": "application/x-ndjson"}
STREAMS_HOW = {"text/event-stream": "with stream=true: server-sent events, `data: {…}` lines",
               "application/x-ndjson": "streamed (the default): one JSON object a line"}


def document_errors(app: Litestar, keyed: bool) -> None:
    """Every route's schema says what its errors look like: OpenAI's error object
    (Ollama's {"error": "…"} on /api), with the statuses the server answers."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if not handler.include_in_schema or route.path in ("/health", "/live", "/ready"):
                continue
            shape = OllamaError if route.path.startswith("/api/") else ErrorResponse
            codes = [403, 503] + ([400, 404, 413, 415] if "POST" in handler.http_methods else [400, 404])
            if keyed or route.path.startswith(("/v1", "/api", "/metrics")):
                codes.append(401)
            handler.responses = {**{c: ResponseSpec(shape, description=ERRORS[c]) for c in sorted(codes)},
                                 **(handler.responses or {})}
    spec = app.openapi_schema  # (generated now, served as it is): the streamed answers' media types too
    for path, media in STREAMS.items():
        ok = spec.paths[path].post.responses["200"]
        ok.description = f"{ok.description}; {STREAMS_HOW[media]} ({media})"
        ok.content = {**(ok.content or {}), media: OpenAPIMediaType()}  # (text, no JSON schema)


def names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


JSON_TYPE = re.compile(r"^application/([\w.+-]+\+)?json\s*(;|$)", re.I)


def web_guard(allowed_hosts: list[str]):
    """Defaults against web pages the user visits: a Host that is not an IP literal,
    localhost or an allowed name is refused (403: DNS rebinding would let a page
    read the replies), and so is a body that is not declared JSON (415: text/plain
    and form bodies are the cross-site POSTs a browser sends without asking)."""
    allowed = {h.lower() for h in allowed_hosts}

    def guard(request: Request) -> None:
        host = request.headers.get("host", "")
        name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else host.rsplit(":", 1)[0]
        if host and "*" not in allowed and not host_ok(name.lower(), allowed):
            raise APIError(403, f"the Host '{host}' is not served here: the server answers to IP addresses and "
                                "localhost; add a name with --allowed-hosts (FERMI_ALLOWED_HOSTS)",
                           type="permission_error", code="host_not_allowed")
        sized = request.headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in request.headers
        if request.method in ("POST", "PUT", "PATCH", "DELETE") and sized and \
                not JSON_TYPE.match(request.headers.get("content-type", "")):
            kind = request.headers.get("content-type") or "none"
            raise APIError(415, f"the request body must be sent as Content-Type: application/json (not {kind}); "
                                "curl: --json, or -H 'Content-Type: application/json'",
                           code="unsupported_media_type")

    return guard


def host_ok(name: str, allowed: set[str]) -> bool:
    if name in allowed or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error"}
STATUS_CODES = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                415: "unsupported_media_type"}


def to_api_error(exc: Exception) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationException):
        extra = exc.extra if isinstance(exc.extra, list) else []
        first = extra[0] if extra and isinstance(extra[0], dict) else {}
        param = first.get("key") or None
        message = first.get("message") or exc.detail
        if missing := re.search(r"missing required field `([^`]+)`", message):
            prefix = "" if param in (None, "data") else f"{param}."
            param = prefix + missing.group(1)
            return APIError(400, f"'{param}' is required", param=param, code="missing_required_parameter")
        if param in (None, "data"):  # the body as a whole: not a JSON object, or no body at all
            detail = "" if message.strip("'") == "data" else f" ({message})"
            return APIError(400, f"the request body must be a JSON object{detail}", code="invalid_request")
        return APIError(400, f"invalid '{param}': {message}", param=param, code="invalid_value")
    if isinstance(exc, RecursionError):  # the body's JSON nested deeper than the decoder goes
        return APIError(400, "the request body is not valid JSON: nested too deeply", code="invalid_json")
    if isinstance(exc, HTTPException):
        status = exc.status_code
        detail = exc.detail or ""
        code = STATUS_CODES.get(status)
        if status == 400 and ("json" in detail.lower() or isinstance(exc.__cause__, SerializationException)):
            detail, code = f"the request body is not valid JSON: {detail}", "invalid_json"
        elif status == 413:
            detail = "the request body is too large"
        kind = STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return APIError(status, detail, type=kind, code=code)
    if isinstance(exc, ContextOverflow):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, FermiError):
        return APIError(400, str(exc))
    log.error("unexpected error", exc_info=exc)
    return APIError(500, f"internal error ({type(exc).__name__}); the server keeps serving",
                    type="server_error", code="internal_error")


def error_response(request: Request, exc: Exception) -> Response:
    err = to_api_error(exc)
    headers = dict(getattr(exc, "headers", None) or {})  # 405's Allow
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    elif err.status == 503:
        headers["Retry-After"] = "1"
    # Ollama's clients read {"error": "…"}; OpenAI's the error object.
    body = {"error": err.message} if request.url.path.startswith("/api/") else err.body()
    return Response(body, status_code=err.status, headers=headers, media_type="application/json")


REQUEST_ID = re.compile(r"^[\w.:@/+=-]{1,128}$")


class JsonLog(logging.Formatter):
    """--log-format json: one JSON object a line (time, level, message, and a
    request's fields: request_id, method, path, status, tokens, duration_s, note)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname.lower(), "message": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True)


class RequestLog:
    """ASGI wrapper: one line per request on the `fermi.server` logger: request id,
    method, path, status, tokens (when a controller left them in the scope),
    duration. Every response carries X-Request-Id: the client's (when it is a
    plain token of at most 128 characters), else a new one."""

    def __init__(self, app):
        self.app = app

    def __getattr__(self, name):  # the wrapped app's state and the like
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        info = scope["fermi.log"] = {"status": 0}
        given = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), "")
        rid = given if REQUEST_ID.match(given) else uuid.uuid4().hex

        async def send_logged(message):
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            tokens = ""
            if "prompt_tokens" in info:
                tokens = (f" prompt={info['prompt_tokens']} cached={info.get('cached_tokens', '?')}"
                          f" completion={info.get('completion_tokens', 0)}")
            note = f" ({info['note']})" if info.get("note") else ""
            took = time.perf_counter() - start
            fields = {"request_id": rid, "method": scope["method"], "path": scope["path"],
                      "status": info["status"] or None, "duration_s": round(took, 6)}
            fields.update({k: info[k] for k in ("prompt_tokens", "cached_tokens", "completion_tokens", "note")
                           if k in info})
            log.info("%s %s %s %s%s %.3fs%s", rid, scope["method"], loggable(scope["path"]), info["status"] or "-",
                     tokens, took, note, extra={"fields": fields})
            metrics = getattr(self.app.state, "metrics", None)
            if metrics is not None:
                metrics.request(scope["path"], info["status"], took)
