"""The torch Runtime: loads safetensors weights into the architecture's Model and
runs prefill/decode over a KVCache (see fermi.backends.Runtime for the contract)."""

from __future__ import annotations

import importlib
import itertools
import os
from typing import Iterator, Sequence

import torch
from safetensors import safe_open

from fermi.backends import Sample
from fermi.config import ARCHITECTURES
from fermi.errors import FermiError
from fermi.sampling import SamplingParams

from . import fused, gguf_blocks, graphs, storage, weights
from .cache import KVCache, Span
from .sampler import TorchSampler, make_sampler, sample_batch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREFILL_CHUNK = 512  # long prompts go through in pieces: bounded activations and masks
IGNORED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


class TorchRuntime:
    backend = "torch"

    def __init__(self, model, config, device: torch.device, dtype: str, compute: str | None = None):
        self.model, self.config = model, config
        self.torch_device, self.device, self.dtype = device, str(device), dtype
        self.compute = compute or dtype  # activations and KV cache (float32 under CPU float16 weights)
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        self.weight_bytes = held + storage.packed_bytes(model)
        # On a GPU, decode steps are recorded once as CUDA graphs and replayed
        # (graphs.py); FERMI_CUDA_GRAPHS=0 runs them eagerly.
        self.cuda_graphs = device.type == "cuda" and os.environ.get("FERMI_CUDA_GRAPHS", "1") != "0"
        self.kernel = None  # quantized weights: which kernels multiply them (the startup line says)
        # On a CPU with the native kernels: decode steps in a few calls a layer (fused.py).
        self.fused = fused.plan(model, device, DTYPES[self.compute])

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim,
                       max_len or c.max_position_embeddings, DTYPES[self.compute], self.torch_device,
                       spare=1 if self.cuda_graphs else 0)

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], cache: KVCache, slot: int = 0, all_logits: bool = False):
        ids = list(ids)
        if not ids:
            raise FermiError("prefill needs at least one token")
        start = cache.lengths[slot]
        cache.reserve(start + len(ids))
        pieces = []
        for a in range(0, len(ids), PREFILL_CHUNK):
            chunk, at = ids[a:a + PREFILL_CHUNK], start + a
            if self.native:
                h = self.fused(cache, chunk, [slot] * len(chunk), list(range(at, at + len(chunk))))[None]
            else:
                x = torch.tensor(chunk, dtype=torch.long, device=self.torch_device).view(1, -1)
                h = self.model(x, cache, Span.prefill(slot, at, len(chunk)))
            if all_logits:
                pieces.append(self.logits(h[0]))
        cache.lengths[slot] = start + len(ids)
        # Only the last position needs the final norm and lm_head (unless asked for all).
        logits = torch.cat(pieces) if all_logits else self.logits(h[0, -1:])[0]
        return logits.float()

    @property
    def native(self) -> bool:
        """Prefills too run the fused step: every product in the native kernel."""
        return self.fused is not None and self.fused.native

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.fused.logits(h) if self.native else self.model.logits(h)

    @torch.inference_mode()
    def prefill_batch(self, chunks: list[list[int]], cache: KVCache, slots: list[int]):
        """Several slots' next prompt tokens in one forward (each chunk at most
        PREFILL_CHUNK long). -> logits of each chunk's last position, [n, vocab]."""
        length = max(len(c) for c in chunks)
        starts = [cache.lengths[s] for s in slots]
        if len(chunks) == 1 or max(starts) + length > cache.max_len:  # a padded row would pass the context
            return torch.stack([self.prefill(c, cache, s) for c, s in zip(chunks, slots)])
        if self.native:  # one row a token, none padded
            cache.reserve(max(st + len(c) for st, c in zip(starts, chunks)))
            h = self.fused(cache, [t for c in chunks for t in c], [s for c, s in zip(chunks, slots) for _ in c],
                           [p for c, st in zip(chunks, starts) for p in range(st, st + len(c))])
            for s, c in zip(slots, chunks):
                cache.lengths[s] += len(c)
            return self.logits(h[torch.tensor(list(itertools.accumulate(len(c) for c in chunks))) - 1]).float()
        cache.reserve(max(starts) + length)
        x = torch.tensor([c + [0] * (length - len(c)) for c in chunks], dtype=torch.long, device=self.torch_device)
        h = self.model(x, cache, Span.ragged(slots, starts, length, self.torch_device))
        last = torch.tensor([len(c) - 1 for c in chunks], device=self.torch_device)
        for s, c in zip(slots, chunks):
            cache.lengths[s] += len(c)
        return self.model.logits(h[torch.arange(len(chunks), device=self.torch_device), last]).float()

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], cache: KVCache, slots: Sequence[int]):
        slots = list(slots)
        if not slots or len(tokens) != len(slots):
            raise FermiError(f"decode got {len(tokens)} tokens for {len(slots)} slots")
        if len(set(slots)) != len(slots):
            raise FermiError(f"decode got a slot twice: {slots}")
        positions = [cache.lengths[s] for s in slots]
        cache.reserve(max(positions) + 1)
        if self.cuda_graphs:
            logits = graphs.decode(self.model, cache, list(tokens), slots, positions)
        elif self.fused is not None:
            logits = self.logits(self.fused(cache, list(tokens), slots, positions)).float()
        else:
            x = torch.tensor(list(tokens), dtype=torch.long, device=self.torch_device).view(-1, 1)
            h = self.model(x, cache, Span.decode(slots, positions, self.torch_device))
            logits = self.model.logits(h[:, 0]).float()  # [len(slots), vocab]
        for s in slots:
            cache.lengths[s] += 1
        return logits

    def sampler(self, params: SamplingParams, prompt_ids: Sequence[int]) -> TorchSampler:
        return make_sampler(params, prompt_ids)

    def sample(self, logits: list, rows: list, masks=None) -> list[Sample]:
        """One batched sampling call: logits as prefill and decode returned them ([vocab]
        or [n, vocab] each), one sampler state per row in that order."""
        x = torch.cat([lg.reshape(-1, lg.shape[-1]) for lg in logits])
        return sample_batch(x, rows, masks)

    def stream(self, ids: Sequence[int], cache: KVCache, slot: int, sampler) -> Iterator[Sample]:
        logits = self.prefill(ids, cache, slot)
        while True:
            sample = sampler(logits)
            yield sample
            logits = self.decode([sample.token], cache, [slot])[0]

    def to_numpy(self, x):
        return x.detach().float().cpu().numpy()


