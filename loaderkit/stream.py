"""Stage 4: stream tensors from the checkpoint, converting each one as the plan says.

Tensors are read one at a time from the format's reader (a lazy mmap view for safetensors), so a
tensor that needs no conversion is never copied and the checkpoint is never materialised twice.
Nothing is assigned to the model until every tensor has been read and converted: a failure midway
leaves the model exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .checkpoint import CheckpointInfo, QuantizedWeight, TensorReader
from .dtypes import is_fp8, to_torch
from .errors import CorruptCheckpointError, LoaderKitError, PluginError, name_checkpoint
from .manager import PluginManager
from .plan import Plan, TensorPlan

if TYPE_CHECKING:
    from .place import DiskWriter


@dataclass
class Loaded:
    """Converted tensors waiting to be assigned: ``tensors`` by model key, ``scales`` by
    ``(module name, buffer name)``."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    scales: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)


def read_all(
    plan: Plan,
    reader: TensorReader,
    manager: PluginManager,
    writer: "DiskWriter | None" = None,
    offload_buffers: bool = False,
    progress=None,
) -> Loaded:
    """Read and convert every planned tensor. Returns them unassigned.

    Tensors planned for ``"disk"`` go to ``writer`` as they stream (or are pointed at in their
    safetensors file when they need no conversion) and are represented in the result by meta
    tensors of their storage dtype, which accelerate's offload hooks fill at forward time.
    """
    out = Loaded()
    for tp in plan.tensors.values():
        if tp.device == "disk" and writer is not None and _point_at_source(tp, plan, writer):
            out.tensors[tp.key] = _meta_like(tp)
            continue
        tensor, scale = _read_one(tp, plan, reader, manager)
        mod, _, local = tp.key.rpartition(".")
        if tp.device == "disk" and writer is not None:
            for k in (tp.key, *tp.also):
                writer.write(k, tensor)
            tensor = _meta_like(tp)
            if scale is not None and offload_buffers:
                writer.write(f"{mod}.{local}_scale" if mod else f"{local}_scale", scale)
                scale = torch.empty_like(scale, device="meta")
        elif tp.device not in ("cpu", "disk"):
            tensor = tensor.to(tp.device)
            scale = None if scale is None else scale.to(tp.device)
        out.tensors[tp.key] = tensor
        if scale is not None:
            out.scales[(mod, f"{local}_scale")] = scale
        if progress is not None:
            progress(tp.nbytes)
    return out


def _read_one(tp: TensorPlan, plan: Plan, reader: TensorReader, manager: PluginManager):
    if tp.conversion == "none" or not isinstance(reader, Source):
        return convert(tp, reader.get(tp.source), plan.checkpoint, reader, manager)
    raw = reader.read(tp.source)  # may live in a buffer the next read reuses
    tensor, scale = convert(tp, raw, plan.checkpoint, reader, manager)
    if raw.numel() and tensor.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
        tensor = tensor.clone()  # a conversion that returned its input: keep a private copy
    return tensor, scale


class Source:
    """A format's reader whose every read is checked and whose every error names the culprit.

    :param reader: what the format plugin's ``open`` returned.
    :param checkpoint: the checkpoint being read.
    :param plugin: the name of the format's plugin.
    """

    def __init__(self, reader: TensorReader, checkpoint: CheckpointInfo, plugin: str) -> None:
        if not callable(getattr(reader, "get", None)) or not callable(getattr(reader, "close", None)):
            raise PluginError(
                f"format plugin {plugin!r} opened {checkpoint.path} as {type(reader).__name__}, which has "
                "no get(name) and close() methods",
                plugin=plugin,
                path=checkpoint.path,
            )
        self.reader, self.checkpoint, self.plugin = reader, checkpoint, plugin

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as stored (a zero-copy view where the format gives one), checked."""
        return self._fetch(key, self.reader.get)

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` for a conversion: formats with an optional ``read(name)`` serve it
        without mapping it (possibly in a buffer the next ``read`` reuses); others use ``get``."""
        return self._fetch(key, getattr(self.reader, "read", None) or self.reader.get)

    def _fetch(self, key: str, fn) -> torch.Tensor:
        ckpt = self.checkpoint
        info = ckpt.tensors[key]
        try:
            raw = fn(key)
        except LoaderKitError as exc:
            raise name_checkpoint(exc, ckpt.path, self.plugin)
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{ckpt.path}: cannot read tensor {key!r} from {info.file} (format plugin "
                f"{self.plugin!r}): {type(exc).__name__}: {exc}",
                path=ckpt.path,
                tensor=key,
                plugin=self.plugin,
            ) from exc
        if not isinstance(raw, torch.Tensor):
            raise PluginError(
                f"format plugin {self.plugin!r} returned {type(raw).__name__} for tensor {key!r} of "
                f"{ckpt.path}, not a torch.Tensor",
                plugin=self.plugin,
                path=ckpt.path,
                tensor=key,
            )
        if tuple(raw.shape) != info.shape or raw.dtype != info.torch_dtype:
            raise CorruptCheckpointError(
                f"{ckpt.path}: tensor {key!r} in {info.file} reads as {str(raw.dtype)} "
                f"{list(raw.shape)} but its header says {info.dtype} {list(info.shape)}",
                path=ckpt.path,
                tensor=key,
                plugin=self.plugin,
            )
        return raw

    def close(self) -> None:
        self.reader.close()


