"""Hugging Face style model directories of the bench's models.

- `model_dir`: the GGUF's config and tokenizer, and a link to fermi's float32
  conversion as model.safetensors: what mlx-lm loads.
- random weights, for a machine the real weights cannot reach (the lent GPU
  machine: 64 MiB travel with the checkout, no network there):

    python -m bench.modeldir header smollm2 DIR   # here: config.json and tokenizer from the GGUF
    python -m bench.modeldir fill DIR             # there: random weights of the config's shapes

  `fill` draws the weights with transformers' own initialization (bfloat16) and
  saves them as model.safetensors; `python -m bench --model DIR` then runs on it.
  Speed and memory do not depend on the weights' values; the answers are noise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def model_dir(spec: dict) -> Path:
    """A Hugging Face style directory of the GGUF's weights for mlx-lm, made once
    under fermi's cache (the safetensors file is a link to fermi's conversion)."""
    from fermi import sources
    from fermi.embedded import cache_dir

    if Path(spec["path"]).is_dir():  # --model DIR: mlx-lm reads it as it is
        return Path(spec["path"])
    model = sources.resolve(spec["path"])
    weights = model.weight_files()[0]
    folder = cache_dir() / "bench" / "mlx-lm" / weights.parent.name
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
    write_header(spec["path"], folder)
    link = folder / "model.safetensors"
    tmp = folder / f".link.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(weights)
    os.replace(tmp, link)
    return folder


def write_header(gguf: str, folder: Path) -> None:
    """The GGUF's config.json, tokenizer.json and tokenizer_config.json (with the chat
    template) in `folder`, as a Hugging Face model directory has them."""
    import json

    from fermi import sources
    from fermi.gguf import open_gguf

    model = sources.resolve(gguf)
    folder.mkdir(parents=True, exist_ok=True)
    g = open_gguf(gguf)
    config = {k: v for k, v in g.config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tok = model.tokenizer
    tok.tok.save(str(folder / "tokenizer.json"))
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token,
            "pad_token": tok.pad_token, "chat_template": model.chat_template}
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in tcfg.items() if v is not None}))


def fill(folder: Path, dtype: str = "bfloat16") -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "header":
        from .workloads import model

        write_header(str(model(argv[1]).locate()), Path(argv[2]))
    elif len(argv) == 2 and argv[0] == "fill":
        fill(Path(argv[1]))
    else:
        raise SystemExit("usage: python -m bench.modeldir header MODEL DIR | fill DIR")


if __name__ == "__main__":
    main(sys.argv[1:])
