"""Qwen3 in PyTorch: Llama with an RMSNorm over each head of q and k (q_norm,
k_norm, applied before RoPE) and an explicit head_dim, which may differ from
hidden_size / num_attention_heads (the config's head_dim is used throughout)."""

from __future__ import annotations

import torch

from fermi.config import ModelConfig

from . import llama


class Attention(llama.Attention):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.q_norm = llama.RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = llama.RMSNorm(config.head_dim, config.rms_norm_eps)

    def qk_norm(self, qk):
        # qk: [batch, length, q heads + kv heads, head_dim]; the norm runs over head_dim.
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        return torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)


class Model(llama.Model):
    def __init__(self, config: ModelConfig):
        super().__init__(config, attention=Attention)
