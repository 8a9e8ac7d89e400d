"""torch on a CPU: a GGUF's quantized blocks kept as the file holds them
(backends/torch/gguf_blocks.py) and multiplied by the native kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny
from fermi.errors import FermiError
from fermi.sources import ModelFiles

gguf = pytest.importorskip("gguf")
from fermi.backends import torch as backend  # noqa: E402
from fermi.backends.torch import weights  # noqa: E402
from fermi.backends.torch.storage import QBlocks, fused_target  # noqa: E402

T = gguf.GGMLQuantizationType
FOUR = {T.Q4_0: False, T.Q4_1: True, T.Q4_K: True}  # 4-bit types, kept; whether with a min a block
EXACT = {T.Q4_0, T.Q4_1, T.Q8_0}  # kept bit for bit (Q4_K: its scales rounded to float16)
QUANTIZED = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K}
pytestmark = pytest.mark.skipif(weights.kernels is None or torch.cuda.is_available(),
                                reason="a GGUF's blocks are kept on a CPU with the native kernels")


@pytest.fixture(scope="module")
def tinies(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    # llama: the Q/K permutation, biases, tied embeddings; rows of 256 for the K-quants' blocks
    return {"llama": tiny.build("llama", root), "llama256": tiny.build("llama", root, hidden_size=256,
                                                                           intermediate_size=512)}


def held(files, model, types) -> dict:
    """{layer: (bits, mins) or None (float)} as the rules say: each matrix by its type
    (4-bit types kept, other quantized ones as q8_0, float ones float), the parts of a
    fused projection alike (mixed: q8_0), a min for all its 4-bit parts if one has one."""
    kinds = {}
    for i, (name, p) in enumerate(model.hf.state_dict().items()):  # as tiny.write_gguf counts
        if p.ndim == 2 and name != "lm_head.weight":
            kind = types[i % len(types)]
            own = (4, FOUR[kind]) if kind in FOUR else (8, False) if kind in QUANTIZED else None
            kinds.setdefault(fused_target(backend.runtime.architecture("llama"), name)[0].removesuffix(".weight"),
                             []).append(own)
    out = {}
    for layer, parts in kinds.items():
        if all(p is None for p in parts):
            out[layer] = None
        elif len({p and p[0] for p in parts}) > 1:
            out[layer] = (8, False)
        else:
            out[layer] = (parts[0][0], any(p[1] for p in parts))
    return out


@pytest.mark.parametrize("types", [(T.Q4_0,), (T.Q4_1,), (T.Q8_0,), (T.Q5_0, T.Q5_1, T.F16, T.BF16),
                                   (T.Q4_K, T.Q5_K, T.Q6_K, T.F32), (T.Q4_1, T.Q4_0, T.Q4_K)])
def test_gguf_blocks_are_kept_and_follow_the_file(tinies, tmp_path, types, monkeypatch):
    monkeypatch.setenv("FERMI_CACHE", str(tmp_path / "cache"))
    model = tinies["llama256" if any(t.name.endswith("_K") for t in types) else "llama"]
    files = tiny.write_gguf(model, tmp_path / "tiny.gguf", types)
    floats = ModelFiles(files.name, files.path, files.config, None, None, _weights=files.weight_files())
    rt = backend.load(files, dtype="float32")  # a GGUF on a CPU: its blocks, by default
    expected = backend.load(floats, dtype="float32")  # gguf's own dequantization of the file
    kinds = {}
    for name, m in rt.model.named_modules():
        if name.endswith(("_proj", "embed_tokens")):
            kinds[name] = (m.bits, m.weight_min is not None) if isinstance(m, QBlocks) else None
    assert kinds == held(files, model, types)
    assert rt.kernel == f"{weights.kernel_path()} kernels"
    # The blocks are the file's: dequantized, each kept matrix is gguf's dequantization
    # (exactly, for the types kept bit for bit: all of them in a projection)
    from safetensors.torch import load_file

    ref = {k: v for f in floats.weight_files() for k, v in load_file(str(f)).items()}
    state = {name: types[i % len(types)] for i, name in enumerate(model.hf.state_dict())}  # each tensor's type
    for layer, kind in kinds.items():
        m = rt.model.get_submodule(layer)
        if kind is None or kind[0] != 4:
            continue
        parts = [n for n in state if n.endswith(".weight") and fused_target(rt.model, n)[0] == f"{layer}.weight"]
        want = torch.cat([ref[n] for n in parts])
        got = weights.dequantized(4, m.weight, m.weight_scale, mins=m.weight_min)
        if all(state[n] in EXACT for n in parts):
            assert torch.equal(got, want), layer
        else:
            assert (got - want).abs().max() <= 2e-3 * want.abs().max(), layer
    ids = tokens(24, seed=3)
    got, want = decoded(rt, ids), decoded(expected, ids)  # decode: the fused step, through the kernels
    # the activations quantized per block (random K-quant blocks, all of a row's weights
    # offset alike by their mins, add up its rounding the most: 5% of the logit scale)
    assert np.abs(got - want).max() <= 8e-2 * np.abs(want).max()
    assert list((tmp_path / "cache" / "gguf").glob("*/torch-blocks.safetensors"))
    again = backend.load(files, dtype="float32")  # from the cache
    assert np.array_equal(decoded(again, ids), got)


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, tiny.VOCAB, n).tolist()


def decoded(rt, ids: list[int]) -> np.ndarray:
    """The logits of decoding ids[12:] one a step after prefilling ids[:12]."""
    cache = rt.new_cache()
    rt.prefill(ids[:12], cache)
    return np.array([rt.to_numpy(rt.decode([t], cache, [0])[0]) for t in ids[12:]])


def test_gguf_blocks_or_not_as_asked(tinies, tmp_path, monkeypatch):
    """quantize=0 and blocks=False dequantize everything; blocks=True where there are
    no blocks to keep, or no kernels to multiply them, is one clear error; without the
    kernels a GGUF is dequantized."""
    monkeypatch.setenv("FERMI_CACHE", str(tmp_path / "cache"))
    files = tiny.write_gguf(tinies["llama"], tmp_path / "tiny.gguf", (T.Q4_1,))
    for load in ({"quantize": 0}, {"blocks": False}, {"dtype": "bfloat16"}):
        rt = backend.load(files, **{"dtype": "float32", **load})
        assert not any(isinstance(m, QBlocks) for m in rt.model.modules()) and rt.kernel is None
    assert backend.load(files, dtype="float32", quantize=8).dtype == "q4_1"  # nothing float left to round
    floats = ModelFiles(files.name, files.path, files.config, None, None, _weights=files.weight_files())
    with pytest.raises(FermiError, match="no quantized blocks to keep"):
        backend.load(floats, dtype="float32", blocks=True)
    with pytest.raises(FermiError, match="keeps a GGUF's quantized blocks on a CPU"):
        backend.load(files, dtype="bfloat16", blocks=True)
    monkeypatch.setattr(weights, "kernels", None)
    assert not any(isinstance(m, QBlocks) for m in backend.load(files, dtype="float32").model.modules())
