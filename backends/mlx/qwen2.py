"""Qwen2 / Qwen2.5 (also DeepSeek-R1-Distill-Qwen) in MLX: Llama with a bias on
the q/k/v projections (always) and none on the output projection."""

from __future__ import annotations

from fermi.config import ModelConfig

from . import llama


class Attention(llama.Attention):
    @staticmethod
    def biases(cfg: ModelConfig) -> tuple[bool, bool]:
        return True, False


class Model(llama.Model):
    attention = Attention
