"""Stage 8, convert: ``loaderkit convert`` writes a converted copy of a checkpoint, in a layout other tools read.

The conversion *is* a load plan executed into files instead of into a model: the checkpoint is
described, a plan is negotiated with the strategy (skips, ``keep_fp32`` modules and library
declarations all apply), and every planned tensor is read, converted with the loader's own
kernels and written, one tensor at a time. What comes out:

* fp8 storage from a transformers directory (``config.json`` with ``architectures`` or
  ``model_type``): compressed-tensors ``float-quantized`` (what llm-compressor writes and vLLM and
  transformers read), with a matching ``quantization_config`` in ``config.json``;
* fp8 storage from anything else (a config-less single file, a diffusers directory): ComfyUI's
  mixed-precision layout (``<m>.weight`` fp8, ``<m>.weight_scale`` float32, ``<m>.comfy_quant``);
* any strategy without fp8 storage: plain tensors in the planned dtypes; an fp8 checkpoint is
  dequantized (scales and markers dropped, ``quantization_config`` removed).

Files are safetensors written incrementally: every shard's header is computed from the plan
before any data is read, and each converted tensor's bytes go straight to their offset. Output
goes to a temporary directory beside the destination, is checked with loaderkit's own strict
reader, and is renamed into place at the end; on any failure nothing is left at the destination.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..contract.bases import Strategy
from ..contract.dtypes import is_fp8, to_torch
from ..contract.layout import DEFAULT_BLOCK
from ..contract.plan import Plan, TensorPlan
from ..contract.records import CheckpointInfo
from ..errors import CheckpointNotFoundError, ConvertError, LoaderKitError
from .build import infer_model
from .discover import PluginManager, get_manager
from .files import Item, ShardWriter, cleanup, make_parents, move_into_place, temp_dir
from .stream import RecyclingSource

#: ``scheme=`` values -> scale granularity.
SCHEMES = {"per-channel": "channel", "per-tensor": "tensor", "block": "block",
           "channel": "channel", "tensor": "tensor"}
#: block shape of ``scheme="block"`` (DeepSeek-V3 / FP8_BLOCK).
BLOCK = DEFAULT_BLOCK
#: files beside the weights copied with them (configs, tokenizers, chat templates, model code).
SIDE_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken", ".py")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
CT, COMFY, PLAIN = "compressed-tensors", "comfy-mixed", "plain"
_EXPECTED_SCHEME = {CT: "compressed-tensors-fp8", COMFY: "comfy-mixed", PLAIN: None}


def _kernels():
    """The conversion kernels (``quantize``) the loader itself uses."""
    from ..kernels import quant

    return quant


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
    items: list[Item]
    tp: TensorPlan | None = None
    granularity: str | None = None  # set when quantized here


@dataclass
class Job:
    """A negotiated conversion, before anything is written."""

    src: Path
    dst: Path
    plan: Plan
    layout: str
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
        job = make_job(src_p, dst_p, strategy, scheme, parse_size(max_shard_size), model, mgr)
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
    if sys.byteorder != "little":
        raise ConvertError("writing safetensors needs a little-endian machine")


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


def make_job(
    src: Path, dst: Path, strategy, scheme: str | None, max_bytes: int, model, mgr: PluginManager
) -> Job:
    """Describe and plan the conversion (headers only): the units, shards and side files."""
    from ..loader import LoadRequest, prepare
    from .inspect import describe

    info = describe(src, mgr)
    single = dst.suffix == ".safetensors"
    if single and info.config is not None:
        raise ConvertError(f"{src} has a config.json; give a directory as the destination so it is "
                           "copied with the weights", path=dst)
    target = CT if _is_transformers(info.config) else COMFY
    gran = _scheme_granularity(scheme, target)
    if model is None and info.config is None:
        model = infer_model(info)
    prep = prepare(LoadRequest(path=src, strategy=_strategy(strategy, gran, mgr), model=model), mgr)
    _refuse_fp8_to_fp8(prep.plan)
    units, ignore = _units(prep, target, gran)
    layout = target if any(u.granularity for u in units) else PLAIN
    if scheme is not None and layout == PLAIN:
        raise ConvertError(f"scheme={scheme!r} applies only to a strategy that stores Linear weights in fp8; "
                           f"strategy {prep.plan.strategy!r} stores none here")
    _check_names(units)
    if layout == CT:
        _check_ct(units)
    shards = [units] if single else _assign_shards(units, max_bytes)
    names, index = _file_names(info, dst, len(shards))
    config = _edit_config(info.config, prep.plan, _ct_config(units, ignore) if layout == CT else None)
    side = [] if info.config is None else _side_files(info)
    return Job(src, dst, prep.plan, layout, units, shards, names, index, side, config, mgr)


def _is_transformers(config: dict | None) -> bool:
    return isinstance(config, dict) and "_class_name" not in config and bool(
        config.get("architectures") or config.get("model_type")
    )


def _scheme_granularity(scheme: str | None, target: str) -> str:
    if scheme is None:
        return "channel" if target == CT else "tensor"
    gran = SCHEMES.get(str(scheme).lower())
    if gran is None:
        raise ConvertError(f"unknown scheme {scheme!r}; use per-channel, per-tensor or block")
    if target == COMFY and gran != "tensor":
        raise ConvertError(
            f"scheme {scheme!r} cannot be written in ComfyUI's mixed layout, which has one scale per "
            "tensor (the layout for checkpoints without a transformers config.json); use per-tensor"
        )
    return gran


def _strategy(strategy, gran: str, mgr: PluginManager):
    """The ``fp8`` strategy by name gets the scheme's granularity; anything else is used as given."""
    if isinstance(strategy, str) and strategy == "fp8":
        entry = mgr.get("strategies", "fp8")
        if entry is not None:
            return mgr.call(entry, entry.obj, granularity="channel" if gran == "block" else gran)
    return strategy


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


