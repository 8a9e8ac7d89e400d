"""Chat templates: the model's own Jinja template, rendered in a sandbox."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import FermiError

# Appended for `thinking off` when a template has no enable_thinking switch (DESIGN.md).
EMPTY_THINK = "<think>\n\n</think>\n\n"

# Used when a model ships no template at all.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
    def __init__(self, source: str | None, bos_token: str | None = None, eos_token: str | None = None):
        self.source = source or CHATML
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
            text += EMPTY_THINK
        return text
