"""Qwen2 (Qwen2.5, DeepSeek-R1-Distill-Qwen) in PyTorch: Llama with a bias on the
q, k and v projections (and none on o_proj, whatever attention_bias says)."""

from __future__ import annotations

from fermi.config import ModelConfig

from . import llama


class Attention(llama.Attention):
    def __init__(self, config: ModelConfig):
        super().__init__(config, qkv_bias=True, o_bias=False)


class Model(llama.Model):
    def __init__(self, config: ModelConfig):
        super().__init__(config, attention=Attention)
