"""Low-rank updates (LoRAs at cast time): ``tensor += scale * up @ down``, added by a module's cast
rule after it decodes the stored tensor, the stored bytes untouched. The runtime
(:mod:`loaderkit.runtime`: ``add_low_rank``, ``remove_low_rank``) attaches them."""

from __future__ import annotations

from dataclasses import dataclass
import torch



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
