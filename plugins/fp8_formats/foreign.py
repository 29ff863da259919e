"""Quantized layouts loaderkit recognises and refuses by name (scheme ``refused-layouts``).

Loading another library's quantized tensors as if they were weights loads raw codes: the worst
outcome a loader can have, because nothing fails. This scheme recognises such layouts from
headers alone and describes them with a :attr:`~loaderkit.plugin.QuantizationInfo.refused`
reason, so ``inspect`` names them and ``plan``/``load``/``convert`` refuse them before reading
any data:

* optimum-quanto (``<m>.weight._data`` + ``<m>.weight._scale``, ``quanto_qmap.json``);
* bitsandbytes int8 / 4-bit (``<m>.SCB``, ``<m>.weight_format``, ``<m>.weight.absmax``,
  ``quant_state`` entries);
* GPTQ / AWQ packed integers (``<m>.qweight`` with ``qzeros`` / ``scales``);
* any ``quantization_config`` that no registered scheme understands (an unknown
  ``quant_method``, a compressed-tensors ``format`` other than the fp8 ones), when the tensors
  are quantized (integer or fp8 weights, or tensors named like quantization data).

It runs after every config-driven scheme and before the key-driven fp8 schemes, so a layout a
scheme does decode is never refused here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loaderkit.errors import UnsupportedCheckpointError
from loaderkit.plugin import CheckpointInfo, QuantizationInfo, Scheme, looks_like_quantization_data

from .common import is_fp8_weight, module_of, quantization_config

#: (name, how to recognise it from keys, what to do).
_LAYOUTS: tuple[tuple[str, Any, str], ...] = (
    (
        "optimum-quanto quantized weights (weight._data + weight._scale)",
        lambda keys: any(k.endswith(".weight._data") for k in keys) and any(k.endswith(".weight._scale") for k in keys),
        "dequantize it with optimum-quanto (load it with quanto, call dequantize/freeze off) and save plain "
        "weights, or load the original high-precision checkpoint",
    ),
    (
        "bitsandbytes quantized weights (SCB / absmax / quant_state)",
        lambda keys: any(k.endswith((".SCB", ".weight_format", ".absmax", ".quant_map")) or ".quant_state." in k
                         for k in keys),
        "dequantize it with bitsandbytes (transformers: model.dequantize()) and save plain weights",
    ),
    (
        "GPTQ/AWQ packed integer weights (qweight / qzeros / scales)",
        lambda keys: any(k.endswith(".qweight") for k in keys) and any(k.endswith((".qzeros", ".scales")) for k in keys),
        "dequantize it with the library that wrote it (gptqmodel, autoawq) and save plain weights",
    ),
)


class RefusedLayouts(Scheme):
    name = "refused-layouts"
    description = "names quantized layouts loaderkit cannot decode (quanto, bitsandbytes, GPTQ/AWQ, unknown configs) and refuses them"
    priority = 25

    def detect(self, checkpoint: CheckpointInfo) -> QuantizationInfo | None:
        keys = list(checkpoint.tensors)
        for family, matches, fix in _LAYOUTS:
            if matches(keys) or (family.startswith("optimum-quanto") and _has_quanto_map(checkpoint)):
                return _refused(family, f"loaderkit does not decode this layout; {fix}", {"layout": family})
        qc = quantization_config(checkpoint.config)
        if qc is not None and _looks_quantized(checkpoint):
            method, fmt = qc.get("quant_method"), qc.get("format")
            family = f"quantization_config quant_method={method!r}" + (f", format={fmt!r}" if fmt else "")
            return _refused(
                family,
                "no installed scheme decodes this quantization; loading it would load raw codes as weights. "
                "Install a scheme plugin for it, or dequantize it with the tool that wrote it",
                {"quant_method": method, "format": fmt, "config_keys": sorted(qc)},
            )
        return None

    def dequantize(self, q, weight, tensors, dtype):
        """Never reached: a refused layout fails at plan time. Refuses again if called directly."""
        raise UnsupportedCheckpointError(f"{q.weight}: this layout is refused by the {self.name} scheme; "
                                         "loaderkit does not decode it", tensor=q.weight)


def _refused(family: str, why: str, details: dict[str, Any]) -> QuantizationInfo:
    return QuantizationInfo(scheme=RefusedLayouts.name, family=family, granularity="none", weights={},
                            details=details, refused=why)


def _has_quanto_map(checkpoint: CheckpointInfo) -> bool:
    return (Path(checkpoint.root) / "quanto_qmap.json").is_file()


def _looks_quantized(checkpoint: CheckpointInfo) -> bool:
    """Integer or fp8 weights, or tensors named like quantization data: what a dequantized copy
    that kept its old ``quantization_config`` does not have."""
    for key, t in checkpoint.tensors.items():
        if looks_like_quantization_data(key) or is_fp8_weight(t):
            return True
        if key.rpartition(".")[2] == "weight" and not t.torch_dtype.is_floating_point and module_of(key):
            return True
    return False
