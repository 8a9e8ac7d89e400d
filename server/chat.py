"""POST /v1/chat/completions: OpenAI's chat completions, streamed (SSE chunks
ending with `data: [DONE]`) or whole."""

from __future__ import annotations

import time
import uuid
from dataclasses import replace
from typing import AsyncIterator

import msgspec
from litestar import Controller, Request, post

from fermi.engine import Engine
from fermi.serving import Delta, Done, ToolCall

from .fleet import Fleet
from .scheduler import Job
from .schemas import (
    APIError, AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatMessage, ChatRequest, Choice,
    ChoiceLogprobs, ChunkChoice, ChunkDelta, CompletionTokensDetails, FunctionCall, PromptTokensDetails,
    TokenLogprob, ToolCallOut, TopLogprob, Usage,
)
from .wire import FINISH, event_stream, guarded, json_format, logprob, note, sse, sse_error, stop_list, tool_set

OPEN, CLOSE = "<think>\n", "\n</think>\n\n"  # inline reasoning (reasoning_format "inline")


class ChatController(Controller):
    path = "/chat/completions"
    tags = ["chat"]

    @post(summary="Create a chat completion", status_code=200,
          description="OpenAI's chat completions, with function tools and response_format (JSON "
                      "object or schema, enforced by a grammar). With stream=true the answer comes as "
                      "server-sent chat.completion.chunk events ending with `data: [DONE]`.")
    async def create(self, request: Request, data: ChatRequest, fleet: Fleet) -> ChatCompletion:
        serving = await fleet.get(data.model)
        engine = serving.require_engine()
        tools = tool_set(data.tools, data.tool_choice, data.parallel_tool_calls)
        schema = json_format(data.response_format, "response_format")
        messages = [message_dict(m, i) for i, m in enumerate(data.messages)]
        sampling = data.sampling()
        if data.logprobs:
            sampling["logprobs"] = data.top_logprobs or 0
        job = await serving.start_job(messages, data.thinking_mode(), sampling,
                                     data.max_completion_tokens or data.max_tokens, stop_list(data.stop), data.n or 1,
                                     tools=tools, json_schema=schema)
        inline = data.reasoning_format in ("inline", "none")
        replies = [Reply(engine, inline, bool(data.logprobs), i) for i in range(len(job.requests))]
        for r in replies[1:]:
            r.id, r.created = replies[0].id, replies[0].created
        log = request.scope.get("fermi.log", {})
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            return event_stream(guarded(job, log, sse_chunks(job, replies, include_usage, log), sse_error))
        choices, dones = [], []
        for reply, records in zip(replies, await job.collect(request.receive)):
            for rec in records[:-1]:
                reply.add(rec)
                reply.token_logprobs(rec)
            dones.append(records[-1])
            choices.append(Choice(index=reply.index, message=reply.message(), logprobs=reply.all_logprobs(),
                                  finish_reason=FINISH[records[-1].finish_reason]))
        note(log, total(dones))
        return ChatCompletion(id=replies[0].id, created=replies[0].created, model=engine.name, choices=choices,
                              usage=usage(replies, dones))


def total(dones: list[Done]) -> Done:
    """The choices' counts together: the prompt once, every choice's tokens."""
    d = dones[0]
    return replace(d, completion_tokens=sum(x.completion_tokens for x in dones))


def usage(replies: list["Reply"], dones: list[Done]) -> Usage:
    d = total(dones)
    reasoning = sum(r.reasoning_tokens(x) for r, x in zip(replies, dones))
    return Usage(prompt_tokens=d.prompt_tokens, completion_tokens=d.completion_tokens,
                 total_tokens=d.prompt_tokens + d.completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(d.cached_tokens),
                 completion_tokens_details=CompletionTokensDetails(reasoning))


def message_dict(m: ChatMessage, index: int) -> dict:
    """A request message as the chat template wants it: text content, and an
    assistant's tool calls (their arguments' JSON as the engine reads it)."""
    if m.content is None or isinstance(m.content, str):
        text = m.content or ""
    else:
        texts = []
        for j, part in enumerate(m.content):
            if part.type not in ("text", "input_text", "output_text") or part.text is None:
                raise APIError(400, f"content parts of type '{part.type}' are not supported: send text",
                               param=f"messages[{index}].content[{j}]", code="unsupported_value")
            texts.append(part.text)
        text = "\n".join(texts)
    out = {"role": "system" if m.role == "developer" else m.role, "content": text}
    reasoning = m.reasoning_content or m.reasoning
    if reasoning and m.role == "assistant":
        out["reasoning_content"] = reasoning
    if m.name:
        out["name"] = m.name
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls and m.role == "assistant":
        calls = []
        for j, c in enumerate(m.tool_calls):
            fn = c.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise APIError(400, "a tool call needs function.name", param=f"messages[{index}].tool_calls[{j}]",
                               code="invalid_value")
            calls.append({"id": c.get("id"), "type": "function",
                          "function": {"name": fn["name"], "arguments": fn.get("arguments") or "{}"}})
        out["tool_calls"] = calls
    return out


