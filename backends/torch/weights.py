"""How the torch backend holds its matrices and multiplies by them, and the copies
that make them at load.

- float32 on a CPU: a few rows (decode) run as one batched matmul over `parts`
  blocks of the weight (weight_blocks), one per core; the wide matrices held
  transposed (transposed).
- float16 on an x86 CPU: packed by fbgemm, multiplied in float32 (pack_half).
- int8 (`--quantize 8`, a CPU): rows with a bfloat16 scale each (int8_rows),
  multiplied in bfloat16 (int8_linear).
"""

from __future__ import annotations

import ctypes

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


def int8_rows(shape, read, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight of `shape` [out, in], whose rows [a, b) `read(a, b)` returns,
    -> (int8 [out, in], bfloat16 [out]): each row rounded to 255 levels of its own
    scale (its largest magnitude is 127), as torch._weight_int8pack_mm reads them.
    Read and quantized INT8_ROWS rows at a time: the float32 work stays small (and
    a reader may map its file for one block only: runtime.load_weights)."""
    q = torch.empty(shape, dtype=torch.int8, device=device)
    scale = torch.empty(shape[0], dtype=torch.bfloat16, device=device)
    for a in range(0, shape[0], INT8_ROWS):
        rows = read(a, a + INT8_ROWS).float()  # the weight itself when float32: not written to
        s = rows.abs().amax(1).clamp(min=1e-12).div_(127).bfloat16()  # the scale the kernel will use
        q[a:a + INT8_ROWS] = (rows / s.float()[:, None]).round_().clamp_(-127, 127)
        scale[a:a + INT8_ROWS] = s
    return q, scale


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
