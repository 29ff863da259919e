"""Header-only recognition of fp8 checkpoint families, shared by the ``fp8-formats`` schemes.

Every function here looks at a :class:`~loaderkit.CheckpointInfo` only: the config, the
safetensors metadata and the tensor keys, shapes and dtypes. No tensor data is read. A family is
recognised by its config (or marker) *and* by the scale tensors that go with each fp8 weight;
where the two disagree the checkpoint is refused with an error naming the tensor.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, Iterable, Sequence

from loaderkit.checkpoint import CheckpointInfo, QuantizationInfo, QuantizedWeight, TensorInfo
from loaderkit.errors import CorruptCheckpointError, UnsupportedCheckpointError

#: fp8 dtypes that hold weights (``float8_e8m0fnu`` only ever holds scales).
FP8_WEIGHT_DTYPES = frozenset({"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"})
#: dtypes an ordinary (``"float"``-encoded) scale may be stored in.
FLOAT_SCALE_DTYPES = frozenset({"float32", "bfloat16", "float16", "float64"})
#: every key leaf that names a weight scale in some family (used to spot unclaimed scales).
SCALE_LEAVES = ("weight_scale", "weight_scale_inv", "scale_weight")
INPUT_LEAVES = ("input_scale", "activation_scale", "scale_input")

#: a scale layout: (granularity, block shape or None).
Layout = tuple[str, "tuple[int, int] | None"]
TENSOR: Layout = ("tensor", None)
CHANNEL: Layout = ("channel", None)


# -- config and keys --------------------------------------------------------------------------


def quantization_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``quantization_config`` of a config.json, also when it sits under ``text_config``."""
    if not isinstance(config, dict):
        return None
    for holder in (config, config.get("text_config")):
        if isinstance(holder, dict):
            for key in ("quantization_config", "compression_config"):
                qc = holder.get(key)
                if isinstance(qc, dict):
                    return qc
    return None


def is_fp8_weight(t: TensorInfo) -> bool:
    """True for a tensor stored in an fp8 dtype that holds values (not e8m0 scales)."""
    return t.dtype in FP8_WEIGHT_DTYPES


def module_of(key: str) -> str:
    """``"a.b.weight_scale"`` -> ``"a.b"`` (``""`` for a top-level key)."""
    return key.rpartition(".")[0]


def sibling(module: str, leaf: str) -> str:
    """The key ``leaf`` of ``module``."""
    return f"{module}.{leaf}" if module else leaf


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# -- scale shapes -----------------------------------------------------------------------------


def expected_scale_shapes(weight_shape: Sequence[int], layout: Layout) -> list[tuple[int, ...]]:
    """The scale shapes a weight of ``weight_shape`` may have under ``layout`` (empty: none)."""
    gran, block = layout
    ws = tuple(weight_shape)
    if gran == "tensor":
        return [(), (1,)] + [(1,) * n for n in range(2, max(len(ws), 1) + 1)]
    if gran == "channel" and len(ws) >= 2:
        return [ws[:-1] + (1,), ws[:-1]]
    if gran == "block" and len(ws) >= 2 and block is not None:
        return [ws[:-2] + (ceil_div(ws[-2], block[0]), ceil_div(ws[-1], block[1]))]
    return []


def describe_layout(layout: Layout) -> str:
    gran, block = layout
    return f"block {block[0]}x{block[1]}" if gran == "block" and block else gran


def classify_scale(
    weight: TensorInfo, scale: TensorInfo, layouts: Sequence[Layout], family: str
) -> Layout:
    """Pick the first layout whose scale shape matches; otherwise raise naming the scale."""
    for layout in layouts:
        if tuple(scale.shape) in expected_scale_shapes(weight.shape, layout):
            return layout
    wants = "; ".join(
        f"{describe_layout(lo)}: {' or '.join(str(list(s)) for s in expected_scale_shapes(weight.shape, lo))}"
        for lo in layouts
    )
    raise CorruptCheckpointError(
        f"scale {scale.name} has shape {list(scale.shape)}, which does not fit its weight "
        f"{weight.name} of shape {list(weight.shape)} in a {family} checkpoint (expected {wants}); "
        "the checkpoint is corrupt or its quantization config does not match its tensors",
        tensor=scale.name,
    )


def scale_encoding(scale: TensorInfo, family: str, *, ue8m0_bytes: bool = False) -> str:
    """``"float"`` or ``"ue8m0"`` from the stored scale dtype; raise for anything else."""
    if scale.dtype in FLOAT_SCALE_DTYPES:
        return "float"
    if scale.dtype == "float8_e8m0fnu" or (scale.dtype == "uint8" and ue8m0_bytes):
        return "ue8m0"
    hint = " (uint8 scales are read as ue8m0 only with scale_fmt: \"ue8m0\")" if scale.dtype == "uint8" else ""
    raise CorruptCheckpointError(
        f"scale {scale.name} is stored as {scale.dtype}; a {family} scale must be float32, "
        f"bfloat16 or float16, or float8_e8m0fnu for power-of-two scales{hint}",
        tensor=scale.name,
    )


