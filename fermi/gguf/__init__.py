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

import importlib

# Each name from the module that holds it, imported on first use: a cached model
# (convert.describe's summary, the float32 conversion) needs neither the `gguf`
# package nor numpy's parsing, and importing them costs ~0.2 s of a warm start.
_WHERE = {
    "AFFINE_BITS": "blocks", "FLOAT_TYPES": "blocks", "GROUP": "blocks", "Affine": "blocks", "llama3_rope_factors": "config",
    "cache_folder": "convert", "converted": "convert", "describe": "convert", "replaced": "convert",
    "_LAYER": "names", "_TOP": "names", "hf_name": "names", "GGUFModel": "reader", "_Reader": "reader",
    "open_gguf": "reader",
}
__all__ = [name for name in _WHERE if not name.startswith("_")]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
