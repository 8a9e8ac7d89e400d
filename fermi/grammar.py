"""Constrained decoding: a grammar (JSON schema, any JSON object, a forced tool
call) becomes a serving-core TokenMask, computed by llguidance.

llguidance rather than xgrammar (both measured, bench/README "Grammar"): it
names the schema keywords it cannot enforce (xgrammar ignores `uniqueItems`,
`not`, `dependentRequired` and look-around patterns without a word, which would
return text that fails the schema), it needs no torch (MLX users have none), and
its mask costs well under a decode step on these vocabularies.

The JSON is compact (", " and ": ", no free whitespace): a small model left free
whitespace can loop on it forever."""

from __future__ import annotations

import json
import re
from functools import cached_property

import llguidance

from .errors import FermiError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}
# After `</think>`: the model's own blank line before the answer.
LEAD = r"/\n{0,2}/"
# Where closing an object only narrows what validates (not under `not` or `if`, nor
# across `allOf`, whose branches may each list some of the properties).
SUBSCHEMAS = ("items", "prefixItems", "anyOf", "oneOf", "additionalProperties", "contains", "then", "else",
              "unevaluatedProperties", "unevaluatedItems")


class GrammarError(FermiError):
    """A schema or grammar that cannot be enforced; the message names why."""


def json_rule(schema: dict) -> str:
    """A Lark rule body for JSON text that validates against `schema`."""
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    return "%json " + json.dumps({**closed(schema), "x-guidance": JSON_OPTIONS})


def closed(schema):
    """`schema` with `additionalProperties: false` on each object that lists its
    properties and says nothing of others (as OpenAI's strict mode and xgrammar do):
    a small model left free invents keys without end. What validates the closed
    schema validates the original."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (closed(v) if k in SUBSCHEMAS else v) for k, v in schema.items()}
    for k in ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas"):
        if isinstance(schema.get(k), dict):
            out[k] = {name: closed(s) for name, s in schema[k].items()}
    if "properties" in schema and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


def json_grammar(schema: dict, lead: bool = False) -> str:
    """The Lark grammar of `schema`'s JSON; lead: a blank line may come first."""
    return start({"answer": f"answer: {json_rule(schema)}\n"}, lead)


def start(rules: dict[str, str], lead: bool = False) -> str:
    """A grammar whose text is one of `rules` (name -> its Lark rules); lead: a blank
    line may come first (the one after `</think>`)."""
    return f"start: {LEAD + ' ' if lead else ''}({' | '.join(rules)})\n" + "".join(rules.values())


def check(lark: str, what: str = "the schema") -> str:
    """`lark` if llguidance can enforce it; else GrammarError naming why."""
    error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(lark))
    if error:
        raise GrammarError(f"{what} cannot be enforced: {_reason(error)}")
    return lark


def _reason(error: str) -> str:
    """llguidance's message without the grammar it quotes (its numbered lines and carets)."""
    lines = []
    for line in error.strip().splitlines():
        if re.match(r"^\s*\d+ \|", line) or "<state>" in line:
            break
        if line.strip() and set(line.strip()) != {"^"}:
            lines.append(line.strip())
    return re.sub(r"^at \d+\(\d+\): (failed to compile JSON schema: )?", "", " ".join(lines))


class Grammars:
    """A model's grammar compiler: llguidance's view of its tokenizer (built on
    first use, about a second for a 150k vocabulary) and its masks."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)

    @cached_property
    def lltok(self) -> llguidance.LLTokenizer:
        return llguidance.LLTokenizer(self.tokenizer.tok.to_str(), n_vocab=self.vocab_size, eos_token=self.eos_ids)

    def literal(self, text: str) -> str:
        """`text` as a Lark terminal: a token of its own (a model's <tool_call>) by id,
        since llguidance reads added tokens as special, else the quoted text."""
        token = self.tokenizer.token_id(text)
        return f"<[{token}]>" if token is not None else json.dumps(text)

    def mask(self, lark: str, dormant: bool = False) -> "GrammarMask":
        """A TokenMask for the Lark grammar; dormant: the reply starts inside a think
        block, and the grammar starts after `</think>`."""
        matcher = llguidance.LLMatcher(self.lltok, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar cannot be enforced: {_reason(matcher.get_error())}")
        return GrammarMask(matcher, self.tokenizer if dormant else None)


class GrammarMask:
    """serving.request.TokenMask over an llguidance matcher. Dormant (a tokenizer
    given): every token allowed until the decoded reply holds `</think>`."""

    def __init__(self, matcher: llguidance.LLMatcher, dormant_tokenizer=None):
        self.matcher = matcher
        self.tokenizer = dormant_tokenizer
        self.reasoning: list[int] = []

    def fork(self) -> "GrammarMask":
        """The same constraint, fresh (another choice of the same prompt)."""
        return GrammarMask(self.matcher.deep_copy(), self.tokenizer)

    def fill(self, row) -> None:
        if self.tokenizer is None:
            self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def accept(self, token: int) -> None:
        if self.tokenizer is not None:
            self.reasoning.append(token)
            if "</think>" in self.tokenizer.decode(self.reasoning[-8:]):
                self.tokenizer = None
            return
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar refused a token: {_reason(self.matcher.get_error())}")
