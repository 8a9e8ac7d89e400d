"""How the torch backend holds its matrices and multiplies by them, and the copies
that make them at load.

- float32 on a CPU: a few rows (decode) run as one batched matmul over `parts`
  blocks of the weight (weight_blocks), one per core; the wide matrices held
  transposed (transposed).
- float16 on an x86 CPU: packed by fbgemm, multiplied in float32 (pack_half).
- 8 and 4 bits in blocks (`--quantize 8|4`, a CPU with the native kernels built):
  blocks of 32 weights along the input with a float16 scale each, llama.cpp's Q8_0
  and Q4_0 (q8_blocks, q4_blocks), multiplied by kernels.c, which quantizes the
  activations the same way and multiplies in integers (block_linear).
- a GGUF's own blocks (a GGUF on a CPU with the kernels, by default): Q4_0, Q4_1, Q4_K
  as 4-bit blocks (with a float16 min a block where the type has one), Q8_0 as q8_0,
  exactly as the file holds them but for Q4_K's scales rounded to float16 (from_affine);
  the other types rounded to q8_0.
- int8 rows (`--quantize 8` without the kernels: the pure-torch path): rows with a
  bfloat16 scale each (int8_rows), multiplied in bfloat16 (int8_linear).
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F

SPLIT_ROWS = 8  # up to this many rows (decode steps of a batch), Linear splits its weight


def stacked(parts: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.cat(parts) into a new tensor of `dtype` (default: theirs): one copy, even of
    one part, converting as it copies."""
    first = parts[0]
    out = torch.empty(sum(p.shape[0] for p in parts), *first.shape[1:], dtype=dtype or first.dtype, device=first.device)
    row = 0
    for p in parts:
        out[row:row + p.shape[0]].copy_(p)
        row += p.shape[0]
    return out


