"""Precision strategies: the base class plugins subclass, and the options they validate.

A strategy decides, module by module, the *storage* dtype of each tensor (what sits in memory)
and the *compute* dtype (what the kernel runs in). The core checks every decision: storage that
differs from compute is only allowed where a runtime cast rule covers the module.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .build import ModelFacts
from .capabilities import DeviceCaps
from .checkpoint import CheckpointInfo, Frozen, TensorInfo
from .errors import StrategyError


class StrategyOptions(BaseModel):
    """Base of every strategy's options model: unknown options are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class ModelContext(Frozen):
    """What a strategy sees once per load, before any per-module decision.

    :ivar checkpoint: the checkpoint description.
    :ivar device: capabilities of the execution device.
    :ivar facts: what the model's library declares (fp32 modules, skip patterns).
    """

    checkpoint: CheckpointInfo
    device: DeviceCaps
    facts: ModelFacts


class ModuleContext(Frozen):
    """One module whose tensors a strategy places.

    :ivar name: qualified module name (``""`` for the root).
    :ivar type: the module's class name (``"Linear"``).
    :ivar kind: ``"linear"``, ``"conv"``, ``"embedding"``, ``"norm"`` or ``"other"``.
    :ivar tensors: the module's own parameters and persistent buffers (local name -> info of the
        tensor that will fill it, or of the planned tensor when the checkpoint lacks it).
    :ivar keep_fp32: the model library asks for this module to stay in float32.
    :ivar keep_fp32_fp16: the library asks for it to stay in float32 when computing in float16.
    :ivar skip_low_precision: the library or user asks this module not to be stored in a
        low-precision format (``_skip_layerwise_casting_patterns`` and the strategy's skips).
    """

    name: str
    type: str
    kind: str
    tensors: dict[str, TensorInfo]
    keep_fp32: bool = False
    keep_fp32_fp16: bool = False
    skip_low_precision: bool = False


class ModuleDecision(Frozen):
    """A strategy's answer for one module.

    :ivar compute: the dtype the module's kernel runs in.
    :ivar storage: local tensor name -> stored dtype (tensors not listed are stored in ``compute``;
        non-float tensors are never cast, whatever is listed).
    :ivar granularity: scale granularity for tensors quantized on load (``"channel"``,
        ``"tensor"``, ``"block"`` or ``"none"`` for unscaled).
    :ivar kernel: for modules stored in another dtype than they compute in: ``"cast"`` (the cast
        rule hands the kernel compute-dtype tensors) or ``"native"`` (a native fp8 matmul, where
        the device has one; negotiated by the strategy).
    :ivar resident: keep a compute-dtype copy of cast weights resident (faster, more memory).
    :ivar reason: why, in a few words; shown in the plan.
    """

    compute: str
    storage: dict[str, str] = Field(default_factory=dict)
    granularity: str = "channel"
    kernel: str = "cast"
    resident: bool = False
    reason: str = ""


class Strategy(abc.ABC):
    """Base class of precision-strategy plugins.

    Set :attr:`name` and, if the strategy takes options, :attr:`Options` (a
    :class:`StrategyOptions` subclass). Implement :meth:`decide`; optionally :meth:`prepare`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions

    def __init__(self, **options: Any) -> None:
        try:
            self.options = self.Options(**options)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors()
            )
            allowed = ", ".join(self.Options.model_fields) or "none"
            raise StrategyError(
                f"invalid options for strategy {self.name!r}: {problems} (accepted options: {allowed})"
            ) from None
        self.decisions: list[tuple[str, str, str]] = []

    def build_dtype(self, checkpoint: CheckpointInfo, device: DeviceCaps) -> str:
        """The dtype most modules will compute in; the skeleton is constructed with it as the
        default dtype (as ``from_pretrained(dtype=...)`` does). Default: ``"float32"``."""
        return "float32"

    def prepare(self, ctx: ModelContext) -> None:
        """Called once per load before :meth:`decide`; record model-wide choices with :meth:`note`."""

    @abc.abstractmethod
    def decide(self, module: ModuleContext) -> ModuleDecision:
        """Return storage and compute dtypes for ``module``."""

    def note(self, subject: str, choice: str, reason: str) -> None:
        """Record a decision (shown in the plan with its reason)."""
        self.decisions.append((subject, choice, reason))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump(exclude_defaults=True).items())
        return f"strategy({self.name!r}{', ' if opts else ''}{opts})"
