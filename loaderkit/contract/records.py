"""The typed, immutable records that flow through the pipeline and into plugins.

Every record is a frozen pydantic model whose mappings are read-only (:class:`FrozenDict`) and
whose sequences are tuples, so a record handed to a plugin cannot be changed behind the
pipeline's back: a changed record is a new record (:meth:`Frozen.replace`).

This module imports nothing from the pipeline; plugin authors reach it through
:mod:`loaderkit.plugin`.
"""

from __future__ import annotations

import copy
import functools
import re
from typing import Annotated, Any, Callable, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from .dtypes import to_torch

#: scale granularities of quantized weights (``"none"``: unscaled fp8).
Granularity = Literal["none", "tensor", "channel", "row", "block"]
#: how a stored scale is encoded: ordinary floats, or power-of-two bytes (``2**(byte - 127)``).
ScaleEncoding = Literal["float", "ue8m0"]


class FrozenDict(dict):
    """A ``dict`` that refuses every change; what records hold instead of plain dicts.

    It is a real ``dict`` (JSON, ``isinstance`` and pydantic serialisation work), pickles and
    deep-copies as itself, and raises :class:`TypeError` on any mutation.
    """

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "loaderkit records are immutable: this mapping is read-only; make a changed copy "
            "with record.replace(field=...) instead"
        )

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __reduce__(self):
        return (type(self), (dict(self),))

    def __copy__(self) -> "FrozenDict":
        return self

    def __deepcopy__(self, memo: dict) -> "FrozenDict":
        return type(self)({k: copy.deepcopy(v, memo) for k, v in self.items()})


class FrozenList(list):
    """A ``list`` that refuses every change (the lists inside frozen configs and details)."""

    __slots__ = ()

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("loaderkit records are immutable: this list is read-only")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __reduce__(self):
        return (type(self), (list(self),))

    def __copy__(self) -> "FrozenList":
        return self

    def __deepcopy__(self, memo: dict) -> "FrozenList":
        return type(self)(copy.deepcopy(v, memo) for v in self)


def freeze(value: Any) -> Any:
    """A deeply read-only copy of JSON-like data: dicts become :class:`FrozenDict`, lists
    :class:`FrozenList` (both still compare equal to the plain ones)."""
    if isinstance(value, FrozenDict | FrozenList) and _deeply_frozen(value):
        return value
    if isinstance(value, dict):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return FrozenList(freeze(v) for v in value)
    return value


def _deeply_frozen(value: Any) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return all(
        isinstance(v, FrozenDict | FrozenList) and _deeply_frozen(v) if isinstance(v, dict | list) else True
        for v in items
    )


def thaw(value: Any) -> Any:
    """A plain, mutable deep copy of frozen JSON-like data (what a library's config reader takes)."""
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, list):
        return [thaw(v) for v in value]
    return value


def _shallow_frozen(value: dict) -> FrozenDict:
    return value if isinstance(value, FrozenDict) else FrozenDict(value)


#: annotation of a read-only mapping field: ``ReadOnly[dict[str, X]]``.
class _ReadOnlyFactory:
    def __getitem__(self, tp: Any) -> Any:
        return Annotated[tp, AfterValidator(_shallow_frozen)]


ReadOnly = _ReadOnlyFactory()
#: a deeply read-only JSON-like mapping (configs, details).
FrozenJSON = Annotated[dict[str, Any], AfterValidator(freeze)]


_new = object.__new__
_set = object.__setattr__


def _defaults(cls: type[BaseModel]) -> dict[str, Any]:
    """Field name -> default (``None`` stands in for required fields), in field order; cached."""
    cached = cls.__dict__.get("_checked_defaults")
    if cached is None:
        cached = {}
        for name, field in cls.model_fields.items():
            if field.default_factory is not None:
                raise TypeError(f"{cls.__name__}.{name} has a default factory; build it with the constructor")
            cached[name] = None if field.is_required() else field.default
        type.__setattr__(cls, "_checked_defaults", cached)
    return cached


