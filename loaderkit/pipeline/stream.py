"""Stages 6 and 7, stream and finalize: read tensors from the checkpoint, converting each one as the plan says, and
assign them to the model once all are read.

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

from ..contract.bases import TensorReader
from ..contract.dtypes import is_fp8, to_torch
from ..contract.layout import block_grid
from ..contract.plan import Plan, TensorPlan
from ..contract.records import CheckpointInfo, KeyMap, QuantizedWeight
from ..errors import BuildError, CorruptCheckpointError, LoaderKitError, PlanError, PluginError
from .discover import Entry, PluginManager

if TYPE_CHECKING:
    from .place import DiskWriter

#: a converting reader (``convert``) is reopened after this many bytes, releasing its maps.
RECYCLE_BYTES = 32 << 20


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
    keymap: KeyMap | None = None,
    zero_copy: bool = True,
    merges: dict | None = None,
) -> Loaded:
    """Read and convert every planned tensor. Returns them unassigned.

    ``zero_copy`` (the default) lets tensors that need no conversion stay views of the format's
    memory map: no copy, but a file rewritten in place afterwards changes them; ``False`` copies
    them into private memory.

    Tensors planned for ``"disk"`` go to ``writer`` as they stream (or are pointed at in their
    safetensors file when they need no conversion) and are represented in the result by meta
    tensors of their storage dtype, which accelerate's offload hooks fill at forward time.

    ``merges`` maps model keys to an object with ``read`` (the tensor plan to read it by) and
    ``apply(tensor) -> (tensor, scale)`` (what is stored): a LoRA merged while loading.
    """
    out = Loaded()
    for tp in plan.tensors.values():
        if tp.device == "disk" and writer is not None and _can_point_at_source(tp, plan):
            if is_fp8(tp.stored_dtype):  # not copied, but checked like a weight kept in memory
                _check_kept(reader.get(tp.source), None, tp, plan)
            _point_at_source(tp, plan, writer)
            out.tensors[tp.key] = _meta_like(tp)
            continue
        merge = (merges or {}).get(tp.key)
        tensor, scale = _read_one(merge.read if merge is not None else tp, plan, reader, manager, keymap)
        if merge is not None:
            tensor, scale = merge.apply(tensor)
        if tp.conversion == "none":
            _check_kept(tensor, scale, tp, plan)
        if not zero_copy and tp.conversion == "none" and not (tp.device == "disk" and writer is not None):
            tensor = tensor.clone()  # private memory: later changes to the file do not reach the model
            # (a tensor the library built from others may be a slice of the file too)
            scale = None if scale is None else scale.clone()  # a float32 scale may be a view too
        mod, _, local = tp.key.rpartition(".")
        if tp.device == "disk" and writer is not None:
            for k in (tp.key, *tp.also):
                writer.write(k, tensor)
            tensor = _meta_like(tp)
            if scale is not None and offload_buffers:
                writer.write(f"{mod}.{tp.scale}" if mod else tp.scale, scale)
                scale = torch.empty_like(scale, device="meta")
        elif tp.device not in ("cpu", "disk"):
            tensor = tensor.to(tp.device)
            scale = None if scale is None else scale.to(tp.device)
        out.tensors[tp.key] = tensor
        if scale is not None:
            out.scales[(mod, tp.scale)] = scale
        if progress is not None:
            progress(tp.nbytes)
    return out


def _read_one(tp: TensorPlan, plan: Plan, reader: TensorReader, manager: PluginManager, keymap: KeyMap | None = None):
    if tp.sources and tp.companions:
        return _fused_quantized(tp, plan, reader, manager, keymap)
    if tp.sources:
        return convert_tensor(tp, build_fused(tp, plan, reader, keymap), plan.checkpoint, reader, manager)
    if tp.conversion == "none" or not isinstance(reader, Source):
        return convert_tensor(tp, reader.get(tp.source), plan.checkpoint, reader, manager)
    chunked = _convert_in_row_blocks(tp, plan, reader)
    if chunked is not None:
        return chunked
    raw = reader.read(tp.source)  # may live in a buffer the next read reuses
    tensor, scale = convert_tensor(tp, raw, plan.checkpoint, reader, manager)
    if raw.numel() and tensor.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
        tensor = tensor.clone()  # a conversion that returned its input: keep a private copy
    return tensor, scale


#: a converted tensor of at least this many bytes is read and converted in row blocks ...
ROW_BLOCKS_MIN = 16 << 20
#: ... of about this many source bytes: the transient memory of its conversion.
ROW_BLOCK_BYTES = 4 << 20


def _convert_in_row_blocks(tp: TensorPlan, plan: Plan, reader: TensorReader):
    """``(tensor, scale)`` of a large cast, fp8 quantization with per-channel, per-row or block scales,
    or int8 quantization (per channel),
    read and converted one block of whole rows at a time straight into the final tensor (each
    row's result depends on its own row, or its own row of blocks, alone: the same bits as the
    whole-tensor conversion); ``None`` when ``tp`` is not such a conversion or the reader cannot
    read rows alone."""
    info = plan.checkpoint.tensors[tp.source]
    if (info.nbytes < ROW_BLOCKS_MIN or len(info.shape) < 2 or not info.shape[0] or not isinstance(reader, Source)
            or not reader.reads_box(tp.source) or info.torch_dtype.itemsize == 1):
        return None
    target = to_torch(tp.target_dtype)
    gran = tp.granularity or "channel"
    int8 = tp.conversion == "quantize" and target == torch.int8
    if int8 and len(info.shape) != 2:
        return None
    if tp.conversion == "quantize" and not int8 and (target.itemsize != 1 or not target.is_floating_point
                                                     or gran not in ("channel", "row", "block")
                                                     or gran == "block" and len(info.shape) != 2):
        return None
    if tp.conversion not in ("cast", "quantize") or tp.companions:
        return None
    from ..contract.layout import DEFAULT_BLOCK
    from ..kernels.int8 import quantize_int8
    from ..kernels.quant import quantize

    n, rest = info.shape[0], tuple(info.shape[1:])
    row_bytes = max(1, info.nbytes // n)
    block = tuple(tp.block or DEFAULT_BLOCK)
    align = block[0] if gran == "block" and tp.conversion == "quantize" else 1
    step = max(align, ROW_BLOCK_BYTES // row_bytes // align * align)
    out = torch.empty(info.shape, dtype=target)
    scale = None
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        part = reader.read_box(tp.source, ((r0, r1),) + tuple((0, d) for d in rest))
        if tp.conversion == "cast":
            out[r0:r1].copy_(part)
            continue
        q, s = quantize_int8(part) if int8 else quantize(part, target, granularity=gran, block=block)
        out[r0:r1].copy_(q)
        if scale is None:
            grid = (-(-n // align),) + tuple(s.shape[1:])
            scale = torch.empty(grid, dtype=s.dtype)
        scale[r0 // align: r0 // align + s.shape[0]].copy_(s)
    return out, scale


def build_fused(tp: TensorPlan, plan: Plan, reader: TensorReader, keymap: KeyMap | None,
           rows: tuple[int, int] | None = None, fetch=None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Build a tensor the model's library fuses from several checkpoint tensors, by its own code,
    reading each source as it asks for it (with ``fetch``, default ``reader.get``); the result
    must have the planned shape and dtype. ``rows``: only those indices of dimension 0, from
    their own sources (``FusedTensor.per_row``); ``shape``: the shape the result must have
    instead (a part of those rows, when ``fetch`` hands out parts of the sources)."""
    if keymap is None or keymap.run is None:
        raise PlanError(f"{tp.key!r} is planned from {len(tp.sources)} tensors, but no key mapping of the "
                        "model's library is available to build it", tensor=tp.key)
    fetch = fetch or reader.get
    out = keymap.run(tp.key, fetch) if rows is None else keymap.run(tp.key, fetch, rows=rows)
    tensor = out.get(tp.key) if isinstance(out, dict) else None
    if not isinstance(tensor, torch.Tensor):
        raise PluginError(f"the model library's conversion for {tp.key!r} returned {sorted(out) if isinstance(out, dict) else type(out).__name__}, "
                          f"not the tensor {tp.key!r}", tensor=tp.key)
    info = plan.checkpoint.tensors[tp.sources[0]]
    want = tp.shape if rows is None else (rows[1] - rows[0],) + tuple(tp.shape[1:])
    want = tuple(shape) if shape is not None else want
    if tuple(tensor.shape) != want or tensor.dtype != info.torch_dtype:
        part = "" if rows is None else f" (rows {rows[0]}:{rows[1]})"
        raise CorruptCheckpointError(
            f"{plan.checkpoint.path}: {tp.key!r}{part} built from {', '.join(tp.sources[:3])}"
            f"{' ...' if len(tp.sources) > 3 else ''} came out {tensor.dtype} {list(tensor.shape)}, but the model "
            f"holds {list(want)}: the checkpoint does not match the model",
            path=plan.checkpoint.path,
            tensor=tp.key,
        )
    return tensor


