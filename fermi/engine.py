"""The engine: a loaded model (weights on a backend, tokenizer, chat template)
and what turns a conversation into a serving-core Request: the rendered prompt,
the sampling values, and the next turn's prefix for the slot's settle.

Generation itself is the serving core's (fermi.serving): every front door
submits requests to a Scheduler and reads its records."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import sources
from .errors import FermiError
from .sampling import SamplingParams, resolve
from .serving import Request, Scheduler
from .template import ChatTemplate
from .thinking import MODES, opens_in_thinking

# Stands in for the next user message when rendering the history as the next
# request will render it; everything before it is the predictable prefix.
NEXT_TURN = "FERMI_NEXT_TURN_d41d8cd9"


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

    def request(self, messages: list[dict], thinking: str = "auto", max_tokens: int | None = None,
                stop: list[str] | None = None, prompt: Prompt | None = None, **sampling) -> Request:
        """The serving-core request for the assistant's reply to `messages` (rendered
        here unless `prompt` is). sampling: the SamplingParams fields, None = the
        default. max_tokens None: up to the context's end."""
        prompt = prompt or self.prompt(messages, thinking)
        params = self.sampling(prompt, **sampling)
        return Request(prompt.ids, params, self.context_length if max_tokens is None else max_tokens, stop,
                       prompt.in_reasoning, prompt.keep_reasoning,
                       next_turn=lambda reply: self.next_turn_ids(messages, reply, thinking))

    def next_turn_ids(self, messages: list[dict], reply: str, thinking: str = "auto") -> list[int] | None:
        """The tokens the conversation's next request starts with: the history, the
        reply rendered as a past assistant turn (content only: Qwen3's template drops
        past reasoning), and the opening of the next user turn. None when the
        template cannot say."""
        history = list(messages) + [{"role": "assistant", "content": reply}, {"role": "user", "content": NEXT_TURN}]
        try:
            text = self.template.render(history, thinking, add_generation_prompt=False)
        except FermiError:
            return None
        cut = text.find(NEXT_TURN)
        return self.tokenizer.encode(text[:cut]) if cut >= 0 else None

    def scheduler(self, slots: int = 1, **kw) -> Scheduler:
        """A serving core of its own over this model (the CLI's: one slot, stepped
        by the caller through Scheduler.run)."""
        return Scheduler(self, slots, **kw)
