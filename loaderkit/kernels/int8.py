"""int8 weight-only storage: the codec and the CPU kernel (``aten._weight_int8pack_mm``).

A weight ``W [N, K]`` is stored as ``q`` (``int8 [N, K]``) and one float32 scale per output
channel (``[N, 1]``). The definition, which :func:`quantize_int8` computes bit-exactly in row
blocks and :func:`quantize_int8_reference` in whole-tensor steps::

    amax  = |W|.float().max(dim=1)                                  # per output channel
    scale = (amax / 127).to(bfloat16).float(), at least bfloat16's smallest normal; 1 where amax is 0
    q     = round_half_even(W.float() / scale).clamp(-127, 127).to(int8)

    W ~= q.float() * scale                                            # decoding (exact in float32)

The scale is rounded to bfloat16 *before* the weight is divided by it, because the kernel takes
its scales in the activation dtype: the kernel and a decode then multiply by the very same
scale. (Rounding the scale can make ``|W / scale|`` exceed 127 by up to 0.4%, hence the clamp;
-128 is never used, so the code is symmetric.)

The kernel computes ``y = x @ (q * scale).T`` for a 2-D ``x`` in bfloat16 (float16 and float32
are accepted by aten too; see :func:`int8_problem` for why loaderkit does not use them). Its
constraints in torch 2.13 on the CPU, found by running it: ``K`` must be a multiple of 16 (other
widths read past the rows: wrong values or a crash) and ``x`` and ``q`` must be aligned to 32 and
16 bytes (a misaligned view crashes); ``N`` and the number of rows of ``x`` are free.
:func:`int8_linear` copies a misaligned operand; :func:`int8_problem` refuses other widths at plan
time. aten registers a CUDA kernel as well; loaderkit does not use it (see :func:`int8_problem`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConversionError
from . import compiled
from .quant import split_over_threads

#: the largest int8 code used (symmetric: -127..127).
INT8_MAX = 127
#: the dtype the scales are rounded to and the activations computed in.
SCALE_DTYPE = torch.bfloat16
#: the inner dimension must be a multiple of this for the kernel.
K_MULTIPLE = 16
#: byte alignment the kernel's vector loads need (activations; weights need 16).
ALIGN = 32
#: bytes of source rows quantized per step (as :data:`loaderkit.kernels.quant.QUANT_BLOCK`).
QUANT_BLOCK = 1 << 20

INT8_REASON = "int8 weight-only: aten._weight_int8pack_mm, bfloat16 activations"


def kernel_available() -> bool:
    """Whether this torch has the CPU kernel."""
    try:
        op = torch.ops.aten._weight_int8pack_mm
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU"))
    except (AttributeError, RuntimeError):
        return False


def int8_problem(*, linear: bool, shape: tuple[int, ...], compute: str, device: str, kind: str) -> str:
    """Why a module cannot store its weight in int8 and run the kernel ('' when it can); decided
    from the plan's facts alone (module kind, weight shape, compute dtype, device)."""
    if not linear:
        return "only nn.Linear has an int8 weight-only kernel"
    if kind != "cpu":
        return (f"{device}: aten._weight_int8pack_mm is used on the CPU only (torch registers a CUDA kernel, "
                "but loaderkit does not check it); on GPUs use strategy 'fp8'")
    if not kernel_available():
        return f"torch {torch.__version__} has no CPU kernel aten._weight_int8pack_mm"
    if compute != "bfloat16":
        return f"the int8 kernel computes in bfloat16 here, not {compute}"
    if len(shape) != 2:
        return f"weight shape {list(shape)} is not 2-D"
    n, k = shape
    if n == 0 or k == 0:
        return f"weight shape {list(shape)} is empty"
    if k % K_MULTIPLE:
        return f"in_features {k} is not a multiple of {K_MULTIPLE}, which the kernel needs"
    return ""


# -- quantize ----------------------------------------------------------------------------------


