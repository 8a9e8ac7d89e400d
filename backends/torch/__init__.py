"""The PyTorch backend: CUDA when there is a GPU, else the CPU (float32).

Implements the module API of fermi.backends (available, default_dtype,
device_name, load) and exposes `make_sampler(params, prompt_ids)`, the same
name the MLX backend exposes, so tests reach the sampler without a model.
"""

from __future__ import annotations

import os

# Tensors of 2 MiB and more in transparent huge pages (torch reads this at its first
# large allocation): fewer TLB misses while decode streams the weights (~3% here).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402  (absolute import: PyTorch, not this package)

from .runtime import TorchRuntime
from .runtime import load as _load
from .sampler import make_sampler

__all__ = ["available", "default_dtype", "device_name", "load", "make_sampler", "TorchRuntime"]


def available() -> str | None:
    return None  # the CPU always works


def _device() -> torch.device:
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype() -> str:
    return "bfloat16" if torch.cuda.is_available() else "float32"


def device_name() -> str:
    return str(_device())


def load(model, dtype: str | None = None, quantize: int | None = None, blocks: bool | None = None) -> TorchRuntime:
    """Weights of `model` (a fermi.sources.ModelFiles) on this backend's device. A
    GGUF's quantized blocks are kept on a CPU with the native kernels (blocks=None:
    unless quantize is 0; see runtime.load), dequantized elsewhere."""
    return _load(model, dtype or default_dtype(), quantize, _device(), blocks)