def load_weights(model, files, dtype: torch.dtype, device: torch.device) -> None:
    """Safetensors into the model built on the meta device, through
    storage.checkpoint_state (which copies every tensor it keeps). Each file is mapped
    once per tensor: a mapping held open keeps every page it touched resident, so each
    tensor's pages go when its copy is made. The embedding table comes first, while
    nothing else is held. A matrix for a layer held as int8 rows (storage.hold) comes as
    int8 rows and their scales (weights.int8_rows), each block of rows read through a
    mapping of its own: the float32 file is never resident whole."""

    def open_file(path):
        return safe_open(str(path), framework="pt", device=str(device))

    def read_rows(path, name, a, b):
        with open_file(path) as f:
            return f.get_slice(name)[a:b]

    def tensors():
        for path in files:
            with open_file(path) as f:
                names = sorted((n for n in f.keys() if not n.endswith(IGNORED)), key=lambda n: "embed_tokens" not in n)
                quantizers = {n: q for n in names if (q := storage.quantizer(model, n))}
                shapes = {n: f.get_slice(n).get_shape() for n in quantizers}
            for n in names:
                if len(shapes.get(n, ())) == 2:  # a matrix, quantized as it is read
                    yield n, quantizers[n](shapes[n], lambda a, b: read_rows(path, n, a, b))
                    continue
                with open_file(path) as f:
                    yield n, f.get_tensor(n)

    load_state(model, tensors(), dtype)


