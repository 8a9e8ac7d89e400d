"""The tokenizer (a `tokenizers.Tokenizer` plus the model's special ids) and the
incremental detokenizer that never emits half a UTF-8 character."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .errors import FermiError


class Tokenizer:
    def __init__(
        self,
        tok: HFTokenizer,
        eos_ids: list[int],
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ):
        self.tok = tok
        self.eos_ids = list(dict.fromkeys(eos_ids))
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.pad_token = pad_token

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        # Chat-template output already holds its special tokens as text: no BOS unless
        # asked (a raw prompt), and then as the model's tokenizer says (its post-processor).
        return self.tok.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @classmethod
    def from_dir(cls, path: Path, config_eos: list[int]) -> "Tokenizer":
        file = path / "tokenizer.json"
        if not file.exists():
            raise FermiError(f"{path} has no tokenizer.json")
        tok = HFTokenizer.from_file(str(file))
        cfg = _read_json(path / "tokenizer_config.json")
        names = {k: _token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        eos = list(config_eos)
        if names["eos_token"] and tok.token_to_id(names["eos_token"]) is not None:
            eos.append(tok.token_to_id(names["eos_token"]))
        return cls(tok, eos, **names)


def _token_str(value) -> str | None:
    # tokenizer_config.json spells a token as a string or as {"content": ...}
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


class Detokenizer:
    """Turns a stream of token ids into text deltas.

    Decodes a sliding window of tokens and emits only the new, complete text: a
    token that ends inside a multi-byte character shows up as U+FFFD at the end of
    the decoded text and is held back until the next token completes it."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # tokens whose text has been emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        decode = lambda ids: self.tokenizer.decode(ids, self.skip_special)  # noqa: E731
        before = decode(self.ids[self.prefix : self.read])
        text = decode(self.ids[self.prefix :])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]

    def flush(self) -> str:
        """Whatever is held back (a character the stream never completed)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip_special)
        text = self.tokenizer.decode(self.ids[self.prefix :], self.skip_special)
        self.prefix = self.read = len(self.ids)
        return text[len(before) :]
