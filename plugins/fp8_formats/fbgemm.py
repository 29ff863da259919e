"""fp8 family ``fp8-fbgemm``: transformers ``quant_method: fbgemm_fp8`` (per-row
``<m>.weight_scale`` [N, 1] float32, ``modules_to_not_convert``)."""

from __future__ import annotations

from loaderkit.plugin import CHANNEL, CheckpointInfo, QuantizationInfo

from .common import Fp8Scheme, has_fp8_or_scales, hf_details, make_info, method_of, scaled_weights


class FbgemmFp8(Fp8Scheme):
    name = "fp8-fbgemm"
    family = "fbgemm_fp8 (per-row)"
    description = "quant_method fbgemm_fp8: <m>.weight_scale [N, 1] float32, modules_to_not_convert"
    priority = 45

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        qc, method = method_of(checkpoint)
        if method != "fbgemm_fp8" or not has_fp8_or_scales(checkpoint):
            return None
        weights = scaled_weights(
            checkpoint, family=self.family, layouts=[CHANNEL],
            scale_leaves=("weight_scale",), input_leaves=("input_scale",),
        )
        return make_info(checkpoint, self.name, self.family, weights, hf_details(checkpoint, qc, weights))
