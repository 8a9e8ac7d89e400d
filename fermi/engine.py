"""The engine: a loaded model (weights on a backend, tokenizer, chat template)
and what turns a conversation into a serving-core Request: the rendered prompt,
the sampling values, and the next turn's prefix for the slot's settle.

Generation itself is the serving core's (fermi.serving): every front door
submits requests to a Scheduler and reads its records."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from . import sources
from .errors import FermiError
from .grammar import ANY_OBJECT, Grammars, json_rule, start
from .sampling import SamplingParams, resolve
from .serving import Request, Scheduler
from .template import ChatTemplate
from .thinking import MODES, OPEN, opens_in_thinking
from .tools import ToolSet, call_format, canonical, describe

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
    raw: bool = False  # no chat template: the text as it is, the reply as the model writes it


class Engine:
    def __init__(self, model: sources.ModelFiles, runtime):
        self.model = model
        self.runtime = runtime
        self.tokenizer = model.tokenizer
        self.template = ChatTemplate(model.chat_template, model.tokenizer.bos_token, model.tokenizer.eos_token,
                                     family=model.config.model_type)
        self.context_length = model.config.max_position_embeddings
        gen_eos = model.generation_config.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else gen_eos or []
        # A template from fermi's table (the file has none) ends turns with a token the file may not call EOS.
        turn_end = {model.tokenizer.token_id(self.template.end_of_turn or "")} - {None}
        self.eos_ids = set(model.tokenizer.eos_ids) | set(model.config.eos_ids) | set(gen_eos) | turn_end
        self.call_format, self.native_tools = call_format(self.template.source)
        self.grammars = Grammars(model.tokenizer, model.config.vocab_size, self.eos_ids)

    @classmethod
    def load(cls, spec: str | None = None, backend: str | None = None, dtype: str | None = None,
             quantize: int | None = None, progress=None, notice: Callable[[str], None] | None = None) -> "Engine":
        from fermi import backends

        model = sources.resolve(spec, progress=progress, notice=notice)  # a bad spec fails before torch loads
        return cls(model, backends.get(backend).load(model, dtype=dtype, quantize=quantize))

    @property
    def name(self) -> str:
        return self.model.name

    def describe(self) -> str:
        r = self.runtime
        kernel = f" ({r.kernel})" if getattr(r, "kernel", None) else ""
        return f"{self.name} · {r.backend} · {r.device} · {r.dtype}{kernel} · context {self.context_length}"

    def render(self, messages: list[dict], thinking: str = "auto", tools: ToolSet | None = None,
               add_generation_prompt: bool = True) -> str:
        """The chat template's text for `messages` (and the tools, through the template
        when it knows them, else described in a system message)."""
        messages = canonical(messages)
        specs = tools.tools if tools else None
        if specs and not self.native_tools:
            messages, specs = describe(messages, specs), None
        return self.template.render(messages, thinking, add_generation_prompt, specs)

    def prompt(self, messages: list[dict], thinking: str = "auto", tools: ToolSet | None = None) -> Prompt:
        if thinking not in MODES:
            raise FermiError(f"thinking must be one of {', '.join(MODES)}, not '{thinking}'")
        text = self.render(messages, thinking, tools)
        in_reasoning = opens_in_thinking(text)
        thinks = thinking == "on" or (thinking == "auto" and (self.template.has_thinking_switch or in_reasoning))
        return Prompt(text, self.tokenizer.encode(text), thinks, in_reasoning, thinking != "off")

    def raw_prompt(self, text: str) -> Prompt:
        """`text` as it is, no chat template (a base model's completion), BOS as the
        tokenizer says (Gemma's adds one; SmolLM2's and Qwen's none)."""
        return Prompt(text, self.tokenizer.encode(text, add_special=True), False, False, True, raw=True)

    def raw_ids(self, ids: list[int]) -> Prompt:
        """Token ids as they are (a completion's prompt sent as tokens)."""
        vocab = self.model.config.vocab_size
        if not ids or any(not 0 <= t < vocab for t in ids):
            raise FermiError(f"a prompt's token ids must be in [0, {vocab})")
        return Prompt(self.tokenizer.decode(ids), list(ids), False, False, True, raw=True)

    def sampling(self, prompt: Prompt, **given) -> SamplingParams:
        """The request's sampling values; what it leaves None comes from the model's
        generation_config, else from the recommendations for its thinking mode."""
        return resolve(given, prompt.thinking, self.model.generation_config)

    def request(self, messages: list[dict], thinking: str = "auto", max_tokens: int | None = None,
                stop: list[str] | None = None, prompt: Prompt | None = None, tools: ToolSet | None = None,
                json_schema: dict | bool | None = None, **sampling) -> Request:
        """The serving-core request for the assistant's reply to `messages` (rendered
        here unless `prompt` is). tools: the tools offered (their calls are read out of
        the answer; a forced choice constrains it); json_schema: the answer is JSON, of
        this schema (True: any object). sampling: the SamplingParams fields, None = the
        default. max_tokens None: the serving core's default cap (none: up to the
        context's end). Raises GrammarError for a
        constraint the grammar engine cannot enforce."""
        if tools is not None:
            tools.fmt = self.call_format
        prompt = prompt or self.prompt(messages, thinking, tools)
        # A forced call is the whole answer; with a format and tools it may call, the
        # answer is a call or the format's JSON.
        rules = {}
        if tools is not None and (tools.forced or (json_schema is not None and tools.choice == "auto")):
            rules["calls"] = tools.rules(self.grammars.literal)
        if json_schema is not None and not (tools is not None and tools.forced):
            rules["answer"] = f"answer: {json_rule(ANY_OBJECT if json_schema is True else json_schema)}\n"
        grammar = None
        if rules:
            prompt = self._open_thinking(prompt)
            grammar = start(rules, lead=prompt.in_reasoning)  # the blank line after </think>
        params = self.sampling(prompt, **sampling)
        request = Request(prompt.ids, params, max_tokens, stop,
                          prompt.in_reasoning, prompt.keep_reasoning,
                          next_turn=(lambda reply: self.next_turn_ids(messages, reply, thinking, tools)) if messages
                          else None, tools=tools, raw=prompt.raw)
        if grammar is not None:
            request.masks.append(self.grammars.mask(grammar, dormant=prompt.in_reasoning))
        return request

    def fork(self, request: Request, index: int) -> Request:
        """Choice `index` of `request`'s prompt: its prefill shared, its own draws (the
        seed + index, when a seed is set)."""
        params = request.params
        if params.seed is not None:
            params = replace(params, seed=params.seed + index)
        return Request(request.ids, params, request.max_tokens, request.stop, request.in_reasoning,
                       request.keep_reasoning,  # no settle: a next turn most likely continues choice 0
                       masks=[m.fork() for m in request.masks], tools=request.tools, raw=request.raw, share=request)

    def _open_thinking(self, prompt: Prompt) -> Prompt:
        """A constrained reply that thinks first starts inside an open think block, so
        the reasoning runs free and the grammar starts at `</think>` (Qwen3's template
        leaves `<think>` to the model)."""
        if not (prompt.thinking and prompt.keep_reasoning and self.template.has_thinking_switch) or prompt.in_reasoning:
            return prompt
        text = prompt.text + OPEN + "\n"
        return Prompt(text, self.tokenizer.encode(text), True, True, True)

    def next_turn_ids(self, messages: list[dict], reply: dict, thinking: str = "auto",
                      tools: ToolSet | None = None) -> list[int] | None:
        """The tokens the conversation's next request starts with: the history, the
        reply (an assistant message: content only, as Qwen3's template drops past
        reasoning, and its tool calls) rendered as a past turn, and the opening of the
        next user turn. None when the template cannot say."""
        history = list(messages) + [reply, {"role": "user", "content": NEXT_TURN}]
        try:
            text = self.render(history, thinking, tools, add_generation_prompt=False)
        except FermiError:
            return None
        cut = text.find(NEXT_TURN)
        return self.tokenizer.encode(text[:cut]) if cut >= 0 else None

    def scheduler(self, slots: int = 1, **kw) -> Scheduler:
        """A serving core of its own over this model (the CLI's: one slot, stepped
        by the caller through Scheduler.run)."""
        return Scheduler(self, slots, **kw)
