"""The gRPC service fermi.v1.Fermi (fermi.proto) on the HTTP server's event loop
and fleet: its requests go to the same engine threads as the HTTP ones, so both
decode in one batch. Also the standard grpc.health.v1.Health service and server
reflection (grpcurl needs no proto file).

Values are checked as the HTTP APIs check theirs (wire.options), and every
refusal is a status code with a readable message: INVALID_ARGUMENT (an empty
prompt, a prompt longer than the context, a bad value), NOT_FOUND (a session
unknown, expired or evicted; a model not here), FAILED_PRECONDITION (a session
already generating), RESOURCE_EXHAUSTED (the queue is full), UNAVAILABLE (a model
loading, the server shutting down), UNAUTHENTICATED (--api-key without
`authorization: Bearer …` metadata). A client that cancels its stream cancels its
request: it leaves the batch before the next step."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fermi.errors import FermiError
from fermi.serving import Done

from .. import wire
from ..fleet import Fleet
from ..models import all_models, health_of
from ..schemas import APIError
from . import fermi_pb2 as pb
from . import fermi_pb2_grpc as pb_grpc
from .sessions import Session, SessionError, Sessions

log = logging.getLogger("fermi.server")

SERVICE = pb.DESCRIPTOR.services_by_name["Fermi"].full_name  # fermi.v1.Fermi
OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # the calls --api-key leaves open
Code = grpc.StatusCode
STATUS = {400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED, 404: Code.NOT_FOUND,
          409: Code.FAILED_PRECONDITION, 413: Code.INVALID_ARGUMENT, 429: Code.RESOURCE_EXHAUSTED,
          503: Code.UNAVAILABLE}
SESSION_STATUS = {"not_found": Code.NOT_FOUND, "busy": Code.FAILED_PRECONDITION, "full": Code.RESOURCE_EXHAUSTED}
THINKING = {pb.THINKING_AUTO: "auto", pb.THINKING_ON: "on", pb.THINKING_OFF: "off"}
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
KIND = {"content": pb.KIND_CONTENT, "reasoning": pb.KIND_REASONING}
ROLES = ("system", "user", "assistant")
SAMPLING = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
            "repeat_penalty": "repetition_penalty"}


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def refused(e: Exception) -> Refused:
    if isinstance(e, Refused):
        return e
    if isinstance(e, SessionError):
        return Refused(SESSION_STATUS[e.code], e.message)
    if isinstance(e, APIError):
        code = Code.RESOURCE_EXHAUSTED if e.code == "overloaded" else STATUS.get(e.status, Code.INTERNAL)
        return Refused(code, e.message)
    if isinstance(e, FermiError):
        return Refused(Code.INVALID_ARGUMENT, str(e))
    log.error("unexpected error in a gRPC call", exc_info=e)
    return Refused(Code.INTERNAL, f"internal error ({type(e).__name__}); the server keeps serving")


def values(r) -> tuple[str, dict, int | None, list[str] | None]:
    """A request's thinking mode, sampling, max tokens and stop strings, checked."""
    if r.thinking not in THINKING:
        raise APIError(400, f"thinking must be THINKING_AUTO, THINKING_ON or THINKING_OFF, not {r.thinking}")
    given = {}
    for name, field in SAMPLING.items():
        if r.HasField(name):
            value = getattr(r, name)
            given[field] = float(f"{value:.7g}") if isinstance(value, float) else value  # float32 -> the decimal sent
    try:
        options = wire.options(given)
    except APIError as e:
        spelled = {v: k for k, v in SAMPLING.items()}.get(e.param, e.param)
        raise APIError(400, e.message.replace(f"'{e.param}'", spelled), param=spelled) from None
    if r.HasField("max_new_tokens") and r.max_new_tokens < 1:
        raise APIError(400, "max_new_tokens must be at least 1 (leave it unset for up to the context's end)")
    max_tokens = r.max_new_tokens if r.HasField("max_new_tokens") else None
    return THINKING[r.thinking], options.sampling(), max_tokens, list(r.stop) or None


def usage(done: Done) -> pb.Usage:
    return pb.Usage(prompt_tokens=done.prompt_tokens, cached_tokens=done.cached_tokens,
                    completion_tokens=done.completion_tokens, time_to_first_token_s=done.ttft,
                    tokens_per_second=done.decode_tps)