class Frozen(BaseModel):
    """Base of loaderkit's immutable records: frozen, no unknown fields, read-only mappings."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    @classmethod
    def from_checked(cls, **values: Any):
        """A record made from values its caller has already checked, without validating them.

        For parsers that check every value themselves (the safetensors header parser, the fp8
        scale pairing) and make tens of thousands of records: half the constructor's cost. Fields
        left out take their defaults. The values must already be of the field types (tuples for
        tuples; a mapping field needs a :class:`FrozenDict`); an unknown field name is a
        ``TypeError``.
        """
        defaults = _defaults(cls)
        fields = {**defaults, **values}
        if len(fields) != len(defaults):
            raise TypeError(f"{cls.__name__} has no field(s) {sorted(values.keys() - defaults.keys())}")
        record = _new(cls)
        _set(record, "__dict__", fields)
        _set(record, "__pydantic_fields_set__", set(values))
        _set(record, "__pydantic_extra__", None)
        _set(record, "__pydantic_private__", None)
        return record

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (validated like a new record)."""
        data = {k: getattr(self, k) for k in type(self).model_fields}
        data.update(changes)
        return type(self)(**data)


class TensorInfo(Frozen):
    """One stored tensor, described from the header.

    :ivar name: the key in the checkpoint.
    :ivar shape: the stored shape.
    :ivar dtype: the stored dtype as a loaderkit dtype name (``"bfloat16"``, ``"float8_e4m3fn"``).
    :ivar file: the file holding it, relative to :attr:`CheckpointInfo.root`.
    :ivar nbytes: bytes on disk.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str
    nbytes: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return to_torch(self.dtype)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class QuantizedWeight(Frozen):
    """How one quantized weight tensor decodes: ``W = q.to(float32) * scale`` (broadcast).

    :ivar weight: key of the quantized tensor.
    :ivar scale: key of its scale tensor (a multiplier), or ``None`` for unscaled fp8.
    :ivar input_scale: key of its static activation scale, if the checkpoint has one.
    :ivar granularity: ``"none"``, ``"tensor"``, ``"channel"`` or ``"block"``.
    :ivar block: the block shape for ``"block"`` granularity (ceil-division grid).
    :ivar scale_encoding: ``"float"`` for ordinary scales, ``"ue8m0"`` for power-of-two bytes.
    """

    weight: str
    scale: str | None = None
    input_scale: str | None = None
    granularity: Granularity = "none"
    block: tuple[int, int] | None = None
    scale_encoding: ScaleEncoding = "float"


class QuantizationInfo(Frozen):
    """What a scheme plugin recognised in a checkpoint.

    :ivar scheme: the registered scheme's name (``"fp8-block"``, ...).
    :ivar family: a human name for the writer family (``"DeepSeek-V3 block fp8"``).
    :ivar granularity: the dominant scale granularity.
    :ivar weights: quantized weight key -> how it decodes.
    :ivar auxiliary: keys that are not model tensors (markers) and are dropped on load.
    :ivar details: free-form facts shown by ``inspect`` (config excerpts, ignored layers).
    :ivar refused: set when the scheme recognised a layout it cannot decode (another library's
        quantization, a config no scheme understands): why, and what to do. ``inspect`` shows
        it; ``plan``, ``load`` and ``convert`` refuse the checkpoint with it, before reading data.
    """

    scheme: str
    family: str
    granularity: Granularity
    weights: ReadOnly[dict[str, QuantizedWeight]]
    auxiliary: tuple[str, ...] = ()
    details: FrozenJSON = Field(default_factory=dict)
    refused: str = ""

    def companion_keys(self) -> set[str]:
        """Keys that travel with a weight (scales) rather than being model tensors themselves."""
        keys: set[str] = set(self.auxiliary)
        for q in self.weights.values():
            keys.update(k for k in (q.scale, q.input_scale) if k)
        return keys


class CheckpointInfo(Frozen):
    """A checkpoint, described from headers alone.

    :ivar path: the path the user gave, made absolute.
    :ivar root: the directory relative to which :attr:`files` and :attr:`TensorInfo.file` are given.
    :ivar format: the name of the format plugin that claimed it.
    :ivar files: the data files, relative to :attr:`root`.
    :ivar tensors: every tensor key -> its description, in file order.
    :ivar metadata: header or index metadata (string values).
    :ivar config: the parsed ``config.json`` beside the weights, if any (read-only; builders
        pass :func:`thaw` of it to their library).
    :ivar quantization: what a scheme plugin recognised, if anything.
    """

    path: str
    root: str
    format: str
    files: tuple[str, ...]
    tensors: ReadOnly[dict[str, TensorInfo]]
    metadata: ReadOnly[dict[str, str]] = Field(default_factory=dict)
    config: FrozenJSON | None = None
    quantization: QuantizationInfo | None = None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtype_bytes(self) -> dict[str, int]:
        """Bytes stored per dtype name, largest first."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly summary (what ``loaderkit inspect`` prints)."""
        q = self.quantization
        return {
            "path": self.path,
            "format": self.format,
            "files": list(self.files),
            "tensors": len(self.tensors),
            "total_bytes": self.total_bytes,
            "dtypes": self.dtype_bytes(),
            "metadata": thaw(self.metadata),
            "config": _config_summary(self.config),
            "quantization": None
            if q is None
            else {
                "scheme": q.scheme,
                "family": q.family,
                "granularity": q.granularity,
                "quantized_tensors": len(q.weights),
                "details": thaw(q.details),
                **({"refused": q.refused} if q.refused else {}),
            },
        }


