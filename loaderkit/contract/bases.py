"""The base classes plugins subclass, and the records a strategy sees and returns.

* :class:`Format` claims a path, describes it from headers and opens a :class:`TensorReader`.
* :class:`Scheme` recognises how quantized weights are encoded and decodes them.
* :class:`Builder` makes an empty model skeleton from a checkpoint's config.
* :class:`Strategy` decides, module by module, storage and compute dtypes
  (:class:`ModuleDecision`), seeing a :class:`BuildContext`, a :class:`ModelContext` and one
  :class:`ModuleContext` per module.

Every record here is validated when it is made: a strategy that returns a misspelt granularity
or kernel fails at plan time, named, instead of at load time. Nothing here imports the pipeline.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from ..errors import StrategyError
from .dtypes import dtype_name, to_torch
from .modules import ModuleKind
from .records import (
    BuildRequest,
    CheckpointInfo,
    DeviceCaps,
    Frozen,
    Granularity,
    ModelFacts,
    QuantizationInfo,
    QuantizedWeight,
    ReadOnly,
    TensorInfo,
)

#: how a module whose storage differs from its compute dtype runs its kernel.
Kernel = Literal["cast", "native"]


# -- formats -------------------------------------------------------------------------------------


class TensorReader(abc.ABC):
    """Streams the tensors of one opened checkpoint; what :meth:`Format.open` returns.

    :meth:`get` and :meth:`close` are required. :meth:`read` is optional: a reader may override
    it to read a tensor's bytes into a buffer (valid until the next ``read``) instead of mapping
    them; loaderkit uses it for tensors it converts, so their source pages do not stay resident.
    The default serves :meth:`get`. A reader is a context manager that closes on exit.
    """

    @abc.abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` on the CPU, as stored (zero-copy from a mmap where possible)."""

    def read(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` for a conversion (default: :meth:`get`)."""
        return self.get(name)

    def read_box(self, name: str, box: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """Return a private copy of the part ``box`` (``(start, stop)`` per dimension) of tensor
        ``name``: what one rank of a parallel load holds. Readers that can read only those bytes
        override it (the safetensors readers ``pread`` exactly the box); the default takes the
        box out of :meth:`get`, which maps the whole tensor."""
        return self.get(name)[tuple(slice(a, b) for a, b in box)].clone()

    def reads_box(self, name: str) -> bool:
        """Whether :meth:`read_box` reads only the box's bytes of tensor ``name`` (default: no)."""
        return False

    @abc.abstractmethod
    def close(self) -> None:
        """Release files and maps."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Format(abc.ABC):
    """Base class of format plugins (containers of tensors).

    Subclass it, set :attr:`name`, implement :meth:`claim`, :meth:`describe` and :meth:`open`,
    and register an instance from ``loaderkit_register_formats``.
    """

    #: unique name, shown in plans and ``loaderkit plugins``.
    name: ClassVar[str] = ""
    #: one line shown by ``loaderkit plugins``.
    description: ClassVar[str] = ""
    #: formats are asked in descending priority; the first whose :meth:`claim` is true wins.
    priority: ClassVar[int] = 0

    @abc.abstractmethod
    def claim(self, path: Path) -> bool:
        """Cheaply decide (from names, or a few leading bytes) whether this format reads ``path``."""

    @abc.abstractmethod
    def describe(self, path: Path) -> CheckpointInfo:
        """Describe the checkpoint from headers alone; never read tensor data."""

    @abc.abstractmethod
    def open(self, checkpoint: CheckpointInfo) -> TensorReader:
        """Open the checkpoint for streaming; the caller closes the returned reader."""

    def output_names(self, checkpoint: CheckpointInfo, count: int) -> tuple[tuple[str, ...], str | None]:
        """The safetensors file names (and index name, for ``count > 1``) ``convert`` gives a
        directory copy of ``checkpoint`` in ``count`` shards. Default: ``model.safetensors`` /
        ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``; a format whose
        files are named by a library's convention answers with that convention."""
        return shard_names("model", count)


def shard_names(stem: str, count: int) -> tuple[tuple[str, ...], str | None]:
    """``stem.safetensors``, or ``count`` shards named as huggingface_hub names them, with an index."""
    if count == 1:
        return (f"{stem}.safetensors",), None
    return (
        tuple(f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)),
        f"{stem}.safetensors.index.json",
    )


class Scheme(abc.ABC):
    """Base class of quantization-scheme plugins (how quantized weights are encoded).

    Register an instance from ``loaderkit_register_schemes``. Schemes are asked in descending
    :attr:`priority`; the first that returns a :class:`QuantizationInfo` from :meth:`detect` wins.
    The scheme that described a checkpoint decodes its weights (:meth:`dequantize`) and the
    scales of the weights kept as stored (:meth:`decode_scale`).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    priority: ClassVar[int] = 0

    @abc.abstractmethod
    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        """Recognise the scheme from the config, metadata, keys, shapes and dtypes; ``None`` if not."""

    @abc.abstractmethod
    def dequantize(
        self, q: QuantizedWeight, weight: torch.Tensor, tensors: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        """Decode ``weight`` to ``dtype``; ``tensors`` holds its companion tensors (scales) by key."""

    def encoder(self) -> "Encoder | None":
        """The writer of this scheme's on-disk layout, for ``convert`` (default: none — the
        scheme reads its layout but cannot write it)."""
        return None

    def dequantized_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """``config.json`` of a dequantized copy of a checkpoint this scheme described: the
        scheme's own quantization entries removed. Default: unchanged."""
        return config

    def decode_scale(self, q: QuantizedWeight, scale: torch.Tensor) -> torch.Tensor:
        """The stored scale of a weight kept as stored, as float32 multipliers (same shape).

        The default decodes :attr:`QuantizedWeight.scale_encoding`: ``"float"`` values as they
        are, ``"ue8m0"`` bytes (``uint8`` or ``float8_e8m0fnu``) as ``2**(byte - 127)``.
        """
        if q.scale_encoding == "ue8m0" and scale.dtype == torch.uint8:
            return torch.exp2(scale.to(torch.float32) - 127.0)
        return scale.to(torch.float32)


class EncodedTensor(Frozen):
    """One tensor an :class:`Encoder` writes: its name, dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = to_torch(self.dtype).itemsize
        for d in self.shape:
            n *= d
        return n


class Encoder(abc.ABC):
    """Writes one quantized on-disk layout (what ``convert`` produces), beside the
    :class:`Scheme` that reads it back (returned by :meth:`Scheme.encoder`).

    ``convert`` negotiates its plan *for* the encoder: a tensor the layout cannot hold in fp8
    (:meth:`holds`) is planned in its compute dtype, with the reason recorded, so ``loaderkit
    plan`` with the same layout shows exactly what ``convert`` writes. Then every tensor the
    plan quantizes becomes :meth:`outputs`, filled by :meth:`encode`.
    """

    #: the layout's name (``convert(..., layout=...)``).
    name: ClassVar[str] = ""
    #: the scale granularities the layout can express, the default first.
    granularities: ClassVar[tuple[str, ...]] = ("tensor",)

    @abc.abstractmethod
    def accepts(self, checkpoint: CheckpointInfo) -> bool:
        """Whether this is the natural layout for a copy of ``checkpoint`` (its config tells)."""

    @abc.abstractmethod
    def holds(self, module: ModuleContext, tensor: str, dtype: str) -> str:
        """``""`` if the layout can store ``module``'s ``tensor`` in the fp8 ``dtype``; else why not."""

    def check(self, plan: Any) -> None:
        """Refuse (raise :class:`loaderkit.ConvertError`) a plan the layout cannot write whole."""

    @abc.abstractmethod
    def outputs(self, tensor: Any, module: Any) -> tuple[EncodedTensor, ...]:
        """The tensors written for one quantized :class:`~loaderkit.plugin.TensorPlan` of the
        :class:`~loaderkit.plugin.ModulePlan` ``module``; the weight itself first."""

    @abc.abstractmethod
    def encode(self, tensor: Any, module: Any, q: torch.Tensor, scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The :meth:`outputs` filled from the quantized weight ``q`` and its float32 ``scale``."""

    @abc.abstractmethod
    def edit_config(self, config: dict[str, Any], plan: Any) -> dict[str, Any]:
        """``config.json`` for the copy (a plain dict), describing the layout to its readers."""


# -- builders ------------------------------------------------------------------------------------


class Builder(abc.ABC):
    """Base class of builder plugins: make an empty model skeleton from a checkpoint's config."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    priority: ClassVar[int] = 0

    @abc.abstractmethod
    def can_build(self, request: BuildRequest) -> bool:
        """True if this builder recognises the checkpoint's config (cheap; no imports if possible)."""

    @abc.abstractmethod
    def build(self, request: BuildRequest) -> torch.nn.Module:
        """Return the model with parameters on the meta device and real non-persistent buffers.

        Use :func:`loaderkit.plugin.meta_init` around the model's constructor.
        """

    def build_class(self, request: BuildRequest, cls: type) -> torch.nn.Module | None:
        """Build the class the user passed as ``model=`` for this checkpoint, or ``None`` to leave
        it to loaderkit (which calls ``cls()``). A builder answers for classes whose constructor
        needs a config it can find for this checkpoint; builders are asked in priority order.
        """
        return None


# -- strategies ----------------------------------------------------------------------------------


class StrategyOptions(BaseModel):
    """Base of every strategy's options model: unknown options are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class BuildContext(Frozen):
    """What a strategy sees before the skeleton exists (:meth:`Strategy.build_dtype`).

    :ivar checkpoint: the checkpoint description.
    :ivar device: capabilities of the execution device.
    :ivar strategies: the registered strategy classes by name (a blocked plugin's are absent);
        a strategy that delegates finds the others here, through :meth:`strategy`.
    """

    checkpoint: CheckpointInfo
    device: DeviceCaps
    strategies: ReadOnly[dict[str, Any]] = Field(default_factory=dict)

    def strategy(self, name: str, **options: Any) -> "Strategy | None":
        """A registered strategy made with ``options``, or ``None`` when none is registered
        under ``name`` (its plugin is blocked or not installed)."""
        cls = self.strategies.get(name)
        return None if cls is None else cls(**options)


class ModelContext(BuildContext):
    """What a strategy sees once per load, before any per-module decision (:meth:`Strategy.prepare`).

    :ivar facts: what the model's library declares (fp32 modules, skip patterns).

    Model-wide choices are recorded with :meth:`note`; they appear in the plan's decisions.
    """

    facts: ModelFacts
    _notes: list = PrivateAttr(default_factory=list)

    def note(self, subject: str, choice: str, reason: str) -> None:
        """Record a decision (shown in the plan with its reason)."""
        self._notes.append((str(subject), str(choice), str(reason)))

    @property
    def notes(self) -> tuple[tuple[str, str, str], ...]:
        return tuple(self._notes)


class ModuleContext(Frozen):
    """One module whose tensors a strategy places.

    :ivar name: qualified module name (``""`` for the root).
    :ivar type: the module's class name (``"Linear"``).
    :ivar kind: ``"linear"``, ``"conv"``, ``"embedding"``, ``"norm"`` or ``"other"``.
    :ivar tensors: the module's own parameters and persistent buffers (local name -> info of the
        tensor that will fill it, or of the planned tensor when the checkpoint lacks it).
    :ivar keep_fp32: the model library asks for this module to stay in float32.
    :ivar keep_fp32_fp16: the library asks for it to stay in float32 when computing in float16.
    :ivar skip_low_precision: the model's library asks for this module not to be stored in a
        low-precision format (``_skip_layerwise_casting_patterns``): a preference a strategy may
        let the user override.
    :ivar stacked_linear: local names of its tensors that are stacks of Linear weights
        (``ModelFacts.stacked_linear``: fused MoE experts), quantizable per row.
    :ivar locked: non-empty when the module *must* stay in its compute dtype for the model to
        run correctly — its parent reads its tensors or their dtype, or the library reads the
        model's dtype from it — and why. Never overridable.
    """

    name: str
    type: str
    kind: ModuleKind
    tensors: ReadOnly[dict[str, TensorInfo]]
    keep_fp32: bool = False
    keep_fp32_fp16: bool = False
    skip_low_precision: bool = False
    stacked_linear: tuple[str, ...] = ()
    locked: str = ""


class ModuleDecision(Frozen):
    """A strategy's answer for one module; every field is checked when it is made.

    :ivar compute: the dtype the module's kernel runs in.
    :ivar storage: local tensor name -> stored dtype (tensors not listed are stored in ``compute``;
        non-float tensors are never cast, whatever is listed).
    :ivar granularity: scale granularity for tensors quantized on load (``"channel"``,
        ``"tensor"``, ``"block"`` or ``"none"`` for unscaled).
    :ivar block: the block shape for ``"block"`` granularity (default
        :data:`loaderkit.plugin.DEFAULT_BLOCK`, 128x128).
    :ivar kernel: for modules stored in another dtype than they compute in: ``"cast"`` (the cast
        rule hands the kernel compute-dtype tensors) or ``"native"`` (a native fp8 matmul; the
        negotiator checks that the module, its weight and the device allow it, and records why
        not when they do not).
    :ivar resident: keep a compute-dtype copy of cast weights resident (faster, more memory).
    :ivar fold_scale: a Linear with per-channel fp8 weight scales applies them to its output
        instead of its weight (see :mod:`loaderkit.runtime`; same math, different rounding).
    :ivar reason: why, in a few words; shown in the plan.
    """

    compute: str
    storage: ReadOnly[dict[str, str]] = Field(default_factory=dict)
    granularity: Granularity = "channel"
    block: tuple[int, int] | None = None
    kernel: Kernel = "cast"
    resident: bool = False
    fold_scale: bool = False
    reason: str = ""

    @field_validator("compute", mode="before")
    @classmethod
    def _compute_name(cls, v: Any) -> str:
        return _checked_dtype(v)

    @field_validator("storage", mode="before")
    @classmethod
    def _storage_names(cls, v: Any) -> Any:
        return {k: _checked_dtype(d) for k, d in v.items()} if isinstance(v, dict) else v

    @field_validator("block")
    @classmethod
    def _positive_block(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError(f"block must be two positive integers, not {list(v)}")
        return v


def _checked_dtype(value: Any) -> str:
    from ..errors import LoaderKitError

    try:
        return dtype_name(value)
    except LoaderKitError as exc:
        raise ValueError(str(exc)) from None


class Strategy(abc.ABC):
    """Base class of precision-strategy plugins.

    Set :attr:`name` and, if the strategy takes options, :attr:`Options` (a
    :class:`StrategyOptions` subclass). Implement :meth:`decide`; optionally :meth:`build_dtype`
    and :meth:`prepare`. A strategy object holds only its options: whatever it works out for
    one load is returned by :meth:`prepare` and handed back to every :meth:`decide` call, so one
    object can plan several loads, also at once.
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

    def build_dtype(self, ctx: BuildContext) -> str:
        """The dtype most modules will compute in; the skeleton is constructed with it as the
        default dtype (as ``from_pretrained(dtype=...)`` does). Default: ``"float32"``."""
        return "float32"

    def prepare(self, ctx: ModelContext) -> Any:
        """Called once per load before :meth:`decide`; returns this load's state (default
        ``None``), which every :meth:`decide` call receives. Record model-wide choices with
        ``ctx.note(subject, choice, reason)``; raise :class:`loaderkit.PlanError` to refuse."""
        return None

    @abc.abstractmethod
    def decide(self, module: ModuleContext, state: Any) -> ModuleDecision:
        """Return storage and compute dtypes for ``module``; ``state`` is what :meth:`prepare`
        returned for this load."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump(exclude_defaults=True).items())
        return f"strategy({self.name!r}{', ' if opts else ''}{opts})"
