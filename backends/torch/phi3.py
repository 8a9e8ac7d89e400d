"""Phi-3 / Phi-3.5 in PyTorch: Llama whose checkpoint has q/k/v and gate/up fused
already (qkv_proj, gate_up_proj: this backend's own layout), with longrope (su)
scaling, whose frequencies fermi.rope computes."""

from __future__ import annotations

from . import llama


class Model(llama.Model):
    FUSED = {}  # the checkpoint's names are the model's
