"""Opening a GGUF file: its metadata, its tensor index, and each tensor's
values (dequantized with the `gguf` package) in Hugging Face's layout."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf.quants import dequantize

from ..errors import FermiError
from ..tokenizer import Tokenizer
from .blocks import Affine, affine
from .config import config_dict
from .names import hf_layout, hf_name
from .tokenizer import tokenizer


class _Reader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map: numpy.memmap's
    Python-level __getitem__ made parsing a 150k-token vocabulary take seconds."""

    @property
    def data(self):
        return self._plain

    @data.setter
    def data(self, value):
        self._mmap = value  # keeps the mapping alive
        self._plain = value.view(np.ndarray)


def open_gguf(path: str | os.PathLike) -> "GGUFModel":
    """Read a GGUF file's metadata and tensor index (tensor data stays mapped)."""
    path = Path(path)
    if not path.is_file():
        raise FermiError(f"{path}: no such GGUF file")
    try:
        reader = _Reader(path)
        size = path.stat().st_size
        for t in reader.tensors:
            # A truncated file can still parse: its last tensors then point past the end.
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise ValueError(f"tensor '{t.name}' lies past the end of the file")
        meta = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors...
        raise FermiError(f"{path}: not a readable GGUF file ({_one_line(e)})") from None
    if "general.architecture" not in meta:
        raise FermiError(f"{path}: GGUF metadata has no 'general.architecture'")
    return GGUFModel(path, reader, meta)


class GGUFModel:
    def __init__(self, path: Path, reader: gguf.GGUFReader, metadata: dict):
        self.path = path
        self.metadata = metadata
        self._reader = reader
        self._tensors = {t.name: t for t in reader.tensors}
        self.config: dict = config_dict(path, metadata, self._tensors)
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")

    @cached_property
    def tokenizer(self) -> Tokenizer:
        # Built on first use: an unsupported architecture should fail on its config
        # (ModelConfig's error) before an unsupported tokenizer can.
        return tokenizer(self.path, self.metadata)

    def convert(
        self, cache_dir: Path | None = None, progress: Callable[[int, int], None] | None = None
    ) -> Path:
        """Every tensor dequantized to float32, with HF names, in one safetensors
        file under `<cache_dir>/gguf/<key>/`; made once, then found again by key.
        `progress(done, total)` counts bytes written."""
        from .convert import write_float32  # convert.py opens files through this module

        return write_float32(self, cache_dir, progress)

    def tensors(self) -> list[tuple[str, object, list[int]]]:
        """(HF name, GGUF tensor, HF shape) for every tensor HF keeps, in file order;
        read one with `dequantized()` or `affine()`."""
        plan = []
        for name, t in self._tensors.items():
            try:
                hf = hf_name(name, self.metadata["general.architecture"])
            except KeyError:
                raise FermiError(f"{self.path}: tensor '{name}' has no Hugging Face name") from None
            if hf is not None:
                # GGUF lists dimensions innermost first; numpy and HF outermost first.
                plan.append((hf, t, [int(n) for n in reversed(t.shape)]))
        return plan

    def dequantized(self, t, shape: list[int]) -> np.ndarray:
        return hf_layout(self.config, t.name, self.raw(t, shape))

    def affine(self, t, shape: list[int], requantize: int | None = None) -> Affine | None:
        """The exact integer form of a 2-D tensor (see blocks.affine)."""
        return affine(self, t, shape, requantize)

    def raw(self, t, shape: list[int]) -> np.ndarray:
        """A tensor's float32 values in the file's own row order."""
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            kind = t.tensor_type.name
            raise FermiError(f"{self.path}: tensor '{t.name}' is {kind}, which gguf cannot dequantize") from None
        return np.ascontiguousarray(array, dtype=np.float32).reshape(shape)


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or e.__class__.__name__
    return text if len(text) <= 200 else text[:197] + "..."
