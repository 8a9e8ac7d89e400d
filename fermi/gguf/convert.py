"""What fermi keeps made from a GGUF, in one cache folder per file: the metadata
summary (config, tokenizer, chat template) and the float32 safetensors
conversion with Hugging Face names and layout."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tokenizers import Tokenizer as HFTokenizer

from ..config import ModelConfig
from ..tokenizer import Tokenizer

if TYPE_CHECKING:
    from .reader import GGUFModel


def cache_folder(path: Path, cache_dir: Path | None = None) -> Path:
    """`<cache_dir>/gguf/<key>/`, where what is made from a GGUF file is kept. The
    key changes when the file is replaced or touched, so nothing stale is reused."""
    if cache_dir is None:
        from ..embedded import cache_dir as default_cache_dir

        cache_dir = default_cache_dir()
    stat = Path(path).stat()
    ident = f"{Path(path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return Path(cache_dir) / "gguf" / hashlib.sha256(ident.encode()).hexdigest()[:16]


def describe(path: Path) -> tuple[dict, Tokenizer, str | None]:
    """A GGUF's config dict, tokenizer and chat template. Parsing the metadata of a
    large vocabulary takes about a second, so it is done once and kept in the cache
    folder (summary.json); a cache that cannot be written is only slower."""
    target = cache_folder(path) / "summary.json"
    try:
        s = json.loads(target.read_text(encoding="utf-8"))
        tok = Tokenizer(HFTokenizer.from_str(s["tokenizer"]), s["eos_ids"], *s["special"])
        return s["config"], tok, s["chat_template"]
    except Exception:  # no cache yet, or not one fermi can read (tokenizers raises plain Exception)
        pass
    from .reader import open_gguf  # (not at import: a cached summary needs no parsing)

    g = open_gguf(path)
    ModelConfig.from_dict(g.config)  # an unsupported architecture fails here, before its tokenizer can
    tok = g.tokenizer
    s = {"config": g.config, "chat_template": g.chat_template, "tokenizer": tok.tok.to_str(),
         "eos_ids": tok.eos_ids, "special": [tok.bos_token, tok.eos_token, tok.pad_token]}
    try:
        with replaced(target) as tmp:
            tmp.write_text(json.dumps(s), encoding="utf-8")
    except OSError:
        pass
    return g.config, tok, g.chat_template


@contextmanager
def replaced(target: Path, suffix: str = ""):
    """A private path beside `target` to write it under, renamed onto it when the
    block ends without an error: a crash never leaves half a file as the cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def converted(path: Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """The float32 conversion of a GGUF (GGUFModel.convert), found in the cache
    without reading the GGUF when it was made before."""
    target = cache_folder(path) / "model.safetensors"
    if target.is_file():
        return target
    from .reader import open_gguf

    return open_gguf(path).convert(progress=progress)


def write_float32(
    model: GGUFModel, cache_dir: Path | None = None, progress: Callable[[int, int], None] | None = None
) -> Path:
    """GGUFModel.convert: every tensor dequantized, streamed one by one into
    `<cache_dir>/gguf/<key>/model.safetensors` unless it is there already."""
    target = cache_folder(model.path, cache_dir) / "model.safetensors"
    if target.is_file():
        return target

    plan = model.tensors()
    head, total = _safetensors_header(plan, {"format": "pt", "source": model.path.name})
    with replaced(target) as tmp, open(tmp, "wb") as f:
        f.write(head)
        done = 0
        if progress:
            progress(0, total)
        for _, t, shape in plan:  # one tensor in memory at a time
            array = model.dequantized(t, shape)
            f.write(array.data)
            done += array.nbytes
            if progress:
                progress(done, total)
    return target


def _safetensors_header(plan, metadata: dict) -> tuple[bytes, int]:
    """The header of a float32 safetensors file holding `plan`'s tensors in order,
    and the size of its data: known before any tensor is dequantized, so the
    tensors can be streamed to disk one by one."""
    header, offset = {}, 0
    for hf, _, shape in plan:
        nbytes = 4 * math.prod(shape)
        header[hf] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads it, so the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text, offset
