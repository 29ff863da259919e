"""fp8 family ``compressed-tensors-fp8``: compressed-tensors ``float-quantized`` checkpoints
(llm-compressor -> vLLM): fp8 weights, ``weight_scale`` in the model dtype, per tensor [1],
channel [N, 1], block grid or group [N, ceil(K/g)]; ``input_scale`` when static."""

from __future__ import annotations

from typing import Any

import torch

from loaderkit.errors import ConvertError, UnsupportedCheckpointError
from loaderkit.plugin import (
    CHANNEL,
    TENSOR,
    CheckpointInfo,
    EncodedTensor,
    Encoder,
    Layout,
    QuantizationInfo,
    block_grid,
    describe_layout,
    to_torch,
)

from .common import (
    Fp8Scheme,
    has_fp8_or_scales,
    is_transformers_config,
    linear_weight_problem,
    make_info,
    method_of,
    module_of,
    name_matches,
    scaled_weights,
    sibling,
    split_name_patterns,
)


class CompressedTensorsEncoder(Encoder):
    """Writes compressed-tensors ``float-quantized`` fp8: what llm-compressor's data-free presets
    write (FP8_DYNAMIC per channel, per tensor; FP8_BLOCK) and vLLM and transformers read —
    ``<m>.weight`` float8_e4m3fn and ``<m>.weight_scale`` in the model's compute dtype, Linear
    weights only, with a matching ``quantization_config``."""

    name = "compressed-tensors"
    granularities = ("channel", "tensor", "block")

    def accepts(self, checkpoint: CheckpointInfo) -> bool:
        return is_transformers_config(checkpoint.config)

    def holds(self, module, tensor: str, dtype: str) -> str:
        return linear_weight_problem(module, tensor, "compressed-tensors")

    def check(self, plan) -> None:
        quantized = [tp for tp in plan.tensors.values() if tp.conversion == "quantize"]
        for tp in quantized:
            if tp.target_dtype != "float8_e4m3fn":
                raise ConvertError(f"compressed-tensors float-quantized weights are float8_e4m3fn; the plan "
                                   f"stores {tp.source} as {tp.target_dtype}", tensor=tp.source)
        computes = {plan.modules[module_of(tp.key)].compute_dtype for tp in quantized}
        if len(computes) > 1:
            raise ConvertError(
                f"quantized Linear modules compute in different dtypes ({', '.join(sorted(computes))}); "
                "compressed-tensors stores every weight_scale in the model dtype; pass a strategy whose "
                "quantized modules share one compute dtype"
            )
        grans = {tp.granularity for tp in quantized}
        if len(grans) > 1:
            raise ConvertError(f"compressed-tensors writes one weight strategy here; the plan mixes {sorted(grans)}")

    def outputs(self, tensor, module) -> tuple[EncodedTensor, ...]:
        n, k = tensor.shape
        shape = {"tensor": (1,), "channel": (n, 1)}.get(tensor.granularity) or block_grid(tensor.shape, tensor.block)
        return (
            EncodedTensor(name=tensor.source, dtype=tensor.target_dtype, shape=tensor.shape),
            EncodedTensor(name=sibling(module_of(tensor.source), "weight_scale"), dtype=module.compute_dtype, shape=shape),
        )

    def encode(self, tensor, module, q, scale) -> dict[str, torch.Tensor]:
        weight, scale_out = self.outputs(tensor, module)
        return {weight.name: q, scale_out.name: scale.to(to_torch(scale_out.dtype)).reshape(scale_out.shape)}

    def edit_config(self, config: dict[str, Any], plan) -> dict[str, Any]:
        """The ``quantization_config`` llm-compressor writes for FP8_DYNAMIC (channel; also used
        for tensor) and FP8_BLOCK (block) — dynamic activation scales; unquantized Linear modules
        in ``ignore``."""
        quantized = [tp for tp in plan.tensors.values() if tp.conversion == "quantize"]
        gran, block = quantized[0].granularity, quantized[0].block
        done = {module_of(tp.key) for tp in quantized}
        ignore = sorted(m.name for m in plan.modules.values() if m.kind == "linear" and m.name not in done)
        weights = {"dynamic": False, "group_size": None, "num_bits": 8, "strategy": gran,
                   "symmetric": True, "type": "float"}
        inputs = {"dynamic": True, "group_size": None, "num_bits": 8, "strategy": "token",
                  "symmetric": True, "type": "float"}
        if gran == "block":
            weights["block_structure"] = list(block)
            inputs.update(group_size=block[1], strategy="group")
        group = {"format": "float-quantized", "input_activations": inputs, "output_activations": None,
                 "targets": ["Linear"], "weights": weights}
        config["quantization_config"] = {
            "config_groups": {"group_0": group}, "format": "float-quantized", "global_compression_ratio": None,
            "ignore": ignore, "kv_cache_scheme": None, "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
        }
        return config