# -- pairing weights with their scales --------------------------------------------------------


def pair_by_leaf(tensors: dict[str, TensorInfo], leaves: Iterable[str], what: str) -> dict[str, str]:
    """Map ``<m>.weight`` -> ``<m>.<leaf>`` for every key ending in one of ``leaves``.

    :raises CorruptCheckpointError: a scale whose weight is absent, or two scales for one weight.
    """
    leaves = tuple(leaves)
    out: dict[str, str] = {}
    for key in tensors:
        module, _, leaf = key.rpartition(".")
        if leaf not in leaves:
            continue
        weight = sibling(module, "weight")
        if weight not in tensors:
            raise CorruptCheckpointError(
                f"{what} {key} has no weight: the checkpoint holds no tensor {weight}; "
                "the checkpoint is incomplete or a shard is missing",
                tensor=key,
            )
        if weight in out:
            raise CorruptCheckpointError(
                f"weight {weight} has two {what}s, {out[weight]} and {key}; keep one",
                tensor=key,
            )
        out[weight] = key
    return out


def scaled_weights(
    ckpt: CheckpointInfo,
    *,
    family: str,
    layouts: Sequence[Layout] | dict[str, Sequence[Layout]],
    scale_leaves: Sequence[str],
    input_leaves: Sequence[str] = ("input_scale",),
    scale_required: bool = True,
    high_precision_ok: bool = False,
    ue8m0_bytes: bool = False,
    exclude: Iterable[str] = (),
) -> dict[str, QuantizedWeight]:
    """Pair every fp8 weight with its scale and input scale, checking shapes and dtypes.

    :param layouts: the allowed scale layouts, or weight key -> its allowed layouts.
    :param scale_required: an fp8 weight without a scale is an error (else it is unscaled).
    :param high_precision_ok: a scale may belong to a non-fp8 weight (ComfyUI legacy files).
    :param exclude: keys that are not weights (markers).
    """
    tensors = ckpt.tensors
    scales = pair_by_leaf(tensors, scale_leaves, "weight scale")
    inputs = pair_by_leaf(tensors, input_leaves, "input scale")
    out: dict[str, QuantizedWeight] = {}
    for w, s in scales.items():
        _check_weight_dtype(tensors[w], s, family, high_precision_ok)
        allowed = layouts.get(w, ()) if isinstance(layouts, dict) else layouts
        gran, block = classify_scale(tensors[w], tensors[s], allowed, family)
        enc = scale_encoding(tensors[s], family, ue8m0_bytes=ue8m0_bytes)
        out[w] = QuantizedWeight(
            weight=w, scale=s, input_scale=inputs.get(w), granularity=gran, block=block, scale_encoding=enc
        )
    for key in _unscaled_fp8(tensors, out, exclude):
        if scale_required:
            names = " or ".join(sibling(module_of(key), leaf) for leaf in scale_leaves)
            raise CorruptCheckpointError(
                f"fp8 weight {key} has no scale ({names}) in a {family} checkpoint, so its values "
                "cannot be decoded; the checkpoint is incomplete or a shard is missing",
                tensor=key,
            )
        out[key] = QuantizedWeight(weight=key, input_scale=inputs.get(key))
    _check_inputs(tensors, inputs, out, family)
    return out


def _check_weight_dtype(wt: TensorInfo, scale: str, family: str, high_precision_ok: bool) -> None:
    if not wt.torch_dtype.is_floating_point:
        raise UnsupportedCheckpointError(
            f"weight {wt.name} is stored as {wt.dtype} with a scale {scale}: a packed or integer format "
            "(nvfp4, int8, ...) that the fp8-formats schemes do not decode; install a plugin for it",
            tensor=wt.name,
        )
    if not is_fp8_weight(wt) and not high_precision_ok:
        raise CorruptCheckpointError(
            f"{scale} is a {family} weight scale, but its weight {wt.name} is stored as {wt.dtype}, not "
            "fp8; the weight was dequantized without dropping its scale, or the file is corrupt",
            tensor=scale,
        )


def _unscaled_fp8(tensors: dict[str, TensorInfo], scaled: dict, exclude: Iterable[str]) -> list[str]:
    skip = set(exclude)
    return [k for k, t in tensors.items() if k not in scaled and k not in skip and is_fp8_weight(t)]


def _check_inputs(
    tensors: dict[str, TensorInfo], inputs: dict[str, str], weights: dict[str, QuantizedWeight], family: str
) -> None:
    for w, i in inputs.items():
        if w not in weights:
            raise CorruptCheckpointError(
                f"input scale {i} belongs to {w}, which is stored as {tensors[w].dtype} without a "
                f"weight scale; a {family} input scale only goes with a quantized weight",
                tensor=i,
            )
        it = tensors[i]
        if math.prod(it.shape) != 1 or it.dtype not in FLOAT_SCALE_DTYPES:
            raise CorruptCheckpointError(
                f"input scale {i} has shape {list(it.shape)} and dtype {it.dtype}; a static "
                "activation scale is one float32/bfloat16/float16 value",
                tensor=i,
            )


