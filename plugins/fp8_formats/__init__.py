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
``refused-layouts``        layouts recognised and refused by name (quanto, bitsandbytes, GPTQ/AWQ,
                           quantization configs no scheme understands): see :mod:`.foreign`
=========================  ===================================================================
"""

from __future__ import annotations

from loaderkit.plugin import hookimpl

from .comfy import ComfyMixed, ComfyScaledFp8
from .common import Fp8Scheme, dequantize
from .compressed_tensors import CompressedTensorsFp8
from .fbgemm import FbgemmFp8
from .foreign import RefusedLayouts
from .hf_config import BlockFp8, ModelOptFp8, PerTensorFp8
from .plain import KeysOnlyFp8, PlainFp8

SCHEMES: tuple[type[Fp8Scheme], ...] = (
    ComfyMixed, ComfyScaledFp8, CompressedTensorsFp8, BlockFp8, FbgemmFp8, PerTensorFp8, ModelOptFp8,
    RefusedLayouts, KeysOnlyFp8, PlainFp8,
)

__all__ = [
    "SCHEMES", "BlockFp8", "ComfyMixed", "ComfyScaledFp8", "CompressedTensorsFp8", "FbgemmFp8",
    "Fp8Scheme", "KeysOnlyFp8", "ModelOptFp8", "PerTensorFp8", "PlainFp8", "RefusedLayouts", "dequantize",
]


@hookimpl
def loaderkit_register_schemes(register) -> None:
    """Register every fp8 family scheme."""
    for cls in SCHEMES:
        register(cls())
