"""Exact, fast conversions between 8-bit float storage and compute dtypes.

:func:`upcast` decodes an fp8 tensor (optionally times its scale) into ``bfloat16``, ``float16``
or ``float32``; :func:`quantize` encodes a high-precision tensor into fp8 with an amax scale,
bit-exact with :func:`quantize_reference` (per output channel it works in row blocks of
:data:`QUANT_BLOCK` source bytes: amax, scale and encoding while the block is in cache).

The definition of a decoded weight is :func:`dequantize_reference`::

    W = (q.float() * scale.float()).to(dtype)        # scale broadcast; block grids expanded
    W = q.to(dtype)                                  # unscaled

:func:`upcast` returns exactly those bits (NaN, signed zero and subnormals included) by a faster
route. On CUDA and other accelerators it uses the reference expression, which the device fuses.
On the CPU, torch's own fp8 conversion is a slow scalar loop. Where this machine builds and checks
the compiled kernel (:mod:`loaderkit.kernels.compiled`), it decodes every route in one pass at
about memory speed, and :func:`quantize` (per channel, per tensor, per block) encodes through it
too. Otherwise (no C compiler, ``LOADERKIT_COMPILED_KERNELS=0``) every 1-byte float is decoded
with lookup tables whose entries are computed *by the reference expression itself*, which is
what makes the result bit-exact by construction:

* unscaled or per-tensor scale: a 65536-entry table maps each *pair* of fp8 bytes (read as one
  ``uint16``) to a pair of outputs (one ``int32``/``int64``), gathered with ``index_select``
  through an ``int32`` index;
* per-channel scales: pair-table decode to float32, multiply by the row scale, cast - the
  reference expression, step by step in cache;
* block scales: one 256-entry table per block, indexed by ``byte + 256 * column_block``.

The work is done in steps of ~32k elements (L2-sized, and under ATen's parallel grain so no op
opens an OpenMP region) and split over ``torch.get_num_threads()`` threads for tensors of 1M
elements or more (``index_select`` itself is single-threaded).

The table routes, measured on a 2-core AVX-512 VM (torch 2.13; fp8 ``float8_e4m3fn``
4096x4096 and 8192x8192; Gelem/s = GB/s of fp8 read; median of 7-9 runs; the machine was shared,
so single-thread figures are the steadier ones; ``python benchmarks/bench_upcast.py`` reprints
them):

==============================================  ===========  ==========
route                                           1 thread     2 threads
==============================================  ===========  ==========
``q.to(torch.bfloat16)`` (torch)                0.15-0.16    0.31
``q.float().to(torch.bfloat16)``                0.13         0.24
bit manipulation (shift, 2**120, NaN patch)     0.11-0.12    0.12
256-entry table, ``int32`` index                0.50-0.59    0.53
pair table -> bf16, new output tensor           0.73-0.80    1.2
pair table -> bf16 into a reused ``out=``       1.8-2.0      2.6-3.0
pair table -> fp32, new output tensor           0.44         0.70-0.78
per-tensor scale -> bf16 (reference 0.10)       0.76-0.78    0.9-1.1
per-channel scale -> bf16 (reference 0.10)      0.48-0.51    0.60-0.65
block scale 128x128 -> bf16 (reference 0.09)    0.47-0.50    0.57-0.61
==============================================  ===========  ==========

A fresh 32-64 MB output costs about as much as the decode (page faults on first touch), which is
why the runtime decodes into reused buffers (``out=``). The bit-manipulation route needs five
elementwise passes and lost to the tables, so it is not used.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ..contract.layout import DEFAULT_BLOCK, GRANULARITIES, block_grid
from ..errors import ConversionError
from . import compiled

#: elements per op of the table routes: fits L2 and stays under ATen's parallel grain (32768).
CHUNK = 32000
#: below this many elements the 256-entry table is used directly (the pair table costs ~0.3 ms).
PAIR_MIN = 1 << 16
#: from this many elements a decode is split over ``torch.get_num_threads()`` threads.
PARALLEL_MIN = 1 << 20
#: most threads one decode uses.
MAX_THREADS = 8



# -- reference ---------------------------------------------------------------------------------


def dequantize_reference(
    q: torch.Tensor,
    dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The definition of decoding: ``(q.float() * scale.float()).to(dtype)``, or ``q.to(dtype)``.

    :param block: the block shape when ``scale`` is a block grid (ceil-division, see
        :func:`expand_block_scale`).
    """
    if scale is None:
        return q.to(dtype)
    s = scale.float()
    if block is not None:
        s = expand_block_scale(s, tuple(q.shape), block)
    return (q.float() * s).to(dtype)


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """Expand a block grid ``[..., ceil(N/b0), ceil(K/b1)]`` to the weight's shape ``[..., N, K]``
    (the one block expansion: schemes, the runtime and the reference decode all use it)."""
    if len(shape) == 2:
        _check_block(scale, shape, block)
    elif len(shape) < 2 or tuple(scale.shape) != block_grid(shape, block):
        raise ConversionError(
            f"block scale has shape {list(scale.shape)} but a weight of shape {list(shape)} with "
            f"block {list(block)} needs {list(block_grid(shape, block)) if len(shape) >= 2 else 'a 2-D weight'}"
        )
    n, k = shape[-2:]
    s = scale.repeat_interleave(block[0], dim=-2)[..., :n, :]
    return s.repeat_interleave(block[1], dim=-1)[..., :k]


