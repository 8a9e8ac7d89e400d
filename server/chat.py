"""POST /v1/chat/completions: OpenAI's chat completions, streamed (SSE chunks
ending with `data: [DONE]`) or whole."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

import msgspec
from litestar import Controller, Request, post
from litestar.response import Stream

from fermi.engine import Engine
from fermi.serving import Delta, Done
from fermi.errors import FermiError

from .scheduler import Job, Serving
from .schemas import (
    APIError, AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatMessage, ChatRequest, Choice,
    ChoiceLogprobs, ChunkChoice, ChunkDelta, CompletionTokensDetails, ErrorBody, PromptTokensDetails,
    TokenLogprob, TopLogprob, Usage,
)

OPEN, CLOSE = "<think>\n", "\n</think>\n\n"  # inline reasoning (reasoning_format "inline")
FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}


class ChatController(Controller):
    path = "/chat/completions"
    tags = ["chat"]

    @post(summary="Create a chat completion", status_code=200,
          description="OpenAI's chat completions. With stream=true the answer comes as server-sent "
                      "chat.completion.chunk events ending with `data: [DONE]`.")
    async def create(self, request: Request, data: ChatRequest, serving: Serving) -> ChatCompletion:
        engine = serving.require_model(data.model)
        if data.n is not None and data.n != 1:
            raise APIError(400, f"n={data.n} is not supported: this server makes one choice per request",
                           param="n", code="unsupported_value")
        if data.tools:
            raise APIError(400, "tools are not supported by this server", param="tools", code="unsupported_value")
        if data.response_format and data.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {\"type\": \"text\"} is supported",
                           param="response_format", code="unsupported_value")
        messages = [message_dict(m, i) for i, m in enumerate(data.messages)]
        sampling = data.sampling()
        if data.logprobs:
            sampling["logprobs"] = data.top_logprobs or 0
        stop = [data.stop] if isinstance(data.stop, str) else data.stop
        job = await serving.start_job(messages, data.thinking_mode(), sampling,
                                     data.max_completion_tokens or data.max_tokens, stop)
        reply = Reply(engine, inline=data.reasoning_format in ("inline", "none"), logprobs=bool(data.logprobs))
        log = request.scope.get("fermi.log", {})
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            return Stream(sse_chunks(job, reply, include_usage, log), media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        records = await job.collect(request.receive)
        for rec in records[:-1]:
            reply.add(rec)
            reply.token_logprobs(rec)
        done = records[-1]
        note(log, done)
        return ChatCompletion(
            id=reply.id, created=reply.created, model=engine.name,
            choices=[Choice(message=reply.message(), logprobs=reply.all_logprobs(),
                            finish_reason=FINISH[done.finish_reason])],
            usage=reply.usage(done),
        )


def message_dict(m: ChatMessage, index: int) -> dict:
    """A request message as the chat template wants it: text content only."""
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
    return out


class Reply:
    """The answer so far, and its pieces in the shapes OpenAI uses."""

    def __init__(self, engine: Engine, inline: bool = False, logprobs: bool = False):
        self.engine, self.inline, self.want_logprobs = engine, inline, logprobs
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.kind = "content"  # of the last piece, for inline reasoning's tags

    def add(self, d: Delta) -> ChunkDelta:
        """Record a delta; returns it as a chunk's delta."""
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

    def token_logprobs(self, d: Delta) -> list[TokenLogprob]:
        if not self.want_logprobs or (d.kind == "reasoning" and not self.inline):
            return []
        out = [token_logprob(self.engine, s) for s in d.logprobs]
        self.logprobs += out
        return out

    def message(self) -> AssistantMessage:
        self.close()
        msg = AssistantMessage(content="".join(self.content))
        if self.reasoning and not self.inline:
            msg.reasoning_content = msg.reasoning = "".join(self.reasoning)
        return msg

    def all_logprobs(self) -> ChoiceLogprobs | None:
        return ChoiceLogprobs(self.logprobs) if self.want_logprobs else None

    def usage(self, done: Done) -> Usage:
        reasoning = "".join(self.reasoning)
        return Usage(
            prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
            total_tokens=done.prompt_tokens + done.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(done.cached_tokens),
            completion_tokens_details=CompletionTokensDetails(
                min(done.completion_tokens, len(self.engine.tokenizer.encode(reasoning))) if reasoning else 0),
        )


def token_logprob(engine: Engine, sample) -> TokenLogprob:
    """A backends.Sample as OpenAI's logprob entry; a token's text is its own decode."""

    def piece(token: int) -> tuple[str, list[int]]:
        text = engine.tokenizer.decode([token])
        return text, list(text.encode("utf-8"))

    top = []
    for token, lp in sample.top or []:
        t, b = piece(token)
        top.append(TopLogprob(t, float(lp), b))
    text, raw = piece(sample.token)
    logprob = float(sample.logprob) if sample.logprob is not None else 0.0
    return TokenLogprob(text, logprob, raw, top)


def note(log: dict, done: Done) -> None:
    """Leave the counts for the request log line."""
    log.update(prompt_tokens=done.prompt_tokens, cached_tokens=done.cached_tokens,
               completion_tokens=done.completion_tokens)
    if done.finish_reason == "cancelled":
        log["note"] = "cancelled"


def sse(obj) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


async def sse_chunks(job: Job, reply: Reply, include_usage: bool, log: dict) -> AsyncIterator[bytes]:
    usage = None if include_usage else msgspec.UNSET

    def chunk(delta: ChunkDelta | None, finish: str | None = None, logprobs=None) -> bytes:
        choices = [] if delta is None else [ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)]
        return sse(ChatCompletionChunk(id=reply.id, created=reply.created, model=reply.engine.name,
                                       choices=choices, usage=usage))

    log.update(prompt_tokens=len(job.request.ids))
    try:
        yield chunk(ChunkDelta(role="assistant", content=""))
        done = None
        async for rec in job.records():
            if isinstance(rec, Done):
                done = rec
                break
            delta = reply.add(rec)
            log["completion_tokens"] = log.get("completion_tokens", 0) + 1  # deltas until Done says
            lp = reply.token_logprobs(rec)
            yield chunk(delta, logprobs=ChoiceLogprobs(lp) if reply.want_logprobs else None)
        if (closing := reply.close()) is not None:
            yield chunk(closing)
        yield chunk(ChunkDelta(), FINISH[done.finish_reason])
        note(log, done)
        if include_usage:
            usage = reply.usage(done)
            yield chunk(None)
        yield b"data: [DONE]\n\n"
    except (FermiError, APIError) as e:  # after the headers went out: an error event ends the stream
        message = e.message if isinstance(e, APIError) else str(e)
        yield sse({"error": ErrorBody(message, "server_error", None, "generation_failed")})
        yield b"data: [DONE]\n\n"
    finally:
        if not job.finished:
            log["note"] = "client disconnected"
        job.abandon()