def _units(prep, layout: str, gran: str) -> tuple[list[Unit], list[str]]:
    """One unit per written source tensor, in checkpoint order; and the Linear modules left in
    high precision (compressed-tensors' ``ignore`` list)."""
    plan: Plan = prep.plan
    named = dict(prep.model.named_modules())
    by_source = {tp.source: tp for tp in plan.tensors.values()}
    copied = _copied_keys(plan)
    units: list[Unit] = []
    for key, info in plan.checkpoint.tensors.items():
        tp = by_source.get(key)
        if tp is not None:
            units.append(_unit(tp, plan, named, layout, gran))
        elif key in copied:
            units.append(Unit(key, [Item(key, info.dtype, info.shape)]))
    quantized = {u.source.rpartition(".")[0] for u in units if u.granularity}
    ignore = sorted(n for n, m in named.items() if isinstance(m, nn.Linear) and n not in quantized)
    return units, ignore


def _copied_keys(plan: Plan) -> set[str]:
    """Checkpoint keys the plan does not load but the model's library ignores on load (legacy
    buffers): copied as stored. Markers, scales and tied duplicates are dropped."""
    return set(plan.library_ignored)


def _unit(tp: TensorPlan, plan: Plan, named: dict, layout: str, gran: str) -> Unit:
    mod_name, _, local = tp.key.rpartition(".")
    if tp.conversion != "quantize":
        return Unit(tp.source, [Item(tp.source, tp.target_dtype, tp.shape)], tp)
    compute = plan.modules[mod_name].compute_dtype
    if local != "weight" or not isinstance(named.get(mod_name), nn.Linear) or len(tp.shape) != 2:
        # both layouts quantize Linear weights only: other planned fp8 tensors stay high precision
        return Unit(tp.source, [Item(tp.source, compute, tp.shape)], tp)
    if layout == CT and tp.target_dtype != "float8_e4m3fn":
        raise ConvertError(f"compressed-tensors float-quantized weights are float8_e4m3fn; the plan stores "
                           f"{tp.source} as {tp.target_dtype}", tensor=tp.source)
    prefix = tp.source[: -len("weight")]
    n, k = tp.shape
    scale_shape = {"tensor": (1,) if layout == CT else (), "channel": (n, 1),
                   "block": (math.ceil(n / BLOCK[0]), math.ceil(k / BLOCK[1]))}[gran]
    items = [Item(tp.source, tp.target_dtype, tp.shape),
             Item(prefix + "weight_scale", compute if layout == CT else "float32", scale_shape)]
    if layout == COMFY:
        items.append(Item(prefix + "comfy_quant", "uint8", (len(_comfy_quant(tp.target_dtype)),)))
    return Unit(tp.source, items, tp, gran)


def _comfy_quant(fp8: str) -> bytes:
    """The bytes ComfyUI stores in ``<m>.comfy_quant`` (``json.dumps`` of the layer's config)."""
    return json.dumps({"format": fp8}).encode("utf-8")


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


