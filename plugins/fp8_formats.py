"""Built-in plugin ``fp8-formats``: the quantization schemes of common fp8 checkpoint families.

Each scheme recognises one family from headers alone (config, safetensors metadata, keys, shapes,
dtypes) and decodes its weights exactly: ``W = q.float() * scale`` in float32, broadcast per
granularity, then cast. The stored scale is always a multiplier, whatever its key is called.

=========================  ===================================================================
scheme                     family
=========================  ===================================================================
``comfy-mixed``            ComfyUI mixed precision (``<m>.comfy_quant`` or ``_quantization_metadata``)
``comfy-scaled-fp8``       ComfyUI legacy scaled fp8 (``<prefix>scaled_fp8`` marker)
``compressed-tensors-fp8`` compressed-tensors ``float-quantized`` (tensor / channel / block / group)
``fp8-block``              DeepSeek-V3 / transformers FineGrainedFP8 (``weight_block_size``)
``fp8-fbgemm``             transformers ``fbgemm_fp8`` (per-row ``weight_scale`` [N, 1])
``fp8-tensor``             AutoFP8 / vLLM / transformers per-tensor ``quant_method: fp8``
``modelopt-fp8``           NVIDIA ModelOpt ``quant_algo`` FP8 / FP8_PER_CHANNEL_PER_TOKEN
``fp8-keys``               scaled fp8 without a quantization config, recognised from key names
``fp8-plain``              unscaled fp8 weights (flux1-dev-fp8, ``*_fp8_e4m3fn`` files)
=========================  ===================================================================
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from loaderkit.checkpoint import CheckpointInfo, QuantizationInfo, QuantizedWeight, Scheme
from loaderkit.errors import CorruptCheckpointError, UnsupportedCheckpointError
from loaderkit.hookspecs import hookimpl

from . import _fp8_families as fam
from ._fp8_families import CHANNEL, TENSOR


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
        from loaderkit.quant import upcast

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
    wants = fam.expected_scale_shapes(shape, (q.granularity, q.block))
    if tuple(s.shape) not in wants:
        want = " or ".join(str(list(x)) for x in wants) or "none (unknown granularity)"
        raise CorruptCheckpointError(
            f"scale {q.scale} has shape {list(s.shape)}, but {fam.describe_layout((q.granularity, q.block))} "
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
    b0, b1 = q.block
    n, k = shape[-2:]
    return s.repeat_interleave(b0, dim=-2)[..., :n, :].repeat_interleave(b1, dim=-1)[..., :k]


class Fp8Scheme(Scheme):
    """Shared decoding of the fp8 schemes; subclasses implement :meth:`detect`."""

    family: ClassVar[str] = ""

    def dequantize(
        self, q: QuantizedWeight, weight: torch.Tensor, tensors: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        """Decode ``weight`` with its scale from ``tensors`` (see :func:`dequantize`)."""
        scale = tensors.get(q.scale) if q.scale else None
        return dequantize(q, weight, scale, dtype)


# -- transformers / vLLM config families --------------------------------------------------------


def _ignored(qc: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in ("ignored_layers", "modules_to_not_convert", "ignore", "exclude_modules"):
        v = qc.get(key)
        if isinstance(v, list):
            out.extend(str(x) for x in v)
    return out


def _method(ckpt: CheckpointInfo) -> tuple[dict[str, Any] | None, str | None]:
    qc = fam.quantization_config(ckpt.config)
    return qc, (str(qc.get("quant_method", "")).lower() if qc else None)


def _hf_details(ckpt: CheckpointInfo, qc: dict[str, Any], weights: dict[str, QuantizedWeight]) -> dict:
    ignored = _ignored(qc)
    modules = [fam.module_of(w) for w, q in weights.items() if q.scale]
    details: dict[str, Any] = {"quant_method": qc.get("quant_method")}
    for key in ("activation_scheme", "fmt", "scale_fmt", "weight_block_size", "activation_scale_ub"):
        if key in qc:
            details[key] = qc[key]
    details["ignored_layers"] = ignored
    clash = fam.modules_in_list(modules, ignored)
    if clash:
        details["ignored_but_quantized"] = clash
    return details


class PerTensorFp8(Fp8Scheme):
    name = "fp8-tensor"
    family = "per-tensor fp8 (AutoFP8 / vLLM)"
    description = "quant_method fp8 without weight_block_size: <m>.weight_scale [] or [1], optional input_scale"
    priority = 40

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        qc, method = _method(checkpoint)
        if method != "fp8" or qc.get("weight_block_size"):
            return None
        if not _has_fp8_or_scales(checkpoint):
            return None
        weights = fam.scaled_weights(
            checkpoint, family=self.family, layouts=[TENSOR],
            scale_leaves=("weight_scale", "weight_scale_inv"), input_leaves=("input_scale", "activation_scale"),
        )
        return fam.make_info(checkpoint, self.name, self.family, weights, _hf_details(checkpoint, qc, weights))


class BlockFp8(Fp8Scheme):
    name = "fp8-block"
    family = "block-scaled fp8 (DeepSeek-V3 / FineGrainedFP8)"
    description = "quant_method fp8 with weight_block_size: <m>.weight_scale_inv over a ceil-division grid"
    priority = 45

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        qc, method = _method(checkpoint)
        if method != "fp8" or not qc.get("weight_block_size"):
            return None
        block = _block_size(qc.get("weight_block_size"), checkpoint)
        if not _has_fp8_or_scales(checkpoint):
            return None
        ue8m0 = str(qc.get("scale_fmt", "")).lower() == "ue8m0"
        weights = fam.scaled_weights(
            checkpoint, family=self.family, layouts=[("block", block)],
            scale_leaves=("weight_scale_inv", "weight_scale"), input_leaves=("input_scale", "activation_scale"),
            ue8m0_bytes=ue8m0,
        )
        details = _hf_details(checkpoint, qc, weights)
        details["partial_blocks"] = sorted(
            w for w, q in weights.items()
            if q.scale and any(d % b for d, b in zip(checkpoint.tensors[w].shape[-2:], block))
        )
        family = self.family + (", ue8m0 scales" if ue8m0 or _any_ue8m0(weights) else "")
        return fam.make_info(checkpoint, self.name, family, weights, details)


class FbgemmFp8(Fp8Scheme):
    name = "fp8-fbgemm"
    family = "fbgemm_fp8 (per-row)"
    description = "quant_method fbgemm_fp8: <m>.weight_scale [N, 1] float32, modules_to_not_convert"
    priority = 45

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        qc, method = _method(checkpoint)
        if method != "fbgemm_fp8" or not _has_fp8_or_scales(checkpoint):
            return None
        weights = fam.scaled_weights(
            checkpoint, family=self.family, layouts=[CHANNEL],
            scale_leaves=("weight_scale",), input_leaves=("input_scale",),
        )
        return fam.make_info(checkpoint, self.name, self.family, weights, _hf_details(checkpoint, qc, weights))


class ModelOptFp8(Fp8Scheme):
    name = "modelopt-fp8"
    family = "NVIDIA ModelOpt fp8"
    description = "quant_method modelopt, quant_algo FP8 (per tensor) or FP8_PER_CHANNEL_PER_TOKEN"
    priority = 40
    LAYOUTS: ClassVar[dict[str, fam.Layout]] = {"FP8": TENSOR, "FP8_PER_CHANNEL_PER_TOKEN": CHANNEL}

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        qc, method = _method(checkpoint)
        if method != "modelopt":
            return None
        inner = qc.get("quantization") if isinstance(qc.get("quantization"), dict) else qc
        algo = str(inner.get("quant_algo", "")).upper()
        if algo not in self.LAYOUTS or not _has_fp8_or_scales(checkpoint):
            return None
        weights = fam.scaled_weights(
            checkpoint, family=self.family, layouts=[self.LAYOUTS[algo]],
            scale_leaves=("weight_scale",), input_leaves=("input_scale",),
        )
        details = {**_hf_details(checkpoint, inner, weights), "quant_method": "modelopt", "quant_algo": algo}
        return fam.make_info(checkpoint, self.name, self.family, weights, details)


class KeysOnlyFp8(Fp8Scheme):
    name = "fp8-keys"
    family = "scaled fp8 without a quantization config (recognised from key names)"
    description = "fp8 weights with <m>.weight_scale / weight_scale_inv / scale_weight and no config"
    priority = 20

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        if fam.quantization_config(checkpoint.config) is not None:
            return None
        tensors = checkpoint.tensors
        if not any(k.rpartition(".")[2] in fam.SCALE_LEAVES for k in tensors):
            return None
        if not any(fam.is_fp8_weight(t) for t in tensors.values()):
            return None
        weights = fam.scaled_weights(
            checkpoint, family=self.family, layouts=[TENSOR, CHANNEL, ("block", (128, 128))],
            scale_leaves=fam.SCALE_LEAVES, input_leaves=fam.INPUT_LEAVES,
        )
        details = {"note": "no quantization_config found; scale layout inferred from shapes "
                           "(block scales assumed 128x128)"}
        return fam.make_info(checkpoint, self.name, self.family, weights, details)


class PlainFp8(Fp8Scheme):
    name = "fp8-plain"
    family = "plain fp8 (unscaled)"
    description = "fp8 weights with no scales and no quantization config: decoded by a plain cast"
    priority = 10

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        if fam.quantization_config(checkpoint.config) is not None:
            return None
        tensors = checkpoint.tensors
        fp8 = [k for k, t in tensors.items() if fam.is_fp8_weight(t)]
        if not fp8:
            return None
        for k in fp8:
            for leaf in (*fam.SCALE_LEAVES, *fam.INPUT_LEAVES, "comfy_quant"):
                companion = fam.sibling(fam.module_of(k), leaf)
                if companion in tensors:
                    raise CorruptCheckpointError(
                        f"fp8 weight {k} has a companion {companion}, but no fp8 scheme recognised "
                        "the checkpoint; add the config.json it was published with",
                        tensor=companion,
                    )
        weights = {k: QuantizedWeight(weight=k) for k in fp8}
        return fam.make_info(checkpoint, self.name, self.family, weights, {})


class ComfyScaledFp8(Fp8Scheme):
    name = "comfy-scaled-fp8"
    family = "ComfyUI scaled fp8 (legacy)"
    description = "a <prefix>scaled_fp8 marker; <m>.scale_weight float32 scalar, optional scale_input"
    priority = 55

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        return fam.detect_comfy_scaled(checkpoint, self.name, self.family)


class ComfyMixed(Fp8Scheme):
    name = "comfy-mixed"
    family = "ComfyUI mixed precision"
    description = "<m>.comfy_quant or __metadata__ _quantization_metadata layers; weight_scale scalar"
    priority = 60

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        return fam.detect_comfy_mixed(checkpoint, self.name, self.family)


class CompressedTensorsFp8(Fp8Scheme):
    name = "compressed-tensors-fp8"
    family = "compressed-tensors float-quantized fp8"
    description = "quant_method compressed-tensors, float 8-bit weights: tensor / channel / block / group"
    priority = 50

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        return _detect_compressed_tensors(checkpoint, self.name, self.family)


# -- compressed-tensors -----------------------------------------------------------------------

_CT_FORMATS = frozenset({"float-quantized", "naive-quantized"})


def _detect_compressed_tensors(ckpt: CheckpointInfo, scheme: str, family: str) -> QuantizationInfo | None:
    """compressed-tensors ``float-quantized``: fp8 weights, ``weight_scale`` in the model dtype,
    per tensor [1], channel [N, 1], block grid or group [N, ceil(K/g)]; ``input_scale`` when static."""
    qc, method = _method(ckpt)
    if method != "compressed-tensors":
        return None
    fp8 = _ct_fp8_groups(ckpt, qc)
    if not fp8 or not _has_fp8_or_scales(ckpt):
        return None
    names, regexes, classes = fam.split_name_patterns(qc.get("ignore") or [])
    weights = fam.scaled_weights(
        ckpt, family=family, layouts=_ct_layouts(ckpt, fp8), scale_leaves=("weight_scale",),
        input_leaves=("input_scale",),
    )
    modules = [fam.module_of(w) for w, q in weights.items() if q.scale]
    details: dict[str, Any] = {
        "format": qc.get("format"),
        "quantization_status": qc.get("quantization_status"),
        "version": qc.get("version"),
        "config_groups": {n: _ct_group_summary(g) for n, g in fp8.items()},
        "ignore": list(qc.get("ignore") or []),
        "ignore_class_names": classes,
    }
    clash = sorted(m for m in modules if fam.name_matches(m, names, regexes))
    if clash:
        details["ignored_but_quantized"] = clash
    return fam.make_info(ckpt, scheme, family, weights, details)


def _ct_fp8_groups(ckpt: CheckpointInfo, qc: dict[str, Any]) -> dict[str, dict]:
    """The config groups, when every one is fp8 float-quantized (none: not this scheme's)."""
    groups = qc.get("config_groups") or {}
    fp8 = {n: g for n, g in groups.items() if _ct_is_fp8(g, qc)}
    other = sorted(set(groups) - set(fp8))
    if fp8 and other:
        raise UnsupportedCheckpointError(
            f"compressed-tensors config groups {other} of {ckpt.path} are not fp8 float-quantized; "
            "the fp8-formats scheme decodes a checkpoint only when every group is",
            path=ckpt.path,
        )
    for key in ckpt.tensors if fp8 else ():
        if key.rpartition(".")[2] in ("weight_zero_point", "weight_global_scale"):
            raise UnsupportedCheckpointError(
                f"{key}: asymmetric or globally scaled compressed-tensors weights are not fp8 "
                "float-quantized; the fp8-formats scheme cannot decode them",
                tensor=key,
            )
    return fp8


def _ct_is_fp8(group: Any, qc: dict[str, Any]) -> bool:
    if not isinstance(group, dict):
        return False
    w = group.get("weights") or {}
    fmt = group.get("format") or qc.get("format")
    return w.get("type") == "float" and w.get("num_bits") == 8 and fmt in _CT_FORMATS


def _ct_layout(group: dict[str, Any]) -> fam.Layout:
    w = group.get("weights") or {}
    strategy = w.get("strategy")
    if strategy == "tensor":
        return TENSOR
    if strategy == "channel":
        return CHANNEL
    if strategy == "block" and _pair_of_ints(w.get("block_structure")):
        return ("block", tuple(w["block_structure"]))
    if strategy == "group" and isinstance(w.get("group_size"), int) and w["group_size"] > 0:
        return ("block", (1, w["group_size"]))
    raise UnsupportedCheckpointError(
        f"compressed-tensors fp8 weights with strategy {strategy!r} (block_structure "
        f"{w.get('block_structure')!r}, group_size {w.get('group_size')!r}) are not decoded by fp8-formats"
    )


def _ct_layouts(ckpt: CheckpointInfo, groups: dict[str, dict]) -> dict[str, list[fam.Layout]]:
    """Weight key -> the layouts of the groups whose targets may match its module."""
    parsed = [(fam.split_name_patterns(g.get("targets") or []), _ct_layout(g)) for g in groups.values()]
    out: dict[str, list[fam.Layout]] = {}
    for key in ckpt.tensors:
        if key.rpartition(".")[2] != "weight_scale":
            continue
        module = fam.module_of(key)
        hits = [lo for (n, r, c), lo in parsed if c or fam.name_matches(module, n, r)]
        out[fam.sibling(module, "weight")] = list(dict.fromkeys(hits or [lo for _, lo in parsed]))
    return out


def _ct_group_summary(group: dict[str, Any]) -> dict[str, Any]:
    a = group.get("input_activations") or None
    return {
        "targets": group.get("targets"),
        "weights": fam.describe_layout(_ct_layout(group)),
        "input_activations": None if a is None
        else f"{a.get('strategy')}, {'dynamic' if a.get('dynamic') else 'static'}",
    }


def _pair_of_ints(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(b, int) and b > 0 for b in v)


def _has_fp8_or_scales(ckpt: CheckpointInfo) -> bool:
    """False for a checkpoint whose config names an fp8 method but whose tensors are all
    high precision and carry no scales (a dequantized copy that kept its config)."""
    return any(
        fam.is_fp8_weight(t) or k.rpartition(".")[2] in (*fam.SCALE_LEAVES, *fam.INPUT_LEAVES)
        for k, t in ckpt.tensors.items()
    )


def _block_size(raw: Any, ckpt: CheckpointInfo) -> tuple[int, int]:
    if isinstance(raw, (list, tuple)) and len(raw) == 2 and all(isinstance(b, int) and b > 0 for b in raw):
        return int(raw[0]), int(raw[1])
    raise CorruptCheckpointError(
        f"config of {ckpt.path} has weight_block_size {raw!r}; expected two positive integers like [128, 128]",
        path=ckpt.path,
    )


def _any_ue8m0(weights: dict[str, QuantizedWeight]) -> bool:
    return any(q.scale_encoding == "ue8m0" for q in weights.values())


SCHEMES: tuple[type[Fp8Scheme], ...] = (
    ComfyMixed, ComfyScaledFp8, CompressedTensorsFp8, BlockFp8, FbgemmFp8, PerTensorFp8, ModelOptFp8,
    KeysOnlyFp8, PlainFp8,
)


@hookimpl
def loaderkit_register_schemes(register) -> None:
    """Register every fp8 family scheme."""
    for cls in SCHEMES:
        register(cls())