def transposed(*parts: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[out_i, in] parts -> one [in, sum(out_i)] of `dtype` (default: theirs), contiguous.
    A GEMV over the columns of this layout streams memory faster than one over the
    rows of the other (SmolLM2's lm_head: 2.5 ms, not 5). Copied 1024 rows at a time:
    the writes stay within a few pages (2 GB/s here, against 1.2 for one strided copy)."""
    first = parts[0]
    out = torch.empty(first.shape[1], sum(p.shape[0] for p in parts), dtype=dtype or first.dtype, device=first.device)
    col = 0
    for p in parts:
        for a in range(0, p.shape[0], 1024):
            block = p[a:a + 1024]
            out[:, col + a:col + a + block.shape[0]].copy_(block.t())
        col += p.shape[0]
    return out


def pack_half(weight: torch.Tensor, bias=None):
    """A float32 weight held in float16 by fbgemm (x86 CPUs): `half_linear` reads half
    the bytes and multiplies in float32, so only the weights' rounding is lost."""
    return torch.ops.quantized.linear_prepack_fp16(weight, bias)


def half_bytes(weight: torch.Tensor) -> int:
    """Bytes fbgemm holds for `weight` once pack_half packed it: blocks of 512 inputs by
    16 outputs, padded, so a 576-wide matrix (SmolLM2's) takes 1.78x its float16 size
    and an 896-wide one (Qwen2.5-0.5B's) 1.14x (measured: the RSS a packing adds)."""
    n, k = weight.shape
    return -(-k // 512) * 512 * (-(-n // 16) * 16) * 2


def give_back_freed_memory() -> None:
    """glibc keeps freed blocks of a few MiB in the heap; malloc_trim returns them."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def half_linear(x: torch.Tensor, packed) -> torch.Tensor:
    y = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, x.shape[-1]), packed)
    return y.view(*x.shape[:-1], -1)


INT8_ROWS = 4096  # rows quantized at a time (int8_rows): a few MiB of float32 temporaries


def quantized_rows(read, quantize, q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and scale filled INT8_ROWS rows at a time: quantize(rows in float32) gives
    those rows' (q, scale). The float32 work stays small (and a reader may map its
    file for one block only: runtime.load_weights)."""
    for a in range(0, q.shape[0], INT8_ROWS):
        q[a:a + INT8_ROWS], scale[a:a + INT8_ROWS] = quantize(read(a, a + INT8_ROWS).float())
    return q, scale


def _int8(rows: torch.Tensor):
    # (rows: the weight itself when float32: not written to)
    s = rows.abs().amax(1).clamp(min=1e-12).div_(127).bfloat16()  # the scale the kernel will use
    return (rows / s.float()[:, None]).round_().clamp_(-127, 127), s


def int8_rows(shape, read, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight of `shape` [out, in], whose rows [a, b) `read(a, b)` returns,
    -> (int8 [out, in], bfloat16 [out]): each row rounded to 255 levels of its own
    scale (its largest magnitude is 127), as torch._weight_int8pack_mm reads them
    (quantized_rows: INT8_ROWS rows at a time)."""
    return quantized_rows(read, _int8, torch.empty(shape, dtype=torch.int8, device=device),
                          torch.empty(shape[0], dtype=torch.bfloat16, device=device))


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    """x times int8 rows (int8_rows), in bfloat16: a few rows of x (decode) by torch's
    int8 weight kernel, which reads the int8 bytes (its fast path takes bfloat16
    inputs); more (a prefill) as one bfloat16 matmul of the rows dequantized.
    Returns x's dtype."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if x2.shape[0] <= SPLIT_ROWS:
        y = torch._weight_int8pack_mm(x2, q, scale)
    else:
        y = F.linear(x2, q * scale[:, None])  # int8 times bfloat16: one bfloat16 temporary
    y = y.view(*x.shape[:-1], -1).to(x.dtype)
    return y if bias is None else y + bias


def weight_blocks(weight: torch.Tensor, parts: int, held_t: bool = False) -> torch.Tensor | None:
    """A weight [out, in] (or [in, out] when held_t) as `parts` blocks [parts, in,
    out/parts], each a view: blocks of rows, or of columns of the transposed layout.
    None when there is nothing to split (one part, or out not divisible)."""
    n = weight.shape[1] if held_t else weight.shape[0]
    if parts < 2 or n % parts:
        return None
    if held_t:
        return weight.view(weight.shape[0], parts, n // parts).transpose(0, 1)
    return weight.view(parts, n // parts, weight.shape[1]).transpose(1, 2)


def _by_blocks(x: torch.Tensor, blocks: torch.Tensor | None) -> torch.Tensor | None:
    """x [..., k] times blocks [parts, k, n/parts] in one batched matmul -> [..., n];
    None unless x is a few rows (decode) and there are blocks."""
    if blocks is None or x.numel() > SPLIT_ROWS * x.shape[-1]:
        return None
    parts, k = blocks.shape[:2]
    y = torch.bmm(x.reshape(1, -1, k).expand(parts, -1, -1), blocks)  # [parts, rows, n/parts]
    return y.transpose(0, 1).reshape(*x.shape[:-1], -1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias=None, blocks=None) -> torch.Tensor:
    """F.linear, through the weight's blocks (weight_blocks) for a few rows of x."""
    y = _by_blocks(x, blocks)
    if y is None:
        return F.linear(x, weight, bias)
    return y if bias is None else y + bias


def linear_t(x: torch.Tensor, weight_t: torch.Tensor, bias=None, blocks=None) -> torch.Tensor:
    """The same with the weight held as [in, out]."""
    y = _by_blocks(x, blocks)
    if y is None:
        y = torch.matmul(x, weight_t)
    return y if bias is None else y + bias


# ---------------------------------------------------------------- blocks (kernels.c)

QK = 32  # weights a block (along the input), one float16 scale each


def _native():
    if os.environ.get("FERMI_KERNELS", "1") == "0":
        return None
    try:
        from . import _kernels
    except ImportError:  # not built (no compiler at install): the pure-torch paths
        return None
    return _kernels


kernels = _native()


def kernel_path() -> str | None:
    """The native kernels' instruction set ("avx512-vnni", "avx2", "c"), None without them."""
    return kernels.info()["path"] if kernels else None


def _blocks(shape, read, quantize, cols) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = shape
    return quantized_rows(read, lambda rows: quantize(rows.reshape(rows.shape[0], k // QK, QK)),
                          torch.empty(n, cols, dtype=torch.uint8 if cols != k else torch.int8),
                          torch.empty(n, k // QK, dtype=torch.float16))


def _q8(b: torch.Tensor):
    s = (b.abs().amax(-1) / 127).half()  # the scale the kernel reads
    inv = torch.where(s > 0, 1 / s.float(), 0)
    return (b * inv[..., None]).round_().clamp_(-127, 127).to(torch.int8).flatten(1), s


def _q4(b: torch.Tensor):
    big = b.gather(-1, b.abs().argmax(-1, keepdim=True))[..., 0]  # the largest magnitude, signed: it maps to -8
    s = (big / -8).half()
    inv = torch.where(s != 0, 1 / s.float(), 0)
    q = (b * inv[..., None]).round_().clamp_(-8, 7).add_(8).to(torch.uint8)  # stored as q + 8
    return _nibbles(q), s


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """4-bit values [..., blocks, 32] (uint8) -> [rows, in/2] bytes: byte j of a block holds
    value j (low nibble) and j+16 (high), the layout the kernel reads."""
    return (q[..., :QK // 2] | (q[..., QK // 2:] << 4)).flatten(1)


def q8_blocks(shape, read):
    """A float weight of `shape` [out, in] (rows [a, b) from read(a, b)) -> (int8 [out,
    in], float16 [out, in/32]): each block of 32 on 255 levels of its own scale."""
    return _blocks(shape, read, _q8, shape[1])


def q4_blocks(shape, read):
    """The same on 16 levels, -8..7 (llama.cpp's Q4_0): (uint8 [out, in/2], float16
    [out, in/32]); byte j of a block holds weights j (low nibble) and j+16, each + 8."""
    return _blocks(shape, read, _q4, shape[1] // 2)


def dequantized(bits: int, q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32, mins=None) -> torch.Tensor:
    """Blocks -> [out, in] floats. 4 bits with `mins` (a GGUF's Q4_1 / Q4_K): the
    nibbles unsigned, each weight scale * q + min."""
    n, nb = scale.shape
    if bits == 4:
        q = torch.cat([q.view(n, nb, QK // 2) & 15, q.view(n, nb, QK // 2) >> 4], -1).to(dtype)
        if mins is None:
            q = q - 8
    w = q.view(n, nb, QK).to(dtype) * scale[..., None].to(dtype)
    return (w if mins is None else w + mins[..., None].to(dtype)).view(n, nb * QK)


def from_affine(q, scales, biases, bits: int):
    """A GGUF matrix in its exact affine form (fermi.gguf.Affine: w = scale * q + bias
    per block of 32, q unsigned) -> blocks held as they are: 4 bits -> (packed
    nibbles, float16 scales, float16 mins, or None where every min is -8 scale: Q4_0);
    8 bits with a bias of -128 scale (Q8_0) -> (int8, float16 scales, None). None for
    the rest (5 bits): those are rounded to q8_0 from their values instead."""
    q, scales, biases = (torch.from_numpy(a) for a in (q, scales, biases))
    n, k = q.shape
    if bits == 4:
        mins = None if torch.equal(biases, -8 * scales) else biases.half()
        return _nibbles(q.view(n, k // QK, QK)), scales.half(), mins
    if bits == 8 and torch.equal(biases, -128 * scales):
        return (q.to(torch.int16) - 128).to(torch.int8), scales.half(), None
    return None


def block_linear(x: torch.Tensor, bits: int, q: torch.Tensor, scale: torch.Tensor, bias=None, mins=None) -> torch.Tensor:
    """x times a weight in blocks (q8_blocks / q4_blocks, or a GGUF's kept: mins): by the
    native kernel (float32 out), however many rows, so each row's product is the same
    however the serving core cut or batched the work (a prefill's bfloat16 matmul would
    be ~2x as fast, and a batched answer not its solo answer); without the kernels, a
    bfloat16 matmul of the weight dequantized. Returns x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    m, n = x2.shape[0], scale.shape[0]
    if kernels is not None:
        x2 = x2.float().contiguous()
        y = torch.empty(m, n)
        args = (y.data_ptr(), x2.data_ptr(), q.data_ptr(), scale.data_ptr(), m, n, x2.shape[1])
        if mins is None:
            (kernels.q8_linear if bits == 8 else kernels.q4_linear)(*args)
        else:
            kernels.q4_linear(*args, 0, 0, 0.0, 0, 0, mins.data_ptr())
    else:
        y = F.linear(x2.to(torch.bfloat16), dequantized(bits, q, scale, torch.bfloat16, mins)).float()
    y = y.view(*x.shape[:-1], n).to(x.dtype)
    return y if bias is None else y + bias