def _config_summary(config: dict | None) -> dict | None:
    if not config:
        return None
    keys = ("architectures", "model_type", "_class_name", "_diffusers_version", "torch_dtype", "dtype")
    return {k: thaw(config[k]) for k in keys if k in config}


class DeviceCaps(Frozen):
    """What one device can do (answered by the ``loaderkit_device_capabilities`` hook).

    :ivar device: the torch device string (``"cpu"``, ``"cuda:0"``).
    :ivar kind: ``"cpu"``, ``"cuda"`` or another torch device type.
    :ivar name: a human description (CPU model, GPU name).
    :ivar compute_dtypes: dtypes the device can run matmuls/convolutions in at all.
    :ivar fast_dtypes: of those, the ones with native hardware support (no emulation penalty).
    :ivar fp8_matmul: native scaled fp8 matmul (``torch._scaled_mm``; CUDA sm >= 8.9).
    :ivar capability: CUDA compute capability, if any.
    :ivar notes: facts that informed the above (CPU flags, measured ratios).
    :ivar speeds: times measured on this device relative to the same work in float32 (below 1:
        faster), by name; the built-in CPU probe measures ``"bfloat16"`` and ``"float16"`` (a
        linear + GELU + layer-norm block) and ``"fp8-bfloat16-rows1"`` / ``"fp8-bfloat16-rows128"``
        (an fp8 Linear weight decoded and applied to 1 and 128 rows of activations in bfloat16,
        against the same in float32). Empty where nothing was measured.
    """

    device: str
    kind: str
    name: str = ""
    compute_dtypes: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")
    fast_dtypes: tuple[str, ...] = ("float32",)
    fp8_matmul: bool = False
    capability: tuple[int, int] | None = None
    notes: tuple[str, ...] = Field(default_factory=tuple)
    speeds: ReadOnly[dict[str, float]] = Field(default_factory=dict)

    def is_fast(self, dtype: str) -> bool:
        return dtype in self.fast_dtypes


class FusedTensor(Frozen):
    """One model tensor the model's library builds from several checkpoint tensors
    (transformers 5 fuses per-expert ``w1``/``w3`` into ``experts.gate_up_proj``).

    :ivar key: the model's state-dict key.
    :ivar sources: the checkpoint keys it is made of, in the order the library reads them.
    :ivar transform: what the library does with them, in words (its operations).
    :ivar shape: the shape the library's operations give, where it is known from the headers
        alone; it is then checked against the model's at plan time (otherwise as it is built).
    :ivar per_row: when each index of dimension 0 is made from its own sources alone (stacked
        experts: index ``e`` from expert ``e``'s tensors), those sources, per index; empty
        otherwise. ``KeyMap.run(key, fetch, rows=(a, b))`` then builds indices ``a..b-1`` from
        theirs only: what one rank of a parallel load reads.
    :ivar cat_dim: for a :attr:`per_row` tensor, how a part of an index is made of parts of its
        sources (what a tensor-parallel rank reads): ``0`` when each index is one source
        stacked as it is (the fused dimension ``d`` is the source's ``d - 1``); ``c >= 1`` when
        each index's sources lie side by side, in :attr:`per_row` order, along the fused
        dimension ``c`` (``experts.gate_up_proj``: ``w1`` then ``w3`` along dimension 1);
        ``-1`` when unknown (a part of an index is then built from its sources read whole).
    """

    key: str
    sources: tuple[str, ...]
    transform: str
    shape: tuple[int, ...] | None = None
    per_row: tuple[tuple[str, ...], ...] = ()
    cat_dim: int = -1


