"""Dtype names and conversions shared by every stage.

loaderkit names dtypes by their torch name without the ``torch.`` prefix (``"bfloat16"``,
``"float8_e4m3fn"``) so that plans and checkpoint descriptions are plain, JSON-friendly data.
"""

from __future__ import annotations

import torch

from ..errors import DtypeError

#: safetensors header dtype string -> loaderkit dtype name.
SAFETENSORS_DTYPES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F4": "float4_e2m1fn_x2",
}

FP8_NAMES = frozenset(
    {"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"}
)

_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "fp16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "double": "float64",
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "float8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


def dtype_name(dtype: torch.dtype | str) -> str:
    """Return loaderkit's name for ``dtype`` (a torch dtype, a torch name or a common alias).

    :raises DtypeError: if the name is not a torch dtype.
    """
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    name = str(dtype).removeprefix("torch.")
    name = _ALIASES.get(name.lower(), name)
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise DtypeError(f"unknown dtype {dtype!r}; use a torch dtype such as torch.bfloat16")
    return name


def to_torch(name: str | torch.dtype) -> torch.dtype:
    """Return the torch dtype for a loaderkit dtype name (or pass a torch dtype through)."""
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, dtype_name(name))


def is_float(name: str) -> bool:
    """True for floating dtypes, fp8 included."""
    return to_torch(name).is_floating_point


def is_fp8(name: str) -> bool:
    """True for the 8-bit float dtypes."""
    return name in FP8_NAMES


#: float dtypes that cannot hold weights: power-of-two scale bytes and packed 4-bit pairs.
NOT_WEIGHTS = frozenset({"float8_e8m0fnu", "float4_e2m1fn_x2"})


def holds_weights(name: str) -> bool:
    """True for floating dtypes a weight can be stored in (fp8 values included, not e8m0 scales
    or packed fp4 pairs)."""
    return is_float(name) and name not in NOT_WEIGHTS and not to_torch(name).is_complex
