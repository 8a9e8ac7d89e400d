"""Qwen3 in MLX: Llama plus an RMSNorm over each head's queries and keys (before
RoPE), and an explicit head_dim (heads * head_dim need not equal hidden_size;
ModelConfig carries it and llama.Attention already sizes by it)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from fermi.config import ModelConfig

from . import llama


class Attention(llama.Attention):
    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__(cfg, layer)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.rms_norm_eps)

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        q, k, v = super().project(x)  # [B, heads, L, head_dim]: the norm runs over head_dim
        return self.q_norm(q), self.k_norm(k), v


class Model(llama.Model):
    attention = Attention
