"""`fermi serve`: the OpenAI-compatible HTTP server.

The port is bound first and the model loads on the engine thread meanwhile
(GET /health answers 503 until it is ready). Ctrl-C or SIGTERM cancels the
running generations and shuts down cleanly (exit status 0)."""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import threading
import sys
from pathlib import Path

from fermi.errors import FermiError

from .common import add_model_args, load_engine


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat completions, responses, models)")
    add_model_args(p)
    g = p.add_argument_group("server (flags win over the environment variables)")
    g.add_argument("--host", help="interface to listen on (default: $FERMI_HOST or 127.0.0.1; "
                   "0.0.0.0 listens on every interface)")
    g.add_argument("--port", type=int, help="default: $FERMI_PORT or 8000")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $FERMI_API_KEY)")
    g.add_argument("--parallel", "--pool", "-np", dest="parallel", type=int, metavar="N",
                   help="slots: sequences decoded together in one batch, each keeping its conversation's "
                   "prefix (default: $FERMI_ENGINE_POOL, else 4 on a CPU and 8 on a GPU or Metal)")
    g.add_argument("--queue-max", type=int, help="generations that may wait; more are refused with 503 "
                   "(default: $FERMI_QUEUE_MAX or 64)")
    g.add_argument("--drain-seconds", type=float, default=10.0, metavar="S", help="on SIGTERM, the time running "
                   "answers get to finish (new and queued requests get 503 at once), then they are cut; Ctrl-C cuts "
                   "at once (default 10)")
    g.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="the request log on stderr: 'fermi: …' lines, or one JSON object a line")
    g.add_argument("--allowed-hosts", metavar="NAMES", help="Host names served besides IP addresses and localhost, "
                   "comma-separated; * = any (default: $FERMI_ALLOWED_HOSTS; guards against DNS rebinding)")
    g.add_argument("--cors-origins", metavar="ORIGINS", help="web origins whose pages may call the server, "
                   "comma-separated; * = any (default: $FERMI_CORS_ORIGINS, else none)")
    g.add_argument("--header-timeout", type=float, default=10.0, metavar="S", help="a connection that has not "
                   "sent a whole request head in this time is closed (default 10)")
    g.add_argument("--max-connections", type=int, default=512, metavar="N", help="open connections at most; "
                   "beyond, new ones get 503 (default 512)")
    g.add_argument("--metrics-public", action="store_true", help="GET /metrics without the API key")
    g.add_argument("--max-tokens", type=int, metavar="N", help="the output cap of a request that sets none, "
                   "0 = up to the context's end (default: $FERMI_MAX_TOKENS or 4096)")
    g.add_argument("--grpc-port", type=int, metavar="PORT", help="also serve the gRPC service fermi.v1.Fermi on "
                   "this port, same host (default: $FERMI_GRPC_PORT, else off; 50051 is its usual port)")
    g.add_argument("--session-max", type=int, help="gRPC conversations kept; the least recently used is dropped "
                   "for a new one (default: $FERMI_SESSION_MAX or 256)")
    g.add_argument("--session-ttl-ms", type=int, help="idle time after which a slot's kept prefix, and a gRPC "
                   "session, is forgotten; 0 = never (default: $FERMI_SESSION_TTL_MS or 30 minutes)")
    g.add_argument("--max-loaded", type=int, help="models resident at once; a request may name any model of "
                   "fermi list, loaded on first use (default: $FERMI_MAX_LOADED or 1)")
    g.add_argument("--keep-alive", help="idle time before a model loaded on demand is unloaded: 5m, 30s, 0, -1 = "
                   "never (default: $FERMI_KEEP_ALIVE or 5m)")
    g.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template to use instead of the model's")
    p.set_defaults(func=serve)


