"""The MLX backend: Metal on Apple Silicon, the CPU elsewhere (the mlx[cpu] wheel).

Module API (see fermi/backends/__init__.py): available, metal_available,
default_dtype, device_name, load, make_sampler. Without MLX installed the module
still imports, and `available()` says why it cannot run.

Weights:
- safetensors (HF names): loaded and cast to the dtype; `quantize=4|8` then
  quantizes every Linear and the embedding (group size 64) in place, evaluated
  a layer at a time, the tables (embedding, lm_head) read and quantized a block
  of rows at a time, so the float weights are never all held at once.
- GGUF, `blocks=True` (the default for a GGUF unless quantize=0): quantized
  tensors stay quantized, in MLX's affine layout (packed q,
  scales, biases per group of 32). The block types that are affine already
  (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K: fermi.gguf.AFFINE_BITS) move over
  exactly, as 4, 5 or 8 bits; the others (Q6_K, Q2_K, Q3_K, ...) are rounded to
  8 bits (min-max per group of 32: the error is a small fraction of their own
  step). F32/F16/BF16 tensors stay float. `blocks=False` (or `quantize=0`) asks
  for every weight dequantized (the float32 conversion); `quantize=4|8` quantizes only what is
  still float, since rounding a quantized weight again only adds error. The
  dtype sets the activations, the float weights and the scales.
  (MLX can read a GGUF itself, but only Q4_0/Q4_1/Q8_0, whole files or not at
  all, and mlx 0.32 decodes Q4_K wrongly: fermi reads the blocks with gguf.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fermi.errors import FermiError
from fermi.gguf import GROUP as GGUF_GROUP
from fermi.gguf import cache_folder, replaced

try:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
except ImportError as e:  # the module stays importable; available() reports it
    mx, _IMPORT_ERROR = None, e

DTYPES = ("float16", "bfloat16", "float32")
GROUP_SIZE = 64  # for quantize=4|8
REQUANTIZE_BITS = 8  # for GGUF types that are not affine in groups of 32
ROW_BLOCK = 4096  # rows of a float table quantized at a time (see _quantized_rows)


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


def load(model, dtype: str | None = None, quantize: int | None = None, blocks: bool | None = None):
    """ModelFiles -> MLXRuntime, the weights evaluated on the device. blocks: keep a
    GGUF's quantized blocks (True) or dequantize every weight first (False); None:
    keep them unless quantize is 0."""
    import importlib

    from fermi.config import ARCHITECTURES

    from .runtime import MLXRuntime

    dtype = dtype or default_dtype()
    if dtype not in DTYPES:
        raise FermiError(f"the MLX backend runs {', '.join(DTYPES)}, not '{dtype}'")
    if quantize not in (None, 0, 4, 8):
        raise FermiError(f"quantize must be 4 or 8 (bits), or 0 for none, not {quantize}")
    if not metal_available():
        # MLX keeps freed buffers for reuse; on the CPU that only holds memory, malloc
        # being as fast (SmolLM2 4-bit: the same decode speed, 32 MiB less at its peak).
        mx.set_cache_limit(0)
    cfg = model.config
    arch = importlib.import_module(f"{__name__}.{ARCHITECTURES[cfg.model_type]}").Model

    tensors = {}
    if blocks is None:
        blocks = model.gguf is not None and quantize != 0
    if blocks and model.gguf is None:
        raise FermiError("there are no quantized blocks to keep: the weights are not a GGUF file")
    if blocks:
        tensors = _from_gguf(model)
    else:
        for f in model.weight_files():
            tensors.update(mx.load(str(f)))
    tensors = {k: v for k, v in tensors.items() if "rotary_emb.inv_freq" not in k}
    if hasattr(arch, "sanitize"):  # the checkpoint's layout -> the architecture's
        tensors = arch.sanitize(tensors, cfg)

    tied = cfg.tie_word_embeddings or "lm_head.weight" not in tensors
    if tied:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}
    net = arch(cfg, tied)
    # Layers that arrive quantized (GGUF) become quantized layers before loading into them.
    saved = cfg.extra.get("quantization") or cfg.extra.get("quantization_config") or {}
    nn.quantize(net, class_predicate=lambda path, m: _arrived_quantized(tensors, path, saved))
    dt = getattr(mx, dtype)
    try:
        net.load_weights([(k, v if v.dtype == mx.uint32 else v.astype(dt)) for k, v in tensors.items()])
    except ValueError as e:  # names or shapes that are not this architecture's
        raise FermiError(f"weights do not match the {cfg.model_type} architecture: {e}") from None
    tensors.clear()  # the modules hold what they need; float weights go once evaluated
    if quantize:
        fits = lambda path, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % GROUP_SIZE == 0
        modules = dict(net.named_modules())
        tables = [p for p in ("model.embed_tokens", "lm_head") if p in modules and fits(p, modules[p])]
        nn.quantize(net, group_size=GROUP_SIZE, bits=quantize, class_predicate=fits)
        if not blocks:  # float tables from the files: quantized in blocks of rows instead
            modules = dict(net.named_modules())
            for p in tables:
                m = modules[p]
                m.weight, m.scales, m.biases = _quantized_rows(model.weight_files(), f"{p}.weight", quantize, dt)
    # Evaluated a piece at a time, the table first: quantizing float weights then holds
    # one layer's floats at most, not the whole model's (SmolLM2, --quantize 4, with the
    # tables in row blocks: the load peaks ~94 MiB over the 80 held, 567 before).
    for piece in (net.model.embed_tokens, *net.model.layers):
        mx.eval(piece.parameters())
    mx.eval(net.parameters())
    size = sum(v.nbytes for _, v in tree_flatten(net.parameters()))
    return MLXRuntime(net, cfg, dtype, device_name(), size)


def _quantized_rows(files, name: str, bits: int, dtype) -> tuple:
    """mx.quantize of the float tensor `name` (cast to `dtype`), a block of rows read
    from its file at a time: quantizing a whole table holds all of it in float first
    (SmolLM2's 113 MB, for 16 MB at 4 bits). Groups run along a row, so blocks of rows
    quantize exactly as the whole tensor does."""
    from safetensors import safe_open

    def block(path, a=None):
        with safe_open(str(path), framework="mlx") as f:  # mapped only for this block
            if name in f.keys():
                t = f.get_slice(name)
                rows = t.get_shape()[0]
                return rows if a is None else t[a:min(a + ROW_BLOCK, rows)]

    path = next(p for p in files if block(p) is not None)
    parts = []
    for a in range(0, block(path), ROW_BLOCK):
        parts.append(mx.quantize(block(path, a).astype(dtype), group_size=GROUP_SIZE, bits=bits))
        mx.eval(parts[-1])
    return tuple(mx.concatenate(p) for p in zip(*parts))


def _arrived_quantized(tensors: dict, path: str, saved: dict) -> dict | bool:
    """to_quantized's arguments for a layer whose weights came quantized, else False.
    The group size is the checkpoint config's `quantization` (mlx-lm writes it: group
    64 by default, per layer where a recipe mixes them), else GGUF's 32; the bits
    follow from the shapes."""
    scales = tensors.get(f"{path}.scales")
    if scales is None:
        return False
    layer = saved.get(path) if isinstance(saved.get(path), dict) else saved
    group = int(layer.get("group_size", GGUF_GROUP))
    bits = tensors[f"{path}.weight"].shape[-1] * 32 // (scales.shape[-1] * group)
    return {"group_size": group, "bits": bits}


def _from_gguf(model) -> dict:
    """HF-named tensors of a GGUF source: quantized ones as MLX's weight/scales/
    biases, float ones as float32 arrays. Made once, then read from the cache
    folder beside the float32 conversion."""
    target = cache_folder(model.gguf) / "mlx.safetensors"
    if target.is_file():
        return mx.load(str(target))
    g = model.gguf_model()
    tensors = {}
    for name, t, shape in g.tensors():
        a = g.affine(t, shape, requantize=REQUANTIZE_BITS)
        if a is None:
            tensors[name] = mx.array(g.dequantized(t, shape))
            continue
        base = name.removesuffix(".weight")
        tensors[name] = mx.array(pack(a.q, a.bits))
        tensors[f"{base}.scales"], tensors[f"{base}.biases"] = mx.array(a.scales), mx.array(a.biases)
    with replaced(target, suffix=".safetensors") as tmp:  # mx.save_safetensors adds the suffix otherwise
        mx.save_safetensors(str(tmp), tensors)
    return tensors


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Integers [rows, cols] (each < 2**bits) into MLX's packed uint32 layout: one
    little-endian bit stream per row, value i at bit i * bits."""
    rows, cols = q.shape
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    eights = np.bitwise_or.reduce(q.reshape(rows, cols // 8, 8).astype(np.uint64) << shifts, axis=-1)
    stream = eights.view(np.uint8).reshape(rows, cols // 8, 8)[..., :bits]  # 8 values in `bits` bytes
    return np.ascontiguousarray(stream).reshape(rows, -1).view(np.uint32)
