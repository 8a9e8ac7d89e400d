"""POST /v1/completions: OpenAI's text completions, for base models: the prompt
as it is (no chat template), a string, a list of strings or token ids; `n`
choices each (prefilled once); `echo`; `logprobs` of the generated tokens;
streamed as text_completion chunks ending with `data: [DONE]`."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

import msgspec
from litestar import Controller, Request, post

from fermi.engine import Engine
from fermi.serving import Done, Request as CoreRequest

from .fleet import Fleet
from .scheduler import Job
from .schemas import (
    APIError, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionTokensDetails,
    PromptTokensDetails, Usage,
)
from .wire import FINISH, event_stream, guarded, logprob, note, sse, sse_error, stop_list


class CompletionsController(Controller):
    path = "/completions"
    tags = ["completions"]

    @post(summary="Create a completion", status_code=200,
          description="OpenAI's text completions: the prompt as it is, no chat template.")
    async def create(self, request: Request, data: CompletionRequest, fleet: Fleet) -> Completion:
        serving = await fleet.get(data.model)
        engine = serving.require_engine()
        for name, ok in (("suffix", data.suffix is None), ("best_of", data.best_of in (None, 1)),
                         ("echo", not (data.echo and data.logprobs is not None))):
            if not ok:
                what = "echo with logprobs (the prompt's own logprobs)" if name == "echo" else name
                raise APIError(400, f"{what} is not supported by this server", param=name, code="unsupported_value")
        prompts = prompt_list(data.prompt)
        sampling = data.sampling()
        if data.logprobs is not None:
            sampling["logprobs"] = data.logprobs
        n = data.n or 1

        def build(engine: Engine) -> list[CoreRequest]:
            out = []
            for p in prompts:
                prompt = engine.raw_prompt(p) if isinstance(p, str) else engine.raw_ids(p)
                first = engine.request([], max_tokens=data.max_tokens, stop=stop_list(data.stop), prompt=prompt,
                                       **sampling)
                out += [first] + [engine.fork(first, i) for i in range(1, n)]
            return out

        job = await serving.start_requests(build)
        texts = [engine.tokenizer.decode(p) if isinstance(p, list) else p for p in prompts]
        choices = [Choice(i, texts[i // n] if data.echo else "", data.logprobs is not None, engine)
                   for i in range(len(job.requests))]
        head = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=engine.name)
        log = request.scope.get("fermi.log", {})
        if data.stream:
            include = bool(data.stream_options and data.stream_options.include_usage)
            return event_stream(guarded(job, log, chunks(job, choices, head, include, log), sse_error))
        dones = []
        for choice, records in zip(choices, await job.collect(request.receive)):
            for rec in records[:-1]:
                choice.add(rec)
            dones.append(records[-1])
            choice.finish = FINISH[records[-1].finish_reason]
        note(log, dones[0])
        return Completion(**head, choices=[c.whole() for c in choices], usage=usage(job, dones))


def prompt_list(prompt) -> list[str | list[int]]:
    """A string, a list of strings, token ids, or a list of token-id lists -> the prompts."""
    token = lambda t: isinstance(t, int) and not isinstance(t, bool)  # noqa: E731
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(token(t) for t in prompt):
        return [prompt]
    if prompt and all(isinstance(p, str) or (isinstance(p, list) and p and all(token(t) for t in p)) for p in prompt):
        return list(prompt)
    raise APIError(400, "prompt must be a string, a list of strings, token ids or lists of token ids",
                   param="prompt", code="invalid_value")


def usage(job: Job, dones: list[Done]) -> Usage:
    prompt = sum(len(r.ids) for r in job.requests if r.share is None)  # each prompt once
    completion = sum(d.completion_tokens for d in dones)
    cached = sum(d.cached_tokens for r, d in zip(job.requests, dones) if r.share is None)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached), completion_tokens_details=CompletionTokensDetails(0))


class Choice:
    """One choice's text (after the echoed prompt) and its tokens' logprobs."""

    def __init__(self, index: int, echo: str, want_logprobs: bool, engine: Engine):
        self.index, self.engine, self.want_logprobs = index, engine, want_logprobs
        self.text = [echo]
        self.finish: str | None = None
        self.logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])

    def add(self, rec) -> tuple[str, CompletionLogprobs | None]:
        offset = len("".join(self.text))
        self.text.append(rec.text)
        if not self.want_logprobs:
            return rec.text, None
        piece = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for sample in rec.logprobs:
            token = self.engine.tokenizer.decode([sample.token])
            piece.tokens.append(token)
            piece.token_logprobs.append(logprob(sample.logprob))
            piece.top_logprobs.append({self.engine.tokenizer.decode([t]): logprob(lp) for t, lp in sample.top or []})
            piece.text_offset.append(offset)
            offset += len(token)
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(self.logprobs, name).extend(getattr(piece, name))
        return rec.text, piece

    def whole(self) -> CompletionChoice:
        return CompletionChoice(text="".join(self.text), index=self.index,
                                logprobs=self.logprobs if self.want_logprobs else None, finish_reason=self.finish)


async def chunks(job: Job, choices: list[Choice], head: dict, include_usage: bool, log: dict) -> AsyncIterator[bytes]:
    usage_field = None if include_usage else msgspec.UNSET
    dones: list[Done | None] = [None] * len(choices)
    log.update(prompt_tokens=len(job.request.ids))
    for c in choices:
        if c.text[0]:  # the echoed prompt first
            yield sse(Completion(**head, choices=[CompletionChoice(text=c.text[0], index=c.index)],
                                 usage=usage_field))
    async for index, rec in job.records():
        c = choices[index]
        if isinstance(rec, Done):
            dones[index] = rec
            yield sse(Completion(**head, choices=[CompletionChoice(text="", index=index,
                                                                   finish_reason=FINISH[rec.finish_reason])],
                                 usage=usage_field))
            continue
        text, lp = c.add(rec)
        yield sse(Completion(**head, choices=[CompletionChoice(text=text, index=index, logprobs=lp)],
                             usage=usage_field))
    note(log, dones[0])
    if include_usage:
        yield sse(Completion(**head, choices=[], usage=usage(job, dones)))
    yield b"data: [DONE]\n\n"
