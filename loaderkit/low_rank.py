"""Low-rank updates (LoRAs at cast time): ``tensor += scale * up @ down``, added by a module's cast
rule after it decodes the stored tensor, the stored bytes untouched. A part of the runtime
(:mod:`loaderkit.runtime`, which exports these names too)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import CastRuleError

if TYPE_CHECKING:
    from .runtime import CastRule


@dataclass(frozen=True)
class LowRank:
    """A low-rank update ``tensor += scale * up @ down`` added after decoding (a LoRA).

    :ivar name: who added it (the LoRA's name); unique per module.
    :ivar tensor: the covered tensor it updates (``"weight"``).
    :ivar up: ``[out, r, 1...]`` and :attr:`down` ``[r, *tensor.shape[1:]]``, in the compute
        dtype, on the module's execution device.
    """

    name: str
    tensor: str
    up: torch.Tensor
    down: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def add_to(self, w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """``w + scale * up @ down`` in ``w``'s dtype, one fused ``addmm``, written into ``out``
        (which may be ``w`` itself, a private buffer) or a new tensor."""
        flat, up, down = w.reshape(w.shape[0], -1), self.up.flatten(1), self.down.flatten(1)
        if out is w:
            flat.addmm_(up, down, alpha=self.scale)  # w is contiguous: flat is a view of it
        elif out is None:
            return torch.addmm(flat, up, down, alpha=self.scale).view(w.shape)
        else:
            torch.addmm(flat, up, down, alpha=self.scale, out=out.view(flat.shape))
        return out


def add_low_rank(module: nn.Module, delta: LowRank, *, name: str = "") -> "CastRule":
    """Add ``delta`` to ``module``'s cast rule, attaching one that only adds deltas when the
    module has none. The stored tensors are not changed; :func:`remove_low_rank` undoes it.

    :raises CastRuleError: for a native fp8 rule (it never decodes the weight), a name already
        used on the module, or a delta whose shape does not fit the tensor.
    """
    from .runtime import _resolve, attach_cast, cast_rule_of

    label = name or type(module).__name__
    owner, key = _resolve(module, delta.tensor)
    stored = owner._parameters.get(key, owner._buffers.get(key))
    up, down = tuple(delta.up.shape), tuple(delta.down.shape)
    if stored is not None and (len(up) < 2 or up[0] != stored.shape[0] or down[1:] != tuple(stored.shape[1:])
                               or up[1] != down[0] or any(s != 1 for s in up[2:])):
        raise CastRuleError(f"{label}.{delta.tensor}: up {list(up)} and down {list(down)} do not make its shape "
                            f"{list(stored.shape)}", module=name, tensor=delta.tensor)
    rule = cast_rule_of(module)
    if rule is None:
        if stored is None or not stored.is_floating_point() or stored.dtype.itemsize == 1:
            raise CastRuleError(f"{label}.{delta.tensor} has no cast rule and is not stored in a compute dtype",
                                module=name, tensor=delta.tensor)
        rule = attach_cast(module, stored.dtype, names=[delta.tensor], name=name)
        rule.for_deltas = True
    if rule.native:
        raise CastRuleError(f"{label} runs the native fp8 matmul, which never decodes its weight, so a LoRA "
                            "cannot be added at cast time; merge it at load (lora_mode='merge')", module=name)
    if any(d.name == delta.name for d in rule.deltas):
        raise CastRuleError(f"{label} already has an update named {delta.name!r}", module=name)
    rule.deltas.append(delta)
    return rule


def remove_low_rank(module: nn.Module, delta_name: str) -> bool:
    """Remove the update named ``delta_name`` from ``module``'s cast rule; a rule attached only
    for deltas goes with its last one. Returns whether there was one."""
    from .hooks import remove_hooks
    from .runtime import CastHook, cast_rule_of

    rule = cast_rule_of(module)
    if rule is None or not any(d.name == delta_name for d in rule.deltas):
        return False
    rule.deltas[:] = [d for d in rule.deltas if d.name != delta_name]
    if rule.for_deltas and not rule.deltas:
        remove_hooks(module, lambda h: isinstance(h, CastHook))
    return True


def delta_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a low-rank update of ``module``'s weight is added in: its cast rule's compute
    dtype, else its weight's dtype."""
    from .runtime import cast_rule_of

    rule = cast_rule_of(module)
    return rule.compute_dtype if rule is not None else module._parameters["weight"].dtype
