"""The KV cache of the MLX backend, and the `Span` that tells one forward where to
write in it, what to read back, at which RoPE offset and under which mask.

Per layer, keys and values are [batch, n_kv_heads, capacity, head_dim] in the
runtime's dtype. Capacity grows in steps of 256 positions up to `max_len`, so a
short session does not reserve the whole context. Layers write where a Span says;
only the runtime advances `lengths`, once the forward is built.

MLX arrays are values, but `a[idx] = b` rebinds `a` to the updated array and MLX
reuses the old buffer when nothing else holds it, so a write costs the size of the
new keys, not of the cache.
"""

from __future__ import annotations

import mlx.core as mx

from fermi.backends import grown_capacity
from fermi.errors import FermiError



class Span:
    """One forward over `slots` (cache rows), each adding `length` tokens at its
    own current length. Equal starts (prefill, or a decode of aligned sequences)
    write with one slice; unequal starts write row by row and attend through a mask."""

    def __init__(self, cache: "KVCache", slots: list[int], length: int):
        if len(set(slots)) != len(slots):
            raise FermiError(f"decode got a slot twice: {slots}")
        self.cache, self.slots, self.length = cache, list(slots), length
        self.starts = [cache.lengths[s] for s in slots]
        self.end = max(self.starts) + length  # keys read back: positions [0, end)
        cache.reserve(self.end)
        n = len(slots)
        contiguous = slots == list(range(slots[0], slots[0] + n))
        self.rows = slice(slots[0], slots[0] + n) if contiguous else mx.array(self.slots)  # gathered
        self.aligned = all(s == self.starts[0] for s in self.starts)
        if self.aligned:
            self.offset = self.starts[0]  # RoPE position of the first new token
            self.mask = "causal" if length > 1 else None  # bottom-right aligned in MLX
        else:
            self.offset = mx.array(self.starts)  # mx.fast.rope takes one offset per row
            # Row b, query q sees key j when j <= starts[b] + q: [n, 1, length, end]
            q = mx.array(self.starts)[:, None, None, None] + mx.arange(length)[:, None]
            self.mask = mx.arange(self.end) <= q

    def mask_for(self, window: int | None):
        """The mask of a layer with a sliding `window` (None: the span's own): a query
        sees only the `window` newest keys, its own included."""
        if window is None or self.end <= window:
            return self.mask
        q = mx.array(self.starts)[:, None, None, None] + mx.arange(self.length)[:, None]  # [n, 1, length, 1]
        back = q - mx.arange(self.end)
        return (back >= 0) & (back < window)

    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write k, v ([n, n_kv_heads, length, head_dim]); return the keys and values
        of positions [0, end) for the span's rows."""
        cache, length = self.cache, self.length
        keys, values = cache.keys[layer], cache.values[layer]
        if self.aligned and isinstance(self.rows, slice):
            s = self.starts[0]
            keys[self.rows, :, s:s + length] = k
            values[self.rows, :, s:s + length] = v
        else:
            for i, (slot, s) in enumerate(zip(self.slots, self.starts)):
                keys[slot:slot + 1, :, s:s + length] = k[i:i + 1]
                values[slot:slot + 1, :, s:s + length] = v[i:i + 1]
        return keys[self.rows, :, :self.end], values[self.rows, :, :self.end]


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int,
                 max_len: int, dtype: mx.Dtype):
        self.batch = batch
        self.max_len = max_len
        self.lengths = [0] * batch
        self._shape = (batch, n_kv_heads, head_dim)
        self._dtype = dtype
        self.capacity = 0
        self.keys: list[mx.array | None] = [None] * n_layers
        self.values: list[mx.array | None] = [None] * n_layers

    def span(self, slots: list[int], length: int) -> Span:
        return Span(self, slots, length)

    def reserve(self, n: int) -> None:
        """Make room for positions [0, n); ContextOverflow past max_len."""
        capacity = grown_capacity(n, self.capacity, self.max_len)
        if capacity is None:
            return
        b, h, d = self._shape
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                # A fresh array each: `a[...] = x` mutates the Python object, so none may be shared.
                pad = mx.zeros((b, h, capacity - self.capacity, d), self._dtype)
                store[i] = pad if old is None else mx.concatenate([old, pad], axis=2)
        self.capacity = capacity

    def advance(self, slots: list[int], n: int) -> None:
        for s in slots:
            self.lengths[s] += n

    def copy(self, src: int, dst: int, n: int) -> None:
        """Row dst holds row src's first n positions (one prompt, several choices)."""
        for store in (self.keys, self.values):
            for a in store:
                a[dst:dst + 1, :, :n] = a[src:src + 1, :, :n]
        self.lengths[dst] = n

    def truncate(self, slot: int, n: int) -> None:
        # Entries past n stay in memory; the next write overwrites them and the
        # read-back length (or the mask) keeps them out of attention until then.
        self.lengths[slot] = max(0, min(n, self.lengths[slot]))

    @property
    def state(self) -> list[mx.array]:
        return [a for a in self.keys + self.values if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state)
