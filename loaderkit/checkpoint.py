"""Describing checkpoints: the typed records format plugins produce, and the format base classes.

A *format* (a container: one safetensors file, a sharded index, a torch zip) claims a path and
describes it from headers alone as a :class:`CheckpointInfo`. A *scheme* (a quantization family,
such as block-scaled fp8) then recognises how the tensors encode weights and records it as a
:class:`QuantizationInfo`. Neither reads tensor data until :meth:`Format.open` is used to stream.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field

from .dtypes import to_torch
from .errors import CorruptCheckpointError


class Frozen(BaseModel):
    """Base of loaderkit's immutable records: frozen, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


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
    granularity: str = "none"
    block: tuple[int, int] | None = None
    scale_encoding: str = "float"


class QuantizationInfo(Frozen):
    """What a scheme plugin recognised in a checkpoint.

    :ivar scheme: the registered scheme's name (``"fp8-block"``, ...).
    :ivar family: a human name for the writer family (``"DeepSeek-V3 block fp8"``).
    :ivar granularity: the dominant scale granularity.
    :ivar weights: quantized weight key -> how it decodes.
    :ivar auxiliary: keys that are not model tensors (markers) and are dropped on load.
    :ivar details: free-form facts shown by ``inspect`` (config excerpts, ignored layers).
    """

    scheme: str
    family: str
    granularity: str
    weights: dict[str, QuantizedWeight]
    auxiliary: tuple[str, ...] = ()
    details: dict[str, Any] = Field(default_factory=dict)

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
    :ivar config: the parsed ``config.json`` beside the weights, if any.
    :ivar quantization: what a scheme plugin recognised, if anything.
    """

    path: str
    root: str
    format: str
    files: tuple[str, ...]
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] | None = None
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
            "metadata": self.metadata,
            "config": _config_summary(self.config),
            "quantization": None
            if q is None
            else {
                "scheme": q.scheme,
                "family": q.family,
                "granularity": q.granularity,
                "quantized_tensors": len(q.weights),
                "details": q.details,
            },
        }


def _config_summary(config: dict | None) -> dict | None:
    if not config:
        return None
    keys = ("architectures", "model_type", "_class_name", "_diffusers_version", "torch_dtype", "dtype")
    return {k: config[k] for k in keys if k in config}


class TensorReader(Protocol):
    """Streams tensors of one opened checkpoint. Returned by :meth:`Format.open`.

    A reader may also offer ``read(name) -> torch.Tensor``: the tensor's bytes read into a
    buffer rather than mapped, valid until the next ``read``. loaderkit uses it for tensors it
    converts, so that their source pages do not stay resident after use; without it, ``get``
    serves every tensor.
    """

    def get(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` on the CPU, as stored (zero-copy from a mmap where possible)."""

    def close(self) -> None:
        """Release files and maps."""


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


class Scheme(abc.ABC):
    """Base class of quantization-scheme plugins (how quantized weights are encoded).

    Register an instance from ``loaderkit_register_schemes``. Schemes are asked in descending
    :attr:`priority`; the first that returns a :class:`QuantizationInfo` from :meth:`detect` wins.
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


def read_json(path: Path, what: str = "JSON file") -> Any:
    """Parse a JSON file, raising :class:`CorruptCheckpointError` that names it on failure."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{what} {path} is not valid UTF-8 JSON: {exc}", path=path) from exc
    except RecursionError:
        raise CorruptCheckpointError(f"{what} {path} nests JSON too deeply to be a real file", path=path) from None
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read {what} {path}: {exc}", path=path) from exc
