"""GGUF files: config, tokenizer and chat template from the metadata, and the
tensors dequantized into one float32 safetensors file with Hugging Face names
and layout, so the rest of fermi reads a GGUF like a model directory. For a
backend that holds quantized weights, `GGUFModel.affine()` gives a tensor's
exact integer form instead (see AFFINE_BITS).

Parsing and dequantization are the `gguf` package's (GGUFReader, gguf.quants);
this package only names, reshapes and caches, one job a module:

- reader.py     opening a file: metadata, tensor index, a tensor's values
- names.py      GGUF -> Hugging Face tensor names and row layout
- config.py     the Hugging Face style config dict from the metadata
- tokenizer.py  the tokenizer (byte-level BPE, SentencePiece)
- blocks.py     quantized blocks in the affine layout MLX keeps
- convert.py    the cache folder: metadata summary, float32 safetensors
"""

from .blocks import AFFINE_BITS, GROUP, Affine
from .config import llama3_rope_factors
from .convert import cache_folder, converted, describe, replaced
from .names import _LAYER, _TOP, hf_name
from .reader import GGUFModel, _Reader, open_gguf

__all__ = [
    "AFFINE_BITS", "GROUP", "Affine", "GGUFModel", "cache_folder", "converted", "describe",
    "hf_name", "llama3_rope_factors", "open_gguf", "replaced",
]