def _finish_scale(amax: torch.Tensor) -> torch.Tensor:
    """float32 scales holding bfloat16 values: ``amax / 127`` rounded, at least the smallest
    normal bfloat16, 1 for an all-zero row."""
    if not bool(torch.isfinite(amax).all()):
        raise ConversionError("cannot quantize a tensor that contains inf or NaN values")
    scale = (amax / INT8_MAX).to(SCALE_DTYPE).float().clamp_(min=torch.finfo(SCALE_DTYPE).tiny)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def quantize_int8_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition (module docstring) in whole-tensor float32 steps; returns ``(q, scale)``
    with ``scale`` ``[N, 1]`` float32. For checking :func:`quantize_int8`."""
    _check_2d(w)
    wf = w.float()
    amax = wf.abs().amax(dim=1) if wf.shape[1] else torch.zeros(wf.shape[0])
    scale = _finish_scale(amax)[:, None]
    return torch.round(wf / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and per-output-channel scales of a 2-D floating tensor, bit-exact with
    :func:`quantize_int8_reference`, in row blocks of :data:`QUANT_BLOCK` source bytes: each
    block's maxima, scales and codes while it is in cache, straight into the final int8 tensor
    (peak memory: the result plus a few MiB of float32 scratch).

    :raises ConversionError: for a tensor that is not 2-D and floating, or holds inf/NaN.
    """
    _check_2d(w)
    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.int8, device=w.device)
    scale = torch.ones(n, dtype=torch.float32, device=w.device)
    if n == 0 or k == 0:
        return q, scale[:, None]
    lib = compiled.library("quantize") if w.device.type == "cpu" and w.dtype in compiled.FORMATS_OUT else None
    if lib is not None:  # the compiled kernel: the row maxima in one pass, the codes in another
        rows = w.contiguous()
        amax = torch.zeros(n, 1, dtype=torch.float32)
        split_over_threads(n, lambda lo, hi: compiled.checked(compiled.amax_grid(lib, rows, amax, (1, k), lo, hi)),
                           cost=k)
        grid = _finish_scale(amax)
        top = float(INT8_MAX)
        encode = compiled.encode_grid
        split_over_threads(n, lambda lo, hi: compiled.checked(encode(lib, rows, q, grid, (1, k), top, lo, hi)), cost=k)
        return q, grid
    step = max(1, QUANT_BLOCK // (w.element_size() * k))
    work = torch.empty((min(step, n), k), dtype=torch.float32, device=w.device)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        part = work[: r1 - r0].copy_(w[r0:r1])
        s = _finish_scale(part.abs().amax(dim=1))
        scale[r0:r1] = s
        q[r0:r1] = part.div_(s[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
    return q, scale[:, None]


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The decoded weight: ``(q.float() * scale).to(dtype)`` (scale ``[N]`` or ``[N, 1]``)."""
    return (q.float() * scale.reshape(-1, 1).float()).to(dtype)


def _check_2d(w: torch.Tensor) -> None:
    if w.dim() != 2 or not w.is_floating_point():
        raise ConversionError(f"int8 weights are quantized from 2-D floating tensors, not {w.dtype} {list(w.shape)}")


# -- the kernel --------------------------------------------------------------------------------


def _aligned(t: torch.Tensor, align: int) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % align == 0 else t.clone()


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``F.linear(x, q * scale, bias)`` through ``aten._weight_int8pack_mm``, computed in ``dtype``
    (bfloat16): ``x`` of any leading shape is cast to ``dtype`` and flattened to rows, the bias
    (in ``dtype``) added to the kernel's output."""
    n, k = q.shape
    if x.shape[-1] != k:
        raise RuntimeError(f"int8 linear: input has {x.shape[-1]} features, the weight {k}")
    lead = x.shape[:-1]
    rows = x.reshape(-1, k).to(dtype)
    if rows.shape[0] == 0:
        y = rows.new_empty((0, n))
    else:
        s = scale.reshape(n).to(dtype)
        y = torch.ops.aten._weight_int8pack_mm(_aligned(rows, ALIGN), _aligned(q, ALIGN), s.contiguous())
    if bias is not None:
        y = y.add_(bias.to(dtype))
    return y.reshape(*lead, n)


_METADATA = {
    torch.Tensor.shape.__get__,
    torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__,
    torch.Tensor.is_cuda.__get__,
    torch.Tensor.requires_grad.__get__,
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.numel,
    torch.Tensor.__len__,
}


class Int8LinearWeight(torch.Tensor):
    """An int8 weight that ``F.linear`` multiplies with the int8 kernel; any other use sees it
    decoded, and ``weight.dtype`` reports the compute dtype (as :class:`Fp8LinearWeight` does)."""

    _scale: torch.Tensor
    _compute: torch.dtype

    @staticmethod
    def __new__(cls, data, requires_grad: bool = False, *, scale=None, compute_dtype=None):
        if compute_dtype is None:  # re-wrapped by code that moves parameters (accelerate)
            return nn.Parameter(data, requires_grad)
        t = torch.Tensor._make_subclass(cls, data, False)
        t._scale = scale
        t._compute = compute_dtype
        return t

    @classmethod
    def wrap(cls, q: torch.Tensor, scale: torch.Tensor, compute_dtype: torch.dtype) -> "Int8LinearWeight":
        return cls(q.detach(), scale=scale, compute_dtype=compute_dtype)

    def raw(self) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return self.view(self.shape)

    def decoded(self) -> torch.Tensor:
        return dequantize_int8(self.raw(), self._scale, self._compute)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.dtype.__get__:
            return args[0]._compute
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func is F.linear and len(args) >= 2 and isinstance(args[1], cls) and not isinstance(args[0], cls):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return int8_linear(args[0], args[1].raw(), args[1]._scale, bias, args[1]._compute)
        args, kwargs = _decode_tree((args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _decode_tree(x):
    if isinstance(x, Int8LinearWeight):
        return x.decoded()
    if isinstance(x, (list, tuple)):
        return type(x)(_decode_tree(v) for v in x)
    if isinstance(x, dict):
        return {k: _decode_tree(v) for k, v in x.items()}
    return x