def _check_block(scale: torch.Tensor, shape: tuple[int, ...], block: tuple[int, int]) -> None:
    if len(shape) != 2 or len(block) != 2 or min(block) < 1:
        raise ConversionError(
            f"block scales need a 2-D weight and a 2-D block; got weight shape {list(shape)}, "
            f"block {list(block)}"
        )
    grid = block_grid(shape, block)
    if tuple(scale.shape) != grid:
        raise ConversionError(
            f"block scale has shape {list(scale.shape)} but a weight of shape {list(shape)} with "
            f"block {list(block)} needs {list(grid)} (ceil-division); check the checkpoint's block size"
        )


# -- upcast ------------------------------------------------------------------------------------


def upcast(
    q: torch.Tensor,
    dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode ``q`` to ``dtype`` (times ``scale``), bit-exact with :func:`dequantize_reference`.

    :param q: the stored tensor (fp8 on the fast path; any dtype is accepted).
    :param dtype: a floating compute dtype (``bfloat16``, ``float16``, ``float32``, ``float64``).
    :param scale: ``None``, a one-element scale, a per-channel scale ``[N, 1, ...]`` (any shape
        that broadcasts against ``q``), or a block grid when ``block`` is given.
    :param block: block shape ``(b0, b1)`` for a block grid ``[ceil(N/b0), ceil(K/b1)]``.
    :param out: optional contiguous destination of ``q``'s shape and ``dtype`` (CPU table routes).
    :raises ConversionError: for a non-float ``dtype`` or a scale that does not fit ``q``.
    """
    if not dtype.is_floating_point or dtype.itemsize == 1:
        raise ConversionError(f"cannot upcast to {dtype}: choose a compute dtype such as torch.bfloat16")
    if block is not None and scale is None:
        raise ConversionError("a block shape was given without a block scale grid")
    if block is not None and q.dim() > 2:  # stacked block grids (fused experts)
        if tuple(scale.shape) != block_grid(tuple(q.shape), tuple(block)) or not _compiled_applies(q, scale, dtype):
            result = dequantize_reference(q, dtype, scale, tuple(block))
            return result if out is None else out.copy_(result)
    elif block is not None:
        _check_block(scale, tuple(q.shape), tuple(block))
    if (block is None and scale is not None and _is_row_scale(q, scale) and (out is None or out.is_contiguous())
            and _compiled_applies(q, scale, dtype)):
        # one scale per row of a stack [..., N, K] (fused experts): per channel of its [-1, K] view
        rows = q.contiguous().view(-1, q.shape[-1])
        dest = upcast(rows, dtype, scale.reshape(-1, 1), out=None if out is None else out.view(rows.shape))
        return dest.view(q.shape)
    if not _table_route_applies(q, scale, block):
        result = dequantize_reference(q, dtype, scale, block)
        return result if out is None else out.copy_(result)
    q = q.contiguous()
    if out is None:
        out = torch.empty(q.shape, dtype=dtype)
    elif out.shape != q.shape or out.dtype != dtype or not out.is_contiguous():
        raise ConversionError(f"out= must be a contiguous {dtype} tensor of shape {list(q.shape)}")
    if _compiled_applies(q, scale, dtype):
        _upcast_compiled(q, scale, block, out)
    elif scale is None or scale.numel() == 1:
        _gather_flat(q.view(torch.uint8).view(-1), _tensor_table(q.dtype, dtype, scale), out.view(-1))
    elif block is not None:
        _upcast_block(q, scale, tuple(block), out)
    else:
        _upcast_channel(q, scale, out)
    return out


def decode_stored(
    q: torch.Tensor,
    dtype: torch.dtype,
    scale: torch.Tensor | None,
    granularity: str | None,
    block: tuple[int, int] | None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode an fp8 weight kept as stored the way its cast rule does at forward time: a
    per-channel scale ``[N]`` broadcasts over dimension 0, a block grid uses ``block``."""
    blk = tuple(block) if granularity == "block" and block is not None else None
    if granularity == "channel" and scale is not None and scale.numel() > 1:
        scale = scale.reshape((-1,) + (1,) * (q.dim() - 1))  # [N] -> [N, 1, ...]
    return upcast(q, dtype, scale, blk, out=out)


def _table_route_applies(q: torch.Tensor, scale: torch.Tensor | None, block) -> bool:
    """Whether a table route covers this decode (CPU, 1-byte float, a scale layout it knows)."""
    if q.device.type != "cpu" or q.dtype.itemsize != 1 or not q.dtype.is_floating_point:
        return False
    if scale is None:
        return True
    if scale.device.type != "cpu" or not scale.dtype.is_floating_point:
        return False
    return scale.numel() == 1 or block is not None or _is_channel_scale(q, scale)


def _compiled_applies(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether the compiled kernel takes this decode (a CPU 1-byte float, a float32 / bfloat16 /
    float16 output, the kernel built and checked on this machine)."""
    if dtype not in compiled.FORMATS_OUT or q.device.type != "cpu" or q.dtype.itemsize != 1:
        return False
    if scale is not None and (scale.device.type != "cpu" or not scale.dtype.is_floating_point
                              or bool(torch.isnan(scale).any())):  # a NaN scale: the reference's NaN bits
        return False
    return compiled.library() is not None


def _upcast_compiled(q: torch.Tensor, scale: torch.Tensor | None, block, out: torch.Tensor) -> None:
    """One pass per element through :mod:`loaderkit.kernels.compiled`, split over threads."""
    lib = compiled.library()
    if scale is None or scale.numel() == 1:
        s = None if scale is None else float(scale.reshape(()).float())
        codes, dest = q.view(-1), out.view(-1)
        split_over_threads(codes.numel(),
                           lambda lo, hi: compiled.checked(compiled.decode_flat(lib, codes[lo:hi], s, dest[lo:hi])))
        return
    if block is None:  # per channel: a grid of one column, one block per row
        rows = q.shape[0]
        codes, grid, cells = q.view(rows, -1), scale.float().reshape(rows, 1).contiguous(), (1, q[0].numel())
    else:
        codes, grid, cells = q, scale.float().contiguous(), tuple(block)
    if codes.dim() == 2:
        dest = out.view(codes.shape)
        split_over_threads(codes.shape[0],
                           lambda lo, hi: compiled.checked(compiled.decode_grid(lib, codes, grid, cells, dest, lo, hi)),
                           cost=codes.shape[1])
        return
    # a stack of block-scaled matrices [..., N, K] (fused experts): one grid each
    codes, dest = codes.reshape(-1, *codes.shape[-2:]), out.view(-1, *codes.shape[-2:])
    grid = grid.reshape(-1, *grid.shape[-2:])
    n = codes.shape[1]

    def work(lo: int, hi: int) -> None:
        for e in range(lo // n, -(-hi // n)):
            r0, r1 = max(lo - e * n, 0), min(hi - e * n, n)
            compiled.checked(compiled.decode_grid(lib, codes[e], grid[e], cells, dest[e], r0, r1))

    split_over_threads(codes.shape[0] * n, work, cost=codes.shape[2])


def _is_row_scale(q: torch.Tensor, scale: torch.Tensor) -> bool:
    """True for one scale per row of a stack of matrices: ``q`` ``[..., N, K]``, ``scale`` ``[..., N, 1]``."""
    return q.dim() > 2 and tuple(scale.shape) == tuple(q.shape[:-1]) + (1,)


def _is_channel_scale(q: torch.Tensor, scale: torch.Tensor) -> bool:
    """True when ``scale`` holds one value per leading index of ``q`` (``[N]``, ``[N,1,...]``)."""
    if q.dim() == 0 or scale.numel() != q.shape[0]:
        return False
    if scale.dim() == 1:
        return q.dim() == 1
    return scale.dim() == q.dim() and all(d == 1 for d in scale.shape[1:])


def _all_codes(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).view(dtype)


def _int_dtype(itemsize: int) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]


@functools.lru_cache(maxsize=32)
def _unscaled_tables(src: torch.dtype, dst: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    table = _all_codes(src).to(dst).view(_int_dtype(dst.itemsize))
    return table, _pair_table(table)


def _tensor_table(src: torch.dtype, dst: torch.dtype, scale: torch.Tensor | None):
    """The 256-entry (and pair) table for an unscaled or per-tensor-scaled decode."""
    if scale is None:
        return _unscaled_tables(src, dst)
    values = (_all_codes(src).float() * scale.reshape(()).float()).to(dst)
    table = values.view(_int_dtype(dst.itemsize))
    return table, _pair_table(table)


def _pair_table(table: torch.Tensor) -> torch.Tensor | None:
    """65536 entries: the ``uint16`` made of two bytes -> the two outputs packed in one integer."""
    bits = table.dtype.itemsize * 8
    if bits > 32:
        return None
    wide = torch.int32 if bits == 16 else torch.int64
    codes = torch.arange(65536, dtype=torch.int64)
    low = table[codes & 0xFF].to(wide) & ((1 << bits) - 1)
    high = table[codes >> 8].to(wide) << bits
    return (low | high).to(wide)


@functools.lru_cache(maxsize=1)
def _pairs_work() -> bool:
    """Whether byte pairs can be read as ``uint16`` indexes: a little-endian machine and a torch
    that copies ``uint16`` into ``int32`` (older releases lack the kernel)."""
    if sys.byteorder != "little":
        return False
    try:
        probe = torch.tensor([0, 65535], dtype=torch.int32).to(torch.uint16)
        return torch.empty(2, dtype=torch.int32).copy_(probe).tolist() == [0, 65535]
    except (RuntimeError, TypeError):
        return False


def _gather_flat(codes: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor | None], out: torch.Tensor) -> None:
    """``out[i] = table[codes[i]]`` (pair table when it pays), split over threads."""
    index, table, dest, tail = _gather_operands(codes, tables, out)
    split_over_threads(index.numel(), functools.partial(_gather_range, index, table, dest))
    if tail:
        out.view(tables[0].dtype)[-1] = tables[0][codes[-1].long()]


def _gather_serial(codes: torch.Tensor, tables: tuple, out: torch.Tensor) -> None:
    """:func:`_gather_flat` on the calling thread only (for use inside a parallel share)."""
    index, table, dest, tail = _gather_operands(codes, tables, out)
    _gather_range(index, table, dest, 0, index.numel())
    if tail:
        out.view(tables[0].dtype)[-1] = tables[0][codes[-1].long()]


def _gather_operands(codes, tables, out):
    """(index, table, destination, odd tail left): byte pairs against the pair table, or bytes."""
    table, pairs = tables
    out_bits = out.view(table.dtype)
    n = codes.numel()
    if pairs is None or n < PAIR_MIN or codes.storage_offset() % 2 or not _pairs_work():
        return codes, table, out_bits, False
    even = n - n % 2
    return codes[:even].view(torch.uint16), pairs, out_bits[:even].view(pairs.dtype), bool(n % 2)


def _step() -> int:
    """Elements per op: under the parallel grain, or 4x that when torch runs single-threaded."""
    return CHUNK if torch.get_num_threads() > 1 else 4 * CHUNK


def _gather_range(index: torch.Tensor, table: torch.Tensor, out: torch.Tensor, lo: int, hi: int) -> None:
    step = _step()
    work = torch.empty(min(hi - lo, step), dtype=torch.int32)
    _gather_steps(index[lo:hi], table, out[lo:hi], work)


def _gather_steps(index: torch.Tensor, table: torch.Tensor, out: torch.Tensor, work: torch.Tensor) -> None:
    """``out = table[index]`` in steps of ``work.numel()`` through the ``int32`` buffer ``work``:
    two ops a step (the steps are cut by one ``split`` each, not sliced one by one)."""
    step = work.numel()
    for src, dst in zip(index.split(step), out.split(step)):
        idx = work if src.numel() == step else work[: src.numel()]
        torch.index_select(table, 0, idx.copy_(src), out=dst)


def split_over_threads(total: int, work, *, align: int = 1, cost: int = 1) -> None:
    """Run ``work(lo, hi)`` over ``[0, total)`` in contiguous shares, one per torch thread.

    The steps inside a share stay below ATen's parallel grain, so no op opens an OpenMP region:
    on a busy machine a region waits for its slowest thread (a scheduler quantum) at every op.
    """
    threads = min(torch.get_num_threads(), MAX_THREADS) if total * cost >= PARALLEL_MIN else 1
    share = -(-total // max(threads, 1))
    share += -share % align
    bounds = [(lo, min(lo + share, total)) for lo in range(0, total, max(share, 1))]
    if len(bounds) <= 1:
        work(0, total)
        return
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def in_caller_mode(lo: int, hi: int) -> None:  # worker threads start with default modes
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            work(lo, hi)

    futures = [_thread_pool().submit(in_caller_mode, lo, hi) for lo, hi in bounds[1:]]
    try:
        work(*bounds[0])
    finally:
        for f in futures:
            f.result()


_POOL_LOCK = threading.Lock()
_POOL: dict[str, object] = {}


def _thread_pool() -> ThreadPoolExecutor:
    """The decode worker threads, made on first use (and again in a forked child)."""
    with _POOL_LOCK:
        if _POOL.get("pid") != os.getpid():
            _POOL["pid"] = os.getpid()
            _POOL["pool"] = ThreadPoolExecutor(MAX_THREADS - 1, thread_name_prefix="loaderkit-decode")
        return _POOL["pool"]


def _scaled_rows(base: torch.Tensor, scales: torch.Tensor, dst: torch.dtype) -> torch.Tensor:
    """Tables for some scale values: entry ``g*256 + b`` decodes byte ``b`` with ``scales[g]``."""
    values = torch.empty(scales.numel(), 256, dtype=dst)
    flat = scales.reshape(-1, 1)
    rows = max(1, _step() // 256)
    for g0 in range(0, flat.shape[0], rows):
        values[g0 : g0 + rows] = base[None, :] * flat[g0 : g0 + rows]
    return values.view(_int_dtype(dst.itemsize)).reshape(-1)


def _upcast_channel(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """Per-row scales: decode by pair table to float32, multiply, cast (step by step)."""
    rows = q.shape[0]
    codes = q.view(torch.uint8).reshape(rows, -1)
    _float_route(codes, q.dtype, scale.reshape(rows, 1).float(), out.view(rows, -1))


def _upcast_block(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], out: torch.Tensor) -> None:
    """One table per block (256 entries), built once per row of blocks."""
    n, k = q.shape
    b0, b1 = block
    codes = q.view(torch.uint8)
    if b0 * b1 < 1024:  # a table per block would outweigh the block
        _float_route(codes, q.dtype, expand_block_scale(scale.float(), (n, k), block), out)
        return
    dest = out.view(_int_dtype(out.dtype.itemsize))
    base = _all_codes(q.dtype).float()
    cols = (torch.arange(k, dtype=torch.int32) // b1).mul_(256)
    grid = scale.float()

    def work(lo: int, hi: int) -> None:
        step = _row_step(k, 1)
        buf = torch.empty(min(hi - lo, step) * k, dtype=torch.int32)
        r0, current, table = lo, -1, None
        while r0 < hi:
            row_block = r0 // b0
            r1 = min(r0 + step, hi, (row_block + 1) * b0)
            if row_block != current:
                table, current = _scaled_rows(base, grid[row_block], out.dtype), row_block
            idx = buf[: (r1 - r0) * k].view(r1 - r0, k).copy_(codes[r0:r1]).add_(cols)
            torch.index_select(table, 0, idx.view(-1), out=dest[r0:r1].reshape(-1))
            r0 = r1

    split_over_threads(n, work, cost=k)


def _float_route(codes: torch.Tensor, src: torch.dtype, scale: torch.Tensor, dest: torch.Tensor) -> None:
    """Decode to float32 by table, multiply by the (broadcast) scale, cast: the reference, chunked."""
    rows, width = codes.shape
    tables = _unscaled_tables(src, torch.float32)
    per_row = scale.shape[0] == rows
    pairs = (width % 2 == 0 and codes.is_contiguous() and codes.storage_offset() % 2 == 0
             and tables[1] is not None and _pairs_work())

    def work(lo: int, hi: int) -> None:
        step = _row_step(width, 1)
        buf = torch.empty(min(hi - lo, step) * width, dtype=torch.float32)
        idx = torch.empty(buf.numel() // 2, dtype=torch.int32) if pairs else None
        scales = scale[lo:hi].split(step) if per_row else None
        for i, (c, d) in enumerate(zip(codes[lo:hi].split(step), dest[lo:hi].split(step))):
            chunk = buf[: c.numel()] if c.numel() != buf.numel() else buf
            if pairs:  # byte pairs against the pair table: two elements per index
                flat = c.view(-1).view(torch.uint16)
                _gather_steps(flat, tables[1], chunk.view(tables[1].dtype), idx[: flat.numel()])
            else:
                _gather_serial(c.reshape(-1), tables, chunk)
            d.copy_(chunk.view(c.shape).mul_(scales[i] if per_row else scale))

    split_over_threads(rows, work, cost=width)


def _row_step(width: int, align: int) -> int:
    step = max(1, _step() // max(width, 1))
    return max(align, step - step % align)


@functools.lru_cache(maxsize=8)
def _nonfinite_codes(dtype: torch.dtype) -> tuple[int | None, int | None, torch.Tensor | None]:
    """The bytes of ``dtype`` that are NaN or infinite, as ``(positive, negative, fallback)``.

    Where each sign's non-finite bytes are the largest of its half (e4m3fn: 0x7F and 0xFF; e5m2:
    0x7C.. and 0xFC..), ``positive`` and ``negative`` are the smallest of them (``None``: that half
    has none) and ``fallback`` is ``None``; otherwise ``fallback`` lists them all."""
    codes = torch.arange(256, dtype=torch.uint8)
    bad = codes[~torch.isfinite(codes.view(dtype).float())]
    found = set(bad.tolist())
    firsts = []
    for lo, hi in ((0, 127), (128, 255)):
        half = sorted(c for c in found if lo <= c <= hi)
        if half and half != list(range(half[0], hi + 1)):
            return None, None, bad
        firsts.append(half[0] if half else None)
    return firsts[0], firsts[1], None


def has_nonfinite_codes(q: torch.Tensor) -> bool:
    """True when the 8-bit float tensor ``q`` holds a NaN or infinite code (False for other dtypes).

    For e4m3fn and e5m2 this is two max-reductions over the bytes (no temporary tensor; several
    GB/s on one core), because their non-finite codes are the largest bytes of each sign."""
    if q.element_size() != 1 or not q.is_floating_point() or not q.numel():
        return False
    pos, neg, fallback = _nonfinite_codes(q.dtype)
    raw = q.reshape(-1).view(torch.uint8)
    if fallback is not None:
        return bool(torch.isin(raw, fallback.to(raw.device)).any())
    if neg is not None and int(raw.max()) >= neg:
        return True
    return pos is not None and int(raw.view(torch.int8).max()) >= pos


# -- quantize ----------------------------------------------------------------------------------


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an 8-bit float dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def quantize(
    w: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    granularity: str = "channel",
    block: tuple[int, int] = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode ``w`` as fp8 with an amax scale so that ``w ~= q.float() * scale``.

    ``scale = amax / fp8_max`` (float32) per tensor (shape ``[]``), per output channel (shape
    ``[N, 1, ...]``, broadcastable to ``w``) or per block (grid ``[ceil(N/b0), ceil(K/b1)]``);
    an all-zero group gets scale 1 so it decodes to exact zeros. ``"none"`` returns ``(q, None)``
    with values saturated to the fp8 range. Tensors with fewer than two dimensions are scaled
    per tensor when ``"channel"`` is asked. Work is done in row chunks, so the temporaries stay
    small even for very large tensors.

    :raises ConversionError: on an unknown granularity, a block request for a non-2-D tensor, a
        non-fp8 target or a tensor containing inf/NaN.
    """
    if fp8_dtype.itemsize != 1 or not fp8_dtype.is_floating_point:
        raise ConversionError(f"quantize needs an 8-bit float dtype, got {fp8_dtype}")
    if granularity not in GRANULARITIES:
        raise ConversionError(f"unknown scale granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")
    if granularity in ("channel", "row") and w.dim() < 2:
        granularity = "tensor"
    if granularity == "row":  # a stack of Linear weights [..., N, K]: one scale per row of K
        q, scale = quantize(w.reshape(-1, w.shape[-1]), fp8_dtype, "channel")
        return q.view(w.shape), scale.reshape(w.shape[:-1] + (1,))
    if granularity == "block" and w.dim() != 2:
        raise ConversionError(f"block scales need a 2-D weight; this one has shape {list(w.shape)}")
    rows = w.reshape(w.shape[0] if w.dim() else 1, -1)
    if granularity != "none" and _compiled_quantize_applies(rows, fp8_dtype):
        q, scale = _quantize_compiled(rows.contiguous(), fp8_dtype, granularity, tuple(block))
        if granularity == "channel":
            scale = scale.reshape((w.shape[0],) + (1,) * (w.dim() - 1))
        return q.view(w.shape), scale
    if granularity == "none":
        return _encode(rows, fp8_dtype, None, clamp=True).view(w.shape), None
    if granularity == "block":
        scale = _finish_scale(_block_amax(rows, tuple(block)), fp8_dtype)
        row_scale = functools.partial(_block_rows, scale, tuple(block), w.shape[1])
        return _encode(rows, fp8_dtype, row_scale, align=block[0]).view(w.shape), scale
    if granularity == "tensor":
        amax = _row_amax(rows)
        scale = _finish_scale(amax.max() if amax.numel() else torch.zeros(()), fp8_dtype)
        grid = scale.reshape(1, 1)  # not 0-d: a 0-d float32 would let bf16 rows divide in bf16
        return _encode(rows, fp8_dtype, lambda r0, r1: grid).view(w.shape), scale
    q, scale = _quantize_channel(rows, fp8_dtype)
    return q.view(w.shape), scale.reshape((w.shape[0],) + (1,) * (w.dim() - 1))


def _compiled_quantize_applies(rows: torch.Tensor, fp8_dtype: torch.dtype) -> bool:
    return (rows.device.type == "cpu" and rows.dtype in compiled.FORMATS_OUT and fp8_dtype in compiled.FP8_OUT
            and rows.numel() > 0 and compiled.library("quantize") is not None)


def _quantize_compiled(rows: torch.Tensor, fp8_dtype: torch.dtype, granularity: str, block: tuple[int, int]):
    """:func:`quantize` of the contiguous 2-D ``rows`` through the compiled kernel: the amax of
    each group in one pass, the scales by :func:`_finish_scale` (torch, as the reference), the
    encoding in a second pass; each pass split over threads by rows (whole blocks of rows)."""
    lib = compiled.library("quantize")
    n, k = rows.shape
    if granularity == "block":
        cells, align = block, block[0]
        amax = torch.zeros(block_grid((n, k), block), dtype=torch.float32)
    else:  # channel, and tensor through its rows' maxima
        cells, align = (1, k), 1
        amax = torch.zeros(n, 1, dtype=torch.float32)
    split_over_threads(n, lambda lo, hi: compiled.checked(compiled.amax_grid(lib, rows, amax, cells, lo, hi)),
                       align=align, cost=k)
    if granularity == "tensor":
        scale = _finish_scale(amax.max(), fp8_dtype)
        grid, cells = scale.reshape(1, 1), (n, k)
    else:
        scale = grid = _finish_scale(amax, fp8_dtype)
    q = torch.empty((n, k), dtype=fp8_dtype)
    top = fp8_max(fp8_dtype)
    split_over_threads(n, lambda lo, hi: compiled.checked(compiled.encode_grid(lib, rows, q, grid, cells, top, lo, hi)),
                       align=align, cost=k)
    return q, scale if granularity != "channel" else scale.reshape(n)


def row_amax(w: torch.Tensor) -> torch.Tensor:
    """The largest magnitude of each row (over the last dimension) of ``w``, in float32, shape
    ``w.shape[:-1]``: what per-row scales made on load are computed from. For the parts of a
    row held by several processes, the maximum of theirs is the row's."""
    return _row_amax(w.reshape(-1, w.shape[-1]) if w.dim() else w.reshape(1, 1)).reshape(w.shape[:-1])


def quantize_rows(w: torch.Tensor, fp8_dtype: torch.dtype, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 of ``w`` (2-D, or a stack ``[..., N, K]``) with the given row maxima ``amax``
    (shape ``w.shape[:-1]``): the same scales and bits as :func:`quantize` (``"channel"`` or
    ``"row"``) of the whole rows, when ``amax`` is their maximum and ``w`` a column slice of them.
    Returns ``(q, scale)`` with ``scale`` of shape ``w.shape[:-1] + (1,)``."""
    rows = w.reshape(-1, w.shape[-1])
    scale = _finish_scale(amax.reshape(-1).to(torch.float32), fp8_dtype)
    q = _encode(rows, fp8_dtype, lambda r0, r1: scale[r0:r1, None])
    return q.view(w.shape), scale.reshape(tuple(w.shape[:-1]) + (1,))


def quantize_reference(
    w: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    granularity: str = "channel",
    block: tuple[int, int] = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The definition :func:`quantize` computes, in whole-tensor float32 steps::

        amax = |w|.max() per group;  scale = amax / fp8_max, at least float32's tiny, 1 where amax is 0
        q = (w.float() / scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)     # scale broadcast / expanded

    (for checking :func:`quantize`; it holds float32 copies of ``w``)."""
    if granularity in ("channel", "row") and w.dim() < 2:
        granularity = "tensor"
    if granularity == "row":
        q, scale = quantize_reference(w.reshape(-1, w.shape[-1]), fp8_dtype, "channel")
        return q.view(w.shape), scale.reshape(w.shape[:-1] + (1,))
    top = fp8_max(fp8_dtype)
    wf = w.float().reshape(w.shape[0] if w.dim() else 1, -1)
    if granularity == "none":
        return wf.clamp(-top, top).to(fp8_dtype).view(w.shape), None
    if granularity == "block":
        scale = _finish_scale(_block_amax(wf, tuple(block)), fp8_dtype)
        full = expand_block_scale(scale, tuple(wf.shape), tuple(block))
    elif granularity == "tensor":
        scale = _finish_scale(wf.abs().amax() if wf.numel() else torch.zeros(()), fp8_dtype)
        full = scale
    else:
        full = _finish_scale(wf.abs().amax(dim=1) if wf.shape[1] else torch.zeros(wf.shape[0]), fp8_dtype)[:, None]
        scale = full.reshape((w.shape[0],) + (1,) * (w.dim() - 1))
    return (wf / full).clamp(-top, top).to(fp8_dtype).view(w.shape), scale


#: bytes of source rows quantized per step: the float32 temporary stays a few MiB, in cache.
QUANT_BLOCK = 1 << 20


def _row_steps(rows: torch.Tensor, align: int = 1, elems: int = 1 << 20):
    """Row ranges of about ``elems`` elements (whole blocks of ``align`` rows): large enough
    that per-op overhead is small, small enough that the float32 temporaries stay a few MB."""
    width = max(rows.shape[1], 1)
    step = max(1, elems // width)
    step = max(align, step - step % align)
    for r0 in range(0, rows.shape[0], step):
        yield r0, min(r0 + step, rows.shape[0])


def _quantize_channel(rows: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row, in row blocks of :data:`QUANT_BLOCK` source bytes: each block's amax,
    scale and encoding while it is in cache, straight into the final fp8 tensor."""
    n, k = rows.shape
    q = torch.empty(rows.shape, dtype=fp8_dtype, device=rows.device)
    amax = torch.zeros(n, dtype=torch.float32, device=rows.device)
    if n == 0 or k == 0:
        return q, _finish_scale(amax, fp8_dtype)
    scale = torch.empty(n, dtype=torch.float32, device=rows.device)
    steps = list(_row_steps(rows, elems=QUANT_BLOCK // rows.element_size()))
    absw = torch.empty((steps[0][1], k), dtype=rows.dtype, device=rows.device)
    work = torch.empty((steps[0][1], k), dtype=torch.float32, device=rows.device)
    top = fp8_max(fp8_dtype)
    for r0, r1 in steps:
        part = rows[r0:r1]
        amax[r0:r1] = torch.abs(part, out=absw[: r1 - r0]).amax(dim=1)
        s = scale[r0:r1]
        torch.div(amax[r0:r1], top, out=s).clamp_(min=torch.finfo(torch.float32).tiny)
        s.masked_fill_(amax[r0:r1] <= 0, 1.0)  # an all-zero row decodes to exact zeros
        q[r0:r1] = _divided(part, s[:, None], work[: r1 - r0])  # |w / s| <= fp8_max: no clamp
    if not bool(torch.isfinite(amax).all()):
        raise ConversionError("cannot quantize a tensor that contains inf or NaN values")
    return q, scale


def _divided(part: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``part.float() / scale`` into ``out`` (float32) in two passes: a mixed-dtype ``torch.div``
    would convert the whole of ``part`` into a temporary first."""
    return out.copy_(part).div_(scale)


def _row_amax(rows: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(rows.shape[0], dtype=torch.float32, device=rows.device)
    if rows.shape[1] == 0:
        return out
    work = None
    for r0, r1 in _row_steps(rows):
        if work is None:  # one temporary, reused: a fresh one per chunk costs page faults
            work = torch.empty((r1 - r0, rows.shape[1]), dtype=rows.dtype, device=rows.device)
        part = torch.abs(rows[r0:r1], out=work[: r1 - r0])
        out[r0:r1] = part.amax(dim=1).float()
    return out


def _block_amax(rows: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    n, k = rows.shape
    b0, b1 = block
    grid = torch.zeros(math.ceil(n / b0), math.ceil(k / b1), dtype=torch.float32, device=rows.device)
    pad = grid.shape[1] * b1 - k
    for r0, r1 in _row_steps(rows, align=b0):
        part = torch.nn.functional.pad(rows[r0:r1].abs().float(), (0, pad))
        part = part.view(r1 - r0, grid.shape[1], b1).amax(dim=2)  # [rows, grid_cols]
        for g in range(r0 // b0, math.ceil(r1 / b0)):
            lo, hi = g * b0 - r0, min((g + 1) * b0, r1) - r0
            grid[g] = part[lo:hi].amax(dim=0)
    return grid


def _block_rows(scale: torch.Tensor, block: tuple[int, int], width: int, r0: int, r1: int) -> torch.Tensor:
    """The block grid expanded for rows ``r0:r1`` (``r0`` a multiple of the block height)."""
    part = scale[r0 // block[0] : math.ceil(r1 / block[0])].repeat_interleave(block[0], dim=0)
    return part[: r1 - r0].repeat_interleave(block[1], dim=1)[:, :width]


def _finish_scale(amax: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    if not bool(torch.isfinite(amax).all()):
        raise ConversionError("cannot quantize a tensor that contains inf or NaN values")
    scale = (amax / fp8_max(fp8_dtype)).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(amax > 0, scale, torch.ones_like(scale)).float()


def _encode(rows: torch.Tensor, fp8_dtype: torch.dtype, row_scale, align: int = 1, clamp: bool = False) -> torch.Tensor:
    """Encode ``rows`` (divided by ``row_scale(r0, r1)`` when given) in row steps. Amax scales
    need no clamp (``|w / s| <= fp8_max`` up to a float32 rounding, and the fp8 cast rounds that
    to ``fp8_max``); unscaled values are saturated (``clamp=True``)."""
    top = fp8_max(fp8_dtype)
    q = torch.empty(rows.shape, dtype=fp8_dtype, device=rows.device)

    work = None
    for r0, r1 in _row_steps(rows, align):
        if work is None:  # one float32 temporary, reused: a fresh one per chunk costs page faults
            work = torch.empty((r1 - r0, rows.shape[1]), dtype=torch.float32, device=rows.device)
        part = work[: r1 - r0]
        if row_scale is not None:
            _divided(rows[r0:r1], row_scale(r0, r1), part)
        else:
            part.copy_(rows[r0:r1])
        q[r0:r1] = part.clamp_(-top, top) if clamp else part
    return q
