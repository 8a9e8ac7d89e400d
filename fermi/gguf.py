"""GGUF files: config, tokenizer and chat template from the metadata, and the
tensors dequantized into one float32 safetensors file with Hugging Face names
and layout, so the rest of fermi reads a GGUF like a model directory. For a
backend that holds quantized weights, `affine()` gives a tensor's exact integer
form instead (see AFFINE_BITS).

Parsing and dequantization are the `gguf` package's (GGUFReader, gguf.quants);
this file only names, reshapes and caches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf.quants import Q4_K, dequantize
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from .config import ARCHITECTURES, ModelConfig
from .errors import FermiError
from .tokenizer import Tokenizer

# llama.cpp's token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

# Block types that are affine in groups of 32 along a row: w = scale * q + bias with
# q unsigned, `bits` wide (the symmetric ones, w = d * (q - 2**(bits-1)), included).
# They move into an affine-quantized layout exactly.
AFFINE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
GROUP = 32


@dataclass
class Affine:
    """One weight matrix as w[r, c] = scales[r, c // GROUP] * q[r, c] + biases[r, c // GROUP]."""

    q: np.ndarray  # uint8 [rows, cols], each value < 2**bits
    scales: np.ndarray  # float32 [rows, cols // GROUP]
    biases: np.ndarray  # float32 [rows, cols // GROUP]
    bits: int


class _Reader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map: numpy.memmap's
    Python-level __getitem__ made parsing a 150k-token vocabulary take seconds."""

    @property
    def data(self):
        return self._plain

    @data.setter
    def data(self, value):
        self._mmap = value  # keeps the mapping alive
        self._plain = value.view(np.ndarray)


def cache_folder(path: Path, cache_dir: Path | None = None) -> Path:
    """`<cache_dir>/gguf/<key>/`, where what is made from a GGUF file is kept. The
    key changes when the file is replaced or touched, so nothing stale is reused."""
    if cache_dir is None:
        from .embedded import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    stat = Path(path).stat()
    ident = f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return Path(cache_dir) / "gguf" / hashlib.sha256(ident.encode()).hexdigest()[:16]


def describe(path: Path) -> tuple[dict, Tokenizer, str | None]:
    """A GGUF's config dict, tokenizer and chat template. Parsing the metadata of a
    large vocabulary takes about a second, so it is done once and kept in the cache
    folder (summary.json); a cache that cannot be written is only slower."""
    target = cache_folder(path) / "summary.json"
    try:
        s = json.loads(target.read_text(encoding="utf-8"))
        tok = Tokenizer(HFTokenizer.from_str(s["tokenizer"]), s["eos_ids"], *s["special"])
        return s["config"], tok, s["chat_template"]
    except Exception:  # no cache yet, or not one fermi can read (tokenizers raises plain Exception)
        pass
    g = open_gguf(path)
    ModelConfig.from_dict(g.config)  # an unsupported architecture fails here, before its tokenizer can
    tok = g.tokenizer
    s = {"config": g.config, "chat_template": g.chat_template, "tokenizer": tok.tok.to_str(),
         "eos_ids": tok.eos_ids, "special": [tok.bos_token, tok.eos_token, tok.pad_token]}
    try:
        with replaced(target) as tmp:
            tmp.write_text(json.dumps(s), encoding="utf-8")
    except OSError:
        pass
    return g.config, tok, g.chat_template


@contextmanager
def replaced(target: Path, suffix: str = ""):
    """A private path beside `target` to write it under, renamed onto it when the
    block ends without an error: a crash never leaves half a file as the cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def converted(path: Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """The float32 conversion of a GGUF (GGUFModel.convert), found in the cache
    without reading the GGUF when it was made before."""
    target = cache_folder(path) / "model.safetensors"
    return target if target.is_file() else open_gguf(path).convert(progress=progress)


def open_gguf(path: str | os.PathLike) -> "GGUFModel":
    """Read a GGUF file's metadata and tensor index (tensor data stays mapped)."""
    path = Path(path)
    if not path.is_file():
        raise FermiError(f"{path}: no such GGUF file")
    try:
        reader = _Reader(path)
        size = path.stat().st_size
        for t in reader.tensors:
            # A truncated file can still parse: its last tensors then point past the end.
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor '{t.name}' lies past the end of the file")
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors...
        raise FermiError(f"{path}: not a readable GGUF file ({_one_line(e)})") from None
    if "general.architecture" not in meta:
        raise FermiError(f"{path}: GGUF metadata has no 'general.architecture'")
    return GGUFModel(path, reader, meta)


class GGUFModel:
    def __init__(self, path: Path, reader: gguf.GGUFReader, metadata: dict):
        self.path = path
        self.metadata = metadata
        self._reader = reader
        self._tensors = {t.name: t for t in reader.tensors}
        self.config: dict = _config(path, metadata, self._tensors)
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        # Built on first use: an unsupported architecture should fail on its config
        # (ModelConfig's error) before an unsupported tokenizer can.
        return _tokenizer(self.path, self.metadata)

    def convert(
        self, cache_dir: Path | None = None, progress: Callable[[int, int], None] | None = None
    ) -> Path:
        """Every tensor dequantized to float32, with HF names, in one safetensors
        file under `<cache_dir>/gguf/<key>/`; made once, then found again by key.
        `progress(done, total)` counts bytes written."""
        target = cache_folder(self.path, cache_dir) / "model.safetensors"
        if target.is_file():
            return target

        plan = self.tensors()
        head, total = _safetensors_header(plan, {"format": "pt", "source": self.path.name})
        with replaced(target) as tmp, open(tmp, "wb") as f:
            f.write(head)
            done = 0
            if progress:
                progress(0, total)
            for _, t, shape in plan:  # one tensor in memory at a time
                array = self.dequantized(t, shape)
                f.write(array.data)
                done += array.nbytes
                if progress:
                    progress(done, total)
        return target

    def tensors(self) -> list[tuple[str, object, list[int]]]:
        """(HF name, GGUF tensor, HF shape) for every tensor HF keeps, in file order;
        read one with `dequantized()` or `affine()`."""
        plan = []
        for name, t in self._tensors.items():
            try:
                hf = hf_name(name)
            except KeyError:
                raise FermiError(f"{self.path}: tensor '{name}' has no Hugging Face name") from None
            if hf is not None:
                # GGUF lists dimensions innermost first; numpy and HF outermost first.
                plan.append((hf, t, [int(n) for n in reversed(t.shape)]))
        return plan

    def dequantized(self, t, shape: list[int]) -> np.ndarray:
        return self._hf_layout(t, self._raw(t, shape))

    def affine(self, t, shape: list[int], requantize: int | None = None) -> Affine | None:
        """The exact integer form of a 2-D tensor of an AFFINE_BITS type. Any other
        quantized type is rounded afresh to `requantize` bits (min-max, groups of
        32) when that is given; float tensors, and the rest, give None."""
        kind = t.tensor_type.name
        bits = AFFINE_BITS.get(kind)
        if len(shape) != 2 or shape[1] % GROUP or kind in ("F32", "F16", "BF16", "F64") or not (bits or requantize):
            return None
        w = self._raw(t, shape).reshape(shape[0], -1, GROUP)
        if bits:
            blocks = t.data.reshape(-1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])
            d = _half(blocks[:, 0:2])
            if kind.endswith("_K"):  # 8 groups per block: 6-bit scales and mins of d and dmin
                sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
                scales, biases = d * sc, -_half(blocks[:, 2:4]) * m
            elif kind.endswith("_1"):
                scales, biases = d, _half(blocks[:, 2:4])
            else:
                scales, biases = d, d * -(2 ** (bits - 1))
            scales, biases = (a.reshape(shape[0], -1, 1).astype(np.float32) for a in (scales, biases))
        else:
            bits = requantize
            lo, hi = w.min(-1, keepdims=True), w.max(-1, keepdims=True)
            scales, biases = (hi - lo) / (2**bits - 1), lo
        safe = np.where(scales == 0, 1, scales)
        q = np.clip(np.rint((w - biases) / safe), 0, 2**bits - 1).astype(np.uint8).reshape(shape)
        arrays = (self._hf_layout(t, a.reshape(shape[0], -1)) for a in (q, scales, biases))
        return Affine(*arrays, bits=bits)

    def _raw(self, t, shape: list[int]) -> np.ndarray:
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            kind = t.tensor_type.name
            raise FermiError(f"{self.path}: tensor '{t.name}' is {kind}, which gguf cannot dequantize") from None
        return np.ascontiguousarray(array, dtype=np.float32).reshape(shape)

    def _hf_layout(self, t, array: np.ndarray) -> np.ndarray:
        """Rows in HF's order (llama.cpp permuted llama's q/k rows); any row width."""
        if self.config["model_type"] == "llama" and re.search(r"\.attn_[qk]\.(weight|bias)$", t.name):
            kv = ".attn_k." in t.name
            array = _unpermute(array, self.config["num_key_value_heads" if kv else "num_attention_heads"])
        return np.ascontiguousarray(array)


def _half(a: np.ndarray) -> np.ndarray:
    """float16 values stored as pairs of bytes ([n, 2] uint8) -> float32 [n, 1]."""
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)


