"""What the fp8 family schemes share: header-only recognition helpers and exact decoding.

Every function here looks at a :class:`~loaderkit.plugin.CheckpointInfo` only — the config, the
safetensors metadata and the tensor keys, shapes and dtypes; no tensor data is read. A family is
recognised by its config (or marker) *and* by the scale tensors that go with each fp8 weight;
where the two disagree the checkpoint is refused with an error naming the tensor. Scale-shape
rules come from :mod:`loaderkit.contract.layout` (via :mod:`loaderkit.plugin`), block expansion
from the codec, so they are judged the same way everywhere.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, ClassVar, Iterable, Sequence

import torch

from loaderkit.errors import CorruptCheckpointError, UnsupportedCheckpointError
from loaderkit.kernels.quant import expand_block_scale
from loaderkit.plugin import (
    CheckpointInfo,
    Layout,
    QuantizationInfo,
    QuantizedWeight,
    Scheme,
    TensorInfo,
    describe_layout,
    expected_scale_shapes,
)

#: fp8 dtypes that hold weights (``float8_e8m0fnu`` only ever holds scales).
FP8_WEIGHT_DTYPES = frozenset({"float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"})
#: dtypes an ordinary (``"float"``-encoded) scale may be stored in.
FLOAT_SCALE_DTYPES = frozenset({"float32", "bfloat16", "float16", "float64"})
#: every key leaf that names a weight scale in some family (used to spot unclaimed scales).
SCALE_LEAVES = ("weight_scale", "weight_scale_inv", "scale_weight")
INPUT_LEAVES = ("input_scale", "activation_scale", "scale_input")



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


# -- scale shapes (the rules themselves: loaderkit.plugin.expected_scale_shapes) ------------


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
    # A verdict depends only on the dtypes and shapes (and the allowed layouts): judged once per
    # combination, which a model repeats for thousands of weights. A failing one raises the first
    # time it is met, naming that weight, as judging each weight would.
    verdicts: dict[tuple, tuple[str, Any, str]] = {}
    make = QuantizedWeight.from_checked  # every value below is checked
    for w, s in scales.items():
        wt, st = tensors[w], tensors[s]
        allowed = layouts.get(w, ()) if isinstance(layouts, dict) else layouts
        key = (wt.dtype, wt.shape, st.dtype, st.shape, tuple(allowed))
        verdict = verdicts.get(key)
        if verdict is None:
            _check_weight_dtype(wt, s, family, high_precision_ok)
            gran, block = classify_scale(wt, st, allowed, family)
            verdict = verdicts[key] = (gran, block, scale_encoding(st, family, ue8m0_bytes=ue8m0_bytes))
        gran, block, enc = verdict
        out[w] = make(weight=w, scale=s, input_scale=inputs.get(w), granularity=gran,
                      block=None if block is None else tuple(block), scale_encoding=enc)
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


# -- decoding ---------------------------------------------------------------------------------


def dequantize(
    q: QuantizedWeight, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Decode one quantized weight: ``(weight.float() * scale).to(dtype)``, scale broadcast per
    :attr:`QuantizedWeight.granularity` (block scales expanded over a ceil-division grid).

    :param q: how the weight decodes (from the checkpoint's :class:`QuantizationInfo`).
    :param weight: the stored tensor ``q.weight``.
    :param scale: the stored tensor ``q.scale`` (``None`` for unscaled weights).
    :param dtype: the dtype to return.
    :raises CorruptCheckpointError: the scale is missing, has the wrong shape, or holds a NaN,
        an infinity or a negative value; the error names the weight and the scale.
    """
    if q.granularity == "none" or q.scale is None:
        return _decode(weight, dtype, None, None)
    if scale is None:
        raise CorruptCheckpointError(
            f"fp8 weight {q.weight} needs its scale {q.scale}, which was not provided", tensor=q.scale
        )
    shape = tuple(weight.shape)
    s = _decode_scale(q, scale).to(weight.device)
    _check_scale(q, s, shape)
    if q.granularity == "block" and len(shape) == 2:
        return _decode(weight, dtype, s, q.block)
    return _decode(weight, dtype, _expand_scale(q, s, shape), None)


def _decode(
    q: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None, block: tuple[int, int] | None
) -> torch.Tensor:
    """``(q.float() * scale).to(dtype)``: through loaderkit's bit-exact fast upcast (lookup tables
    on the CPU) for compute dtypes, by the expression itself otherwise."""
    if dtype.is_floating_point and dtype.itemsize > 1:
        from loaderkit.kernels.quant import upcast

        return upcast(q, dtype, scale, block)
    w = q.to(torch.float32)
    return (w if scale is None else w * scale).to(dtype)


def _decode_scale(q: QuantizedWeight, scale: torch.Tensor) -> torch.Tensor:
    """The scale as float32 values; ue8m0 bytes decode to ``2**(byte - 127)`` (255 is NaN)."""
    if q.scale_encoding == "ue8m0":
        if scale.dtype == torch.uint8:
            scale = scale.view(torch.float8_e8m0fnu)
        if scale.dtype != torch.float8_e8m0fnu:
            raise CorruptCheckpointError(
                f"scale {q.scale} of {q.weight} is {str(scale.dtype).removeprefix('torch.')}; "
                "ue8m0 scales are stored as float8_e8m0fnu or uint8 bytes",
                tensor=q.scale,
            )
    elif not scale.is_floating_point():
        raise CorruptCheckpointError(
            f"scale {q.scale} of {q.weight} is {str(scale.dtype).removeprefix('torch.')}, not a float",
            tensor=q.scale,
        )
    return scale.to(torch.float32)