def _point_at_source(tp: TensorPlan, plan: Plan, writer: "DiskWriter") -> bool:
    """Offload without copying: point the offload index at the tensor in its safetensors file."""
    info = plan.checkpoint.tensors[tp.source]
    if tp.conversion != "none" or tp.companions or not info.file.endswith(".safetensors"):
        return False
    path = str(Path(plan.checkpoint.root) / info.file)
    for k in (tp.key, *tp.also):
        writer.point(k, path, tp.source, tp.target_dtype)
    return True


def _meta_like(tp: TensorPlan) -> torch.Tensor:
    return torch.empty(tp.shape, dtype=to_torch(tp.target_dtype), device="meta")


def convert(
    tp: TensorPlan, raw: torch.Tensor, ckpt: CheckpointInfo, reader: TensorReader, manager: PluginManager
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Convert one raw tensor as planned. Returns ``(tensor, scale or None)``."""
    target = to_torch(tp.target_dtype)
    if tp.conversion == "none":
        if tp.companions:
            return raw, _scale_buffer(ckpt, tp.source, reader)
        return raw, None
    if tp.conversion == "cast":
        if is_fp8(tp.stored_dtype):
            from .quant import upcast

            return upcast(raw, target), None
        return raw.to(target), None
    if tp.conversion == "dequantize":
        q = ckpt.quantization
        entry = manager.get("schemes", q.scheme)
        if entry is None:
            raise LoaderKitError(
                f"{ckpt.path}: scheme {q.scheme!r} that described the checkpoint is no longer registered",
                path=ckpt.path,
            )
        qw: QuantizedWeight = q.weights[tp.source]
        companions = {k: reader.get(k) for k in tp.companions}
        try:
            out = manager.call(entry, entry.obj.dequantize, qw, raw, companions, target)
        except LoaderKitError as exc:
            raise name_checkpoint(exc, ckpt.path, entry.plugin)
        if not isinstance(out, torch.Tensor):
            raise PluginError(
                f"scheme {q.scheme!r} of plugin {entry.plugin!r} dequantized {tp.source!r} of "
                f"{ckpt.path} to {type(out).__name__}, not a torch.Tensor",
                plugin=entry.plugin,
                path=ckpt.path,
                tensor=tp.source,
            )
        if out.dtype != target or tuple(out.shape) != tp.shape:
            raise LoaderKitError(
                f"scheme {q.scheme!r} dequantized {tp.source!r} to {out.dtype} {list(out.shape)}, "
                f"expected {target} {list(tp.shape)}",
                plugin=entry.plugin,
                tensor=tp.source,
            )
        return out, None
    if tp.conversion == "quantize":
        from .quant import quantize

        q, scale = quantize(raw, target, granularity=tp.granularity or "channel")
        return q, None if (tp.granularity or "channel") == "none" else scale
    raise LoaderKitError(f"unknown conversion {tp.conversion!r} planned for {tp.key!r}")


def _scale_buffer(ckpt: CheckpointInfo, source: str, reader: TensorReader) -> torch.Tensor:
    """The scale of a kept fp8 weight, as a float32 multiplier."""
    qw = ckpt.quantization.weights[source]
    s = reader.get(qw.scale)
    if qw.scale_encoding == "ue8m0":
        if s.dtype == torch.uint8:
            s = torch.exp2(s.to(torch.float32) - 127.0)
        else:
            s = s.to(torch.float32)
    else:
        s = s.to(torch.float32)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise CorruptCheckpointError(
            f"{ckpt.path}: scale {qw.scale!r} of {source!r} holds NaN, Inf or negative values",
            path=ckpt.path,
            tensor=qw.scale,
        )
    return s


def assign(model: torch.nn.Module, plan: Plan, loaded: Loaded) -> None:
    """Put every loaded tensor into the model (tied keys share one parameter), then scales."""
    named = dict(model.named_modules(remove_duplicate=False))
    for key, tensor in loaded.tensors.items():
        tp = plan.tensors[key]
        value = None
        for k in (key, *tp.also):
            mod_name, _, local = k.rpartition(".")
            module = named[mod_name]
            if local in module._parameters:
                if value is None or not isinstance(value, torch.nn.Parameter):
                    grad = tensor.is_floating_point() and not is_fp8(tp.target_dtype)
                    value = torch.nn.Parameter(tensor, requires_grad=grad)
                module._parameters[local] = value
            else:
                module._buffers[local] = tensor if value is None else value.data
    for (mod_name, name), scale in loaded.scales.items():
        module = named[mod_name]
        if name in module._parameters or name in module._buffers:
            module._buffers.pop(name, None)
            module._parameters.pop(name, None)
        module.register_buffer(name, scale, persistent=True)


def meta_leftovers(model: torch.nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device."""
    out = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    out += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    return out