class CompressedTensorsFp8(Fp8Scheme):
    name = "compressed-tensors-fp8"
    family = "compressed-tensors float-quantized fp8"
    description = "quant_method compressed-tensors, float 8-bit weights: tensor / channel / block / group"
    priority = 50

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        return _detect_compressed_tensors(checkpoint, self.name, self.family)

    def encoder(self) -> CompressedTensorsEncoder:
        return CompressedTensorsEncoder()



_CT_FORMATS = frozenset({"float-quantized", "naive-quantized", "mxfp8-quantized"})


def _detect_compressed_tensors(ckpt: CheckpointInfo, scheme: str, family: str) -> QuantizationInfo | None:
    """compressed-tensors ``float-quantized``: fp8 weights, ``weight_scale`` in the model dtype,
    per tensor [1], channel [N, 1], block grid or group [N, ceil(K/g)]; ``input_scale`` when static."""
    qc, method = method_of(ckpt)
    if method != "compressed-tensors":
        return None
    fp8 = _ct_fp8_groups(ckpt, qc)
    if not fp8 or not has_fp8_or_scales(ckpt):
        return None
    names, regexes, classes = split_name_patterns(qc.get("ignore") or [])
    mx = any((g.get("format") or qc.get("format")) == "mxfp8-quantized" for g in fp8.values())
    weights = scaled_weights(
        ckpt, family=family + (" (MXFP8: group-32 ue8m0 scales)" if mx else ""), layouts=_ct_layouts(ckpt, fp8),
        scale_leaves=("weight_scale",), input_leaves=("input_scale",), ue8m0_bytes=mx,
    )
    modules = [module_of(w) for w, q in weights.items() if q.scale]
    details: dict[str, Any] = {
        "format": qc.get("format"),
        "quantization_status": qc.get("quantization_status"),
        "version": qc.get("version"),
        "config_groups": {n: _ct_group_summary(g) for n, g in fp8.items()},
        "ignore": list(qc.get("ignore") or []),
        "ignore_class_names": classes,
    }
    clash = sorted(m for m in modules if name_matches(m, names, regexes))
    if clash:
        details["ignored_but_quantized"] = clash
    return make_info(ckpt, scheme, family + (" (MXFP8: group-32 ue8m0 scales)" if mx else ""), weights, details)


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


def _ct_layout(group: dict[str, Any]) -> Layout:
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


def _ct_layouts(ckpt: CheckpointInfo, groups: dict[str, dict]) -> dict[str, list[Layout]]:
    """Weight key -> the layouts of the groups whose targets may match its module."""
    parsed = [(split_name_patterns(g.get("targets") or []), _ct_layout(g)) for g in groups.values()]
    out: dict[str, list[Layout]] = {}
    for key in ckpt.tensors:
        if key.rpartition(".")[2] != "weight_scale":
            continue
        module = module_of(key)
        hits = [lo for (n, r, c), lo in parsed if c or name_matches(module, n, r)]
        out[sibling(module, "weight")] = list(dict.fromkeys(hits or [lo for _, lo in parsed]))
    return out


def _ct_group_summary(group: dict[str, Any]) -> dict[str, Any]:
    a = group.get("input_activations") or None
    return {
        "targets": group.get("targets"),
        "weights": describe_layout(_ct_layout(group)),
        "input_activations": None if a is None
        else f"{a.get('strategy')}, {'dynamic' if a.get('dynamic') else 'static'}",
    }


def _pair_of_ints(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(b, int) and b > 0 for b in v)
