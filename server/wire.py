"""The wire logic every API shares: tools, tool choice and response formats as
the engine takes them, checked (a 400 naming the field, never a dropped value);
stop lists; the request log's counts; the error that ends a stream."""

from __future__ import annotations

import math
import re
from typing import AsyncIterator, Callable

import msgspec
from litestar.response import Stream

from fermi.errors import FermiError
from fermi.grammar import GrammarError, check, json_grammar
from fermi.serving import Done
from fermi.tools import ToolSet

from .schemas import APIError, ErrorBody, Options

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# "cancelled" reaches only an answer nobody reads (its client gone); one the server cut raises scheduler.Cut.
FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop"}


def tool_set(tools: list[dict] | None, choice, parallel: bool | None, param: str = "tools") -> ToolSet | None:
    """OpenAI function tools (chat's {"type", "function": {…}} or the Responses API's
    flat {"type", "name", …}) and tool_choice, as the engine takes them."""
    if choice is not None and not tools and choice != "none":
        raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
    if not tools:
        return None
    specs = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise APIError(400, f"tools of type '{t.get('type')}' are not supported: send function tools",
                           param=f"{param}[{i}].type", code="unsupported_value")
        fn = t.get("function", t)
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise APIError(400, "a function's name must be 1 to 64 letters, digits, '_' or '-'",
                           param=f"{param}[{i}].name", code="invalid_value")
        spec = {"name": name}
        if fn.get("description"):
            spec["description"] = fn["description"]
        spec["parameters"] = fn.get("parameters") or {"type": "object", "properties": {}}
        specs.append({"type": "function", "function": spec})
    names = [s["function"]["name"] for s in specs]
    if len(set(names)) != len(names):
        raise APIError(400, "two tools have the same name", param=param, code="invalid_value")
    toolset = ToolSet(specs, tool_choice(choice, names), True if parallel is None else parallel)
    if toolset.forced:  # its grammar must be enforceable
        for i, spec in enumerate(specs):
            if toolset.choice in ("required", spec["function"]["name"]):
                schema_check(spec["function"]["parameters"], f"{param}[{i}].parameters")
    return toolset


def tool_choice(choice, names: list[str]) -> str:
    """none | auto | required | a tool's name, from OpenAI's spellings."""
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice must be none, auto, required or a function, not '{choice}'",
                           param="tool_choice", code="invalid_value")
        return choice
    name = (choice.get("function") or {}).get("name") or choice.get("name")
    if choice.get("type") != "function" or not name:
        raise APIError(400, "tool_choice must name a function: {\"type\": \"function\", \"function\": {\"name\": …}}",
                       param="tool_choice", code="invalid_value")
    if name not in names:
        raise APIError(400, f"tool_choice names '{name}', which is not among the tools", param="tool_choice",
                       code="invalid_value")
    return name


def json_format(fmt: dict | None, param: str, flat: bool = False) -> dict | bool | None:
    """response_format (chat) or text.format (Responses, flat: its schema beside the
    type) -> the engine's json_schema: None (text), True (any JSON object), a schema."""
    if not fmt:
        return None
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return True
    if kind != "json_schema":
        raise APIError(400, f"{param} type must be text, json_object or json_schema, not '{kind}'",
                       param=f"{param}.type", code="invalid_value")
    where = fmt if flat else fmt.get("json_schema")
    spot = f"{param}.schema" if flat else f"{param}.json_schema.schema"
    if not isinstance(where, dict) or not isinstance(where.get("schema"), dict):
        raise APIError(400, f"{spot} is required: a JSON schema object", param=spot, code="missing_required_parameter")
    schema_check(where["schema"], spot)
    return where["schema"]


def schema_check(schema, param: str) -> None:
    try:
        check(json_grammar(schema), f"the JSON schema at {param}")
    except GrammarError as e:
        raise APIError(400, str(e), param=param, code="invalid_json_schema") from None


def options(given: dict) -> Options:
    """Sampling and thinking values a front door read without msgspec's request
    decoding (gRPC), checked as the HTTP requests' are: a 400 naming the value."""
    try:
        return msgspec.convert(given, Options)
    except msgspec.ValidationError as e:
        message, _, where = str(e).rpartition(" - at `$.")
        param = where.rstrip("`") or None
        raise APIError(400, f"invalid '{param}': {message}" if param else str(e), param=param,
                       code="invalid_value") from None


def loggable(text: str) -> str:
    """Text from a request, safe in a log line: control characters (a forged line
    break), backslashes and non-ASCII escaped as Python writes them."""
    return text.encode("unicode_escape").decode("ascii")


FLOOR = -9999.0  # OpenAI's logprob for a token of no probability


def logprob(value) -> float:
    """A sample's logprob as JSON can carry it (an impossible token: FLOOR, never null)."""
    v = 0.0 if value is None else float(value)
    return v if math.isfinite(v) else FLOOR


def stop_list(stop: str | list[str] | None) -> list[str] | None:
    return [stop] if isinstance(stop, str) else stop


def note(log: dict, done: Done) -> None:
    """Leave the counts for the request log line."""
    log.update(prompt_tokens=done.prompt_tokens, cached_tokens=done.cached_tokens,
               completion_tokens=done.completion_tokens)
    if done.finish_reason == "cancelled":
        log["note"] = "cancelled"


class Streamed(Stream):
    """A streamed answer sent as its own media type (Litestar would give it the
    route's, application/json)."""

    def to_asgi_response(self, *args, media_type=None, **kwargs):
        return super().to_asgi_response(*args, media_type=self.media_type, **kwargs)


def event_stream(body: AsyncIterator[bytes]) -> Streamed:
    """Server-sent events (OpenAI's streams), never cached or buffered on the way."""
    return Streamed(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                   "X-Accel-Buffering": "no"})


def ndjson_stream(body: AsyncIterator[bytes]) -> Streamed:
    """One JSON object a line (Ollama's streams)."""
    return Streamed(body, media_type="application/x-ndjson")


def sse(obj) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


def sse_error(message: str) -> list[bytes]:
    """The end of an OpenAI SSE stream that failed after its headers went out."""
    return [sse({"error": ErrorBody(message, "server_error", None, "generation_failed")}), b"data: [DONE]\n\n"]


async def guarded(job, log: dict, body: AsyncIterator[bytes],
                  ending: Callable[[str], list[bytes]]) -> AsyncIterator[bytes]:
    """A streamed answer's bytes; a generation that fails after the headers went out
    ends with `ending(message)`, and a consumer gone (or done) lets go of the job."""
    try:
        async for chunk in body:
            yield chunk
    except (FermiError, APIError) as e:
        if done := getattr(e, "done", None):  # cut short: its tokens count in the log
            note(log, done)
            log["note"] = "cut short"
        for chunk in ending(e.message if isinstance(e, APIError) else str(e)):
            yield chunk
    finally:
        if not job.finished:
            log["note"] = "client disconnected"
        job.abandon()
