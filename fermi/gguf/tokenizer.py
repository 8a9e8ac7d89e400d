"""The tokenizer a GGUF's metadata describes, built with `tokenizers`: byte-level
BPE (`tokenizer.ggml.model` "gpt2") or SentencePiece BPE ("llama": scores, byte
fallback, the space prefix rule), as the model's own tokenizer.json or
transformers' GGUF loader build them."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ..errors import FermiError
from ..tokenizer import Tokenizer

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Tokens that end a turn, as llama.cpp also treats them (its end-of-generation set).
_END_OF_TURN = {
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>"
}
# SentencePiece vocabularies whose merge order is the order of the file, not its
# scores, and whose text gets no space prefix unless the file says so.
_GEMMA = {"gemma", "gemma2", "gemma3"}
SPACE = "\u2581"  # SentencePiece's spelling of a space


def tokenizer(path: Path, meta: dict) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if kind == "gpt2":
        tok, spelled = _byte_level(path, meta, tokens, types)
    elif kind == "llama":
        tok, spelled = _sentencepiece(meta, tokens, types)
    else:
        raise FermiError(
            f"{path}: GGUF tokenizer '{kind}' is not supported (fermi reads 'gpt2', byte-level BPE, "
            "and 'llama', SentencePiece)"
        )
    # Added tokens match whole, before normalization; control ones are special (skippable
    # in decode). One the vocabulary spells otherwise (Gemma's runs of spaces) is an
    # ordinary piece there, as in transformers.
    added = [(t, ty) for t, s, ty in zip(tokens, spelled, types) if ty in (UNKNOWN, CONTROL, USER_DEFINED) and s == t]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in added if ty != USER_DEFINED])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in added if ty == USER_DEFINED])
    tok.post_processor = _post_processor(meta, tokens, add_bos=kind == "llama")

    def token_at(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    eos = [meta[key] for key in (f"tokenizer.ggml.{k}_token_id" for k in ("eos", "eot", "eom")) if key in meta]
    eos += [i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == CONTROL and t in _END_OF_TURN]
    return Tokenizer(
        tok,
        eos,
        bos_token=token_at("bos_token_id"),
        eos_token=token_at("eos_token_id"),
        pad_token=token_at("padding_token_id"),
    )


def _post_processor(meta: dict, tokens: list[str], add_bos: bool):
    """BOS (and EOS) around a text encoded with add_special_tokens, as the file's
    add_bos_token/add_eos_token say; llama.cpp's default is BOS for SentencePiece only."""

    def end(name: str, default: bool) -> tuple[str, int] | None:
        i = meta.get(f"tokenizer.ggml.{name}_token_id")
        wanted = meta.get(f"tokenizer.ggml.add_{name}_token", default)
        return (tokens[i], i) if wanted and i is not None and 0 <= i < len(tokens) else None

    bos, eos = end("bos", add_bos), end("eos", False)
    if bos is None and eos is None:
        return None
    single = ([bos[0]] if bos else []) + ["$A"] + ([eos[0]] if eos else [])
    return processors.TemplateProcessing(single=single, special_tokens=list({e for e in (bos, eos) if e}))


# ---------------------------------------------------------------- byte-level BPE (gpt2)