class KeyMap(Frozen):
    """How the model's library maps a checkpoint's keys onto its model (``ModelFacts.key_mapping``).

    :ivar renamed: checkpoint key -> model key, where they differ (one to one).
    :ivar fused: model key -> the checkpoint tensors it is built from (many to one).
    :ivar run: ``run(model_key, fetch)`` builds a fused tensor, reading each source with
        ``fetch(checkpoint_key)``, by the library's own code; returns ``{model_key: tensor}``.
        For a tensor with :attr:`FusedTensor.per_row`, ``run(model_key, fetch, rows=(a, b))``
        builds only indices ``a..b-1`` of its dimension 0.
        A model tensor made from *one* checkpoint tensor by an operation (a slice of a fused
        ``qkv`` weight, a transposed matrix) is a fused tensor with one source: several model
        tensors may share a source, each reading its own part of it.
    :ivar ignored: checkpoint key -> why the library's conversion leaves it out (the tensors of
        another component in a file that holds a whole pipeline); recorded in the plan.
    """

    renamed: ReadOnly[dict[str, str]] = Field(default_factory=dict)
    fused: ReadOnly[dict[str, FusedTensor]] = Field(default_factory=dict)
    ignored: ReadOnly[dict[str, str]] = Field(default_factory=dict)
    run: Callable[..., dict[str, torch.Tensor]] | None = None