def _check_ct(units: list[Unit]) -> None:
    scale_dtypes = {u.items[1].dtype for u in units if u.granularity}
    if len(scale_dtypes) > 1:
        raise ConvertError(
            f"quantized Linear modules compute in different dtypes ({', '.join(sorted(scale_dtypes))}); "
            "compressed-tensors stores every weight_scale in the model dtype; pass a strategy whose "
            "quantized modules share one compute dtype"
        )


def _ct_config(units: list[Unit], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` llm-compressor writes for its data-free presets: FP8_DYNAMIC
    (channel; also used for tensor) and FP8_BLOCK (block) — dynamic activation scales."""
    gran = next(u.granularity for u in units if u.granularity)
    weights = {"dynamic": False, "group_size": None, "num_bits": 8, "strategy": gran,
               "symmetric": True, "type": "float"}
    inputs = {"dynamic": True, "group_size": None, "num_bits": 8, "strategy": "token",
              "symmetric": True, "type": "float"}
    if gran == "block":
        weights["block_structure"] = list(BLOCK)
        inputs.update(group_size=BLOCK[1], strategy="group")
    group = {"format": "float-quantized", "input_activations": inputs, "output_activations": None,
             "targets": ["Linear"], "weights": weights}
    return {"config_groups": {"group_0": group}, "format": "float-quantized",
            "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed"}


def _edit_config(config: dict | None, plan: Plan, qc: dict | None) -> dict | None:
    """config.json for the output: quantization_config set (compressed-tensors) or removed, and
    the model dtype set to the dtype most modules compute in."""
    if config is None:
        return None
    out = json.loads(json.dumps(config))
    dtype = plan.entry_dtype()
    for holder in (out, out.get("text_config")):
        if isinstance(holder, dict):
            holder.pop("quantization_config", None)
            holder.pop("compression_config", None)
            for key in ("dtype", "torch_dtype"):
                if key in holder and isinstance(holder[key], str):
                    holder[key] = dtype
    if _is_transformers(out) and "dtype" not in out and "torch_dtype" not in out:
        out["dtype"] = dtype
    if qc is not None:
        out["quantization_config"] = qc
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


def _file_names(info: CheckpointInfo, dst: Path, count: int) -> tuple[list[str], str | None]:
    if dst.suffix == ".safetensors":
        return [dst.name], None
    stem = "diffusion_pytorch_model" if isinstance(info.config, dict) and "_class_name" in info.config else "model"
    if count == 1:
        return [f"{stem}.safetensors"], None
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)], f"{stem}.safetensors.index.json"


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
        out.append(p)
    return out


# -- writing ---------------------------------------------------------------------------------------


def _produce(unit: Unit, job: Job) -> dict[str, torch.Tensor]:
    """Read one source tensor and convert it into the unit's output tensors."""
    from .stream import convert_tensor

    ckpt = job.plan.checkpoint
    raw = job.reader.get(unit.source)
    tp = unit.tp
    first = unit.items[0]
    if tp is None:
        return {first.name: raw}
    if unit.granularity:
        q, scale = _kernels().quantize(raw, to_torch(first.dtype), granularity=unit.granularity, block=BLOCK)
        scale_item = unit.items[1]
        out = {first.name: q, scale_item.name: scale.to(to_torch(scale_item.dtype)).reshape(scale_item.shape)}
        if len(unit.items) > 2:
            marker = _comfy_quant(first.dtype)
            out[unit.items[2].name] = torch.frombuffer(bytearray(marker), dtype=torch.uint8)
        return out
    if tp.conversion == "quantize":  # planned fp8 but not a Linear weight: kept high precision
        return {first.name: raw.to(to_torch(first.dtype))}
    tensor, _ = convert_tensor(tp, raw, ckpt, job.reader, job.manager)
    return {first.name: tensor}


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
    if got != want or scheme != _EXPECTED_SCHEME[job.layout]:
        raise ConvertError(f"the written copy of {job.src} does not read back as planned (scheme {scheme!r}, "
                           f"{len(got)} tensors for {len(want)}); this is a bug in loaderkit", path=job.dst)


def _run(job: Job, progress: bool | None) -> Path:
    """Write into a temporary directory beside the destination, check, then move into place."""
    from ..progress import progress_bar

    dst = job.dst
    created = make_parents(dst.parent)
    tmp = temp_dir(dst, "partial")
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


