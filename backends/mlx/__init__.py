"""The MLX backend: Metal on Apple Silicon, the CPU elsewhere (the mlx[cpu] wheel).

Module API (see fermi/backends/__init__.py): available, metal_available,
default_dtype, device_name, load, make_sampler. Without MLX installed the module
still imports, and `available()` says why it cannot run.

Weights:
- safetensors (HF names): loaded and cast to the dtype; `quantize=4|8` then
  quantizes every Linear and the embedding (group size 64) in place.
- GGUF: MLX reads the file itself and keeps Q4_0, Q4_1 and Q8_0 tensors in its
  own quantized layout (weight/scales/biases, blocks of 32), exactly. That is what
  MLX is good at, so a GGUF loads quantized by default. F32/F16 tensors come as
  they are; every other type (BF16, K-quants, Q5_x) comes dequantized from the
  float32 conversion (`weight_files()`, gguf's own dequantizer). `quantize=0`
  asks for every weight dequantized to the dtype; `quantize=4|8` re-quantizes
  uniformly from the dequantized weights. The dtype alone does not dequantize:
  it sets the activations, the float weights and the scales. When MLX cannot
  read a GGUF at all (a tensor type its reader lacks, e.g. Q5_0), the float32
  conversion is used throughout.
"""

from __future__ import annotations

import re
from typing import Sequence

from fermi.errors import FermiError

try:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
except ImportError as e:  # the module stays importable; available() reports it
    mx, _IMPORT_ERROR = None, e

DTYPES = ("float16", "bfloat16", "float32")
GROUP_SIZE = 64  # for quantize=4|8
GGUF_BLOCK = 32  # Q4_0/Q4_1/Q8_0 as MLX reads them: groups of 32 along the input dim
NATIVE = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}  # GGUF types MLX's reader gets exactly right


def available() -> str | None:
    if mx is None:
        return f"mlx cannot be imported ({_IMPORT_ERROR}); install mlx (macOS) or mlx[cpu] (Linux)"
    return None


def metal_available() -> bool:
    try:
        return mx is not None and bool(mx.metal.is_available())
    except Exception:
        return False


def default_dtype() -> str:
    # float16 is MLX's dtype on Metal. MLX's CPU kernels for float16 are slow (a
    # float16 Q4_1 SmolLM2 decodes at 0.1 tok/s on a CPU where float32 does 4), so
    # the CPU build defaults to float32.
    return "float16" if metal_available() else "float32"


def device_name() -> str:
    return "metal" if metal_available() else "cpu"


def make_sampler(params, prompt_ids: Sequence[int]):
    from .sampler import make_sampler as make
    return make(params, prompt_ids)


def load(model, dtype: str | None = None, quantize: int | None = None):
    """ModelFiles -> MLXRuntime, the weights evaluated on the device."""
    from . import llama, qwen2, qwen3
    from .runtime import MLXRuntime

    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise FermiError(f"the MLX backend runs {', '.join(DTYPES)}, not '{dtype}'")
    if quantize not in (None, 0, 4, 8):
        raise FermiError(f"quantize must be 4 or 8 (bits), or 0 for none, not {quantize}")
    cfg = model.config
    arch = {"llama": llama.Model, "qwen2": qwen2.Model, "qwen3": qwen3.Model}[cfg.model_type]

    tensors = _from_gguf(model, cfg) if model.gguf is not None else None
    if tensors is not None and quantize is not None:
        tensors = _dequantize(tensors)
    if tensors is None:
        tensors = {}
        for f in model.weight_files():
            tensors.update(mx.load(str(f)))
    tensors = {k: v for k, v in tensors.items() if "rotary_emb.inv_freq" not in k}

    tied = cfg.tie_word_embeddings or "lm_head.weight" not in tensors
    if tied:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}
    net = arch(cfg, tied)
    # Layers that arrive quantized (GGUF) become quantized layers before loading into them.
    nn.quantize(net, class_predicate=lambda path, m: _native_quant(tensors, path))
    dt = getattr(mx, dtype)
    try:
        net.load_weights([(k, v if v.dtype == mx.uint32 else v.astype(dt)) for k, v in tensors.items()])
    except ValueError as e:  # names or shapes that are not this architecture's
        raise FermiError(f"weights do not match the {cfg.model_type} architecture: {e}") from None
    if quantize:
        fits = lambda path, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % GROUP_SIZE == 0
        nn.quantize(net, group_size=GROUP_SIZE, bits=quantize, class_predicate=fits)
    mx.eval(net.parameters())
    size = sum(v.nbytes for _, v in tree_flatten(net.parameters()))
    return MLXRuntime(net, cfg, dtype, device_name(), size)