def load_state(model, tensors, dtype: torch.dtype) -> None:
    """(name, tensor) pairs of a checkpoint into the model built on the meta device
    (storage.checkpoint_state), every weight accounted for."""
    state = storage.checkpoint_state(model, tensors, dtype)
    weights.give_back_freed_memory()
    expected = set(model.state_dict().keys())
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise FermiError(
            f"weights do not match the {model.config.model_type} architecture: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, assign=True)


def architecture(model_type: str):
    """The torch Model class of an architecture (fermi.config.ARCHITECTURES)."""
    return importlib.import_module(f"{__package__}.{ARCHITECTURES[model_type]}").Model


def load(model_files, dtype: str | None, quantize: int | None, device: torch.device,
         blocks: bool | None = None) -> TorchRuntime:
    """blocks: keep a GGUF's quantized blocks (gguf_blocks.py) or dequantize every
    weight (False); None: keep them where they can be (a GGUF, a CPU with the native
    kernels, float32 activations) unless quantize is 0. quantize=4|8 then rounds what
    is still float; without blocks, every matrix."""
    if quantize and quantize not in (4, 8):
        raise FermiError(f"{quantize}-bit weights are not supported by the torch backend (--quantize 8 and 4 are, on a CPU)")
    if quantize and device.type != "cpu":
        raise FermiError(f"{quantize}-bit weights run on the CPU only in the torch backend")
    if dtype not in DTYPES:
        raise FermiError(f"unknown dtype '{dtype}' (choose {', '.join(DTYPES)})")
    if quantize and dtype != "float32":
        raise FermiError(f"--quantize {quantize} computes in float32 on the torch backend, not {dtype}")
    can_keep = model_files.gguf is not None and device.type == "cpu" and dtype == "float32" and weights.kernels
    if blocks is None:
        blocks = bool(can_keep) and quantize != 0
    if blocks and not can_keep:
        raise FermiError("the torch backend keeps a GGUF's quantized blocks on a CPU with its native kernels, "
                         "activations in float32" if model_files.gguf else
                         "there are no quantized blocks to keep: the weights are not a GGUF file")
    config = model_files.config
    # float16 on an x86 CPU: the weights are held in float16 and multiplied by fbgemm in
    # float32 (half the bytes of float32, its prefill speed); CPU float16 arithmetic is slow.
    half = dtype == "float16" and device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
    compute = "float32" if half else dtype
    kept = gguf_blocks.cached(model_files, architecture(config.model_type)) if blocks else None
    with torch.device("meta"):
        model = architecture(config.model_type)(config)
        if blocks:
            storage.hold(model, gguf_blocks.layers(model, kept))
        if quantize:
            how = held_as(model, quantize)
            storage.hold(model, how)
        elif device.type == "cpu" and dtype == "float32" and not blocks:
            # float32 only: CPU bmm in half precision takes a slow path (15 ms for SmolLM2's lm_head).
            # Before loading: the weights are read in the layout it picks.
            storage.hold(model, "blocks", torch.get_num_threads())
    model.requires_grad_(False)  # before loading: int8 tensors cannot require gradients
    if blocks:
        load_state(model, gguf_blocks.tensors(model, kept), DTYPES[dtype])
    else:
        load_weights(model, model_files.weight_files(), DTYPES[dtype], device)
    model.eval()
    model.setup(DTYPES[compute], device)
    if dtype == "float32" and not quantize and not blocks:
        storage.fold_norms(model)
    if half:
        storage.pack_half(model)
    storage.ready(model)
    # The label users see (startup line, stats): the weights' format, float32 arithmetic around them.
    label = gguf_blocks.label(kept) if blocks else LABELS[how] if quantize else dtype
    rt = TorchRuntime(model, config, device, label, compute)
    if quantize or blocks:
        rt.kernel = f"{weights.kernel_path()} kernels" if (blocks or how != "int8") and weights.kernels \
            else "torch kernels"
    return rt


LABELS = {"int8": "int8", "q8": "q8_0", "q4": "q4_0"}


def held_as(model, quantize: int) -> str:
    """--quantize 8|4 -> how the matrices are held (storage.hold): blocks of 32
    (q8, q4) through the native kernels; int8 rows through torch's own kernel where the
    kernels are not built (or a width is not a multiple of 32). 4 bits need blocks."""
    fit = storage.blocks_fit(model)
    if quantize == 8:
        return "q8" if fit and weights.kernels else "int8"
    if not fit:
        raise FermiError("4-bit weights need every matrix's input width to be a multiple of 32")
    return "q4"
