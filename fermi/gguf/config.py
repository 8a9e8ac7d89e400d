"""A Hugging Face style config dict (config.json's keys) from a GGUF's metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf.quants import dequantize

from .. import rope
from ..config import ARCHITECTURES
from ..errors import FermiError

# GGUF architecture -> Hugging Face model_type, where the two differ.
_MODEL_TYPE = {"gemma3": "gemma3_text"}  # the text model: a Gemma 3 GGUF holds no vision tower


def config_dict(path: Path, meta: dict, tensors: dict) -> dict:
    arch = meta["general.architecture"]
    model_type = _MODEL_TYPE.get(arch, arch)
    # Known: fermi reads this architecture's metadata (it may still not run it).
    known = arch in ARCHITECTURES or model_type in ARCHITECTURES or arch in _EXTRA

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        return max(value) if isinstance(value, list) else value  # some archs state a count per layer

    def need(key):
        value = get(key)
        if value is None:
            if known:
                raise FermiError(f"{path}: GGUF metadata has no '{arch}.{key}'")
            return 0  # placeholder: ModelConfig rejects the architecture itself
        return value

    heads = need("attention.head_count")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    config = {
        "model_type": model_type,
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
    if known:
        config["rope_scaling"] = _rope_scaling(path, arch, meta, tensors, config)
    if arch in _EXTRA:
        config.update(_EXTRA[arch](get, config))
    return config


def _gemma3(get, config: dict) -> dict:
    """What Gemma3TextConfig states and llama.cpp leaves to its code (llama-model.cpp,
    LLM_ARCH_GEMMA3): every sixth layer global, the others a sliding window with their
    own RoPE base, and the query scale."""
    n = config["num_hidden_layers"]
    # 27B (62 layers) scales queries by hidden/heads, every other size by head_dim.
    scalar = config["hidden_size"] // config["num_attention_heads"] if n == 62 else config["head_dim"]
    local = 10000.0
    # RoPE per kind of layer as transformers 5 spells it (fermi.rope reads that); the
    # scaling of the larger models applies to the global layers only.
    full = {"rope_type": "default", **(config["rope_scaling"] or {}), "rope_theta": config["rope_theta"]}
    return {
        "sliding_window": get("attention.sliding_window"),
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)],
        "rope_local_base_freq": local,  # config.json's spelling (transformers 4)
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": local},
                            "full_attention": full},
        "query_pre_attn_scalar": scalar,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": get("final_logit_softcapping"),
        "attn_logit_softcapping": get("attn_logit_softcapping"),
    }


# Architectures whose HF config has keys beyond the common ones: fn(get, config) -> dict.
_EXTRA = {"gemma3": _gemma3}


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
    """The divisor of each rotary frequency under llama3 scaling (the `rope_freqs`
    tensor convert_hf_to_gguf writes): fermi.rope's."""
    periods = theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return rope.llama3_factors(periods, s).astype(np.float32)