def _native_quant(tensors: dict, path: str) -> dict | bool:
    """to_quantized's arguments for a layer whose weights came quantized, else False."""
    scales = tensors.get(f"{path}.scales")
    if scales is None:
        return False
    bits = tensors[f"{path}.weight"].shape[-1] * 32 // (scales.shape[-1] * GGUF_BLOCK)
    return {"group_size": GGUF_BLOCK, "bits": bits}


def _dequantize(tensors: dict) -> dict:
    out = {}
    for name, v in tensors.items():
        prefix, _, kind = name.rpartition(".")
        if kind in ("scales", "biases"):
            continue
        q = _native_quant(tensors, prefix) if kind == "weight" else False
        if q:
            # float32 scales, else the result comes out in their float16
            s, b = (tensors[f"{prefix}.{k}"].astype(mx.float32) for k in ("scales", "biases"))
            v = mx.dequantize(v, s, b, **q)
        out[name] = v
    return out


# GGUF tensor names -> HF names: the one mapping for this source format.
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_name(name: str) -> str | None:
    """'blk.3.attn_q.scales' -> 'model.layers.3.self_attn.q_proj.scales'; None to drop
    (rope_freqs: the RoPE frequencies are computed from the config)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(\w+)", name)
    if m:
        part = _GGUF_BLOCK.get(m[2])
        return part and f"model.layers.{m[1]}.{part}.{m[3]}"
    base, _, kind = name.rpartition(".")
    return f"{_GGUF_TOP[base]}.{kind}" if base in _GGUF_TOP else None


def _from_gguf(model, cfg) -> dict | None:
    """HF-named tensors from the GGUF, quantized ones as weight/scales/biases; None
    when MLX cannot read the file (the caller then takes the float32 conversion)."""
    try:
        raw = mx.load(str(model.gguf))
    except Exception:  # a tensor type MLX's reader lacks (Q5_0, IQ*, ...)
        return None
    # MLX's reader turns every other type into float16 and gets some wrong (Q4_K in
    # mlx 0.32): a float16 tensor that was not F16 in the file comes from the float32
    # conversion instead, made by gguf's own dequantizer. Only then are the types
    # read (gguf's reader takes seconds on a large vocabulary).
    foreign = set()
    if any(v.dtype == mx.float16 and not k.endswith((".scales", ".biases")) for k, v in raw.items()):
        from gguf import GGUFReader

        foreign = {t.name for t in GGUFReader(str(model.gguf)).tensors if t.tensor_type.name not in NATIVE}
    tensors = {gguf_name(k): v for k, v in raw.items() if k not in foreign}
    tensors.pop(None, None)
    if cfg.model_type == "llama":
        # llama.cpp permuted the Q/K rows (interleaved RoPE pairs); undo it. Quantization
        # groups run along the input dim, so weight/scales/biases rows move together.
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
        for name, v in tensors.items():
            n = heads.get(name.split(".")[-2])
            if n:  # rows [n, 2, half] in HF became [n, half, 2] in the GGUF
                tensors[name] = v.reshape(n, -1, 2, *v.shape[1:]).swapaxes(1, 2).reshape(v.shape)
    if foreign:
        converted = {}
        for f in model.weight_files():  # HF layout: already unpermuted
            converted.update(mx.load(str(f)))
        tensors.update({name: converted[name] for name in map(gguf_name, foreign) if name})
    return tensors
