"""fp8 families without a quantization config.

* ``fp8-keys``: scaled fp8 recognised from key names alone (``<m>.weight_scale``,
  ``weight_scale_inv``, ``scale_weight``; block scales assumed 128x128);
* ``fp8-plain``: unscaled fp8 weights (flux1-dev-fp8, ``*_fp8_e4m3fn`` files), decoded by a cast.
"""

from __future__ import annotations

from loaderkit.errors import CorruptCheckpointError
from loaderkit.plugin import CHANNEL, DEFAULT_BLOCK, TENSOR, CheckpointInfo, QuantizationInfo, QuantizedWeight

from .common import (
    INPUT_LEAVES,
    SCALE_LEAVES,
    Fp8Scheme,
    is_fp8_weight,
    make_info,
    module_of,
    quantization_config,
    scaled_weights,
    sibling,
)


class KeysOnlyFp8(Fp8Scheme):
    name = "fp8-keys"
    family = "scaled fp8 without a quantization config (recognised from key names)"
    description = "fp8 weights with <m>.weight_scale / weight_scale_inv / scale_weight and no config"
    priority = 20

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        if quantization_config(checkpoint.config) is not None:
            return None
        tensors = checkpoint.tensors
        if not any(k.rpartition(".")[2] in SCALE_LEAVES for k in tensors):
            return None
        if not any(is_fp8_weight(t) for t in tensors.values()):
            return None
        weights = scaled_weights(
            checkpoint, family=self.family, layouts=[TENSOR, CHANNEL, ("block", DEFAULT_BLOCK)],
            scale_leaves=SCALE_LEAVES, input_leaves=INPUT_LEAVES,
        )
        details = {"note": "no quantization_config found; scale layout inferred from shapes "
                           "(block scales assumed 128x128)"}
        return make_info(checkpoint, self.name, self.family, weights, details)


class PlainFp8(Fp8Scheme):
    name = "fp8-plain"
    family = "plain fp8 (unscaled)"
    description = "fp8 weights with no scales and no quantization config: decoded by a plain cast"
    priority = 10

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        if quantization_config(checkpoint.config) is not None:
            return None
        tensors = checkpoint.tensors
        fp8 = [k for k, t in tensors.items() if is_fp8_weight(t)]
        if not fp8:
            return None
        for k in fp8:
            for leaf in (*SCALE_LEAVES, *INPUT_LEAVES, "comfy_quant"):
                companion = sibling(module_of(k), leaf)
                if companion in tensors:
                    raise CorruptCheckpointError(
                        f"fp8 weight {k} has a companion {companion}, but no fp8 scheme recognised "
                        "the checkpoint; add the config.json it was published with",
                        tensor=companion,
                    )
        weights = {k: QuantizedWeight(weight=k) for k in fp8}
        return make_info(checkpoint, self.name, self.family, weights, {})
