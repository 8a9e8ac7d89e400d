"""RoPE frequencies, computed in one place for both backends and the GGUF reader.

`parameters(config)` says which of the config's spellings wins (one rule);
`frequencies(params, head_dim, max_positions)` turns them into inverse
frequencies [head_dim/2], as transformers' modeling_rope_utils computes them
(default, linear, llama3, yarn, longrope/su), in float64 then rounded once to
float32. Scaling kinds that also scale cos/sin say by how much (attention_factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import FermiError

KINDS = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass
class Frequencies:
    inv_freq: np.ndarray  # float32 [head_dim/2]: the angle per position of each pair of dims
    attention_factor: float = 1.0  # cos and sin are scaled by it (yarn, longrope)
    # longrope: from position `long_from` on, these instead (vLLM's rule: by position, so a
    # key cached early keeps its rotation; llama.cpp picks by the context size)
    long_inv_freq: np.ndarray | None = None
    long_from: int | None = None

    @property
    def periods(self) -> np.ndarray:
        """1 / inv_freq, what mx.fast.rope takes as `freqs`."""
        return (1.0 / self.inv_freq.astype(np.float64)).astype(np.float32)


def parameters(config, layer_type: str | None = None) -> dict:
    """The RoPE parameters {rope_type, rope_theta, …}. transformers 5 writes one
    `rope_parameters` dict (per layer type where layers differ, as Gemma 3's); older
    configs have `rope_theta` and `rope_scaling` (whose type may be spelled `type`).
    `rope_parameters` wins where both are there, as transformers reads it."""
    params = config.extra.get("rope_parameters")
    if params and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if params and "rope_theta" not in params and not ({"rope_type", "type"} & params.keys()):
        raise FermiError(f"RoPE parameters per layer type ({', '.join(params)}) but none asked for")
    if not params:
        params = {**(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    params = dict(params)
    if params.get("partial_rotary_factor", config.extra.get("partial_rotary_factor", 1.0)) != 1.0:
        raise FermiError("RoPE over part of each head (partial_rotary_factor) is not supported")
    params.setdefault("rope_theta", config.rope_theta)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def frequencies(params: dict, head_dim: int, max_positions: int) -> Frequencies:
    kind, theta = params["rope_type"], float(params["rope_theta"])
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    base = theta ** exponents  # the periods, unscaled
    if kind == "default":
        return Frequencies(_f32(1.0 / base))
    if kind == "linear":
        return Frequencies(_f32(1.0 / (base * params["factor"])))
    if kind == "llama3":
        return Frequencies(_f32(1.0 / base / llama3_factors(base, params)))
    if kind == "yarn":
        return _yarn(params, base, head_dim, max_positions)
    if kind in ("longrope", "su"):
        original = params["original_max_position_embeddings"]
        factor = params.get("factor") or max_positions / original
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        short = _f32(1.0 / (np.asarray(params["short_factor"], np.float64) * base))
        long = _f32(1.0 / (np.asarray(params["long_factor"], np.float64) * base))
        return Frequencies(short, attention, long, original)
    raise FermiError(f"RoPE scaling '{kind}' is not supported (fermi runs: {', '.join(KINDS)})")


def llama3_factors(periods: np.ndarray, s: dict) -> np.ndarray:
    """Llama 3.1's stretch of each period: long wavelengths slowed by `factor`, short
    ones kept, the band between low_freq_factor and high_freq_factor interpolated
    smoothly. (Also the `rope_freqs` tensor a llama3 GGUF carries.)"""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi * periods
    smooth = (old_len / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen > old_len / low, factor, 1.0)
    return np.where((wavelen >= old_len / high) & (wavelen <= old_len / low), medium, out)


def _yarn(params: dict, base: np.ndarray, head_dim: int, max_positions: int) -> Frequencies:
    """NTK-by-parts interpolation (YaRN), as transformers' _compute_yarn_parameters."""
    theta, original = float(params["rope_theta"]), params["original_max_position_embeddings"]
    factor = params.get("factor") or max_positions / original
    mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0  # noqa: E731
    attention = params.get("attention_factor")
    if attention is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def dim_of(rotations):  # the dimension whose wavelength makes `rotations` turns over `original`
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolated (the period as it is), 0: interpolated (stretched by factor)
    return Frequencies(_f32(1 / (factor * base) * (1 - keep) + 1 / base * keep), float(attention))


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).astype(np.float32)