def _byte_level(path: Path, meta: dict, tokens: list[str], types: list[int]) -> tuple[HFTokenizer, list[str]]:
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    # Ordinary tokens are spelled in GPT-2's byte alphabet; control and user-defined
    # ones are the raw text the model's tokenizer.json lists as added tokens.
    alphabet = set(_BYTE_CHAR.values())
    spelled = [
        t if ty in (CONTROL, USER_DEFINED) or set(t) <= alphabet else "".join(_BYTE_CHAR[b] for b in t.encode())
        for t, ty in zip(tokens, types)
    ]
    vocab = {t: i for i, t in enumerate(spelled)}
    normalizer, pre, ignore_merges = _pre_tokenizer(path, meta.get("tokenizer.ggml.pre"))
    tok = HFTokenizer(models.BPE(vocab, merges, byte_fallback=False, ignore_merges=ignore_merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return tok, spelled


def _pre_tokenizer(path: Path, pre: str | None):
    """(normalizer, pre-tokenizer, ignore_merges) that reproduce the model's own
    tokenizer.json for llama.cpp's pre-tokenizer name."""
    def byte_level(use_regex: bool):  # use_regex: GPT-2's own split, when nothing splits before
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)

    def split(regex: str):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level(False)]
        )

    if pre in (None, "default", "gpt-2", "gpt2"):
        return None, byte_level(True), False
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # Their tokenizer.json splits every digit off first (llama.cpp's regex for
        # these starts with \p{N}). transformers' GGUF tokenizer leaves this out and
        # so differs where whitespace runs meet a digit: "x\n\n2" is Ċ Ċ 2 there, ĊĊ 2 here.
        digits = pre_tokenizers.Digits(individual_digits=True)
        return None, pre_tokenizers.Sequence([digits, byte_level(True)]), False
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        # Llama 3's tokenizer.json (and llama.cpp) take a whole word that is in the
        # vocabulary as one token without applying merges; transformers' GGUF tokenizer does not.
        return None, split(_LLAMA3_SPLIT), True
    if pre == "qwen2":
        # Qwen2/2.5/3's tokenizer.json normalizes to NFC first; transformers' GGUF
        # tokenizer (and llama.cpp) do not, so they differ on decomposed text ("e\u0301").
        return normalizers.NFC(), split(_QWEN2_SPLIT), False
    if pre == "deepseek-r1-qwen":
        # As transformers builds it: no NFC (not known for this tokenizer.json).
        return None, split(_QWEN2_SPLIT), False
    raise FermiError(f"{path}: GGUF pre-tokenizer '{pre}' is not supported")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the spelling of byte-level vocabularies)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # spaces, controls and a few more move past 255, in byte order
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHAR = _bytes_to_unicode()


# ---------------------------------------------------------------- SentencePiece BPE (llama)


def _sentencepiece(meta: dict, tokens: list[str], types: list[int]) -> tuple[HFTokenizer, list[str]]:
    """SentencePiece's BPE as `tokenizers` runs it: spaces spelled ▁, BPE merges
    rebuilt from the pieces, a character with no piece spelled as its UTF-8 bytes
    (the <0xNN> pieces)."""
    arch = meta.get("general.architecture")
    if arch in _GEMMA:
        # Gemma's files store its pieces of ▁s as runs of spaces, and its scores do not
        # follow its merge order: the order of the file does (transformers' gemma_tokenizer).
        spelled = [SPACE * len(t) if t and set(t) == {" "} else t for t in tokens]
        scores = {t: -i for i, t in enumerate(spelled)}
    else:
        spelled = list(tokens)
        scores = dict(zip(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)))
    vocab = {t: i for i, t in enumerate(spelled)}
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = HFTokenizer(models.BPE(
        vocab, _merges(vocab, scores), unk_token=tokens[unk] if unk is not None and unk < len(tokens) else None,
        fuse_unk=True, byte_fallback=True,
    ))
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if arch == "phi3":
        # Phi-3's tokenizer.json prefixes every text with ▁ in its normalizer, even one that
        # starts with a space: "  hi" is ▁▁▁hi there, ▁▁hi with Metaspace. transformers does so too.
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        prefix = True
    else:
        # The space prefix rule: a ▁ before the text as the file's add_space_prefix says
        # (SentencePiece's default: on). Only at the very start, as transformers puts it;
        # llama.cpp also puts one after each special token.
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", arch not in _GEMMA))
        scheme = "first" if prefix else "never"
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=scheme, split=False)
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))  # the prefix space again
    tok.decoder = decoders.Sequence(steps)
    return tok, spelled


def _merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every way to make a piece
    from two others, ranked by the piece's score, best first (transformers'
    generate_merges, whose tie order this keeps)."""
    merges = []
    for piece, score in scores.items():
        halves = ((piece[:i], piece[i:]) for i in range(1, len(piece)))
        local = [(a, b, score) for a, b in halves if a in vocab and b in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges += local
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]
