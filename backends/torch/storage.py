"""How the torch backend holds its matrices: linear-layer classes that a step
swaps in for the architecture's nn.Linear and Embedding (as gpt-fast's
quantize.py and mlx-lm's nn.quantize do), so the architecture files hold only
the math. The kernels and the copies they load with are in weights.py.

- nn.Linear, Embedding: float weights as the checkpoint has them (CUDA, bfloat16,
  a one-thread CPU).
- Blocks, TableT (`hold(model, "blocks", parts)`, CPU float32): a few rows
  (decode) multiply as one batched matmul over `parts` blocks, one per core; a
  weight wider than deep (and a tied table) held as [in, out].
- QBlocks, QTable (`hold(model, "q8"|"q4")`, CPU `--quantize 8|4`
  with the native kernels): blocks of 32 weights with a float16 scale each.
- Int8Rows, Int8Table (`hold(model, "int8")`, CPU `--quantize 8` without them):
  int8 rows with a bfloat16 scale each.
- Half (`pack_half(model)` once loaded in float16, x86 CPU): packed by fbgemm,
  multiplied in float32.

Each class takes its checkpoint tensors (`take`: the parts of a fused weight, in
order), so loading needs no knowledge of how any layer is held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .weights import (QK, block_linear, dequantized, give_back_freed_memory, half_bytes, half_linear, int8_linear,
                      int8_rows, linear, linear_t, pack_half as packed_half, q4_blocks, q8_blocks, stacked, transposed,
                      weight_blocks)

HEAD_ROWS = 32768  # rows of a matrix packed at a time (Half): packing converts to float32 first


class Embedding(nn.Embedding):
    """The token table, float; also the output projection of a tied model."""

    def __init__(self, vocab: int, hidden: int):
        # An explicit empty weight skips the random init: the checkpoint fills it, and
        # normal_ on the meta device costs over a second of one-time setup at startup.
        super().__init__(vocab, hidden, _weight=torch.empty(vocab, hidden))

    def as_linear(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


def _empty(*shape, dtype=None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


def _bias(linear: nn.Linear) -> nn.Parameter | None:
    return None if linear.bias is None else _empty(linear.out_features)


class Blocks(nn.Module):
    """A float32 matrix whose few-row products (decode) use every core: on a CPU torch
    runs a matrix-vector product on one thread, bound by one core's memory bandwidth
    (~12 GB/s of ~33 here). Cut into `parts` blocks, one batched matmul runs them in
    parallel: blocks of rows, or for a weight wider than it is deep, blocks of columns
    of the weight held as [in, out] (weight_t), which streams faster at those shapes
    (gate/up: 28 GB/s against 22 here)."""

    def __init__(self, linear: nn.Linear, parts: int):
        super().__init__()
        self.in_features, self.out_features, self.parts = linear.in_features, linear.out_features, parts
        wide = self.out_features > self.in_features
        self.weight = None if wide else _empty(self.out_features, self.in_features)
        self.weight_t = _empty(self.in_features, self.out_features) if wide else None
        self.bias = _bias(linear)
        self.blocks = None  # views of the weight, made once it is loaded (ready)

    def take(self, kind: str, parts: list, dtype) -> dict:
        if kind == "weight" and self.weight_t is not None:
            return {"weight_t": transposed(*parts, dtype=dtype)}
        return {kind: stacked(parts, dtype)}

    def ready(self) -> None:
        held_t = self.weight_t is not None
        self.blocks = weight_blocks(self.weight_t if held_t else self.weight, self.parts, held_t)

    def scale_inputs(self, w: torch.Tensor) -> None:
        """W := W diag(w), in place (a norm's weight folded in)."""
        if self.weight_t is not None:
            self.weight_t.mul_(w[:, None])
        else:
            self.weight.mul_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_t is not None:
            return linear_t(x, self.weight_t, self.bias, self.blocks)
        return linear(x, self.weight, self.bias, self.blocks)


class TableT(nn.Module):
    """A tied table held as [hidden, vocab] (Blocks' layout for the output projection,
    2.5 ms a step for SmolLM2's, not 5); the embedding reads its columns."""

    def __init__(self, table: Embedding, parts: int):
        super().__init__()
        self.parts = parts
        self.weight_t = _empty(table.embedding_dim, table.num_embeddings)
        self.blocks = None

    def take(self, kind: str, parts: list, dtype) -> dict:
        return {"weight_t": transposed(*parts, dtype=dtype)}

    def ready(self) -> None:
        self.blocks = weight_blocks(self.weight_t, self.parts, held_t=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_t[:, ids].movedim(0, -1)  # [hidden, n, length] -> [n, length, hidden]

    def as_linear(self, h: torch.Tensor) -> torch.Tensor:
        return linear_t(h, self.weight_t, blocks=self.blocks)


class Int8Rows(nn.Module):
    """int8 rows with a bfloat16 scale each (weights.int8_rows), multiplied by
    int8_linear. Its checkpoint matrices come as (int8, scale) rows."""

    quantize = staticmethod(int8_rows)  # the loader quantizes its matrices as it reads them

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = _empty(linear.out_features, linear.in_features, dtype=torch.int8)
        self.weight_scale = _empty(linear.out_features, dtype=torch.bfloat16)
        self.bias = _bias(linear)

    def take(self, kind: str, parts: list, dtype) -> dict:
        """The weight comes as (q, scale[, min]) tuples, a part's each (joined by rows)."""
        if kind != "weight":
            return {kind: stacked(parts, dtype)}
        fields = [torch.cat(f) if len(parts) > 1 else f[0] for f in zip(*parts)]
        return dict(zip(("weight", "weight_scale", "weight_min"), fields))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias)


class Int8Table(Int8Rows):
    """The table as int8 rows: a lookup dequantizes the rows it reads."""

    def __init__(self, table: Embedding):
        nn.Module.__init__(self)
        self.weight = _empty(table.num_embeddings, table.embedding_dim, dtype=torch.int8)
        self.weight_scale = _empty(table.num_embeddings, dtype=torch.bfloat16)
        self.bias = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.weight_scale[ids, None].float()

    def as_linear(self, h: torch.Tensor) -> torch.Tensor:
        return int8_linear(h, self.weight, self.weight_scale)


class QBlocks(nn.Module):
    """Blocks of 32 weights along the input with a float16 scale each, on 8 bits
    (weights.q8_blocks: llama.cpp's Q8_0) or 4 (q4_blocks: Q4_0; with a float16 min a
    block too, a GGUF's Q4_1 / Q4_K kept: weights.from_affine), multiplied by
    weights.block_linear (the native kernel at decode)."""

    def __init__(self, linear: nn.Linear, bits: int, mins: bool = False):
        super().__init__()
        self._hold(linear.out_features, linear.in_features, bits, mins)
        self.bias = _bias(linear)

    def _hold(self, n: int, k: int, bits: int, mins: bool) -> None:
        self.bits, self.quantize = bits, q8_blocks if bits == 8 else q4_blocks  # (the loader's quantizer)
        self.weight = _empty(n, k * bits // 8, dtype=torch.int8 if bits == 8 else torch.uint8)
        self.weight_scale = _empty(n, k // QK, dtype=torch.float16)
        self.weight_min = _empty(n, k // QK, dtype=torch.float16) if mins else None

    take = Int8Rows.take

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_linear(x, self.bits, self.weight, self.weight_scale, self.bias, self.weight_min)


class QTable(QBlocks):
    """The table in blocks: a lookup dequantizes the rows it reads."""

    def __init__(self, table: Embedding, bits: int, mins: bool = False):
        nn.Module.__init__(self)
        self._hold(table.num_embeddings, table.embedding_dim, bits, mins)
        self.bias = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        mins = None if self.weight_min is None else self.weight_min[flat]
        return dequantized(self.bits, self.weight[flat], self.weight_scale[flat], mins=mins).view(*ids.shape, -1)

    def as_linear(self, h: torch.Tensor) -> torch.Tensor:
        return QBlocks.forward(self, h)


class Half(nn.Module):
    """A float16 matrix packed by fbgemm (x86 CPUs): half the bytes of float32,
    multiplied in float32. Packed HEAD_ROWS rows at a time (each output is its own
    row's product, so the result is the same): packing converts what it packs to
    float32 first, and a whole table (Qwen2.5-0.5B's, 545 MB) would peak at 1.5x the
    weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        blocks = weight.split(HEAD_ROWS)
        biases = [None] * len(blocks) if bias is None else bias.float().split(HEAD_ROWS)
        self.packed = [packed_half(w, b) for w, b in zip(blocks, biases)]
        self.packed_bytes = sum(half_bytes(w) for w in blocks) + (0 if bias is None else bias.numel() * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.packed) == 1:
            return half_linear(x, self.packed[0])
        return torch.cat([half_linear(x, p) for p in self.packed], -1)

    as_linear = forward  # (a tied table's projection: HalfTable)


class HalfTable(Half):
    """A tied float16 table: lookups read it as it is, the projection is packed."""

    def __init__(self, table: Embedding):
        super().__init__(table.weight, None)
        self.weight = table.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def as_linear(self, h: torch.Tensor) -> torch.Tensor:
        return Half.forward(self, h)


# ---------------------------------------------------------------- the steps


def _swap(model: nn.Module, make) -> None:
    """Each child module m of the model replaced by make(m) where that is not None."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = make(child)
            if new is not None:
                setattr(parent, name, new)


def tied(model: nn.Module) -> bool:
    return getattr(model, "lm_head", None) is None


def hold(model: nn.Module, how: str, parts: int = 1) -> None:
    """Before loading (on the meta device): the layout the weights are read in.
    "blocks": CPU float32 decode over `parts` blocks (nothing to do for one part;
    a model already loaded float has its weights moved over); "int8": every matrix
    and the table as int8 rows; "q8", "q4": every one in blocks of 32; a dict {layer
    name: (bits, mins)}: those layers in blocks (a GGUF's, runtime.gguf_blocks)."""
    if how == "blocks" and parts > 1:
        head = tied(model)

        def blocks(m):
            if isinstance(m, (Blocks, TableT)):  # split already: cut again
                m.parts = parts
                m.ready()
                return None
            new = Blocks(m, parts) if isinstance(m, nn.Linear) else \
                TableT(m, parts) if isinstance(m, Embedding) and head else None
            if new is not None and m.weight.device.type != "meta":  # loaded: its tensors move over
                for kind in ("weight", "bias"):
                    if getattr(m, kind, None) is not None:
                        for k, v in new.take(kind, [getattr(m, kind)], None).items():
                            setattr(new, k, nn.Parameter(v, requires_grad=False))
                new.ready()
            return new

        _swap(model, blocks)
    elif how == "int8":
        _swap(model, lambda m: Int8Rows(m) if isinstance(m, nn.Linear) else
              Int8Table(m) if isinstance(m, Embedding) else None)
    elif how in ("q8", "q4"):  # (each matrix's input a multiple of 32: blocks_fit)
        bits = int(how[1])
        _swap(model, lambda m: QBlocks(m, bits) if isinstance(m, nn.Linear) else
              QTable(m, bits) if isinstance(m, Embedding) else None)
    else:  # {layer name: (bits, mins)}: a GGUF's blocks, layer by layer; the rest stay float
        names = {id(m): n for n, m in model.named_modules()}

        def kept(m):
            if names.get(id(m)) not in how:
                return None
            return (QBlocks if isinstance(m, nn.Linear) else QTable)(m, *how[names[id(m)]])

        _swap(model, kept)


def blocks_fit(model: nn.Module) -> bool:
    """Whether every matrix's input (and the table's width) is a multiple of 32, as blocks need."""
    return all(m.in_features % QK == 0 for m in model.modules() if isinstance(m, nn.Linear)) and \
        all(m.embedding_dim % QK == 0 for m in model.modules() if isinstance(m, Embedding))


def ready(model: nn.Module) -> None:
    """Once the weights are loaded: the views each storage keeps of them."""
    for m in model.modules():
        if hasattr(m, "ready"):
            m.ready()


def fold_norms(model: nn.Module) -> None:
    """Each norm weight the architecture names (model.norm_feeds) multiplied into the
    projection it feeds, in place: one elementwise product less per norm (~3% of a CPU
    decode step for SmolLM2). For float32, where the product adds no rounding to speak of."""
    for norm, proj in model.norm_feeds():
        if isinstance(proj, Blocks):
            proj.scale_inputs(norm.weight)
        else:
            proj.weight.mul_(norm.weight)
        norm.weight = None


def pack_half(model: nn.Module) -> None:
    """Weights loaded in float16 -> every matrix product's weight packed by fbgemm
    (Half), a tied table kept in float16 for lookups (HalfTable), the rest (norms)
    float32. Activations and the KV cache are float32."""
    head = tied(model)

    def pack(m):
        if isinstance(m, nn.Linear):
            new = Half(m.weight, m.bias)
        elif isinstance(m, Embedding) and head:
            new = HalfTable(m)
        else:
            return None
        m.weight = None
        give_back_freed_memory()  # else the float16 copies stay resident beside the packed ones
        return new

    _swap(model, pack)
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if not isinstance(m, (Embedding, HalfTable)):
                p.data = p.data.float()


def packed_bytes(model: nn.Module) -> int:
    """Bytes fbgemm holds (not parameters, so not counted by them)."""
    return sum(getattr(m, "packed_bytes", 0) for m in model.modules())


def fused_target(model: nn.Module, name: str) -> tuple[str, str | None]:
    """The model's name for a checkpoint tensor, and the fused projection
    (model.FUSED: the projections of one input run as one matmul) it is a part of."""
    for fused, parts in model.FUSED.items():
        for p in parts:
            if f".{p}." in name:
                prefix, kind = name.split(f".{p}.")
                return f"{prefix}.{fused}.{kind}", fused
    return name, None


def quantizer(model: nn.Module, name: str):
    """How the checkpoint matrix `name` is quantized as it is read (the `quantize` of
    the layer that holds it: weights.int8_rows, q8_blocks, …), None for a float one."""
    target, _ = fused_target(model, name)
    prefix, _, kind = target.rpartition(".")
    if kind != "weight" or (name == "lm_head.weight" and tied(model)):
        return None
    try:
        return getattr(model.get_submodule(prefix), "quantize", None)
    except AttributeError:  # (not a layer of this model: left to be reported as unexpected)
        return None


def checkpoint_state(model: nn.Module, tensors, dtype: torch.dtype | None = None) -> dict:
    """Checkpoint tensors, (name, tensor) one at a time -> the model's state dict: a
    tied lm_head dropped, the parts of each fused projection joined once all are in,
    each handed to the layer that holds it (its `take`: transposed, int8 rows, …).
    Each tensor kept is made in one copy, converted to `dtype` in it (a conversion
    beforehand would be a second copy, whose freed memory the heap keeps), so the
    caller may hand in views of a mapped file; the extra memory is one layer's parts
    (or the table, if it comes first)."""
    modules = dict(model.named_modules())
    state, pending = {}, {}
    for name, t in tensors:
        if name == "lm_head.weight" and tied(model):
            continue
        target, fused = fused_target(model, name)
        parts = [t]
        if fused:
            group = pending.setdefault(target, {})
            group[name] = t
            if len(group) < len(model.FUSED[fused]):
                continue
            group = pending.pop(target)
            prefix, kind = target.split(f".{fused}.")
            parts = [group[f"{prefix}.{p}.{kind}"] for p in model.FUSED[fused]]
        prefix, _, kind = target.rpartition(".")
        layer = modules.get(prefix)
        if hasattr(layer, "take"):
            state.update({f"{prefix}.{k}": v for k, v in layer.take(kind, parts, dtype).items()})
        else:  # (an int8 pair here is not the model's: left to be reported as unexpected)
            state[target] = parts[0][0] if isinstance(parts[0], tuple) else stacked(parts, dtype)
    for group in pending.values():  # parts without their partners: reported as unexpected
        state.update(group)
    return state