class FermiService(pb_grpc.FermiServicer):
    def __init__(self, fleet: Fleet, sessions: Sessions):
        self.fleet, self.sessions = fleet, sessions

    async def Generate(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        started, session, new, held = time.perf_counter(), None, False, False
        try:
            thinking, sampling, max_tokens, stop = values(request)
            if not request.prompt.strip():
                raise APIError(400, "prompt is empty: send the next user message")
            if request.session_id:
                session = self.sessions.get(request.session_id)
                if session.busy:
                    raise SessionError("busy", f"session {session.id} is already generating an answer; wait for "
                                               "its end (or cancel that stream)")
                if request.model and request.model not in session.names:
                    raise APIError(400, f"session {session.id} is a conversation with {session.model}; "
                                        "start a new session for another model")
            else:
                session, new = self.sessions.create(), True
            session.busy = held = True
            serving = await self.fleet.get(request.model if new else session.model)
            if new:
                session.model = serving.require_engine().name
                session.names = {session.model, request.model} - {""}
            system = request.system or session.system
            user = {"role": "user", "content": request.prompt}
            messages = ([{"role": "system", "content": system}] if system else []) + session.messages + [user]
            job = await serving.start_job(messages, thinking, sampling, max_tokens, stop)
        except Exception as e:  # noqa: BLE001 - every refusal is a status code
            if held:  # (a session busy with another request stays busy)
                session.busy = False
            if new:
                self.sessions.close(session.id)
            await self.refuse(context, "Generate", e, started)
            return
        session.system = system
        content: list[str] = []

        def after(outcome: str) -> None:
            session.busy = False
            self.sessions.touch(session)
            if outcome != "failed":  # answered, or cancelled: the partial answer stays, as in fermi chat
                session.messages += [user, {"role": "assistant", "content": "".join(content)}]

        async for response in self.relay("Generate", job, context, session.id, content, started, after):
            yield response

    async def Chat(self, request: pb.ChatRequest, context) -> AsyncIterator[pb.GenerateResponse]:
        started = time.perf_counter()
        try:
            thinking, sampling, max_tokens, stop = values(request)
            if not request.messages:
                raise APIError(400, "messages is empty: send at least one message")
            for i, m in enumerate(request.messages):
                if m.role not in ROLES:
                    raise APIError(400, f"messages[{i}].role must be system, user or assistant, not '{m.role}'")
            serving = await self.fleet.get(request.model or None)
            job = await serving.start_job([{"role": m.role, "content": m.content} for m in request.messages],
                                          thinking, sampling, max_tokens, stop)
        except Exception as e:  # noqa: BLE001
            await self.refuse(context, "Chat", e, started)
            return
        async for response in self.relay("Chat", job, context, "", [], started):
            yield response

    async def ResetSession(self, request: pb.SessionRequest, context) -> pb.SessionInfo:
        try:
            s = self.idle_session(request.session_id)
            info = self.info(s)
            s.messages = []
            return info
        except Exception as e:  # noqa: BLE001
            await self.refuse(context, "ResetSession", e)

    async def CloseSession(self, request: pb.SessionRequest, context) -> pb.SessionInfo:
        try:
            return self.info(self.sessions.close(self.idle_session(request.session_id).id))
        except Exception as e:  # noqa: BLE001
            await self.refuse(context, "CloseSession", e)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.Model(id=m.id, loaded=bool(m.loaded), owned_by=m.owned_by)
                                             for m in await all_models(self.fleet)])

    # --- the parts

    async def relay(self, method: str, job, context, session_id: str, content: list[str], started: float,
                    after=None) -> AsyncIterator[pb.GenerateResponse]:
        """stream(), then: the job let go, after(outcome) called, the log line written;
        outcome: ok (answered), cancelled (the client left), failed."""
        outcome, last = "cancelled", None
        try:
            async for response in self.stream(job, context, session_id, content):
                last = response
                yield response
            outcome = "ok"
        except Exception:
            outcome = "failed"
            raise
        finally:
            job.abandon()
            if after is not None:
                after(outcome)
            self.logged(method, outcome, last.usage if outcome == "ok" else None, started)

    async def stream(self, job, context, session_id: str, content: list[str]) -> AsyncIterator[pb.GenerateResponse]:
        """The job's records as responses (content pieces also into `content`)."""
        try:
            async for _, rec in job.records():
                if isinstance(rec, Done):
                    yield pb.GenerateResponse(session_id=session_id, finish_reason=FINISH[rec.finish_reason],
                                              usage=usage(rec))
                    continue
                if rec.kind == "content":
                    content.append(rec.text)
                piece = pb.GenerateResponse(token=rec.text, token_ids=rec.tokens, session_id=session_id,
                                            kind=KIND[rec.kind])
                if rec.tokens:
                    piece.token_id = rec.tokens[-1]
                yield piece
        except (FermiError, APIError, Refused) as e:  # (a cut answer: scheduler.Cut, UNAVAILABLE)
            await self.refuse(context, "stream", e)

    def idle_session(self, session_id: str) -> Session:
        if not session_id:
            raise APIError(400, "session_id is empty")
        s = self.sessions.get(session_id)
        if s.busy:
            raise SessionError("busy", f"session {s.id} is generating an answer; wait for its end (or cancel it)")
        return s

    @staticmethod
    def info(s: Session) -> pb.SessionInfo:
        return pb.SessionInfo(session_id=s.id, messages=len(s.messages), model=s.model or "")

    async def refuse(self, context, method: str, e: Exception, started: float | None = None) -> None:
        r = refused(e)
        if started is not None:
            log.info("gRPC %s %s %.3fs (%s)", method, r.code.name, time.perf_counter() - started, wire.loggable(r.message))
        await context.abort(r.code, r.message)

    @staticmethod
    def logged(method: str, outcome: str, u: pb.Usage | None, started: float) -> None:
        """The call's line in the request log, as the HTTP requests have theirs."""
        took = time.perf_counter() - started
        if outcome != "ok":
            log.info("gRPC %s %s %.3fs (%s)", method, outcome.upper(), took,
                     "client cancelled" if outcome == "cancelled" else "the answer failed")
            return
        log.info("gRPC %s OK prompt=%d cached=%d completion=%d %.3fs", method, u.prompt_tokens, u.cached_tokens,
                 u.completion_tokens, took)


