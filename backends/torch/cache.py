"""The KV cache of the torch backend, and the `Span` that tells a forward where to
write in it and what to read back.

Per layer, keys and values are [batch, n_kv_heads, capacity, head_dim] in the
runtime's dtype. Capacity grows in steps (256 positions) up to `max_len`, so a
short session does not reserve the whole context. Layers write at the positions a
Span names; only the runtime advances `lengths`, after a forward succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fermi.backends import grown_capacity


@dataclass
class Span:
    """Where one forward's new keys/values go. Two shapes:

    - every row writes `length` positions from `start` (prefill, or a decode whose
      sequences all have the same length): `positions` is None;
    - each row at positions of its own (`positions`: [n] for one token a row, or
      [n, length] for several prompts prefilled together), written through `index`
      (the rows as a tensor) so row i pairs with positions[i].
    """

    rows: slice | torch.Tensor  # the batch's cache rows; a slice reads back as a view
    start: int  # first position written (the smallest, when positions is set)
    length: int  # new tokens per row
    end: int  # keys read back: positions [0, end)
    positions: torch.Tensor | None = None  # [n] int64, one position per row
    index: torch.Tensor | None = None  # [n] int64, the rows again, for paired indexing

    @classmethod
    def prefill(cls, slot: int, start: int, length: int) -> "Span":
        return cls(slice(slot, slot + 1), start, length, start + length)

    @classmethod
    def decode(cls, slots: list[int], positions: list[int], device) -> "Span":
        rows, end = consecutive(slots), max(positions) + 1
        if rows is None:
            rows = torch.tensor(slots, device=device)
        if all(p == positions[0] for p in positions):
            return cls(rows, positions[0], 1, end)
        index = rows if isinstance(rows, torch.Tensor) else torch.tensor(slots, device=device)
        return cls(rows, min(positions), 1, end, torch.tensor(positions, device=device), index)

    @classmethod
    def ragged(cls, slots: list[int], starts: list[int], length: int, device) -> "Span":
        """Several prompts prefilled together, each `length` positions from its own
        start (the shorter ones padded: what they write past their end is never read)."""
        index = torch.tensor(slots, device=device)
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)
        return cls(index, min(starts), length, max(starts) + length, positions, index)

    def rows_positions(self) -> torch.Tensor:
        """positions as [n, length]."""
        return self.positions.view(self.positions.shape[0], -1)


def consecutive(slots: list[int]) -> slice | None:
    """The slots as a slice of the batch when they are consecutive (their rows then
    read back as a view), else None (read through an index tensor)."""
    return slice(slots[0], slots[0] + len(slots)) if slots == list(range(slots[0], slots[0] + len(slots))) else None


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int,
                 max_len: int, dtype: torch.dtype, device: torch.device, spare: int = 0):
        """spare: rows beyond the batch's slots that no sequence reads (row `batch`
        takes the writes of the rows that pad a CUDA graph's batch; graphs.py)."""
        self.batch = batch
        self.max_len = max_len
        self.lengths = [0] * batch
        self._shape = (batch + spare, n_kv_heads, 0, head_dim)
        self._dtype, self._device = dtype, device
        self.k = [self._empty(0) for _ in range(n_layers)]
        self.v = [self._empty(0) for _ in range(n_layers)]
        self.steps: dict = {}  # decode steps recorded as CUDA graphs over these tensors (graphs.py)

    def _empty(self, capacity: int) -> torch.Tensor:
        b, h, _, d = self._shape
        return torch.zeros(b, h, capacity, d, dtype=self._dtype, device=self._device)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def reserve(self, n: int) -> None:
        """Make room for positions [0, n); ContextOverflow past max_len."""
        capacity = grown_capacity(n, self.capacity, self.max_len)
        if capacity is None:
            return
        old = self.capacity
        self.steps.clear()  # they hold the tensors replaced here
        for layer in range(len(self.k)):
            for store in (self.k, self.v):
                grown = self._empty(capacity)
                grown[:, :, :old] = store[layer]
                store[layer] = grown

    def update(self, layer: int, span: Span, k: torch.Tensor, v: torch.Tensor):
        """Write k, v ([n, n_kv_heads, length, head_dim]) where `span` says; return
        the keys and values of positions [0, span.end) for the span's rows."""
        keys, values = self.k[layer], self.v[layer]
        if span.positions is None:
            keys[span.rows, :, span.start:span.end] = k
            values[span.rows, :, span.start:span.end] = v
        else:
            # Paired advanced indexing: row index[i] gets its tokens at positions[i]
            # (the indexed dims come first: [n, length, heads, head_dim]).
            pos = span.rows_positions()
            keys[span.index[:, None], :, pos] = k.transpose(1, 2)
            values[span.index[:, None], :, pos] = v.transpose(1, 2)
        return keys[span.rows, :, :span.end], values[span.rows, :, :span.end]

    def copy(self, src: int, dst: int, n: int) -> None:
        """Row dst holds row src's first n positions (one prompt, several choices)."""
        with torch.inference_mode():  # the tensors were made under it
            for store in (self.k, self.v):
                for t in store:
                    t[dst, :, :n] = t[src, :, :n]
        self.lengths[dst] = n

    def truncate(self, slot: int, n: int) -> None:
        # Stale entries past n stay in memory; the next write overwrites them and
        # masks keep them out of attention until then.
        self.lengths[slot] = max(0, min(n, self.lengths[slot]))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