class Reply:
    """The answer so far, and its pieces in the shapes OpenAI uses."""

    def __init__(self, engine: Engine, inline: bool = False, logprobs: bool = False, index: int = 0):
        self.engine, self.inline, self.want_logprobs, self.index = engine, inline, logprobs, index
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.calls: list[ToolCallOut] = []
        self.kind = "content"  # of the last piece, for inline reasoning's tags

    def add(self, d: Delta | ToolCall) -> ChunkDelta:
        """Record a delta or a tool call's piece; returns it as a chunk's delta."""
        if isinstance(d, ToolCall):  # a call's first piece names it; each piece adds to its arguments
            if d.name is not None:
                self.calls.append(ToolCallOut(id=d.id, type="function", function=FunctionCall(name=d.name, arguments="")))
            self.calls[d.index].function.arguments += d.arguments
            piece = ToolCallOut(index=d.index, function=FunctionCall(arguments=d.arguments))
            if d.name is not None:
                piece.id, piece.type, piece.function.name = d.id, "function", d.name
            return ChunkDelta(tool_calls=[piece])
        if d.kind == "reasoning":
            self.reasoning.append(d.text)
            if self.inline:
                text = (OPEN if self.kind != "reasoning" else "") + d.text
                self.kind = "reasoning"
                self.content.append(text)
                return ChunkDelta(content=text)
            return ChunkDelta(reasoning_content=d.text, reasoning=d.text)
        text = (CLOSE if self.inline and self.kind == "reasoning" else "") + d.text
        self.kind = "content"
        self.content.append(text)
        return ChunkDelta(content=text)

    def close(self) -> ChunkDelta | None:
        """The closing tag of an inline reasoning the answer never left."""
        if self.inline and self.kind == "reasoning":
            self.kind = "content"
            self.content.append(CLOSE.rstrip())
            return ChunkDelta(content=CLOSE.rstrip())
        return None

    def token_logprobs(self, d: Delta | ToolCall) -> list[TokenLogprob]:
        if not self.want_logprobs or d.kind == "tool_call" or (d.kind == "reasoning" and not self.inline):
            return []
        out = [token_logprob(self.engine, s) for s in d.logprobs]
        self.logprobs += out
        return out

    def message(self) -> AssistantMessage:
        self.close()
        content = "".join(self.content)
        msg = AssistantMessage(content=content or (None if self.calls else ""))
        if self.reasoning and not self.inline:
            msg.reasoning_content = msg.reasoning = "".join(self.reasoning)
        if self.calls:
            msg.tool_calls = self.calls
        return msg

    def all_logprobs(self) -> ChoiceLogprobs | None:
        return ChoiceLogprobs(self.logprobs) if self.want_logprobs else None

    def reasoning_tokens(self, done: Done) -> int:
        reasoning = "".join(self.reasoning)
        return min(done.completion_tokens, len(self.engine.tokenizer.encode(reasoning))) if reasoning else 0


def token_logprob(engine: Engine, sample) -> TokenLogprob:
    """A backends.Sample as OpenAI's logprob entry; a token's text is its own decode."""

    def piece(token: int) -> tuple[str, list[int]]:
        text = engine.tokenizer.decode([token])
        return text, list(text.encode("utf-8"))

    top = []
    for token, lp in sample.top or []:
        t, b = piece(token)
        top.append(TopLogprob(t, logprob(lp), b))
    text, raw = piece(sample.token)
    return TokenLogprob(text, logprob(sample.logprob), raw, top)


async def sse_chunks(job: Job, replies: list[Reply], include_usage: bool, log: dict) -> AsyncIterator[bytes]:
    """The chunks (wrapped in wire.guarded by the route)."""
    first = replies[0]
    usage_field = None if include_usage else msgspec.UNSET

    def chunk(reply: Reply | None, delta: ChunkDelta | None = None, finish: str | None = None, logprobs=None,
              usage_value=None) -> bytes:
        choices = [] if reply is None else [ChunkChoice(index=reply.index, delta=delta, finish_reason=finish,
                                                        logprobs=logprobs)]
        return sse(ChatCompletionChunk(id=first.id, created=first.created, model=first.engine.name,
                                       choices=choices, usage=usage_value or usage_field))

    log.update(prompt_tokens=len(job.request.ids))
    dones: list[Done | None] = [None] * len(replies)
    for reply in replies:
        yield chunk(reply, ChunkDelta(role="assistant", content=""))
    async for index, rec in job.records():
        reply = replies[index]
        if isinstance(rec, Done):
            dones[index] = rec
            if (closing := reply.close()) is not None:
                yield chunk(reply, closing)
            yield chunk(reply, ChunkDelta(), FINISH[rec.finish_reason])
            continue
        delta = reply.add(rec)
        log["completion_tokens"] = log.get("completion_tokens", 0) + 1  # deltas until Done says
        lp = reply.token_logprobs(rec)
        yield chunk(reply, delta, logprobs=ChoiceLogprobs(lp) if reply.want_logprobs else None)
    note(log, total(dones))
    if include_usage:
        yield chunk(None, usage_value=usage(replies, dones))
    yield b"data: [DONE]\n\n"
