"""Tools on the model's side: which call format a chat template teaches (read
from the template, never from the model's name), the tools and the history as
the template wants them, and the grammar that forces a well-formed call.

A template that knows no tools gets them described in a system message in the
Hermes format, and its past calls and tool results rendered as that format's
text; the same parser (toolcalls.py) reads the answer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from .grammar import json_rule
from .toolcalls import CallParser

HERMES_SYSTEM = """# Tools

You may call one or more functions to help with the user's request. The functions you can call are described by JSON signatures inside <tools></tools> tags:
<tools>
{tools}
</tools>

To call a function, answer with a JSON object holding its name and arguments inside <tool_call></tool_call> tags:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-json-object>}}
</tool_call>"""


def call_format(template: str) -> tuple[str, bool]:
    """(the call format a chat template teaches, whether it renders tools itself)."""
    native = "tools" in template
    if not native:
        return "hermes", False
    if "<function=" in template and "<parameter=" in template:
        return "qwen3_coder", True
    if "<tool_call>" in template:
        return "hermes", True
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3", True
    return "hermes", True


@dataclass
class ToolSet:
    """The tools of a request, as OpenAI's chat completions spell them
    ([{"type": "function", "function": {"name", "description", "parameters"}}]),
    and what may be done with them. choice: none | auto | required | a tool's name."""

    tools: list[dict]
    choice: str = "auto"
    parallel: bool = True
    fmt: str = field(default="hermes", init=False)  # set by the engine from its template

    def params(self) -> dict[str, dict]:
        return {t["function"]["name"]: t["function"].get("parameters") or {"type": "object", "properties": {}}
                for t in self.tools}

    def parser(self) -> CallParser | None:
        """The reader of the answer's calls; None with choice none (all is content)."""
        return None if self.choice == "none" else CallParser(self.fmt, self.params(), self.parallel)

    @property
    def forced(self) -> bool:
        return self.choice not in ("none", "auto")

    def rules(self, literal: Callable[[str], str]) -> str:
        """The Lark rules of `calls`, what a forced choice allows: one call (or several
        when parallel) of an allowed tool, its arguments valid for its parameters.
        literal: text -> Lark terminal (a token of its own by id)."""
        params = self.params()
        names = list(params) if self.choice == "required" else [self.choice]
        if self.fmt == "qwen3_coder":
            rules, alternatives = [], []
            for i, n in enumerate(names):
                parts = _xml_params(params[n], i, rules)
                rules.append(f'f{i}: "<function={n}>\\n" {" ".join(parts)} "</function>"\n')
                alternatives.append(f"f{i}")
            body = "body: " + " | ".join(alternatives) + "\n" + "".join(rules)
            call = f'call: {literal("<tool_call>")} "\\n" body "\\n" {literal("</tool_call>")}\n'
        else:
            key = "parameters" if self.fmt == "llama3" else "arguments"
            options = [{"type": "object", "properties": {"name": {"const": n}, key: params[n]},
                        "required": ["name", key], "additionalProperties": False} for n in names]
            body = "body: " + json_rule(options[0] if len(options) == 1 else {"anyOf": options}) + "\n"
            call = ("call: body\n" if self.fmt == "llama3" else
                    f'call: {literal("<tool_call>")} "\\n" body "\\n" {literal("</tool_call>")}\n')
        many = ' ("\\n" call)*' if self.parallel and self.fmt != "llama3" else ""
        return f"calls: call{many}\n{call}{body}"


def _xml_params(schema: dict, i: int, rules: list[str]) -> list[str]:
    """qwen3_coder: one rule per parameter (required ones in order, then the
    optional ones, each optional); string values are free text up to the next tag."""
    props = schema.get("properties", {})
    required = [p for p in schema.get("required", []) if p in props]
    out = []
    for j, p in enumerate(required + [p for p in props if p not in required]):
        kind = props[p].get("type", "string")
        # A string's text holds its closing newline (the parser drops it).
        value = '/[^<]+/ "' if kind == "string" else json_rule(props[p]) + ' "\\n'
        rules.append(f'p{i}_{j}: "<parameter={p}>\\n" {value}</parameter>\\n"\n')
        out.append(f"p{i}_{j}" + ("" if p in required else "?"))
    return out


def canonical(messages: list[dict]) -> list[dict]:
    """The history with each past call's arguments as an object (clients send them as
    JSON text; templates write them with tojson), as transformers passes them."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function") or c)
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        fn["arguments"] = json.loads(args) if args.strip() else {}
                    except ValueError:
                        pass  # not JSON: the template gets the text
                calls.append({**c, "type": "function", "function": fn})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def describe(messages: list[dict], tools: list[dict]) -> list[dict]:
    """For a template that knows no tools: the tools in a system message (Hermes
    format), past calls as <tool_call> text, tool results as user turns."""
    text = HERMES_SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [json.dumps({"name": c["function"]["name"], "arguments": c["function"].get("arguments", {})},
                                ensure_ascii=False) for c in m["tool_calls"]]
            content = "\n".join([m.get("content") or ""] + [f"<tool_call>\n{c}\n</tool_call>" for c in calls])
            m = {"role": "assistant", "content": content.lstrip("\n")}
        elif m["role"] == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    if out and out[0]["role"] == "system":
        return [{**out[0], "content": f"{out[0]['content']}\n\n{text}"}] + out[1:]
    return [{"role": "system", "content": text}] + out
