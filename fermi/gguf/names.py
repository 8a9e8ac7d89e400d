"""GGUF tensor names and layout -> Hugging Face's: the one renaming of the GGUF
source format, and the row order llama.cpp changed."""

from __future__ import annotations

import re

import numpy as np

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
# Gemma 3 norms both ends of each sub-block; llama.cpp's ffn_norm is the one before the MLP.
_GEMMA_LAYER = _LAYER | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_LAYER = {"gemma3": _GEMMA_LAYER}
# llama3's rope factors: config.rope_scaling carries them instead.
_SKIP = {"rope_freqs"}


def hf_name(name: str, arch: str | None = None) -> str | None:
    """The Hugging Face name of a GGUF tensor of a file of architecture `arch`
    (None: not a weight HF keeps). Raises KeyError for a tensor fermi does not know."""
    stem, _, kind = name.rpartition(".")  # kind: weight | bias
    if stem in _SKIP:
        return None
    if stem in _TOP:
        return f"{_TOP[stem]}.{kind}"
    layer = _ARCH_LAYER.get(arch, _LAYER)
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m[2] in layer:
        return f"model.layers.{m[1]}.{layer[m[2]]}.{kind}"
    raise KeyError(name)


def hf_layout(config: dict, name: str, array: np.ndarray) -> np.ndarray:
    """Rows in HF's order (llama.cpp permuted llama's q/k rows); any row width. Gemma's
    norm weights as HF holds them: HF scales by (1 + w), llama.cpp stores 1 + w."""
    if config["model_type"] == "llama" and re.search(r"\.attn_[qk]\.(weight|bias)$", name):
        kv = ".attn_k." in name
        array = _unpermute(array, config["num_key_value_heads" if kv else "num_attention_heads"])
    elif config["model_type"] == "gemma3_text" and name.endswith("norm.weight"):
        array = array - 1
    return np.ascontiguousarray(array)



def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's llama q/k permute (HF's rotate-half layout, rows
    [head, 2, dim/2], stored as llama.cpp's interleaved pairs, [head, dim/2, 2])."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