class ModelFacts(Frozen):
    """What a model's library declares about it; merged from every ``loaderkit_model_facts`` answer.

    :ivar keep_fp32: module-name patterns kept in float32 under bf16/fp16 (``_keep_in_fp32_modules``;
        a pattern matches a module whose qualified name contains it as a dotted component run).
    :ivar keep_fp32_fp16: patterns (matched like ``keep_fp32``) kept in float32 only when the
        compute dtype is float16 (transformers' non-strict ``_keep_in_fp32_modules``).
    :ivar skip_low_precision: regexes of modules never stored in fp8
        (``_skip_layerwise_casting_patterns``).
    :ivar ignore_unexpected: regexes of checkpoint keys to ignore when the model lacks them.
    :ivar ignore_missing: regexes of model keys the checkpoint may lack.
    :ivar tied: target key -> source key of tied parameters (the target is not loaded; it is tied).
    :ivar no_split: module class names accelerate must not split across devices.
    :ivar finalize: callables run on the loaded model (``tie_weights`` and the like).
    :ivar dtype_source: modules the library reads the model's dtype from (``model.dtype`` is
        the dtype of the first floating parameter in transformers and diffusers): they are never
        stored in a storage-only dtype, so ``model.dtype`` stays the compute dtype.
    :ivar linear_types: class names the library uses as linear layers (transformers' GPT-2
        ``Conv1D``, a Linear with a transposed weight): strategies see them as ``"linear"``.
    :ivar stacked_linear: model keys of parameters that are stacks of Linear weights
        ``[..., out, in]`` read by their module's own forward (transformers 5's fused MoE experts,
        ``experts.gate_up_proj``): strategies may store them in fp8 with one scale per row
        (granularity ``"row"``), and a cast rule covers their module.
    :ivar initialize: the library's own initializer of parameters it allows a checkpoint to
        lack and computes itself (Marian's sinusoidal position tables, which ``save_pretrained``
        leaves out): ``initialize(model, keys)`` fills them in place, as ``from_pretrained`` does.
    :ivar key_mapping: the library's own key conversions: ``key_mapping(tensors)`` gets the
        checkpoint's tensor descriptions (a read-only mapping of key -> :class:`TensorInfo`, scales
        and markers left out; iterating it gives the keys) and returns a :class:`KeyMap` (renamed
        and fused tensors), or ``None`` when the library converts none.
    :ivar low_precision_advice: non-empty when the library's model is sensitive to low-precision
        storage as a whole (a VAE): why. fp8 strategies keep such a model in its compute dtype
        unless asked otherwise, and say so in the plan.
    :ivar tp_plan: the library's own tensor-parallel plan: ``tp_plan(degree)`` returns module
        name patterns (``*`` matches one name component) -> a ``torch.distributed.tensor.parallel``
        style, or ``None`` for modules left replicated; it raises a :class:`LoaderKitError` when
        the model cannot be split ``degree`` ways (heads not divisible) or uses a style it cannot
        express. ``load(..., parallelize="tp")`` applies it.
    :ivar source: who declared these facts.
    """

    keep_fp32: tuple[str, ...] = ()
    keep_fp32_fp16: tuple[str, ...] = ()
    skip_low_precision: tuple[str, ...] = ()
    ignore_unexpected: tuple[str, ...] = ()
    ignore_missing: tuple[str, ...] = ()
    tied: ReadOnly[dict[str, str]] = Field(default_factory=dict)
    no_split: tuple[str, ...] = ()
    finalize: tuple[Callable[[torch.nn.Module], Any], ...] = ()
    dtype_source: tuple[str, ...] = ()
    linear_types: tuple[str, ...] = ()
    stacked_linear: tuple[str, ...] = ()
    low_precision_advice: str = ""
    key_mapping: Callable[[tuple[str, ...]], KeyMap] | None = None
    initialize: Callable[[torch.nn.Module, tuple[str, ...]], Any] | None = None
    tp_plan: Callable[[int], dict[str, Any]] | None = None
    source: tuple[str, ...] = ()

    @field_validator("skip_low_precision", "ignore_unexpected", "ignore_missing")
    @classmethod
    def _regexes(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ValueError(f"{p!r} is not a valid regular expression: {exc}") from None
        return patterns

    def merge(self, other: "ModelFacts") -> "ModelFacts":
        """Union of two fact sets (tuples concatenated without duplicates, dicts merged)."""

        def cat(a, b):
            return tuple(dict.fromkeys((*a, *b)))

        return ModelFacts(
            keep_fp32=cat(self.keep_fp32, other.keep_fp32),
            keep_fp32_fp16=cat(self.keep_fp32_fp16, other.keep_fp32_fp16),
            skip_low_precision=cat(self.skip_low_precision, other.skip_low_precision),
            ignore_unexpected=cat(self.ignore_unexpected, other.ignore_unexpected),
            ignore_missing=cat(self.ignore_missing, other.ignore_missing),
            tied={**self.tied, **other.tied},
            no_split=cat(self.no_split, other.no_split),
            finalize=cat(self.finalize, other.finalize),
            dtype_source=cat(self.dtype_source, other.dtype_source),
            linear_types=cat(self.linear_types, other.linear_types),
            stacked_linear=cat(self.stacked_linear, other.stacked_linear),
            low_precision_advice=self.low_precision_advice or other.low_precision_advice,
            key_mapping=self.key_mapping or other.key_mapping,
            initialize=self.initialize or other.initialize,
            tp_plan=self.tp_plan or other.tp_plan,
            source=cat(self.source, other.source),
        )

    def keeps_fp32(self, module_name: str, fp16: bool = False) -> bool:
        """True if ``module_name`` matches a ``keep_fp32`` pattern (or, with ``fp16``, a
        ``keep_fp32_fp16`` one): a run of dotted components equal to the pattern's."""
        patterns = (*self.keep_fp32, *(self.keep_fp32_fp16 if fp16 else ()))
        return bool(patterns) and _component_runs(patterns).search(module_name) is not None

    def skips_low_precision(self, module_name: str) -> bool:
        return any(re.search(p, module_name) for p in self.skip_low_precision)


@functools.lru_cache(maxsize=64)
def _component_runs(patterns: tuple[str, ...]) -> re.Pattern:
    """One regex matching a name in which some pattern is a run of whole dotted components."""
    return re.compile("|".join(rf"(?:^|\.){re.escape(p)}(?:\.|$)" for p in patterns))


class BuildRequest(Frozen):
    """What a builder gets.

    :ivar checkpoint: the checkpoint description (its ``config`` holds config.json).
    :ivar dtype: the dtype the strategy expects most parameters to compute in; builders use it as
        the default dtype while constructing, as the model libraries do in ``from_pretrained``.
    """

    checkpoint: CheckpointInfo
    dtype: str