def _check_scale(q: QuantizedWeight, s: torch.Tensor, shape: tuple[int, ...]) -> None:
    wants = expected_scale_shapes(shape, (q.granularity, q.block))
    if tuple(s.shape) not in wants:
        want = " or ".join(str(list(x)) for x in wants) or "none (unknown granularity)"
        raise CorruptCheckpointError(
            f"scale {q.scale} has shape {list(s.shape)}, but {describe_layout((q.granularity, q.block))} "
            f"scaling of weight {q.weight} with shape {list(shape)} needs {want}",
            tensor=q.scale,
        )
    if not bool(torch.isfinite(s).all()):
        raise CorruptCheckpointError(
            f"scale {q.scale} of weight {q.weight} holds NaN or infinite values; the checkpoint is corrupt",
            tensor=q.scale,
        )
    if bool((s < 0).any()):
        raise CorruptCheckpointError(
            f"scale {q.scale} of weight {q.weight} holds negative values; fp8 scales are >= 0",
            tensor=q.scale,
        )


def _expand_scale(q: QuantizedWeight, s: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if q.granularity == "tensor":
        return s.reshape(())
    if q.granularity == "channel":
        return s.reshape(shape[:-1] + (1,))
    return expand_block_scale(s, shape, q.block)


class Fp8Scheme(Scheme):
    """Shared decoding of the fp8 schemes; subclasses implement :meth:`detect`."""

    family: ClassVar[str] = ""

    def dequantize(
        self, q: QuantizedWeight, weight: torch.Tensor, tensors: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        """Decode ``weight`` with its scale from ``tensors`` (see :func:`dequantize`)."""
        scale = tensors.get(q.scale) if q.scale else None
        return dequantize(q, weight, scale, dtype)

    def decode_scale(self, q: QuantizedWeight, scale: torch.Tensor) -> torch.Tensor:
        """The scale of a weight kept as stored, as float32 (ue8m0 bytes as powers of two)."""
        return _decode_scale(q, scale)

    def dequantized_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config without ``quantization_config`` / ``compression_config`` (top level and
        ``text_config``), as a dequantized copy must be described."""
        for holder in (config, config.get("text_config")):
            if isinstance(holder, dict):
                holder.pop("quantization_config", None)
                holder.pop("compression_config", None)
        return config


# -- transformers / vLLM config helpers ------------------------------------------------------


def ignored_layers(qc: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("ignored_layers", "modules_to_not_convert", "ignore", "exclude_modules"):
        v = qc.get(key)
        if isinstance(v, list):
            out.extend(str(x) for x in v)
    return out


def method_of(ckpt: CheckpointInfo) -> tuple[dict[str, Any] | None, str | None]:
    qc = quantization_config(ckpt.config)
    return qc, (str(qc.get("quant_method", "")).lower() if qc else None)


def hf_details(ckpt: CheckpointInfo, qc: dict[str, Any], weights: dict[str, QuantizedWeight]) -> dict:
    ignored = ignored_layers(qc)
    modules = [module_of(w) for w, q in weights.items() if q.scale]
    details: dict[str, Any] = {"quant_method": qc.get("quant_method")}
    for key in ("activation_scheme", "fmt", "scale_fmt", "weight_block_size", "activation_scale_ub"):
        if key in qc:
            details[key] = qc[key]
    details["ignored_layers"] = ignored
    clash = modules_in_list(modules, ignored)
    if clash:
        details["ignored_but_quantized"] = clash
    return details


def has_fp8_or_scales(ckpt: CheckpointInfo) -> bool:
    """False for a checkpoint whose config names an fp8 method but whose tensors are all
    high precision and carry no scales (a dequantized copy that kept its config)."""
    return any(
        is_fp8_weight(t) or k.rpartition(".")[2] in (*SCALE_LEAVES, *INPUT_LEAVES)
        for k, t in ckpt.tensors.items()
    )


def block_size_of(raw: Any, ckpt: CheckpointInfo) -> tuple[int, int]:
    if isinstance(raw, (list, tuple)) and len(raw) == 2 and all(isinstance(b, int) and b > 0 for b in raw):
        return int(raw[0]), int(raw[1])
    raise CorruptCheckpointError(
        f"config of {ckpt.path} has weight_block_size {raw!r}; expected two positive integers like [128, 128]",
        path=ckpt.path,
    )


def any_ue8m0(weights: dict[str, QuantizedWeight]) -> bool:
    return any(q.scale_encoding == "ue8m0" for q in weights.values())




def is_transformers_config(config: dict | None) -> bool:
    """A transformers ``config.json`` (``architectures`` / ``model_type``, not diffusers' ``_class_name``)."""
    return isinstance(config, dict) and "_class_name" not in config and bool(
        config.get("architectures") or config.get("model_type")
    )


def linear_weight_problem(module: Any, tensor: str, what: str) -> str:
    """Why a layout that stores 2-D ``nn.Linear`` weights only cannot hold this tensor ('' if it can)."""
    info = module.tensors.get(tensor)
    if tensor != "weight" or module.kind != "linear" or info is None or len(info.shape) != 2:
        return f"the {what} layout stores fp8 only for Linear weights"
    return ""
