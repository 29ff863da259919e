"""Convert (a plan executed into files): ``loaderkit convert`` writes a converted copy of a checkpoint, in a layout other tools read.

The conversion *is* a load plan executed into files instead of into a model: the checkpoint is
described, a plan is negotiated with the strategy (skips, ``keep_fp32`` modules and library
declarations all apply), and every planned tensor is read, converted with the loader's own
kernels and written, one tensor at a time. ``convert`` knows no file family itself:

* fp8 storage is written by a *layout* — the :class:`~loaderkit.plugin.Encoder` of a registered
  scheme (the built-ins: compressed-tensors ``float-quantized`` for a transformers directory,
  ComfyUI's mixed-precision layout for anything else). The plan is negotiated *for* that layout:
  what it cannot hold in fp8 is planned in the compute dtype, recorded in the plan, so
  ``loaderkit.plan(..., layout=...)`` shows exactly what ``convert`` writes;
* any strategy without fp8 storage writes plain tensors in the planned dtypes; an fp8
  checkpoint is dequantized, and every scheme drops its own entries from the ``config.json``;
* file names come from the source's format (:meth:`~loaderkit.plugin.Format.output_names`).

Files are safetensors written incrementally: every shard's header is computed from the plan
before any data is read, and each converted tensor's bytes go straight to their offset. Output
goes to a temporary directory beside the destination, is checked with loaderkit's own strict
reader, and is renamed into place at the end; on any failure nothing is left at the destination.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..contract.bases import EncodedTensor, Strategy, shard_names
from ..contract.dtypes import is_fp8
from ..contract.plan import Plan, TensorPlan
from ..contract.io import escapes
from ..contract.records import CheckpointInfo, thaw
from ..errors import CheckpointNotFoundError, ConvertError, LoaderKitError
from .build import infer_model
from .discover import Layout, PluginManager, get_manager
from .negotiate import with_granularity
from .files import ShardWriter, clean_stale, cleanup, make_parents, move_into_place, temp_dir
from .stream import RecyclingSource

#: ``scheme=`` values -> scale granularity.
SCHEMES = {"per-channel": "channel", "per-tensor": "tensor", "block": "block",
           "channel": "channel", "tensor": "tensor"}
#: files beside the weights copied with them (configs, tokenizers, chat templates, model code).
SIDE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
def parse_size(size: int | str) -> int:
    """Bytes from ``2_000_000_000``, ``"2GB"`` (decimal, as huggingface_hub) or ``"2GiB"``."""
    if isinstance(size, int) and size > 0:
        return size
    m = _SIZE.match(str(size))
    if not m or float(m.group(1)) <= 0:
        raise ConvertError(f"max_shard_size {size!r} is not a size; write it like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "").lower()
    base = 1024 if unit.endswith("i") else 1000
    return int(float(m.group(1)) * base ** " kmgt".index(unit[:1] or " "))


# -- the job: what will be written ---------------------------------------------------------------


@dataclass
class Unit:
    """One source tensor and the output tensors it becomes (a quantized weight brings its scale
    and marker). ``tp`` is ``None`` for keys copied as stored."""

    source: str
    items: list[EncodedTensor]
    tp: TensorPlan | None = None


@dataclass
class Job:
    """A negotiated conversion, before anything is written."""

    src: Path
    dst: Path
    plan: Plan
    layout: "Layout | None"
    units: list[Unit]
    shards: list[list[Unit]]
    shard_names: list[str]
    index_name: str | None
    side_files: list[Path]
    config: dict[str, Any] | None
    manager: PluginManager
    reader: "RecyclingSource | None" = None

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for u in self.units for i in u.items)


# -- public entry point -------------------------------------------------------------------------


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    strategy: str | Strategy = "fp8",
    *,
    scheme: str | None = None,
    layout: str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    model: nn.Module | Callable[[], nn.Module] | None = None,
    progress: bool | None = None,
    manager: PluginManager | None = None,
) -> Path:
    """Write a converted copy of checkpoint ``src`` at ``dst``; returns ``dst`` as an absolute path.

    :param strategy: a strategy name or object: ``"fp8"`` writes fp8 weights with scales (see the
        module docstring for the layouts), ``"bf16"``/``"fp16"``/``"fp32"`` convert dtypes and
        dequantize fp8 checkpoints.
    :param scheme: fp8 scales: ``"per-channel"`` (default for compressed-tensors),
        ``"per-tensor"`` (default, and the only choice, for the ComfyUI layout) or ``"block"``
        (128x128 blocks, compressed-tensors only).
    :param layout: the fp8 layout to write, by name (``"compressed-tensors"``, ``"comfy-mixed"``
        or a plugin's); default: the first registered layout that accepts the checkpoint.
    :param max_shard_size: a directory output is split into shards of at most this size
        (``"5GB"`` = 5e9 bytes); a ``dst`` ending in ``.safetensors`` is always one file.
    :param overwrite: replace an existing ``dst`` (atomically, once the new copy is complete).
    :param model: the architecture, as :func:`loaderkit.load` takes it. Without it, a checkpoint
        with a config is built by builder plugins and one without is given a model inferred
        from its tensor names and shapes.
    :param progress: show a progress bar (``None``: when standard error is a terminal).
    :raises ConvertError: for a bad destination, an unsupported combination or a failed write;
        other :class:`LoaderKitError` subclasses from describing and planning the checkpoint.
    """
    mgr = manager or get_manager()
    src_p, dst_p = Path(src).expanduser().absolute(), Path(dst).expanduser().absolute()
    _check_paths(src_p, dst_p, overwrite)
    try:
        job = make_job(src_p, dst_p, strategy, scheme, parse_size(max_shard_size), model, mgr, layout)
    except LoaderKitError:
        raise
    except OSError as exc:
        raise ConvertError(f"cannot read {src_p}: {exc}", path=src_p) from exc
    _check_space(job)
    return _run(job, progress)


def _check_paths(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.exists():
        raise _not_found(src)
    rs, rd = src.resolve(), dst.resolve()
    if rs == rd:
        raise ConvertError(f"source and destination are the same path ({src}); choose another DST", path=dst)
    if src.is_dir() and rd.is_relative_to(rs):
        raise ConvertError(f"destination {dst} is inside the source checkpoint {src}; write it elsewhere", path=dst)
    if rs.is_relative_to(rd):
        raise ConvertError(f"destination {dst} contains the source checkpoint {src}; choose another DST", path=dst)
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise ConvertError(f"destination {dst} already exists; pass overwrite=True (--overwrite) to replace it",
                           path=dst)
    if overwrite and dst.is_dir() and not dst.is_symlink() and not _looks_like_checkpoint(dst):
        raise ConvertError(f"--overwrite replaces a checkpoint, and {dst} is not one (it holds no weights or "
                           "config.json); choose another destination", path=dst)
    if sys.byteorder != "little":
        raise ConvertError("writing safetensors needs a little-endian machine")


def _looks_like_checkpoint(path: Path) -> bool:
    try:
        names = [p.name for p in path.iterdir()]
    except OSError:
        return False
    return not names or any(n.endswith((".safetensors", ".bin", ".pt", ".pth")) or n == "config.json" for n in names)


def _not_found(src: Path) -> LoaderKitError:
    return CheckpointNotFoundError(
        f"checkpoint {src} does not exist; pass a safetensors file, a torch .bin/.pt/.pth file, "
        "an index .json, or a directory holding one",
        path=src,
    )


def _check_space(job: Job) -> None:
    try:
        free = shutil.disk_usage(_existing_parent(job.dst)).free
    except OSError:
        return
    need = job.total_bytes
    if need > free:
        raise ConvertError(
            f"not enough space to write {job.dst}: it needs {need / 1e9:.2f} GB and "
            f"{free / 1e9:.2f} GB are free; free some space or choose another destination",
            path=job.dst,
        )


def _existing_parent(p: Path) -> Path:
    while not p.exists():
        p = p.parent
    return p


# -- planning ----------------------------------------------------------------------------------


def find_layout(mgr: PluginManager, checkpoint: CheckpointInfo, name: str | None) -> Layout | None:
    """The layout called ``name``, or the first registered one that accepts ``checkpoint``."""
    if name is not None:
        return mgr.layout(name)
    for lay in mgr.layouts():
        if mgr.call(lay.scheme, lay.encoder.accepts, checkpoint):
            return lay
    return None


def make_job(
    src: Path, dst: Path, strategy, scheme: str | None, max_bytes: int, model, mgr: PluginManager,
    layout_name: str | None = None,
) -> Job:
    """Describe and plan the conversion (headers only): the units, shards and side files."""
    from ..loader import LoadRequest, prepare
    from .inspect import describe

    info = describe(src, mgr)
    single = dst.suffix == ".safetensors"
    if single and info.config is not None:
        raise ConvertError(f"{src} has a config.json; give a directory as the destination so it is "
                           "copied with the weights", path=dst)
    layout = find_layout(mgr, info, layout_name)
    gran = _scheme_granularity(scheme, layout)
    if model is None and info.config is None:
        model = infer_model(info)
    strategy = strategy if scheme is None else with_granularity(strategy, gran, mgr)
    request = LoadRequest(path=src, strategy=strategy, model=model, layout=None if layout is None else layout.name)
    plan = prepare(request, mgr).plan
    _refuse_fp8_to_fp8(plan)
    _refuse_int8(plan)
    fused = [tp for tp in plan.tensors.values() if tp.sources]
    if fused:
        raise ConvertError(
            f"{src}: the model's library builds {len(fused)} tensors from several checkpoint tensors on load "
            f"(e.g. {fused[0].key} from {fused[0].sources[0]} ...); converting such a checkpoint is not supported "
            "yet: load it with loaderkit.load instead", path=src)
    quantized = [tp for tp in plan.tensors.values() if tp.conversion == "quantize"]
    if quantized and layout is None:
        raise ConvertError(f"the plan stores {quantized[0].source} in fp8, but no registered fp8 layout "
                           f"accepts {src}; pass layout= one of: "
                           f"{', '.join(lay.name for lay in mgr.layouts()) or 'none'}", path=src)
    if not quantized:
        if scheme is not None:
            raise ConvertError(f"scheme={scheme!r} applies only to a strategy that stores weights in fp8; "
                               f"strategy {plan.strategy!r} stores none here")
        layout = None
    if layout is not None:
        mgr.call(layout.scheme, layout.encoder.check, plan)
    units = _units(plan, layout, mgr)
    _check_names(units)
    shards = [units] if single else _assign_shards(units, max_bytes)
    names, index = _file_names(info, dst, len(shards), mgr)
    config = _output_config(info, plan, layout, mgr)
    side = [] if info.config is None else _side_files(info)
    return Job(src, dst, plan, layout, units, shards, names, index, side, config, mgr)


def _scheme_granularity(scheme: str | None, layout: Layout | None) -> str | None:
    if scheme is None:
        return None if layout is None else layout.encoder.granularities[0]
    gran = SCHEMES.get(str(scheme).lower())
    if gran is None:
        raise ConvertError(f"unknown scheme {scheme!r}; use per-channel, per-tensor or block")
    if layout is not None and gran not in layout.encoder.granularities:
        raise ConvertError(
            f"scheme {scheme!r} cannot be written in the {layout.name} layout, which has "
            + ("one scale per tensor" if layout.encoder.granularities == ("tensor",)
               else f"{'/'.join(layout.encoder.granularities)} scales")
            + "; use " + " or ".join(f"per-{g}" if g != "block" else g for g in layout.encoder.granularities)
        )
    return gran


def _refuse_fp8_to_fp8(plan: Plan) -> None:
    kept = [tp.source for tp in plan.tensors.values() if is_fp8(tp.stored_dtype) and is_fp8(tp.target_dtype)]
    if kept:
        q = plan.checkpoint.quantization
        family = f" ({q.family})" if q else ""
        raise ConvertError(
            f"{plan.checkpoint.path} is already an fp8 checkpoint{family}: {kept[0]} is stored in fp8; "
            "load it as it is, or convert it with a bf16, fp16 or fp32 strategy to dequantize it",
            path=plan.checkpoint.path,
            tensor=kept[0],
        )


def _refuse_int8(plan: Plan) -> None:
    int8 = next((tp for tp in plan.tensors.values() if tp.target_dtype == "int8" and tp.conversion == "quantize"), None)
    if int8 is not None:
        raise ConvertError(
            f"the plan stores {int8.source} in int8 (strategy {plan.strategy!r}): int8 weight-only storage is made "
            "on load for loaderkit's runtime, and no on-disk layout is written for it; load the original with "
            "that strategy instead, or convert with strategy 'fp8'",
            path=plan.checkpoint.path,
            tensor=int8.source,
        )


def _units(plan: Plan, layout: Layout | None, mgr: PluginManager) -> list[Unit]:
    """One unit per written source tensor, in checkpoint order: what the plan loads, plus the
    keys the model's library ignores on load (legacy buffers), copied as stored. Markers, scales
    and tied duplicates are dropped."""
    by_source = {tp.source: tp for tp in plan.tensors.values()}
    copied = set(plan.library_ignored)
    units: list[Unit] = []
    for key, info in plan.checkpoint.tensors.items():
        tp = by_source.get(key)
        if tp is not None and tp.conversion == "quantize":
            module = plan.modules[tp.key.rpartition(".")[0]]
            items = mgr.call(layout.scheme, layout.encoder.outputs, tp, module, returns=tuple)
            units.append(Unit(tp.source, list(items), tp))
        elif tp is not None:
            units.append(Unit(tp.source, [EncodedTensor(name=tp.source, dtype=tp.target_dtype, shape=tp.shape)], tp))
        elif key in copied:
            units.append(Unit(key, [EncodedTensor(name=key, dtype=info.dtype, shape=info.shape)]))
    return units


def _check_names(units: list[Unit]) -> None:
    seen: dict[str, str] = {}
    for u in units:
        for it in u.items:
            if it.name in seen:
                raise ConvertError(
                    f"two output tensors would be named {it.name} (written for {seen[it.name]} and for "
                    f"{u.source}): the fp8 layout names a weight's scale <m>.weight_scale; keep that "
                    "module in high precision (strategy option skip)",
                    tensor=it.name,
                )
            seen[it.name] = u.source


def _output_config(info: CheckpointInfo, plan: Plan, layout: Layout | None, mgr: PluginManager) -> dict | None:
    """config.json for the output: every scheme's own quantization entries removed, the layout's
    added, and the model dtype keys (``dtype``/``torch_dtype``) set to the dtype most modules
    compute in."""
    if info.config is None:
        return None
    out = thaw(info.config)
    for entry in mgr.schemes():
        out = mgr.call(entry, entry.obj.dequantized_config, out, returns=dict)
    dtype = plan.entry_dtype()
    for holder in (out, out.get("text_config")):
        if isinstance(holder, dict):
            for key in ("dtype", "torch_dtype"):
                if isinstance(holder.get(key), str):
                    holder[key] = dtype
    if layout is not None:
        out = mgr.call(layout.scheme, layout.encoder.edit_config, out, plan, returns=dict)
    return out


def _assign_shards(units: list[Unit], max_bytes: int) -> list[list[Unit]]:
    """Greedy in order (as huggingface_hub splits); a weight and its scale stay together."""
    shards: list[list[Unit]] = []
    current: list[Unit] = []
    size = 0
    for u in units:
        n = sum(i.nbytes for i in u.items)
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(u)
        size += n
    return shards + [current] if current or not shards else shards


def _file_names(info: CheckpointInfo, dst: Path, count: int, mgr: PluginManager) -> tuple[list[str], str | None]:
    if dst.suffix == ".safetensors":
        return [dst.name], None
    entry = mgr.get("formats", info.format)
    if entry is None:
        names, index = shard_names("model", count)
    else:
        names, index = mgr.call(entry, entry.obj.output_names, info, count, returns=tuple)
    return list(names), index


def _side_files(info: CheckpointInfo) -> list[Path]:
    """Configs, tokenizer files and the like beside the weights (not weights, not indexes)."""
    root = Path(info.root)
    weights = {Path(f).name for f in info.files}
    out = []
    for p in sorted(root.iterdir()):
        name = p.name
        if (not p.is_file() or name.startswith(".") or name in weights or ".index." in name
                or not name.endswith(SIDE_SUFFIXES) or Path(info.path).name == name):
            continue
        if escapes(root, p) is not None:
            continue  # a link out of the checkpoint (notes.txt -> ~/.ssh/id_rsa) is never copied
        out.append(p)
    return out


# -- writing ---------------------------------------------------------------------------------------


def _produce(unit: Unit, job: Job) -> dict[str, torch.Tensor]:
    """Read one source tensor and convert it into the unit's output tensors, as planned."""
    from .stream import convert_tensor

    raw = job.reader.get(unit.source)
    tp = unit.tp
    if tp is None:
        return {unit.items[0].name: raw}
    tensor, scale = convert_tensor(tp, raw, job.plan.checkpoint, job.reader, job.manager)
    if tp.conversion != "quantize":
        return {unit.items[0].name: tensor}
    module = job.plan.modules[tp.key.rpartition(".")[0]]
    lay = job.layout
    return job.manager.call(lay.scheme, lay.encoder.encode, tp, module, tensor, scale, returns=dict)


def _write_all(job: Job, out_dir: Path, update) -> None:
    """Write every shard, the index and the side files into ``out_dir``."""
    weight_map: dict[str, str] = {}
    for shard, name in zip(job.shards, job.shard_names):
        writer = ShardWriter(out_dir / name, [it for u in shard for it in u.items])
        try:
            for unit in shard:
                for key, tensor in _produce(unit, job).items():
                    try:
                        writer.write(key, tensor)
                    except OSError as exc:
                        raise ConvertError(f"cannot write tensor {key} to {job.dst}: {exc.strerror or exc}; "
                                           f"nothing was written to {job.dst}", path=job.dst, tensor=key) from exc
                    weight_map[key] = name
                nbytes = job.plan.checkpoint.tensors[unit.source].nbytes
                job.reader.done(nbytes)
                if update is not None:
                    update(nbytes)
            writer.close()
        except BaseException:
            writer.abandon()
            raise
    if job.index_name:
        index = {"metadata": {"total_size": job.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / job.index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    for path in job.side_files:
        if path.name == "config.json" and job.config is not None:
            (out_dir / path.name).write_text(json.dumps(job.config, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(path, out_dir / path.name)


def _self_check(job: Job, output: Path) -> None:
    """Describe the output with loaderkit's own strict readers: every planned tensor, as planned,
    recognised as the intended layout."""
    from .inspect import describe

    info = describe(output, job.manager)
    want = {i.name: (i.dtype, i.shape) for u in job.units for i in u.items}
    got = {k: (t.dtype, t.shape) for k, t in info.tensors.items()}
    scheme = info.quantization.scheme if info.quantization else None
    expected = job.layout.scheme.name if job.layout is not None else None
    if got != want or scheme != expected:
        raise ConvertError(f"the written copy of {job.src} does not read back as planned (scheme {scheme!r}, "
                           f"{len(got)} tensors for {len(want)}); this is a bug in loaderkit", path=job.dst)


def _run(job: Job, progress: bool | None) -> Path:
    """Write into a temporary directory beside the destination, check, then move into place."""
    from ..progress import progress_bar

    dst = job.dst
    try:
        created = make_parents(dst.parent)
        clean_stale(dst)
        tmp = temp_dir(dst, "partial")
    except OSError as exc:
        raise ConvertError(f"cannot write beside {dst}: {exc.strerror or exc}; nothing was written", path=dst) from exc
    try:
        job.reader = RecyclingSource(job.plan.checkpoint, job.manager)
        try:
            total = sum(job.plan.checkpoint.tensors[u.source].nbytes for u in job.units)
            with torch.no_grad(), progress_bar(total, f"converting {job.src.name}", progress=progress) as update:
                _write_all(job, tmp, update)
        finally:
            job.reader.close()
        output = tmp / dst.name if dst.suffix == ".safetensors" else tmp
        _self_check(job, output)
        move_into_place(output, dst)
    except LoaderKitError:
        cleanup(tmp, created)
        raise
    except OSError as exc:
        cleanup(tmp, created)
        raise ConvertError(f"cannot write {dst}: {exc}; nothing was written to {dst}", path=dst) from exc
    except BaseException:
        cleanup(tmp, created)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # what is left of it after a single-file rename
    return dst


