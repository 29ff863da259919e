"""The one taxonomy of torch modules loaderkit reasons about.

* :func:`module_kind` classifies a module for strategies (``ModuleContext.kind``).
* :data:`KERNEL_LAYERS` are the layers whose forward only hands its own tensors to one functional
  kernel: the runtime may decode their weights into reused buffers.
* :data:`STRICT_KERNELS` are those whose kernel fails (or silently misbehaves) when activations
  and weights differ in dtype: ``verify`` watches their inputs.
* :func:`read_by_parent` names modules whose parent reads their tensors without calling them.
"""

from __future__ import annotations

import re
from typing import Literal

from torch import nn

ModuleKind = Literal["linear", "conv", "embedding", "norm", "other"]

_NORM = re.compile(r"norm", re.IGNORECASE)

KERNEL_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
    nn.modules.batchnorm._NormBase,
)  # fmt: skip

STRICT_KERNELS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,
)


def module_kind(module: nn.Module) -> ModuleKind:
    """Classify a module for strategies: linear, conv, embedding, norm or other."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(module, nn.modules.batchnorm._NormBase) or _NORM.search(type(module).__name__):
        return "norm"
    return "other"


def read_by_parent(name: str, named: dict[str, nn.Module]) -> bool:
    """True for a module whose parent reads its tensors without calling it (so a cast rule on
    the module itself would never run): ``nn.MultiheadAttention.out_proj``."""
    parent, _, _ = name.rpartition(".")
    return bool(name) and isinstance(named.get(parent), nn.MultiheadAttention)