# -- summaries --------------------------------------------------------------------------------


#: leaves of attention-cache scales some fp8 checkpoints carry (not weights; dropped on load).
KV_SCALE_LEAVES = ("k_scale", "v_scale", "q_scale", "kv_scale", "prob_scale")


def kv_scale_keys(ckpt: CheckpointInfo) -> list[str]:
    """Keys of KV-cache / attention scales (``self_attn.k_scale``): auxiliary, not weight scales."""
    return [k for k, t in ckpt.tensors.items() if k.rpartition(".")[2] in KV_SCALE_LEAVES and not is_fp8_weight(t)]


def dominant_granularity(weights: dict[str, QuantizedWeight]) -> str:
    """The most common granularity, preferring scaled ones over ``"none"``."""
    counts = Counter(q.granularity for q in weights.values())
    scaled = {g: n for g, n in counts.items() if g != "none"}
    pool = scaled or counts
    return max(pool, key=lambda g: pool[g]) if pool else "none"


def layer_summary(ckpt: CheckpointInfo, weights: dict[str, QuantizedWeight]) -> dict[str, Any]:
    """Counts and names of quantized layers, for ``inspect``."""
    layers = sorted(module_of(w) for w in weights)
    unscaled = sorted(q.weight for q in weights.values() if not q.scale)
    out: dict[str, Any] = {
        "quantized_layers": len(layers),
        "layers": layers,
        "weight_dtypes": dict(Counter(ckpt.tensors[w].dtype for w in weights)),
        "granularities": dict(Counter(q.granularity for q in weights.values())),
    }
    scale_dtypes = Counter(ckpt.tensors[q.scale].dtype for q in weights.values() if q.scale)
    if scale_dtypes:
        out["scale_dtypes"] = dict(scale_dtypes)
    inputs = sum(1 for q in weights.values() if q.input_scale)
    if inputs:
        out["input_scales"] = inputs
    if unscaled and len(unscaled) < len(weights):
        out["unscaled_fp8"] = unscaled
    return out


def make_info(
    ckpt: CheckpointInfo,
    scheme: str,
    family: str,
    weights: dict[str, QuantizedWeight],
    details: dict[str, Any],
    auxiliary: Iterable[str] = (),
) -> QuantizationInfo:
    """Assemble the :class:`QuantizationInfo` with the common layer summary in ``details``;
    KV-cache scales join the auxiliary keys."""
    kv = kv_scale_keys(ckpt)
    if kv:
        details = {**details, "kv_cache_scales": kv}
    auxiliary = list(dict.fromkeys([*auxiliary, *kv]))
    return QuantizationInfo(
        scheme=scheme,
        family=family,
        granularity=dominant_granularity(weights),
        weights=weights,
        auxiliary=tuple(auxiliary),
        details={**details, **layer_summary(ckpt, weights)},
    )


# -- name matching (ignore lists) --------------------------------------------------------------


def split_name_patterns(entries: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """Split ignore/target entries into exact names, ``re:`` regexes and class-name-like entries.

    A class name (``"Linear"``, ``"MixtralSparseMoeBlock"``) cannot be checked from headers; it is
    an entry without a dot that starts with an upper-case letter.
    """
    names, regexes, classes = [], [], []
    for e in entries:
        if not isinstance(e, str):
            continue
        if e.startswith("re:"):
            regexes.append(e[3:])
        elif "." not in e and e[:1].isupper():
            classes.append(e)
        else:
            names.append(e)
    return names, regexes, classes


def name_matches(module: str, names: Iterable[str], regexes: Iterable[str]) -> bool:
    """compressed-tensors semantics: exact name, or ``re.match`` of a ``re:`` pattern."""
    if module in names:
        return True
    for rx in regexes:
        try:
            if re.match(rx, module):
                return True
        except re.error:
            continue
    return False


def modules_in_list(modules: Iterable[str], entries: Iterable[str]) -> list[str]:
    """Modules named by an ignore/skip list of plain names (exact, or as a dotted suffix/prefix)."""
    entries = [e for e in entries if isinstance(e, str)]
    hits = []
    for m in modules:
        for e in entries:
            if m == e or m.endswith("." + e) or m.startswith(e + "."):
                hits.append(m)
                break
    return sorted(hits)


# -- ComfyUI ----------------------------------------------------------------------------------

COMFY_FP8_FORMATS = frozenset({"float8_e4m3fn", "float8_e5m2"})


def detect_comfy_scaled(ckpt: CheckpointInfo, scheme: str, family: str) -> QuantizationInfo | None:
    """ComfyUI legacy scaled fp8: a ``<prefix>scaled_fp8`` marker whose dtype is the fp8 storage
    dtype (float32 means e4m3fn), ``<m>.scale_weight`` and optional ``<m>.scale_input``.

    As in ComfyUI, every ``scale_weight`` multiplies its weight (also a high-precision one), and an
    fp8 weight without one is unscaled. A file with ``_quantization_metadata`` is left to
    ``comfy-mixed``, which ComfyUI prefers too.
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