def serve(args) -> int:
    import uvicorn

    from fermi.engine import Engine
    from fermi.server.app import JsonLog, RequestLog, Settings, create_app
    from fermi.template import ChatTemplate

    settings = Settings.from_env(host=args.host, port=args.port, api_key=args.api_key, parallel=args.parallel,
                                 queue_max=args.queue_max, session_ttl_ms=args.session_ttl_ms,
                                 max_loaded=args.max_loaded, keep_alive=args.keep_alive, grpc_port=args.grpc_port,
                                 session_max=args.session_max, max_tokens=args.max_tokens,
                                 allowed_hosts=args.allowed_hosts, cors_origins=args.cors_origins)
    settings.metrics_public = args.metrics_public
    if args.model:
        settings.aliases = [args.model]
    template = None
    if args.chat_template:
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise FermiError(f"cannot read the chat template {args.chat_template}: {e.strerror}") from None

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLog() if args.log_format == "json" else logging.Formatter("fermi: %(message)s"))
    for name in ("fermi.server", "fermi.serving"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).propagate = False
    log = logging.getLogger("fermi.server")

    def load():
        engine = load_engine(args, notice=log.info)  # (the log's format: text or JSON)
        if template is not None:
            engine.model = dataclasses.replace(engine.model, chat_template=template)
            engine.template = ChatTemplate(template, engine.tokenizer.bos_token, engine.tokenizer.eos_token)
        return engine

    failed: list[BaseException] = []

    def on_error(e: BaseException) -> None:
        failed.append(e)
        server.should_exit = True

    def on_ready(engine) -> None:
        log.info("ready: %s, %d slots decoded together", engine.name, len(app.state.fleet.primary.scheduler.slots))

    def load_model(spec: str):  # another model a request names: the same backend, dtype and weights' format
        return Engine.load(spec, args.backend, args.dtype, args.quantize)

    app = create_app(load, settings, on_ready=on_ready, on_error=on_error, load_model=load_model)
    config = uvicorn.Config(RequestLog(app), host=settings.host, port=settings.port, log_level="warning",
                            access_log=False, lifespan="on", timeout_graceful_shutdown=args.drain_seconds + 5,
                            loop="asyncio" if settings.grpc_port is not None else "auto",  # grpc.aio: asyncio's
                            http=protocol(args.header_timeout, args.max_connections))
    sock = bind(settings.host, settings.port)
    if settings.grpc_port:  # a port in use is one clear line now, not a failed startup later
        bind(settings.host, settings.grpc_port, "gRPC ").close()
    server = make_server(config, app.state.fleet, args.drain_seconds)
    server.run(sockets=[sock])
    if failed:
        e = failed[0]
        raise e if isinstance(e, (FermiError, OSError, ValueError, RuntimeError)) else FermiError(str(e))
    return 0


def bind(host: str, port: int, what: str = "") -> socket.socket:
    """The listening socket, bound before anything loads: a port in use is one
    clear error line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise FermiError(f"cannot listen {what}on {host}:{port}: {e.strerror or e}") from None
    return sock


def protocol(header_s: float, max_connections: int):
    """uvicorn's h11 protocol, plus: a connection whose request head is not whole
    `header_s` after it opened (or after its last answer) is closed, so clients that
    never finish their headers cannot hold connections; a connection beyond
    `max_connections` open ones is answered 503 (the API's error object,
    Retry-After) and closed."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)  # (it joins self.connections)
            if len(self.connections) > max_connections:
                self.app = too_many_connections
            self.head_timer = self.loop.call_later(header_s, self.head_overdue)

        def on_response_complete(self):
            super().on_response_complete()
            self.head_timer.cancel()
            if not self.transport.is_closing():
                self.head_timer = self.loop.call_later(header_s, self.head_overdue)

        def connection_lost(self, exc):
            self.head_timer.cancel()
            super().connection_lost(exc)

        def head_overdue(self):
            waiting = self.cycle is None or self.cycle.response_complete  # no request being answered
            if waiting and not self.transport.is_closing():
                self.transport.close()

    return Protocol


async def too_many_connections(scope, receive, send) -> None:
    import msgspec

    from fermi.server.schemas import APIError

    message = "the server has as many connections open as --max-connections allows; try again shortly"
    body = msgspec.json.encode(APIError(503, message, type="server_error", code="too_many_connections").body())
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def make_server(config, fleet, drain_s: float = 0.0):
    """uvicorn's Server, plus: SIGTERM drains (new and queued requests get 503,
    running answers have `drain_s` seconds to finish, then they are cut), Ctrl-C
    (or a second signal) cuts them at once; a clean shutdown exits 0 rather than
    re-raising the signal."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                host, port = (sockets[0].getsockname()[:2] if sockets else (config.host, config.port))
                logging.getLogger("fermi.server").info(
                    "listening on http://%s:%d (model %s)", host, port,
                    "ready" if fleet.primary is None or fleet.primary.ready.is_set() else "loading")

        def handle_exit(self, sig, frame):
            if sig == signal.SIGTERM and drain_s > 0 and not self.should_exit:
                logging.getLogger("fermi.server").info("draining: running answers have %gs to finish", drain_s)
                fleet.drain()
                cut = threading.Timer(drain_s, fleet.cancel_all)
                cut.daemon = True
                cut.start()
            else:
                fleet.cancel_all()
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

    return Server(config)
