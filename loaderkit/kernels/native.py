"""Native fp8 matmul for cast rules: ``nn.Linear`` through ``torch._scaled_mm``.

Used by :mod:`loaderkit.runtime` for rules whose plan says ``kernel="native"``; whether a module
may run natively is decided at plan time by :func:`native_problem`. For the duration of one
forward the module's ``weight`` is a :class:`Fp8LinearWeight`: the stored fp8 tensor plus its
scale. An ``F.linear`` call on it quantizes the activation to ``float8_e4m3fn`` (dynamic amax
scale, per tensor or per row) and runs ``torch._scaled_mm``; every other use of the weight sees
the decoded compute-dtype tensor, and ``weight.dtype`` reports the compute dtype, so modules that
cast their input to ``self.weight.dtype`` keep working.

An ``int8`` weight runs the int8 weight-only kernel instead (:mod:`loaderkit.kernels.int8`).

Supported: ``float8_e4m3fn`` weights with no scale or a per-tensor scale (any compute dtype), or
a per-channel scale (rowwise kernel: ``bfloat16`` compute, compute capability >= 9.0); N and K
multiples of 16. Anything
else is decoded as usual, and the plan's ``kernel_reason`` says why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..contract.records import DeviceCaps
from .int8 import INT8_REASON, int8_problem
from .quant import upcast

_E4M3_MAX = 448.0
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


def native_problem(
    *,
    linear: bool,
    weight_dtype: str,
    shape: tuple[int, ...],
    granularity: str,
    compute: str,
    caps: DeviceCaps,
) -> str:
    """Why a module cannot run the native fp8 matmul on the device ``caps`` describes ('' when
    it can). Decided from the plan's facts alone — module kind, stored weight dtype and shape,
    scale granularity, compute dtype, and the device's declared capabilities — so the plan
    says which kernel runs, and why, before any weight is read.
    """
    if weight_dtype == "int8":
        if granularity != "channel":
            return f"int8 weights need one scale per output channel, not {granularity} scales"
        return int8_problem(linear=linear, shape=shape, compute=compute, device=caps.device, kind=caps.kind)
    if not linear:
        return "only nn.Linear has a native fp8 path"
    if weight_dtype != "float8_e4m3fn":
        return f"weight is {weight_dtype}; the native path needs float8_e4m3fn"
    if not caps.fp8_matmul:
        return f"{caps.device} has no native fp8 matmul (needs CUDA compute capability >= 8.9)"
    if len(shape) != 2 or shape[0] % 16 or shape[1] % 16:
        return f"weight shape {list(shape)} is not a multiple of 16"
    if granularity == "block":
        return "block scales have no native kernel here; decoded instead"
    if granularity == "channel" and compute != "bfloat16":
        return "per-channel (rowwise) fp8 matmul computes in bfloat16 only"
    if granularity == "channel" and caps.capability is not None and tuple(caps.capability) < (9, 0):
        return "per-channel (rowwise) fp8 matmul needs CUDA compute capability >= 9.0"
    if compute not in ("bfloat16", "float16", "float32"):
        return f"compute dtype {compute} has no native fp8 output"
    return ""


NATIVE_REASON = "native fp8 matmul (torch._scaled_mm)"


def native_reason(weight_dtype: str) -> str:
    """What runs for a native module whose weight is stored in ``weight_dtype``."""
    return INT8_REASON if weight_dtype == "int8" else NATIVE_REASON


class Fp8LinearWeight(torch.Tensor):
    """An fp8 weight that ``F.linear`` multiplies natively; anything else sees it decoded."""

    _scale: torch.Tensor | None
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
    def wrap(cls, q: torch.Tensor, scale: torch.Tensor | None, compute_dtype: torch.dtype) -> Fp8LinearWeight:
        return cls(q.detach(), scale=scale, compute_dtype=compute_dtype)

    def raw(self) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            return self.view(self.shape)

    def decoded(self) -> torch.Tensor:
        return upcast(self.raw(), self._compute, self._scale)

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
            return native_linear(args[0], args[1].raw(), args[1]._scale, bias, args[1]._compute)
        args, kwargs = _decode_tree((args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def native_linear(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``F.linear(x, q * scale, bias)`` with an fp8 matmul: ``x`` is quantized to e4m3fn with a
    dynamic amax scale (per row when ``scale`` is per channel, else per tensor)."""
    n, k = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    rowwise = scale is not None and scale.numel() > 1
    amax = x2.abs().amax(dim=1, keepdim=True) if rowwise else x2.abs().amax()
    scale_a = (amax.float() / _E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    xq = (x2.float() / scale_a).clamp_(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    if rowwise:
        scale_b = scale.reshape(1, n).float()
    else:
        scale_b = (scale.reshape(()) if scale is not None else torch.ones((), device=q.device)).float()
    y = torch._scaled_mm(xq, q.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y.reshape(*lead, n)


def _decode_tree(x):
    if isinstance(x, Fp8LinearWeight):
        return x.decoded()
    if isinstance(x, (list, tuple)):
        return type(x)(_decode_tree(v) for v in x)
    if isinstance(x, dict):
        return {k: _decode_tree(v) for k, v in x.items()}
    return x
