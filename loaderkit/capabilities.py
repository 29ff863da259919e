"""Declared capabilities of devices: what they can represent, and what they compute fast.

The built-in ``devices`` plugin fills :class:`DeviceCaps` by probing the machine; a plugin can
answer ``loaderkit_device_capabilities`` first to describe a device differently.
"""

from __future__ import annotations

from pydantic import Field

from .checkpoint import Frozen


class DeviceCaps(Frozen):
    """What one device can do.

    :ivar device: the torch device string (``"cpu"``, ``"cuda:0"``).
    :ivar kind: ``"cpu"``, ``"cuda"`` or another torch device type.
    :ivar name: a human description (CPU model, GPU name).
    :ivar compute_dtypes: dtypes the device can run matmuls/convolutions in at all.
    :ivar fast_dtypes: of those, the ones with native hardware support (no emulation penalty).
    :ivar fp8_matmul: native scaled fp8 matmul (``torch._scaled_mm``; CUDA sm >= 8.9).
    :ivar capability: CUDA compute capability, if any.
    :ivar notes: facts that informed the above (CPU flags, measured ratios).
    """

    device: str
    kind: str
    name: str = ""
    compute_dtypes: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")
    fast_dtypes: tuple[str, ...] = ("float32",)
    fp8_matmul: bool = False
    capability: tuple[int, int] | None = None
    notes: tuple[str, ...] = Field(default_factory=tuple)

    def is_fast(self, dtype: str) -> bool:
        return dtype in self.fast_dtypes
