"""Quantized GGUF blocks in the affine layout MLX keeps: for the block types that
are affine in groups of 32 along a row, the file's own integers and per-group
scale and bias, so a quantized weight moves over exactly instead of being
dequantized and rounded again."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
from gguf.quants import Q4_K

from .names import hf_layout

# Block types that are affine in groups of 32 along a row: w = scale * q + bias with
# q unsigned, `bits` wide (the symmetric ones, w = d * (q - 2**(bits-1)), included).
# They move into an affine-quantized layout exactly.
AFFINE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")  # the types that are not quantized
GROUP = 32


@dataclass
class Affine:
    """One weight matrix as w[r, c] = scales[r, c // GROUP] * q[r, c] + biases[r, c // GROUP]."""

    q: np.ndarray  # uint8 [rows, cols], each value < 2**bits
    scales: np.ndarray  # float32 [rows, cols // GROUP]
    biases: np.ndarray  # float32 [rows, cols // GROUP]
    bits: int


def affine(model, t, shape: list[int], requantize: int | None = None) -> Affine | None:
    """The exact integer form of a 2-D tensor of an AFFINE_BITS type of `model` (a
    GGUFModel). Any other quantized type is rounded afresh to `requantize` bits
    (min-max, groups of 32) when that is given; float tensors, and the rest, give None."""
    kind = t.tensor_type.name
    bits = AFFINE_BITS.get(kind)
    if len(shape) != 2 or shape[1] % GROUP or kind in FLOAT_TYPES or not (bits or requantize):
        return None
    w = model.raw(t, shape).reshape(shape[0], -1, GROUP)
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
    arrays = (hf_layout(model.config, t.name, a.reshape(shape[0], -1)) for a in (q, scales, biases))
    return Affine(*arrays, bits=bits)


def _half(a: np.ndarray) -> np.ndarray:
    """float16 values stored as pairs of bytes ([n, 2] uint8) -> float32 [n, 1]."""
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)
