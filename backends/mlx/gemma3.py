"""Gemma 3 (text) in MLX; the math as backends/torch/gemma3.py says: (1 + weight)
RMSNorms (also over q and k heads), four norms a block, GeGLU (tanh GELU), the
embedding scaled by sqrt(hidden), scores scaled by query_pre_attn_scalar^-1/2,
sliding and full layers each with their own RoPE."""

from __future__ import annotations

import math
import mlx.core as mx
import mlx.nn as nn

from fermi.config import ModelConfig

from . import llama
from .cache import Span


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class Attention(llama.Attention):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__(cfg, layer)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        self.scale = cfg.extra.get("query_pre_attn_scalar", cfg.head_dim) ** -0.5

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        q, k, v = super().project(x)
        return self.q_norm(q), self.k_norm(k), v


class MLP(llama.MLP):
    act = staticmethod(nn.gelu_approx)  # (tanh's)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attention: type[Attention], layer: int):
        super().__init__()
        self.self_attn = attention(cfg, layer)
        self.mlp = MLP(cfg)
        dim, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def __call__(self, x: mx.array, span: Span, layer: int, mask) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), span, layer, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Model(llama.Model):
    attention, block, norm = Attention, Block, RMSNorm

    def __init__(self, cfg: ModelConfig, tied: bool):
        super().__init__(cfg, tied)
        self.model._embed_scale = math.sqrt(cfg.hidden_size)
