"""fp8 families described by a transformers / vLLM ``quantization_config``.

* ``fp8-tensor``: AutoFP8 / vLLM / transformers ``quant_method: fp8`` without ``weight_block_size``
  (``<m>.weight_scale`` [] or [1], optional ``input_scale``);
* ``fp8-block``: DeepSeek-V3 / transformers FineGrainedFP8 (``weight_block_size``,
  ``<m>.weight_scale_inv`` over a ceil-division grid, float or ue8m0 scales);
* ``modelopt-fp8``: NVIDIA ModelOpt ``quant_algo`` FP8 / FP8_PER_CHANNEL_PER_TOKEN.
"""

from __future__ import annotations

from typing import ClassVar

from loaderkit.plugin import CHANNEL, TENSOR, CheckpointInfo, Layout, QuantizationInfo

from .common import (
    Fp8Scheme,
    any_ue8m0,
    block_size_of,
    has_fp8_or_scales,
    hf_details,
    make_info,
    method_of,
    scaled_weights,
)


class PerTensorFp8(Fp8Scheme):
    name = "fp8-tensor"
    family = "per-tensor fp8 (AutoFP8 / vLLM)"
    description = "quant_method fp8 without weight_block_size: <m>.weight_scale [] or [1], optional input_scale"
    priority = 40

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        qc, method = method_of(checkpoint)
        if method != "fp8" or qc.get("weight_block_size"):
            return None
        if not has_fp8_or_scales(checkpoint):
            return None
        weights = scaled_weights(
            checkpoint, family=self.family, layouts=[TENSOR],
            scale_leaves=("weight_scale", "weight_scale_inv"), input_leaves=("input_scale", "activation_scale"),
        )
        return make_info(checkpoint, self.name, self.family, weights, hf_details(checkpoint, qc, weights))


class BlockFp8(Fp8Scheme):
    name = "fp8-block"
    family = "block-scaled fp8 (DeepSeek-V3 / FineGrainedFP8)"
    description = "quant_method fp8 with weight_block_size: <m>.weight_scale_inv over a ceil-division grid"
    priority = 45

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        qc, method = method_of(checkpoint)
        if method != "fp8" or not qc.get("weight_block_size"):
            return None
        block = block_size_of(qc.get("weight_block_size"), checkpoint)
        if not has_fp8_or_scales(checkpoint):
            return None
        ue8m0 = str(qc.get("scale_fmt", "")).lower() == "ue8m0"
        weights = scaled_weights(
            checkpoint, family=self.family, layouts=[("block", block)],
            scale_leaves=("weight_scale_inv", "weight_scale"), input_leaves=("input_scale", "activation_scale"),
            ue8m0_bytes=ue8m0,
        )
        details = hf_details(checkpoint, qc, weights)
        partial = {shape for shape in {checkpoint.tensors[w].shape for w, q in weights.items() if q.scale}
                   if any(d % b for d, b in zip(shape[-2:], block))}
        details["partial_blocks"] = sorted(
            w for w, q in weights.items() if q.scale and checkpoint.tensors[w].shape in partial
        )
        family = self.family + (", ue8m0 scales" if ue8m0 or any_ue8m0(weights) else "")
        return make_info(checkpoint, self.name, family, weights, details)


class ModelOptFp8(Fp8Scheme):
    name = "modelopt-fp8"
    family = "NVIDIA ModelOpt fp8"
    description = "quant_method modelopt, quant_algo FP8 (per tensor) or FP8_PER_CHANNEL_PER_TOKEN"
    priority = 40
    LAYOUTS: ClassVar[dict[str, Layout]] = {"FP8": TENSOR, "FP8_PER_CHANNEL_PER_TOKEN": CHANNEL}

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        qc, method = method_of(checkpoint)
        if method != "modelopt":
            return None
        inner = qc.get("quantization") if isinstance(qc.get("quantization"), dict) else qc
        algo = str(inner.get("quant_algo", "")).upper()
        if algo not in self.LAYOUTS or not has_fp8_or_scales(checkpoint):
            return None
        weights = scaled_weights(
            checkpoint, family=self.family, layouts=[self.LAYOUTS[algo]],
            scale_leaves=("weight_scale",), input_leaves=("input_scale",),
        )
        details = {**hf_details(checkpoint, inner, weights), "quant_method": "modelopt", "quant_algo": algo}
        return make_info(checkpoint, self.name, self.family, weights, details)
