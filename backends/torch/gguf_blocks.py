"""A GGUF's quantized matrices kept as the file holds them, for the native kernels
(runtime.load: a GGUF on a CPU, float32 activations, unless quantize=0): the 4-bit
affine types (Q4_0, Q4_1, Q4_K) as 4-bit blocks, with a float16 min a block where
the type has one; Q8_0 as q8_0; every other quantized type (Q5_*, Q6_K, …) rounded
to q8_0 from its values (its error a small fraction of its own step); float tensors
stay float. The parts of one fused projection (q/k/v, gate/up) are held alike: all
4-bit, else all q8_0. Made once from the file into `torch-blocks.safetensors` in the
GGUF's cache folder (beside the float32 conversion and MLX's), read from there after."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fermi.gguf import AFFINE_BITS, FLOAT_TYPES, cache_folder, replaced

from . import storage
from .weights import QK, from_affine, q8_blocks

CACHE = "torch-blocks.safetensors"
FORMAT = "1"  # of the blocks file: one made by another layout is made again


def cached(model_files, model) -> Path:
    """The blocks file of `model_files`' GGUF, made on first use. `model`: the
    architecture (its class will do), for its fused projections."""
    target = cache_folder(model_files.gguf) / CACHE
    if _metadata(target).get("format") == FORMAT:
        return target
    g = model_files.gguf_model()
    plan = g.tensors()  # (HF name, GGUF tensor, HF shape)

    def own(t, shape) -> int | None:  # the bits a tensor is held in alone; None: float
        kind = t.tensor_type.name
        if len(shape) != 2 or kind in FLOAT_TYPES or shape[1] % QK:
            return None
        return 4 if AFFINE_BITS.get(kind) == 4 else 8

    bits = {name: own(t, shape) for name, t, shape in plan}
    groups: dict[str, list[str]] = {}
    for name in bits:
        groups.setdefault(storage.fused_target(model, name)[0], []).append(name)
    for names in groups.values():
        if len({bits[n] for n in names}) > 1:  # a fused projection of mixed kinds: q8_0, all of it
            for n in names:
                bits[n] = 8
    tensors, forms = {}, Counter()  # (forms: how many matrices are held each way)
    for name, t, shape in plan:
        if bits[name] is None:
            tensors[name] = torch.tensor(g.dequantized(t, shape))
            continue
        a = g.affine(t, shape) if AFFINE_BITS.get(t.tensor_type.name) == bits[name] else None
        blocks = a and from_affine(a.q, a.scales, a.biases, a.bits)
        if blocks is None:  # rounded to q8_0
            w = torch.tensor(g.dequantized(t, shape))
            blocks = (*q8_blocks(shape, lambda i, j: w[i:j]), None)
        forms[t.tensor_type.name.lower() if a else "q8_0"] += 1
        tensors[name], tensors[f"{name}.scale"] = blocks[:2]
        if blocks[2] is not None:
            tensors[f"{name}.min"] = blocks[2]
    for names in groups.values():  # 4-bit parts of one projection: all with mins, or none
        if any(f"{n}.min" in tensors for n in names):
            for n in names:
                tensors.setdefault(f"{n}.min", (-8 * tensors[f"{n}.scale"].float()).half())
    label = "+".join(form for form, _ in forms.most_common())
    with replaced(target, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"label": label, "format": FORMAT})
    return target


def _metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # none yet, or not a file safetensors reads (it raises its own errors)
        return {}


def label(path: Path) -> str:
    """What the weights are held as, for the startup line, the most matrices' first:
    "q4_1+q8_0" (SmolLM2's Q4_1 file, its table Q8_0), "q8_0+q4_k" (…)."""
    return _metadata(path)["label"]


def layers(model, path: Path) -> dict:
    """{layer name: (bits, mins)} of the layers the blocks file holds in blocks (for
    storage.hold)."""
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        held = {}
        for key in keys:
            if key.endswith(".scale"):
                name = key.removesuffix(".scale")
                layer = storage.fused_target(model, name)[0].rpartition(".")[0]
                held[layer] = (8 if f.get_slice(name).get_dtype() == "I8" else 4, f"{name}.min" in keys)
    return held


def tensors(model, path: Path):
    """(name, tensor) of the blocks file for storage.checkpoint_state: a matrix in
    blocks as (q, scale[, min]); a float matrix of a layer held quantized (quantize=4|8
    on a GGUF: what is still float) quantized as it is read; the rest as they are. The
    file is mapped once per tensor (as runtime.load_weights does): a mapping held open
    keeps every page it touched resident, the whole file by the end."""
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    for name in sorted(k for k in keys if not k.endswith((".scale", ".min"))):
        with safe_open(str(path), framework="pt") as f:
            if f"{name}.scale" in keys:
                yield name, tuple(f.get_tensor(k) for k in (name, f"{name}.scale", f"{name}.min") if k in keys)
            elif quantize := storage.quantizer(model, name):
                w = f.get_tensor(name)
                yield name, quantize(w.shape, lambda i, j: w[i:j])
            else:
                yield name, f.get_tensor(name)