class KeyCheck(grpc.aio.ServerInterceptor):
    """--api-key: every call carries `authorization: Bearer KEY`, but for the health
    checks (probes) and reflection (the service's schema, public in the repo)."""

    def __init__(self, key: str):
        self.key = key.encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN):
            return handler
        metadata = dict(details.invocation_metadata or ())
        scheme, _, token = str(metadata.get("authorization", "")).partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.key):
            return handler

        async def deny(request, context):
            await context.abort(Code.UNAUTHENTICATED, "missing or wrong API key: send the metadata "
                                                      "'authorization: Bearer <key>'")

        kind = ("unary_stream" if handler.response_streaming else "unary_unary") if not handler.request_streaming \
            else ("stream_stream" if handler.response_streaming else "stream_unary")
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(deny, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RpcServer:
    """The gRPC server beside the HTTP one: start() on the running event loop."""

    def __init__(self, fleet: Fleet, host: str, port: int, api_key: str | None, session_max: int,
                 session_ttl_s: float | None):
        self.fleet, self.host, self.port, self.api_key = fleet, host, port, api_key
        self.sessions = Sessions(session_max, session_ttl_s)
        self.server = self.health = self.watcher = None

    async def start(self) -> int:
        """Listen; the port bound (RuntimeError: it cannot be)."""
        self.server = grpc.aio.server(interceptors=[KeyCheck(self.api_key)] if self.api_key else None,
                                      options=[("grpc.so_reuseport", 0)])  # a port in use is an error
        pb_grpc.add_FermiServicer_to_server(FermiService(self.fleet, self.sessions), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        try:
            self.port = self.server.add_insecure_port(address(self.host, self.port))
        except RuntimeError as e:
            raise RuntimeError(f"cannot listen for gRPC on {address(self.host, self.port)}: {e}") from None
        await self.server.start()
        await self.watch_once()
        self.watcher = asyncio.ensure_future(self.watch())
        log.info("gRPC: listening on %s (%s)", address(self.host, self.port), SERVICE)
        return self.port

    async def watch_once(self) -> None:
        """The health status follows /ready (the model loaded, not draining); idle
        sessions past the TTL go."""
        up = health_of(self.fleet).status == "ok"
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)
        self.sessions.expire()

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            await self.watch_once()

    async def stop(self, grace: float = 2.0) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