def _safetensors_header(plan, metadata: dict) -> tuple[bytes, int]:
    """The header of a float32 safetensors file holding `plan`'s tensors in order,
    and the size of its data: known before any tensor is dequantized, so the
    tensors can be streamed to disk one by one."""
    header, offset = {}, 0
    for hf, _, shape in plan:
        nbytes = 4 * math.prod(shape)
        header[hf] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads it, so the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text, offset


# ---------------------------------------------------------------- tensor names

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama3's rope factors: config.rope_scaling carries them instead.
_SKIP = {"rope_freqs"}


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None: not a weight HF keeps).
    Raises KeyError for a tensor fermi does not know."""
    stem, _, kind = name.rpartition(".")  # kind: weight | bias
    if stem in _SKIP:
        return None
    if stem in _TOP:
        return f"{_TOP[stem]}.{kind}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m[2] in _LAYER:
        return f"model.layers.{m[1]}.{_LAYER[m[2]]}.{kind}"
    raise KeyError(name)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's llama q/k permute (HF's rotate-half layout, rows
    [head, 2, dim/2], stored as llama.cpp's interleaved pairs, [head, dim/2, 2])."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- config


def _config(path: Path, meta: dict, tensors: dict) -> dict:
    arch = meta["general.architecture"]
    supported = arch in ARCHITECTURES

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        return max(value) if isinstance(value, list) else value  # some archs state a count per layer

    def need(key):
        value = get(key)
        if value is None:
            if supported:
                raise FermiError(f"{path}: GGUF metadata has no '{arch}.{key}'")
            return 0  # placeholder: ModelConfig rejects the architecture itself
        return value

    heads = need("attention.head_count")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config = {
        "model_type": arch,
        "hidden_size": need("embedding_length"),
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length"),
        "vocab_size": get("vocab_size") or len(tokens),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length", 4096),
        "rope_scaling": None,
        # llama.cpp writes no output.weight when the head is the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if config["head_dim"] is None and heads:
        config["head_dim"] = config["hidden_size"] // heads
    if supported:
        config["rope_scaling"] = _rope_scaling(path, arch, meta, tensors, config)
    return config


def _f32(x: float) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.999999747e-06. The shortest float32
    # spelling gives back the value the model's config.json states.
    return float(str(np.float32(x)))


def _rope_scaling(path: Path, arch: str, meta: dict, tensors: dict, config: dict) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        scaling = {"rope_type": kind, "factor": _f32(meta[f"{arch}.rope.scaling.factor"])}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = original
        return scaling
    if kind not in (None, "none"):
        raise FermiError(f"{path}: rope scaling '{kind}' is not supported")
    if "rope_freqs.weight" not in tensors:
        return None
    # Llama 3.x: convert_hf_to_gguf writes the llama3 rope scaling as per-frequency
    # divisors (rope_freqs), not as metadata. Every Llama 3.1-3.3 uses these
    # parameters but `factor`; rebuild them and check they give the stored divisors.
    rope_freqs = tensors["rope_freqs.weight"]
    stored = dequantize(rope_freqs.data, rope_freqs.tensor_type).ravel()
    scaling = {
        "rope_type": "llama3",
        "factor": _f32(stored.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    expected = llama3_rope_factors(config["rope_theta"], config["head_dim"], scaling)
    if expected.shape != stored.shape or not np.allclose(expected, stored, rtol=1e-4):
        raise FermiError(f"{path}: its rope_freqs match no llama3 rope scaling fermi knows")
    return scaling


def llama3_rope_factors(theta: float, head_dim: int, s: dict) -> np.ndarray:
    """The divisor of each rotary frequency under llama3 scaling, as convert_hf_to_gguf computes it."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    old = s["original_max_position_embeddings"]
    low, high, factor = s["low_freq_factor"], s["high_freq_factor"], s["factor"]
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, mid)).astype(np.float32)


# ---------------------------------------------------------------- tokenizer

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


def _tokenizer(path: Path, meta: dict) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise FermiError(f"{path}: GGUF tokenizer '{kind}' is not supported (fermi reads 'gpt2', byte-level BPE)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]

    # Ordinary tokens are spelled in GPT-2's byte alphabet; control and user-defined
    # ones are the raw text the model's tokenizer.json lists as added tokens.
    alphabet = set(_BYTE_CHAR.values())
    vocab = {}
    for i, (token, ty) in enumerate(zip(tokens, types)):
        if ty not in (CONTROL, USER_DEFINED) and not set(token) <= alphabet:
            token = "".join(_BYTE_CHAR[b] for b in token.encode())
        vocab[token] = i
    normalizer, pre, ignore_merges = _pre_tokenizer(path, meta.get("tokenizer.ggml.pre"))
    tok = HFTokenizer(models.BPE(vocab, merges, byte_fallback=False, ignore_merges=ignore_merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    # Added tokens match whole, before normalization; control ones are special (skippable in decode).
    added = [(t, ty == CONTROL) for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, special in added if special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, special in added if not special])

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


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or e.__class__.__name__
    return text if len(text) <= 200 else text[:197] + "..."
