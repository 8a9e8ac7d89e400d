"""The engine: a loaded model, its sessions, and the generation stream.

Layered generators: the backend's `stream` yields sampled token ids; a
Session's `generate` turns them into records (text or reasoning deltas, then
one `Done` with the finish reason and the counts). The REPL and the server
consume the same records."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from . import sources
from .errors import ContextOverflow, FermiError
from .sampling import SamplingParams, resolve
from .stops import StopStrings
from .template import ChatTemplate
from .thinking import MODES, ThinkingSplitter, opens_in_thinking
from .tokenizer import Detokenizer


@dataclass
class Delta:
    kind: str  # "content" | "reasoning"
    text: str
    logprobs: list = field(default_factory=list)  # backends.Sample of the tokens behind it, when asked


@dataclass
class Done:
    finish_reason: str  # "stop" (EOS or stop string), "length" (max tokens or context end), "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the session's cache
    ttft: float  # seconds from the request to the first token
    decode_tps: float  # generated tokens per second after the first
    prefill_tps: float
    tokens: list[int] = field(default_factory=list)  # the generated ids (EOS not included)
    logprobs: list = field(default_factory=list)


@dataclass
class Prompt:
    text: str
    ids: list[int]
    thinking: bool  # the model is expected to think (decides default sampling)
    in_reasoning: bool  # generation starts inside an open think block
    keep_reasoning: bool  # False for thinking off: a think block the model emits is stripped


class Engine:
    def __init__(self, model: sources.ModelFiles, runtime):
        self.model = model
        self.runtime = runtime
        self.tokenizer = model.tokenizer
        self.template = ChatTemplate(model.chat_template, model.tokenizer.bos_token, model.tokenizer.eos_token)
        self.context_length = model.config.max_position_embeddings
        gen_eos = model.generation_config.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else gen_eos or []
        self.eos_ids = set(model.tokenizer.eos_ids) | set(model.config.eos_ids) | set(gen_eos)

    @classmethod
    def load(cls, spec: str | None = None, backend: str | None = None, dtype: str | None = None,
             quantize: int | None = None, progress=None, notice: Callable[[str], None] | None = None) -> "Engine":
        from fermi import backends

        module = backends.get(backend)
        model = sources.resolve(spec, progress=progress, notice=notice)
        return cls(model, module.load(model, dtype=dtype, quantize=quantize))

    @property
    def name(self) -> str:
        return self.model.name

    def describe(self) -> str:
        r = self.runtime
        return f"{self.name} · {r.backend} · {r.device} · {r.dtype} · context {self.context_length}"

    def prompt(self, messages: list[dict], thinking: str = "auto") -> Prompt:
        if thinking not in MODES:
            raise FermiError(f"thinking must be one of {', '.join(MODES)}, not '{thinking}'")
        text = self.template.render(messages, thinking)
        in_reasoning = opens_in_thinking(text)
        thinks = thinking == "on" or (thinking == "auto" and (self.template.has_thinking_switch or in_reasoning))
        return Prompt(text, self.tokenizer.encode(text), thinks, in_reasoning, thinking != "off")

    def sampling(self, prompt: Prompt, **given) -> SamplingParams:
        """The request's sampling values; what it leaves None comes from the model's
        generation_config, else from the recommendations for its thinking mode."""
        return resolve(given, prompt.thinking, self.model.generation_config)

    def session(self) -> "Session":
        return Session(self)


class Session:
    """A conversation's tokens and KV cache: the next request reuses the longest
    common token prefix and prefills only the rest."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.cache = engine.runtime.new_cache(1, engine.context_length)
        self.ids: list[int] = []  # the tokens whose keys and values the cache holds
        self.last_used = time.monotonic()

    def reset(self) -> None:
        self.cache.truncate(0, 0)
        self.ids = []

    def common_prefix(self, ids: list[int]) -> int:
        n = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            n += 1
        return n

    def chat(self, messages: list[dict], thinking: str = "auto", **kwargs) -> Iterator[Delta | Done]:
        """Render `messages` with the chat template and generate the reply.
        kwargs: max_new_tokens, stop, cancel and the sampling values (None = default)."""
        prompt = self.engine.prompt(messages, thinking)
        names = SamplingParams.__dataclass_fields__
        params = self.engine.sampling(prompt, **{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        return self.generate(prompt, params, **kwargs)

    def generate(self, prompt: Prompt, params: SamplingParams, max_new_tokens: int = 1024,
                 stop: list[str] | None = None, cancel: Callable[[], bool] | None = None) -> Iterator[Delta | Done]:
        engine = self.engine
        ids = prompt.ids
        if len(ids) >= engine.context_length:
            raise ContextOverflow(len(ids), engine.context_length)
        if max_new_tokens < 0:
            raise FermiError("max_new_tokens must be positive")
        max_new_tokens = min(max_new_tokens, engine.context_length - len(ids))
        return self._run(ids, prompt, params, max_new_tokens, stop, cancel)

    def _run(self, ids, prompt, params, max_new_tokens, stop, cancel) -> Iterator[Delta | Done]:
        engine, runtime = self.engine, self.engine.runtime
        start = time.perf_counter()
        self.last_used = time.monotonic()

        cached = min(self.common_prefix(ids), len(ids) - 1)  # at least one token to prefill for logits
        self.cache.truncate(0, cached)
        self.ids = ids[:cached]
        detok = Detokenizer(engine.tokenizer)
        stops = StopStrings(stop)
        splitter = ThinkingSplitter(prompt.in_reasoning, prompt.keep_reasoning)
        generated: list[int] = []
        samples: list = []
        finish, first_at, hit_stop = "length", None, False

        def records(text: str) -> Iterator[Delta]:
            for kind, piece in splitter.feed(text):
                yield Delta(kind, piece, samples[:])
                samples.clear()

        stream = runtime.stream(ids[cached:], self.cache, 0, runtime.sampler(params, ids))
        try:
            for sample in stream if max_new_tokens > 0 else ():
                if first_at is None:
                    first_at = time.perf_counter()
                if sample.token in engine.eos_ids:
                    finish = "stop"
                    break
                generated.append(sample.token)
                if params.logprobs is not None:
                    samples.append(sample)
                text, hit_stop = stops.feed(detok.add(sample.token))
                yield from records(text)
                if hit_stop:
                    finish = "stop"
                    break
                if cancel is not None and cancel():
                    finish = "cancelled"
                    break
                if len(generated) >= max_new_tokens:
                    break
            if not hit_stop:  # text held back as a possible stop string start is answer after all
                text, hit_stop = stops.feed(detok.flush())
                yield from records(text if hit_stop else text + stops.flush())
                finish = "stop" if hit_stop else finish
            for kind, piece in splitter.flush():
                yield Delta(kind, piece, [])
        finally:
            stream.close()
            # The cache is the truth: it may hold one step more or less than was yielded.
            self.ids = (ids + generated)[: self.cache.lengths[0]]
            self.last_used = time.monotonic()

        end = time.perf_counter()
        first_at = first_at or end
        n = len(generated)
        yield Done(
            finish_reason=finish,
            prompt_tokens=len(ids),
            completion_tokens=n,
            cached_tokens=cached,
            ttft=first_at - start,
            decode_tps=(n - 1) / (end - first_at) if n > 1 and end > first_at else 0.0,
            prefill_tps=(len(ids) - cached) / (first_at - start) if first_at > start else 0.0,
            tokens=generated,
            logprobs=samples,
        )
