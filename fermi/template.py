"""Chat templates: the model's own Jinja template, rendered in a sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import FermiError
from .thinking import OPEN

# Appended for `thinking off` when a template has no enable_thinking switch (DESIGN.md).
EMPTY_THINK = "<think>\n\n</think>\n\n"

# Used when a model ships no template at all.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# google/gemma-3-270m-it's tokenizer_config.json chat_template (all Gemma 3 instruct
# models share it): the system message folded into the first user turn.
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# microsoft/Phi-3.5-mini-instruct's tokenizer_config.json chat_template.
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# A model whose file carries no template (a base model) gets its family's turn format,
# keyed by the config's model_type / the GGUF architecture: (template, the token that
# ends its turns, a stop even where the file names another EOS). Others get ChatML.
KNOWN = {
    "gemma3": (GEMMA3, "<end_of_turn>"),
    "gemma3_text": (GEMMA3, "<end_of_turn>"),
    "phi3": (PHI3, "<|end|>"),
    "qwen2": (CHATML, "<|im_end|>"),
    "qwen3": (CHATML, "<|im_end|>"),
    "llama": (CHATML, "<|im_end|>"),  # SmolLM2's format
}


def _raise(message):
    raise TemplateError(message)


@lru_cache(maxsize=8)
def _compile(source: str):
    # Same settings as transformers' apply_chat_template; the sandbox keeps a
    # template that came with a model from reaching Python internals.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str | None = None, eos_token: str | None = None,
                 family: str | None = None):
        """source None: the model's file has no template; family (its model_type) picks one from KNOWN."""
        self.source, self.end_of_turn = (source, None) if source else KNOWN.get(family, (CHATML, "<|im_end|>"))
        self.special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        self.has_thinking_switch = "enable_thinking" in self.source

    def render(self, messages: list[dict], thinking: str = "auto", add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        """thinking: "on" | "off" | "auto" (the model's own default); tools: function
        tools in OpenAI's chat shape, as transformers' apply_chat_template passes them."""
        kwargs = dict(self.special, messages=messages, add_generation_prompt=add_generation_prompt)
        if tools:
            kwargs["tools"] = tools
        if thinking != "auto" and self.has_thinking_switch:
            kwargs["enable_thinking"] = thinking == "on"
        try:
            text = _compile(self.source).render(**kwargs)
        except TemplateError as e:
            raise FermiError(f"chat template error: {e}") from None
        except Exception as e:  # noqa: BLE001 - the template's own code failed (the sandbox's range cap, a bad operand)
            raise FermiError(f"chat template error: {type(e).__name__}: {e}") from None
        if thinking == "off" and not self.has_thinking_switch and add_generation_prompt:
            # A generation prompt that opens the block itself (DeepSeek-R1's) gets it closed, not a second one.
            head, tag, tail = text.rpartition(OPEN)
            text = (head if tag and not tail.strip() else text) + EMPTY_THINK
        return text
