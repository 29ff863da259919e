"""LoRA records: what a LoRA file holds, what a LoRA format reads from it, and what the plan says.

A LoRA file is described from its header (names, dtypes, shapes) and the ``adapter_config.json``
beside it, if any. A :class:`LoraFormat` plugin turns that description into low-rank pairs, one
per model module; the core checks them against the model and records them in the plan
(:class:`LoraPlan`), before any weight is read.
"""

from __future__ import annotations

import abc

from typing import Callable, Literal, Sequence

from pydantic import Field

from .records import Frozen, FrozenJSON, ReadOnly, TensorInfo

#: how a LoRA reaches the weights: merged into them on load, or added when the cast rule decodes.
LoraMode = Literal["merge", "cast"]


class LoraFile(Frozen):
    """A LoRA file, from its header alone.

    :ivar path: the safetensors file.
    :ivar tensors: tensor name -> description (dtype, shape).
    :ivar metadata: the header's ``__metadata__``.
    :ivar config: the ``adapter_config.json`` beside the file (peft), or ``None``.
    """

    path: str
    tensors: ReadOnly[dict[str, TensorInfo]]
    metadata: ReadOnly[dict[str, str]]
    config: FrozenJSON | None = None


class LoraPair(Frozen):
    """One low-rank update ``W += scale * up @ down`` of a module's ``weight``.

    :ivar module: the model's module name it updates.
    :ivar down: the file's key of the ``[r, in, ...]`` factor (peft ``lora_A``, kohya ``lora_down``).
    :ivar up: the file's key of the ``[out, r, ...]`` factor (peft ``lora_B``, kohya ``lora_up``).
    :ivar scale: the format's multiplier (``alpha / r``, ``alpha / sqrt(r)`` for rsLoRA...),
        before the user's strength.
    """

    module: str
    down: str
    up: str
    scale: float


class LoraLayout(Frozen):
    """What a LoRA format read: its pairs, and the file's keys it could not place in the model.

    :ivar pairs: one pair per updated module.
    :ivar unmatched: the file's keys that name no module of the model (reported, never skipped).
    :ivar derived: factors the format *computes* (by its library's converter) rather than reads,
        by the key pairs name them with: their descriptions, checked like the file's own. The
        core gets their values from :meth:`LoraFormat.tensors`.
    """

    pairs: tuple[LoraPair, ...]
    unmatched: tuple[str, ...] = ()
    derived: ReadOnly[dict[str, TensorInfo]] = Field(default_factory=dict)


class LoraFormat(abc.ABC):
    """Base class of LoRA key formats (registered with ``loaderkit_register_lora_formats``).

    :cvar name: unique name.
    :cvar priority: higher is asked first.
    """

    name: str = ""
    priority: int = 0

    @abc.abstractmethod
    def claim(self, lora: LoraFile) -> bool:
        """Whether this format reads ``lora`` (from its names and metadata alone)."""

    @abc.abstractmethod
    def read(self, lora: LoraFile, modules: Sequence[str], scalar: Callable[[str], float]) -> LoraLayout:
        """Place ``lora``'s tensors on the model's ``modules`` (qualified names of the modules that
        have a weight). ``scalar(key)`` reads a one-element tensor of the file (an ``alpha``)."""

    def tensors(self, lora: LoraFile, keys: Sequence[str]) -> dict:
        """The values of ``keys`` among the layout's ``derived`` factors (only formats that
        derive factors implement it; the core calls it only for those)."""
        raise NotImplementedError(f"LoRA format {self.name!r} derives no factors")


class LoraTarget(Frozen):
    """One module a LoRA updates, as planned.

    :ivar module: the module name.
    :ivar down: the file's key of the down factor; :attr:`up` that of the up factor.
    :ivar rank: the rank ``r``.
    :ivar scale: the total multiplier: the user's strength times the format's.
    """

    module: str
    down: str
    up: str
    rank: int
    scale: float


class LoraPlan(Frozen):
    """One LoRA of a load, as planned.

    :ivar name: its name (unique per model; the file's stem unless given).
    :ivar path: the file.
    :ivar format: the LoRA format that read it; :attr:`plugin` the plugin that registered it.
    :ivar strength: the user's multiplier.
    :ivar mode: ``"merge"`` (merged into the weights while they load) or ``"cast"`` (added to the
        decoded weight at each forward; removable).
    :ivar targets: module name -> target, for every module it updates.
    :ivar derived: its factors are computed by its format (:attr:`LoraLayout.derived`), not read
        from the file as they are.
    """

    name: str
    path: str
    format: str
    plugin: str = ""
    strength: float
    mode: LoraMode
    targets: ReadOnly[dict[str, LoraTarget]]
    derived: bool = False
