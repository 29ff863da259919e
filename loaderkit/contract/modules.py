"""The one taxonomy of torch modules loaderkit reasons about.

* :func:`module_kind` classifies a module for strategies (``ModuleContext.kind``).
* :data:`KERNEL_LAYERS` are the layers whose forward only hands its own tensors to one functional
  kernel: the runtime may decode their weights into reused buffers.
* :data:`STRICT_KERNELS` are those whose kernel fails (or silently misbehaves) when activations
  and weights differ in dtype: ``verify`` watches their inputs.
* :func:`read_by_parent` names modules whose parent reads their tensors without calling them.
"""

from __future__ import annotations

import functools
import inspect
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


def read_by_parent(name: str, named: dict[str, nn.Module]) -> str:
    """Why a module's tensors must stay in its compute dtype because its *parent* reads them
    ('' when it does not): a parent that reads the child's tensors without calling it (so a cast
    rule on the child never runs: ``nn.MultiheadAttention.out_proj``), or one whose ``forward``
    reads ``self.<child>.weight.dtype`` — T5's feed-forward casts its activations to
    ``self.wo.weight.dtype``; with ``wo`` stored in fp8 the activations would become fp8."""
    if not name:
        return ""
    parent_name, _, child = name.rpartition(".")
    parent = named.get(parent_name)
    if parent is None:
        return ""
    if isinstance(parent, nn.MultiheadAttention):
        return "its parent nn.MultiheadAttention reads its tensors without calling it"
    if child in _children_whose_dtype_is_read(type(parent)):
        return (f"its parent {type(parent).__name__}.forward reads self.{child}.weight.dtype (it casts "
                "activations to it): a storage-only dtype there would reach the kernels as activations")
    return ""


_READS_DTYPE = re.compile(r"self\.(\w+)\.weight\.dtype")


@functools.lru_cache(maxsize=None)
def _children_whose_dtype_is_read(cls: type) -> frozenset[str]:
    """Child attribute names whose ``weight.dtype`` the class's ``forward`` reads."""
    forward = getattr(cls, "forward", None)
    if forward is None or forward is nn.Module.forward:
        return frozenset()
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return frozenset()
    return frozenset(_READS_DTYPE.findall(source))