def _fused_quantized(tp: TensorPlan, plan: Plan, reader: TensorReader, manager: PluginManager, keymap: KeyMap | None):
    """A tensor the library fuses from quantized sources: the stored fp8 bytes fused by the
    library's operations, and the sources' scales — decoded by their scheme, one per row — fused
    by the same operations, so each row keeps its own multiplier. Kept as fp8, or decoded."""
    return decode_fused(tp, plan, build_fused(tp, plan, reader, keymap), fused_scales(tp, plan, reader, manager, keymap))


def fused_scales(tp: TensorPlan, plan: Plan, reader: TensorReader, manager: PluginManager, keymap: KeyMap,
                 rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The scales of a fused tensor's quantized sources, decoded by their scheme and fused by the
    library's own operations (of indices ``rows`` of dimension 0 only, for a per-row fused tensor)."""
    ckpt = plan.checkpoint
    entry = scheme_entry(ckpt, manager)
    first = ckpt.quantization.weights[tp.sources[0]]
    block = first.block if first.granularity == "block" else None

    def decoded(key: str) -> torch.Tensor:
        qw = ckpt.quantization.weights[key]
        s = manager.call(entry, entry.obj.decode_scale, qw, reader.get(qw.scale), returns=torch.Tensor)
        if block is not None:
            return s.to(torch.float32).contiguous()  # the grid, fused like the weights
        n = ckpt.tensors[key].shape[0]
        return (s.reshape(1, 1).expand(n, 1) if s.numel() == 1 else s.reshape(n, 1)).to(torch.float32).contiguous()

    out = keymap.run(tp.key, decoded) if rows is None else keymap.run(tp.key, decoded, rows=rows)
    scale = out.get(tp.key) if isinstance(out, dict) else None
    shape = tp.shape if rows is None else (rows[1] - rows[0],) + tuple(tp.shape[1:])
    want = block_grid(shape, block) if block is not None else shape[:-1] + (1,)
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != want:
        raise CorruptCheckpointError(
            f"{ckpt.path}: the scales of {tp.key!r}'s sources fused to "
            f"{list(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__}, not {list(want)}",
            path=ckpt.path, tensor=tp.key)
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise CorruptCheckpointError(f"{ckpt.path}: a scale of {tp.key!r}'s sources holds NaN, Inf or negative values",
                                     path=ckpt.path, tensor=tp.key)
    return scale


def decode_fused(tp: TensorPlan, plan: Plan, q: torch.Tensor, scale: torch.Tensor):
    """A fused quantized tensor (or its rows) as planned: kept with its scale, or decoded."""
    if tp.conversion == "none":
        return q, scale
    from ..kernels.quant import upcast

    ckpt = plan.checkpoint
    first = ckpt.quantization.weights[tp.sources[0]]
    block = first.block if first.granularity == "block" else None
    decoded = upcast(q, to_torch(tp.target_dtype), scale, block)
    _check_finite(decoded, q, tp, ckpt)
    return decoded, None


class Source:
    """A format's reader whose every read is checked and whose every error names the culprit.

    :param reader: what the format plugin's ``open`` returned.
    :param checkpoint: the checkpoint being read.
    :param plugin: the name of the format's plugin.
    """

    def __init__(
        self, reader: TensorReader, checkpoint: CheckpointInfo, plugin: str, manager: PluginManager | None = None
    ) -> None:
        if not callable(getattr(reader, "get", None)) or not callable(getattr(reader, "close", None)):
            raise PluginError(
                f"format plugin {plugin!r} opened {checkpoint.path} as {type(reader).__name__}, which has "
                "no get(name) and close() methods",
                plugin=plugin,
                path=checkpoint.path,
            )
        self.reader, self.checkpoint, self.plugin, self.manager = reader, checkpoint, plugin, manager

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as stored (a zero-copy view where the format gives one), checked."""
        return self._fetch(key, self.reader.get)

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` for a conversion: formats with an optional ``read(name)`` serve it
        without mapping it (possibly in a buffer the next ``read`` reuses); others use ``get``."""
        return self._fetch(key, getattr(self.reader, "read", None) or self.reader.get)

    def read_box(self, key: str, box: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """The part ``box`` of tensor ``key`` (a private copy), checked: what one rank of a
        parallel load reads. Readers without ``read_box`` serve it from ``get``."""
        fn = getattr(self.reader, "read_box", None)
        if fn is None:
            return self.get(key)[tuple(slice(a, b) for a, b in box)].clone()
        return self._fetch(key, lambda k: fn(k, box), tuple(b - a for a, b in box))

    def reads_box(self, key: str) -> bool:
        """Whether :meth:`read_box` reads only the box's bytes of ``key``."""
        fn = getattr(self.reader, "reads_box", None)
        return bool(fn(key)) if callable(fn) else False

    def _fetch(self, key: str, fn, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        ckpt = self.checkpoint
        info = ckpt.tensors[key]
        try:
            raw = fn(key)
        except LoaderKitError as exc:
            raise exc.with_context(path=ckpt.path, plugin=self.plugin)
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{ckpt.path}: cannot read tensor {key!r} from {info.file} (format plugin "
                f"{self.plugin!r}): {type(exc).__name__}: {exc}",
                path=ckpt.path,
                tensor=key,
                plugin=self.plugin,
            ) from exc
        if type(raw) not in (torch.Tensor, torch.nn.Parameter):
            raise PluginError(
                f"format plugin {self.plugin!r} returned {type(raw).__name__} for tensor {key!r} of "
                f"{ckpt.path}, not a plain torch.Tensor (tensor subclasses are refused: their values "
                "are not what their storage holds)",
                plugin=self.plugin,
                path=ckpt.path,
                tensor=key,
            )
        want = info.shape if shape is None else shape
        if tuple(raw.shape) != want or raw.dtype != info.torch_dtype:
            raise CorruptCheckpointError(
                f"{ckpt.path}: tensor {key!r} in {info.file} reads as {str(raw.dtype)} "
                f"{list(raw.shape)} but its header says {info.dtype} {list(want)}",
                path=ckpt.path,
                tensor=key,
                plugin=self.plugin,
            )
        return raw

    def close(self) -> None:
        if self.manager is None:
            self.reader.close()
        else:
            self.manager.invoke(self.plugin, self.reader.close)


def _can_point_at_source(tp: TensorPlan, plan: Plan) -> bool:
    """True when ``tp`` can be offloaded without copying: stored as planned in a safetensors file."""
    if tp.sources:
        return False  # built by the library's conversion: written out, not pointed at
    info = plan.checkpoint.tensors[tp.source]
    return tp.conversion == "none" and not tp.companions and info.file.endswith(".safetensors")


def _point_at_source(tp: TensorPlan, plan: Plan, writer: "DiskWriter") -> None:
    """Offload without copying: point the offload index at the tensor in its safetensors file."""
    path = str(Path(plan.checkpoint.root) / plan.checkpoint.tensors[tp.source].file)
    for k in (tp.key, *tp.also):
        writer.point(k, path, tp.source, tp.target_dtype)


def _meta_like(tp: TensorPlan) -> torch.Tensor:
    return torch.empty(tp.shape, dtype=to_torch(tp.target_dtype), device="meta")


def scheme_entry(ckpt: CheckpointInfo, manager: PluginManager) -> Entry:
    """The scheme that described ``ckpt``; it decodes its weights and scales."""
    q = ckpt.quantization
    entry = manager.get("schemes", q.scheme)
    if entry is None:
        raise PluginError(
            f"{ckpt.path}: scheme {q.scheme!r} that described the checkpoint is no longer registered",
            path=ckpt.path,
        )
    return entry


def convert_tensor(
    tp: TensorPlan, raw: torch.Tensor, ckpt: CheckpointInfo, reader: TensorReader, manager: PluginManager
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Convert one raw tensor as planned. Returns ``(tensor, scale or None)``."""
    target = to_torch(tp.target_dtype)
    if tp.conversion == "none":
        if tp.companions:
            return raw, kept_scale(ckpt, tp, reader, manager)
        return raw, None
    if tp.conversion == "cast":
        if is_fp8(tp.stored_dtype):
            from ..kernels.quant import upcast

            out = upcast(raw, target)
            _check_finite(out, raw, tp, ckpt)
            return out, None
        return raw.to(target), None
    if tp.conversion == "dequantize":
        entry = scheme_entry(ckpt, manager)
        qw: QuantizedWeight = ckpt.quantization.weights[tp.source]
        companions = {k: reader.get(k) for k in tp.companions}
        try:
            out = manager.call(entry, entry.obj.dequantize, qw, raw, companions, target, returns=torch.Tensor)
        except LoaderKitError as exc:
            raise exc.with_context(path=ckpt.path, plugin=entry.plugin)
        _check_finite(out, raw, tp, ckpt)
        if out.dtype != target or tuple(out.shape) != tp.shape:
            raise PluginError(
                f"scheme {entry.name!r} dequantized {tp.source!r} to {out.dtype} {list(out.shape)}, "
                f"expected {target} {list(tp.shape)}",
                plugin=entry.plugin,
                tensor=tp.source,
                path=ckpt.path,
            )
        return out, None
    if tp.conversion == "quantize" and target == torch.int8:
        from ..kernels.int8 import quantize_int8

        return quantize_int8(raw)
    if tp.conversion == "quantize":
        from ..kernels.quant import quantize

        gran = tp.granularity or "channel"
        q, scale = quantize(raw, target, granularity=gran, **({"block": tp.block} if tp.block else {}))
        return q, None if gran == "none" else scale
    raise PlanError(f"unknown conversion {tp.conversion!r} planned for {tp.key!r}", tensor=tp.key)


def _check_finite(out: torch.Tensor, raw: torch.Tensor, tp: TensorPlan, ckpt: CheckpointInfo) -> None:
    """Finite stored values must decode to finite weights: a scale whose product with the fp8
    range overflows the target dtype (fp16 with scale 1e6, a ue8m0 byte of 254) is refused."""
    if not out.is_floating_point() or bool(torch.isfinite(out).all()):
        return
    if bool(torch.isfinite(raw.float()).all()):
        raise CorruptCheckpointError(
            f"{ckpt.path}: {tp.source!r} decodes to infinite values in {tp.target_dtype} although its stored "
            "values are finite: its scale overflows that dtype; load it in a wider dtype (fp32) or fix the scale",
            path=ckpt.path,
            tensor=tp.source,
        )
    if not tp.buffer:
        raise _nonfinite_codes_error(tp, ckpt)


def _nonfinite_codes_error(tp: TensorPlan, ckpt: CheckpointInfo) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{ckpt.path}: the fp8 weight {tp.source!r} holds NaN or infinite codes; a weight cannot, so the "
        "checkpoint is corrupt",
        path=ckpt.path,
        tensor=tp.source,
    )


def _check_kept(q: torch.Tensor, scale: torch.Tensor | None, tp: TensorPlan, plan: Plan) -> None:
    """A weight kept as stored is decoded only at forward time, so what decoding would refuse is
    refused now: fp8 NaN or infinite codes (every byte read once, without a copy) and, with a
    scale, values the compute dtype cannot hold."""
    from ..kernels.quant import has_nonfinite_codes

    if not tp.buffer and has_nonfinite_codes(q):
        raise _nonfinite_codes_error(tp, plan.checkpoint)
    if scale is not None:
        _check_kept_range(q, scale, tp, plan)


def _check_kept_range(q: torch.Tensor, scale: torch.Tensor, tp: TensorPlan, plan: Plan) -> None:
    """An fp8 weight kept as stored is decoded in its module's compute dtype at every forward; a
    scale whose product with the codes overflows that dtype (fp16 and scales above ~146) would
    give infinite weights only then, so it is refused now. The bound ``max code * max scale``
    clears almost every weight without reading it; the rest are decoded once, as the cast rule will."""
    from ..kernels.quant import decode_stored, fp8_max

    mod = tp.key.rpartition(".")[0]
    mp = plan.modules.get(mod)
    if mp is None or not is_fp8(tp.stored_dtype) or not scale.numel():
        return
    dtype = to_torch(mp.compute_dtype)
    if not dtype.is_floating_point or dtype.itemsize < 2:
        return
    if fp8_max(q.dtype) * float(scale.abs().amax()) <= torch.finfo(dtype).max:
        return
    decoded = decode_stored(q, dtype, scale, tp.granularity, tp.block)
    if bool(torch.isfinite(decoded).all()):
        return
    ckpt = plan.checkpoint
    raise PlanError(
        f"{ckpt.path}: the fp8 weight {tp.source!r} is kept as stored and decoded in {mp.compute_dtype} at "
        f"forward time, but its scale (up to {float(scale.amax()):.4g}) times its codes overflows "
        f"{mp.compute_dtype}: its module {mod!r} would compute with infinite weights; compute in bfloat16 "
        "or float32 (strategy 'fp8' with compute_dtype='bfloat16') or dequantize it at load",
        path=ckpt.path,
        tensor=tp.source,
        module=mod,
    )


def kept_scale(ckpt: CheckpointInfo, tp: TensorPlan, reader: TensorReader, manager: PluginManager) -> torch.Tensor:
    """The scale of an fp8 weight kept as stored, decoded by its scheme to float32 multipliers."""
    qw = ckpt.quantization.weights[tp.source]
    entry = scheme_entry(ckpt, manager)
    s = manager.call(entry, entry.obj.decode_scale, qw, reader.get(qw.scale), returns=torch.Tensor)
    if s.dtype != torch.float32:
        raise PluginError(
            f"scheme {entry.name!r} decoded scale {qw.scale!r} to {s.dtype}, not float32",
            plugin=entry.plugin,
            tensor=qw.scale,
        )
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise CorruptCheckpointError(
            f"{ckpt.path}: scale {qw.scale!r} of {tp.source!r} holds NaN, Inf or negative values",
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


def check_assigned(model: torch.nn.Module, plan: Plan) -> None:
    """Every planned tensor, read back from the model after assignment, is what the plan says:
    its dtype, its shape, and (unless offloaded) its device. A module whose tensors are managed
    by someone else (an offload cache, a custom parameter store) could turn an fp8 assignment
    into something else; that is an error naming the tensor, never a silent change."""
    named = dict(model.named_modules(remove_duplicate=False))
    for tp in plan.tensors.values():
        for key in (tp.key, *tp.also):
            mod_name, _, local = key.rpartition(".")
            module = named[mod_name]
            t = module._parameters.get(local) if local in module._parameters else module._buffers.get(local)
            want_device = None if tp.device in ("disk", "cpu") and t is not None and t.device.type == "meta" else tp.device
            problem = _assignment_problem(t, tp, want_device)
            if problem:
                raise BuildError(
                    f"{plan.checkpoint.path}: after assignment, {key!r} {problem}; something other than "
                    f"loaderkit manages {type(module).__name__}'s tensors (an offload cache, a custom parameter "
                    "store). Load into a plain module, or let that library load it",
                    path=plan.checkpoint.path,
                    tensor=key,
                    module=mod_name,
                )


def _assignment_problem(t: torch.Tensor | None, tp: TensorPlan, device: str | None) -> str:
    if t is None:
        return "is missing from its module"
    if t.dtype != to_torch(tp.target_dtype):
        return f"is {str(t.dtype).removeprefix('torch.')}, but the plan stores it as {tp.target_dtype}"
    if tuple(t.shape) != tp.shape:
        return f"has shape {list(t.shape)}, but the plan says {list(tp.shape)}"
    if device is not None and device != "disk" and t.device != torch.device(device):
        return f"is on {t.device}, but the plan puts it on {device}"
    return ""


def meta_leftovers(model: torch.nn.Module) -> list[str]:
    """Names of parameters and buffers still on the meta device."""
    out = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    out += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    return out


def check_complete(model: torch.nn.Module, plan: Plan) -> None:
    """Every tensor of the model is real after loading (or offloaded to disk as planned)."""
    offloaded = {k for t in plan.tensors.values() if t.device == "disk" for k in (t.key, *t.also)}
    left = [k for k in meta_leftovers(model) if k not in offloaded]
    if left:
        more = f" ... and {len(left) - 10} more" if len(left) > 10 else ""
        raise BuildError(
            f"{plan.checkpoint.path}: after loading, {len(left)} tensors are still empty (meta): "
            f"{', '.join(left[:10])}{more}. They are neither in the checkpoint nor computed by the "
            "model's constructor; add them to the checkpoint or pass a model that initialises them",
            path=plan.checkpoint.path,
            tensor=left[0],
        )


def open_source(checkpoint: CheckpointInfo, manager: PluginManager) -> "Source":
    """Open ``checkpoint`` with the format that described it, as a checked :class:`Source`."""
    entry = manager.get("formats", checkpoint.format)
    if entry is None:
        raise PluginError(f"format {checkpoint.format!r} that described {checkpoint.path} is no longer registered",
                          path=checkpoint.path)
    return Source(manager.call(entry, entry.obj.open, checkpoint), checkpoint, entry.plugin, manager)


class RecyclingSource:
    """The checkpoint's checked tensor reader (:class:`Source`), closed and reopened every
    :data:`RECYCLE_BYTES` read.

    Readers serve zero-copy views of memory maps; pages of tensors already written would stay
    mapped (and counted in the process's memory) until the reader is closed. Recycling it keeps
    the memory in use to about one window plus the tensor in flight, whatever the checkpoint size.
    """

    def __init__(self, checkpoint: CheckpointInfo, manager: PluginManager) -> None:
        self.checkpoint, self.manager = checkpoint, manager
        self.source: Source | None = None
        self.since = 0

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as stored, checked against its description."""
        if self.source is None:
            self.source = open_source(self.checkpoint, self.manager)
        return self.source.get(key)

    def done(self, nbytes: int) -> None:
        """Count bytes read; release the reader's maps once a window is full."""
        self.since += nbytes
        if self.since >= RECYCLE_BYTES:
            self.close()

    def close(self) -> None:
        source, self.source, self.since = self.source, None, 0
        if source is not None:
            source.close()
