"""POST /v1/responses: OpenAI's Responses API. The answer is a response object
whose output holds a `reasoning` item (when the model thought), a `message` item
and a `function_call` item per tool call; streamed, it comes as typed events,
each with its sequence_number:

    response.created, response.in_progress,
    per text item: response.output_item.added, response.content_part.added,
              response.reasoning_text.delta* / response.output_text.delta*,
              response.reasoning_text.done / response.output_text.done,
              response.content_part.done, response.output_item.done,
    per call: response.output_item.added, response.function_call_arguments.delta*,
              response.function_call_arguments.done, response.output_item.done,
    response.completed (or response.incomplete when max_output_tokens ran out).

Input items: messages, reasoning, function_call (the assistant's past calls) and
function_call_output (their results)."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

import msgspec
from litestar import Controller, Request, post

from fermi.engine import Engine
from fermi.sampling import SamplingParams
from fermi.serving import Delta, Done, ToolCall

from .fleet import Fleet
from .scheduler import Job
from .schemas import (
    APIError, ErrorBody, FunctionCallItem, IncompleteDetails, InputItem, InputTokensDetails, MessageItem,
    OutputText, OutputTokensDetails, ReasoningConfig, ReasoningItem, ReasoningText, ResponseObject,
    ResponsesRequest, ResponseUsage, TextConfig,
)
from .wire import event_stream, guarded, json_format, note, stop_list, tool_set

TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesController(Controller):
    path = "/responses"
    tags = ["responses"]

    @post(summary="Create a model response", status_code=200,
          description="OpenAI's Responses API. With stream=true the answer comes as typed server-sent "
                      "events, each with its sequence_number, ending in response.completed or "
                      "response.incomplete.")
    async def create(self, request: Request, data: ResponsesRequest, fleet: Fleet) -> ResponseObject:
        serving = await fleet.get(data.model)
        engine = serving.require_engine()
        if data.previous_response_id:
            raise APIError(400, "previous_response_id is not supported: this server stores no responses; "
                           "send the whole conversation as input", param="previous_response_id",
                           code="unsupported_value")
        tools = tool_set(data.tools, data.tool_choice, data.parallel_tool_calls)
        schema = json_format((data.text or {}).get("format"), "text.format", flat=True)
        messages = input_messages(data)
        effort = data.reasoning.effort if data.reasoning else None
        job = await serving.start_job(messages, data.thinking_mode(effort), data.sampling(), data.max_output_tokens,
                                     stop_list(data.stop), tools=tools, json_schema=schema)
        build = Builder(engine, data, job.request.params)
        log = request.scope.get("fermi.log", {})
        if data.stream:
            return event_stream(guarded(job, log, sse_events(job, build, log), build.failed))
        records = (await job.collect(request.receive))[0]
        for rec in records[:-1]:
            build.add(rec)
        note(log, records[-1])
        build.finish(records[-1])
        return build.response()


def input_messages(data: ResponsesRequest) -> list[dict]:
    """instructions + input as chat messages. A reasoning item's text goes with the
    assistant message after it, as reasoning_content (the template decides);
    function_call items are that message's tool calls, function_call_output items
    tool messages."""
    messages = [{"role": "system", "content": data.instructions}] if data.instructions else []
    if isinstance(data.input, str):
        return messages + [{"role": "user", "content": data.input}]
    if not data.input:
        raise APIError(400, "input must not be empty", param="input", code="invalid_value")
    reasoning = None
    for i, item in enumerate(data.input):
        kind = item.type or "message"
        if kind == "reasoning":
            parts = item.content or []
            reasoning = parts if isinstance(parts, str) else "".join(p.text or "" for p in parts)
            continue
        if kind == "function_call":
            if not item.name or item.call_id is None:
                raise APIError(400, "a function_call item needs name and call_id", param=f"input[{i}]",
                               code="missing_required_parameter")
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments or "{}"}}
            if not (messages and messages[-1]["role"] == "assistant" and reasoning is None):
                messages.append({"role": "assistant", "content": ""})
                if reasoning:
                    messages[-1]["reasoning_content"] = reasoning
                reasoning = None
            messages[-1].setdefault("tool_calls", []).append(call)
            continue
        if kind == "function_call_output":
            if item.call_id is None:
                raise APIError(400, "a function_call_output item needs call_id", param=f"input[{i}].call_id",
                               code="missing_required_parameter")
            output = item.output if isinstance(item.output, str) or item.output is None else \
                "\n".join(p.text or "" for p in item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output or ""})
            continue
        if kind != "message":
            raise APIError(400, f"input items of type '{kind}' are not supported", param=f"input[{i}].type",
                           code="unsupported_value")
        if item.role is None:
            raise APIError(400, "an input message needs a role", param=f"input[{i}].role", code="missing_required")
        message = {"role": "system" if item.role == "developer" else item.role, "content": item_text(item, i)}
        if item.role == "assistant" and reasoning:
            message["reasoning_content"] = reasoning
        reasoning = None
        messages.append(message)
    if not messages:
        raise APIError(400, "input holds no message", param="input", code="invalid_value")
    return messages


def item_text(item: InputItem, index: int) -> str:
    if item.content is None or isinstance(item.content, str):
        return item.content or ""
    texts = []
    for j, part in enumerate(item.content):
        if part.type not in TEXT_PARTS or part.text is None:
            raise APIError(400, f"content parts of type '{part.type}' are not supported: send text",
                           param=f"input[{index}].content[{j}]", code="unsupported_value")
        texts.append(part.text)
    return "\n".join(texts)


class Builder:
    """Turns records into output items (and their stream events), and the
    response object around them."""

    def __init__(self, engine: Engine, data: ResponsesRequest, params: SamplingParams):
        self.engine, self.data, self.params = engine, data, params
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.items: list[ReasoningItem | MessageItem | FunctionCallItem] = []
        self.texts: list[list[str]] = []  # per item, its text pieces
        self.seq = 0
        self.status = "in_progress"
        self.done: Done | None = None

    def event(self, type: str, **fields) -> bytes:
        body = {"type": type, "sequence_number": self.seq, **fields}
        self.seq += 1
        return b"event: " + type.encode() + b"\ndata: " + msgspec.json.encode(body) + b"\n\n"

    def response(self) -> ResponseObject:
        d, p = self.data, self.params
        usage = incomplete = None
        if self.done is not None:
            reasoning = "".join("".join(t) for it, t in zip(self.items, self.texts) if isinstance(it, ReasoningItem))
            r_tokens = len(self.engine.tokenizer.encode(reasoning)) if reasoning else 0
            usage = ResponseUsage(
                input_tokens=self.done.prompt_tokens,
                input_tokens_details=InputTokensDetails(self.done.cached_tokens,
                                                        self.done.prompt_tokens - self.done.cached_tokens),
                output_tokens=self.done.completion_tokens,
                output_tokens_details=OutputTokensDetails(min(r_tokens, self.done.completion_tokens)),
                total_tokens=self.done.prompt_tokens + self.done.completion_tokens,
            )
            if self.status == "incomplete":
                incomplete = IncompleteDetails("max_output_tokens")
        return ResponseObject(
            id=self.id, created_at=self.created, status=self.status,
            completed_at=int(time.time()) if self.status == "completed" else None,
            model=self.engine.name, output=list(self.items), usage=usage, incomplete_details=incomplete,
            instructions=d.instructions, max_output_tokens=d.max_output_tokens,
            temperature=p.temperature, top_p=p.top_p, metadata=d.metadata or {},
            reasoning=ReasoningConfig(d.reasoning.effort if d.reasoning else None,
                                      d.reasoning.summary if d.reasoning else None),
            text=TextConfig((d.text or {}).get("format") or {"type": "text"}),
            tools=d.tools or [], tool_choice=d.tool_choice or "auto",
            parallel_tool_calls=d.parallel_tool_calls is not False,
        )

    def start(self) -> list[bytes]:
        r = self.response()
        return [self.event("response.created", response=r), self.event("response.in_progress", response=r)]

    def _open(self, kind: str, call: ToolCall | None = None) -> list[bytes]:
        if call is not None:
            item = FunctionCallItem(id=f"fc_{uuid.uuid4().hex}", call_id=call.id, name=call.name, arguments="",
                                    status="in_progress")
            self.items.append(item)
            self.texts.append([])
            return [self.event("response.output_item.added", output_index=len(self.items) - 1, item=item)]
        if kind == "reasoning":
            item = ReasoningItem(id=f"rs_{uuid.uuid4().hex}", content=[], status="in_progress")
            part = ReasoningText(text="")
        else:
            item = MessageItem(id=f"msg_{uuid.uuid4().hex}", content=[], status="in_progress")
            part = OutputText(text="")
        self.items.append(item)
        self.texts.append([])
        i = len(self.items) - 1
        return [self.event("response.output_item.added", output_index=i, item=item),
                self.event("response.content_part.added", item_id=item.id, output_index=i, content_index=0,
                           part=part)]

    def _close(self, status: str) -> list[bytes]:
        """End the last item: its text done, its part done, the item done."""
        i = len(self.items) - 1
        item, text = self.items[i], "".join(self.texts[i])
        item.status = status
        if isinstance(item, FunctionCallItem):
            item.arguments = text
            return [self.event("response.function_call_arguments.done", item_id=item.id, output_index=i,
                               arguments=text, name=item.name),
                    self.event("response.output_item.done", output_index=i, item=item)]
        if isinstance(item, ReasoningItem):
            item.content = [ReasoningText(text=text)]
            done = self.event("response.reasoning_text.done", item_id=item.id, output_index=i, content_index=0,
                              text=text)
        else:
            item.content = [OutputText(text=text)]
            done = self.event("response.output_text.done", item_id=item.id, output_index=i, content_index=0,
                              text=text, logprobs=[])
        return [done,
                self.event("response.content_part.done", item_id=item.id, output_index=i, content_index=0,
                           part=item.content[0]),
                self.event("response.output_item.done", output_index=i, item=item)]

    def _open_kind(self) -> str | None:
        if not self.items or self.items[-1].status != "in_progress":
            return None
        item = self.items[-1]
        return "reasoning" if isinstance(item, ReasoningItem) else (
            "tool_call" if isinstance(item, FunctionCallItem) else "content")

    def add(self, d: Delta | ToolCall) -> list[bytes]:
        out: list[bytes] = []
        if isinstance(d, ToolCall):
            if d.name is not None:  # a new call: its own item
                if self._open_kind() is not None:
                    out += self._close("completed")
                out += self._open("tool_call", d)
            i = len(self.items) - 1
            if d.arguments:
                self.texts[i].append(d.arguments)
                out.append(self.event("response.function_call_arguments.delta", item_id=self.items[i].id,
                                      output_index=i, delta=d.arguments))
            return out
        if self._open_kind() != d.kind:
            if self._open_kind() is not None:
                out += self._close("completed")
            out += self._open(d.kind)
        i = len(self.items) - 1
        self.texts[i].append(d.text)
        item_id = self.items[i].id
        if d.kind == "reasoning":
            out.append(self.event("response.reasoning_text.delta", item_id=item_id, output_index=i,
                                  content_index=0, delta=d.text))
        else:
            out.append(self.event("response.output_text.delta", item_id=item_id, output_index=i,
                                  content_index=0, delta=d.text, logprobs=[]))
        return out

    def finish(self, done: Done) -> list[bytes]:
        """Close the open item; a response always ends with a message item."""
        self.done = done
        incomplete = done.finish_reason == "length"
        out: list[bytes] = []
        if self._open_kind() is not None:
            out += self._close("incomplete" if incomplete else "completed")
        if not any(isinstance(it, (MessageItem, FunctionCallItem)) for it in self.items):
            out += self._open("content")
            out += self._close("incomplete" if incomplete else "completed")
        self.status = "incomplete" if incomplete else "completed"
        return out

    def failed(self, message: str) -> list[bytes]:
        """A generation that failed after the headers went out: response.failed."""
        self.status = "failed"
        r = self.response()
        r.error = ErrorBody(message, "server_error", None, "generation_failed")
        return [self.event("response.failed", response=r)]

    def final(self) -> bytes:
        kind = "response.incomplete" if self.status == "incomplete" else "response.completed"
        return self.event(kind, response=self.response())


async def sse_events(job: Job, build: Builder, log: dict) -> AsyncIterator[bytes]:
    log.update(prompt_tokens=len(job.request.ids))
    for e in build.start():
        yield e
    async for _, rec in job.records():
        if isinstance(rec, Done):
            for e in build.finish(rec):
                yield e
            note(log, rec)
            yield build.final()
            break
        log["completion_tokens"] = log.get("completion_tokens", 0) + 1  # deltas until Done says
        for e in build.add(rec):
            yield e
