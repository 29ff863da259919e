"""What a cast rule covers: the tensors of a module it hands to the kernel, each checked against
its scale when it is attached. A part of the runtime (:mod:`loaderkit.runtime`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

from .contract.layout import GRANULARITIES, scale_fits
from .errors import CastRuleError


@dataclass(frozen=True)
class TensorCast:
    """How one tensor of a module is handed to its kernel.

    :ivar name: the tensor's name relative to the module (``"weight"``, ``"out_proj.weight"``).
    :ivar scale: name of the module buffer holding its float32 scale, or ``None``.
    :ivar granularity: ``"none"``, ``"tensor"``, ``"channel"`` or ``"block"``.
    :ivar block: the block shape for ``"block"`` granularity.
    """

    name: str
    scale: str | None = None
    granularity: str = "none"
    block: tuple[int, int] | None = None


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed`` DTensor (sharded by FSDP2 or tensor parallelism),
    checked without importing ``torch.distributed.tensor`` when it was never loaded."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def default_names(module: nn.Module) -> list[str]:
    names = [n for n, p in module.named_parameters(recurse=False) if p is not None and p.is_floating_point()]
    if isinstance(module, nn.MultiheadAttention):
        names += [f"out_proj.{n}" for n, p in module.out_proj.named_parameters(recurse=False) if p is not None]
    return names


def tensor_cast(module: nn.Module, tname: str, spec, label: str, mname: str) -> TensorCast:
    """Validate one covered tensor (and its scale) and describe it."""
    try:
        owner, key = resolve(module, tname)
    except AttributeError:
        owner, key = module, ""
    if key not in owner._parameters and key not in owner._buffers:
        raise CastRuleError(f"{label} has no parameter or buffer {tname!r} to cover", module=mname, tensor=tname)
    if spec is None:
        return TensorCast(tname)
    scale_name, granularity, block = spec
    where = f"{label}.{tname}"
    if granularity not in GRANULARITIES:
        raise CastRuleError(
            f"{where}: unknown scale granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}",
            module=mname,
            tensor=tname,
        )
    scale = module._buffers.get(scale_name)
    if scale is None:
        raise CastRuleError(
            f"{where}: scale buffer {scale_name!r} is not a buffer of the module; register it "
            "with module.register_buffer(name, scale) before attaching the rule",
            module=mname,
            tensor=tname,
        )
    tensor = owner._parameters.get(key, owner._buffers.get(key))
    shape = tuple(tensor.shape) if tensor is not None else ()
    block = tuple(block) if block is not None else None
    if is_dtensor(tensor) and scale_fits(tuple(tensor.to_local().shape), tuple(scale.shape), granularity, block):
        shape = tuple(tensor.to_local().shape)  # a tensor-parallel shard decodes with its own rows' scale
    if not scale_fits(shape, tuple(scale.shape), granularity, block):
        raise CastRuleError(
            f"{where}: a {granularity} scale of shape {list(scale.shape)} does not fit a tensor of shape "
            f"{list(shape)}" + (f" with block {list(block)}" if block else ""),
            module=mname,
            tensor=tname,
        )
    return TensorCast(tname, scale_name, granularity, block)


def resolve(module: nn.Module, tname: str) -> tuple[nn.Module, str]:
    *path, key = tname.split(".")
    for part in path:
        module = getattr(module, part)
    return module, key
