"""Model sources: a Hugging Face repo id, a local directory, a .gguf file, or the
embedded SmolLM2. Each resolves to a `ModelFiles`: config, tokenizer, chat
template and safetensors weights with Hugging Face names and layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .config import ModelConfig
from .tokenizer import Tokenizer


@dataclass
class ModelFiles:
    name: str  # what users see: repo id, directory name or GGUF file name
    path: Path  # the directory or the .gguf file
    config: ModelConfig
    tokenizer: Tokenizer
    chat_template: str | None
    generation_config: dict = field(default_factory=dict)
    gguf: Path | None = None  # the GGUF file, when the source is one
    _weights: Callable[[], list[Path]] | list[Path] = field(default_factory=list, repr=False)

    def weight_files(self) -> list[Path]:
        """Safetensors files (HF names and layout). For a GGUF, the dequantized
        float32 conversion, made on first use and kept in the cache directory."""
        if callable(self._weights):
            self._weights = self._weights()
        return self._weights
