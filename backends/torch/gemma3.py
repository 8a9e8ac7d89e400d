"""Gemma 3 (text) in PyTorch: Llama's attention and gated MLP, with

- RMSNorm scaled by (1 + weight), in float32 (Gemma's own), also over each head
  of q and k before RoPE;
- four norms a block: after attention and after the MLP too, before each residual;
- GeGLU: the gate through tanh-approximated GELU;
- the embedding scaled by sqrt(hidden) (the tied output projection is not);
- attention scores scaled by query_pre_attn_scalar^-1/2;
- layers of two kinds (layer_types): sliding_attention sees the `sliding_window`
  newest positions, with the local RoPE; full_attention all, with the global one.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fermi.config import ModelConfig

from . import llama


class RMSNorm(llama.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


class Attention(llama.Attention):
    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.scale = config.extra.get("query_pre_attn_scalar", config.head_dim) ** -0.5

    def qk_norm(self, qk):
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=2)
        return torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)


class MLP(llama.MLP):
    act = staticmethod(partial(F.gelu, approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, attention: type[Attention]):
        super().__init__()
        self.self_attn = attention(config)
        self.mlp = MLP(config)
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, rope, mask, causal, cache, layer, span):
        h = self.self_attn(self.input_layernorm(x), rope, mask, causal, cache, layer, span)
        x = x + self.post_attention_layernorm(h)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Model(llama.Model):
    Block, Norm = Block, RMSNorm

    def __init__(self, config: ModelConfig):
        super().__init__(config, attention=Attention)
        self.embed_scale = math.sqrt(config.hidden_size)

    def norm_feeds(self) -> list:
        return []  # (1 + w) norms: not folded

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        return x * torch.tensor(self.embed_scale, dtype=x.dtype)  # in the table's dtype, as transformers
