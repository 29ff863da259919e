"""ComfyUI's fp8 families.

* ``comfy-scaled-fp8``: legacy scaled fp8 (a ``<prefix>scaled_fp8`` marker; ``<m>.scale_weight``
  float32 scalar, optional ``scale_input``);
* ``comfy-mixed``: mixed precision (``<m>.comfy_quant`` or ``__metadata__``
  ``_quantization_metadata`` layers; ``weight_scale`` scalar).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

import torch

from loaderkit.errors import CorruptCheckpointError, UnsupportedCheckpointError
from loaderkit.plugin import CHANNEL, TENSOR, CheckpointInfo, EncodedTensor, Encoder, QuantizationInfo, TensorInfo

from .common import (
    Fp8Scheme,
    is_fp8_weight,
    is_transformers_config,
    linear_weight_problem,
    make_info,
    module_of,
    scaled_weights,
    sibling,
)


class ComfyScaledFp8(Fp8Scheme):
    name = "comfy-scaled-fp8"
    family = "ComfyUI scaled fp8 (legacy)"
    description = "a <prefix>scaled_fp8 marker; <m>.scale_weight float32 scalar, optional scale_input"
    priority = 55

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        return detect_comfy_scaled(checkpoint, self.name, self.family)


class ComfyMixedEncoder(Encoder):
    """Writes ComfyUI's mixed-precision layout: ``<m>.weight`` fp8, ``<m>.weight_scale`` float32
    (one per tensor), ``<m>.comfy_quant`` (uint8 JSON bytes naming the fp8 format); Linear
    weights only. The layout for checkpoints without a transformers ``config.json``."""

    name = "comfy-mixed"
    granularities = ("tensor",)

    def accepts(self, checkpoint: CheckpointInfo) -> bool:
        return not is_transformers_config(checkpoint.config)

    def holds(self, module, tensor: str, dtype: str) -> str:
        if dtype not in COMFY_FP8_FORMATS:
            return f"ComfyUI's mixed layout stores {' or '.join(sorted(COMFY_FP8_FORMATS))} only"
        return linear_weight_problem(module, tensor, "ComfyUI mixed")

    def outputs(self, tensor, module) -> tuple[EncodedTensor, ...]:
        prefix = module_of(tensor.source)
        return (
            EncodedTensor(name=tensor.source, dtype=tensor.target_dtype, shape=tensor.shape),
            EncodedTensor(name=sibling(prefix, "weight_scale"), dtype="float32", shape=()),
            EncodedTensor(name=sibling(prefix, "comfy_quant"), dtype="uint8", shape=(len(comfy_quant(tensor.target_dtype)),)),
        )

    def encode(self, tensor, module, q, scale) -> dict[str, torch.Tensor]:
        weight, scale_out, marker = self.outputs(tensor, module)
        return {
            weight.name: q,
            scale_out.name: scale.to(torch.float32).reshape(()),
            marker.name: torch.frombuffer(bytearray(comfy_quant(tensor.target_dtype)), dtype=torch.uint8),
        }

    def edit_config(self, config: dict[str, Any], plan) -> dict[str, Any]:
        return config  # the layout is described by its tensors


def comfy_quant(fp8: str) -> bytes:
    """The bytes ComfyUI stores in ``<m>.comfy_quant`` (``json.dumps`` of the layer's config)."""
    return json.dumps({"format": fp8}).encode("utf-8")


class ComfyMixed(Fp8Scheme):
    name = "comfy-mixed"
    family = "ComfyUI mixed precision"
    description = "<m>.comfy_quant or __metadata__ _quantization_metadata layers; weight_scale scalar"
    priority = 60

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        return detect_comfy_mixed(checkpoint, self.name, self.family)

    def encoder(self) -> ComfyMixedEncoder:
        return ComfyMixedEncoder()


COMFY_FP8_FORMATS = frozenset({"float8_e4m3fn", "float8_e5m2"})


def detect_comfy_scaled(ckpt: CheckpointInfo, scheme: str, family: str) -> QuantizationInfo | None:
    """ComfyUI legacy scaled fp8: a ``<prefix>scaled_fp8`` marker whose dtype is the fp8 storage
    dtype (float32 means e4m3fn), ``<m>.scale_weight`` and optional ``<m>.scale_input``.

    As in ComfyUI, every ``scale_weight`` multiplies its weight (also a high-precision one), and an
    fp8 weight without one is unscaled — when no fp8 weight has one. A file where some fp8 weights
    have a ``scale_weight`` and others do not is refused: ComfyUI's writers scale every fp8
    weight, so a missing one is a lost tensor, and decoding it unscaled would be silently wrong.
    A file with ``_quantization_metadata`` is left to ``comfy-mixed``, which ComfyUI prefers too.
    """
    tensors = ckpt.tensors
    markers = [k for k in tensors if k == "scaled_fp8" or k.endswith(".scaled_fp8")]
    if not markers or "_quantization_metadata" in ckpt.metadata:
        return None
    storage = {m[: -len("scaled_fp8")]: _marker_storage(tensors[m]) for m in markers}
    weights = scaled_weights(
        ckpt, family=family, layouts=[TENSOR, CHANNEL], scale_leaves=("scale_weight",),
        input_leaves=("scale_input",), scale_required=False, high_precision_ok=True, exclude=markers,
    )
    unscaled = sorted(w for w, q in weights.items() if q.scale is None and is_fp8_weight(tensors[w]))
    if unscaled and any(q.scale for w, q in weights.items() if is_fp8_weight(tensors[w])):
        raise CorruptCheckpointError(
            f"fp8 weight {unscaled[0]} has no {sibling(module_of(unscaled[0]), 'scale_weight')}, while other fp8 "
            f"weights of this {family} checkpoint have one ({len(unscaled)} without); the file lost tensors "
            "or is corrupt, and decoding those weights unscaled would be wrong",
            tensor=unscaled[0],
        )
    details: dict[str, Any] = {
        "markers": {m: {"dtype": tensors[m].dtype, "numel": math.prod(tensors[m].shape)} for m in markers},
        "prefixes": list(storage),
        "storage_dtype": sorted(set(storage.values())),
        "full_precision_matrix_mult": any(math.prod(tensors[m].shape) == 2 for m in markers),
    }
    mismatch = sorted(
        w for w in weights
        if is_fp8_weight(tensors[w]) and tensors[w].dtype != _storage_for(w, storage, tensors[w].dtype)
    )
    if mismatch:
        details["dtype_differs_from_marker"] = mismatch
    high = sorted(w for w, q in weights.items() if q.scale and not is_fp8_weight(tensors[w]))
    if high:
        details["scaled_high_precision"] = high
    return make_info(ckpt, scheme, family, weights, details, auxiliary=markers)


def _marker_storage(t: TensorInfo) -> str:
    if t.dtype == "float32":
        return "float8_e4m3fn"
    if is_fp8_weight(t):
        return t.dtype
    raise CorruptCheckpointError(
        f"marker {t.name} is stored as {t.dtype}; a ComfyUI scaled_fp8 marker is an fp8 tensor "
        "(or float32, meaning float8_e4m3fn)",
        tensor=t.name,
    )


def _storage_for(key: str, storage: dict[str, str], default: str) -> str:
    prefixes = [p for p in storage if key.startswith(p)]
    return storage[max(prefixes, key=len)] if prefixes else default


def detect_comfy_mixed(ckpt: CheckpointInfo, scheme: str, family: str) -> QuantizationInfo | None:
    """ComfyUI mixed precision: per-layer ``<m>.comfy_quant`` (uint8 JSON bytes, not read here)
    and/or ``__metadata__["_quantization_metadata"]`` = ``{"layers": {name: {"format": ...}}}``,
    with ``<m>.weight_scale`` (scalar) and optional ``<m>.input_scale``."""
    tensors = ckpt.tensors
    markers = [k for k in tensors if k.rpartition(".")[2] == "comfy_quant"]
    has_meta = "_quantization_metadata" in ckpt.metadata
    if not markers and not has_meta:
        return None
    legacy = [k for k in tensors if k == "scaled_fp8" or k.endswith(".scaled_fp8")]  # superseded
    layers, version = _metadata_layers(ckpt) if has_meta else ({}, None)
    for k in markers:
        _check_comfy_quant_tensor(tensors[k])
        layers.setdefault(module_of(k), None)
    for module, fmt in layers.items():
        _check_comfy_layer(tensors, module, fmt)
    weights = scaled_weights(
        ckpt, family=family, layouts=[TENSOR], scale_leaves=("weight_scale",),
        input_leaves=("input_scale",), scale_required=False, exclude=markers + legacy,
    )
    for module in layers:
        w = sibling(module, "weight")
        if weights[w].scale is None:
            raise CorruptCheckpointError(
                f"layer {module} is marked as ComfyUI-quantized but has no {sibling(module, 'weight_scale')}; "
                "its fp8 weight cannot be decoded",
                tensor=w,
            )
    details: dict[str, Any] = {
        "layout": " + ".join(x for x, on in (("comfy_quant tensors", markers), ("_quantization_metadata", has_meta)) if on),
        "formats": dict(Counter(f or "in comfy_quant data (not read at inspect)" for f in layers.values())),
    }
    if version is not None:
        details["format_version"] = version
    extra = sorted(module_of(w) for w, q in weights.items() if q.scale and module_of(w) not in layers)
    if extra:
        details["scaled_without_entry"] = extra
    return make_info(ckpt, scheme, family, weights, details, auxiliary=markers + legacy)


def _check_comfy_quant_tensor(t: TensorInfo) -> None:
    if t.dtype != "uint8" or len(t.shape) != 1:
        raise CorruptCheckpointError(
            f"{t.name} is stored as {t.dtype} {list(t.shape)}; a comfy_quant entry is a 1-D uint8 "
            "tensor of JSON bytes",
            tensor=t.name,
        )


def _metadata_layers(ckpt: CheckpointInfo) -> tuple[dict[str, str | None], Any]:
    try:
        meta = json.loads(ckpt.metadata["_quantization_metadata"])
    except ValueError as exc:
        raise CorruptCheckpointError(
            f"safetensors metadata _quantization_metadata of {ckpt.path} is not valid JSON: {exc}",
            path=ckpt.path,
        ) from exc
    raw = meta.get("layers") if isinstance(meta, dict) else None
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(
            f"safetensors metadata _quantization_metadata of {ckpt.path} has no 'layers' mapping",
            path=ckpt.path,
        )
    prefix = _layer_prefix(ckpt, list(raw))
    layers: dict[str, str | None] = {}
    for name, conf in raw.items():
        fmt = conf if isinstance(conf, str) else conf.get("format") if isinstance(conf, dict) else None
        layers[name if sibling(name, "weight") in ckpt.tensors else prefix + name] = fmt
    return layers, meta.get("format_version")


def _layer_prefix(ckpt: CheckpointInfo, names: list[str]) -> str:
    """The key prefix (``"model.diffusion_model."``) metadata layer names omit, if they omit one."""
    missing = [n for n in names if sibling(n, "weight") not in ckpt.tensors]
    if not missing:
        return ""
    tail = f".{missing[0]}.weight"
    hits = [k[: -len(tail) + 1] for k in ckpt.tensors if k.endswith(tail)]
    if len(hits) == 1 and all(sibling(hits[0] + n, "weight") in ckpt.tensors for n in missing):
        return hits[0]
    raise CorruptCheckpointError(
        f"_quantization_metadata of {ckpt.path} lists layer {missing[0]!r}, but the checkpoint has "
        f"no tensor {missing[0]}.weight (nor one under a single common prefix)",
        path=ckpt.path,
        tensor=sibling(missing[0], "weight"),
    )


def _check_comfy_layer(tensors: dict[str, TensorInfo], module: str, fmt: str | None) -> None:
    w = sibling(module, "weight")
    if w not in tensors:
        raise CorruptCheckpointError(
            f"layer {module} has a ComfyUI quantization entry but the checkpoint holds no {w}", tensor=w
        )
    wt = tensors[w]
    if fmt is not None and fmt not in COMFY_FP8_FORMATS:
        raise UnsupportedCheckpointError(
            f"layer {module} ({w}) uses ComfyUI quantization format {fmt!r}; the fp8-formats scheme "
            "decodes float8_e4m3fn and float8_e5m2 only: install a plugin for that format",
            tensor=w,
        )
    if not is_fp8_weight(wt):
        if fmt is None:
            raise UnsupportedCheckpointError(
                f"layer {module} is ComfyUI-quantized but its weight {w} is stored as {wt.dtype}: a "
                "non-fp8 ComfyUI format (nvfp4, int8, ...) that the fp8-formats scheme cannot decode",
                tensor=w,
            )
        raise CorruptCheckpointError(f"layer {module} is listed as {fmt} but {w} is stored as {wt.dtype}", tensor=w)
    if fmt is not None and wt.dtype != fmt:
        raise CorruptCheckpointError(f"layer {module} is listed as {fmt} but {w} is stored as {wt.dtype}", tensor=w)
    s = sibling(module, "weight_scale")
    if s in tensors and math.prod(tensors[s].shape) != 1:
        raise UnsupportedCheckpointError(
            f"{s} has shape {list(tensors[s].shape)}: a block-scaled ComfyUI format (such as mxfp8) "
            "that the fp8-formats scheme does not decode; float8 layers have one scale per tensor",
            tensor=s,
        )
