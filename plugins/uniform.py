"""Built-in plugin ``uniform``: the strategies ``fp32``, ``bf16`` and ``fp16``.

Every floating-point tensor is stored and computed in the strategy's dtype, except modules the
model's library keeps in float32 (``_keep_in_fp32_modules``), which stay float32 under bf16 and
fp16. Non-float tensors (integer ids, boolean masks) are never cast. An fp8 checkpoint is
dequantized (scales applied) into the strategy's dtype.
"""

from __future__ import annotations

from typing import ClassVar

from loaderkit.plugin import hookimpl, ModuleContext, ModuleDecision, Strategy, StrategyOptions


class UniformOptions(StrategyOptions):
    """Options of the uniform strategies.

    :ivar keep_fp32_modules: honour the model library's ``_keep_in_fp32_modules`` (default on).
    """

    keep_fp32_modules: bool = True


class Uniform(Strategy):
    """Store and compute every floating-point tensor in one dtype."""

    dtype: ClassVar[str] = "float32"
    Options = UniformOptions

    def build_dtype(self, ctx) -> str:
        return self.dtype

    def decide(self, module: ModuleContext, state: None = None) -> ModuleDecision:
        keep = module.keep_fp32 or (self.dtype == "float16" and module.keep_fp32_fp16)
        if self.dtype != "float32" and keep and self.options.keep_fp32_modules:
            return ModuleDecision(compute="float32", reason="kept in float32 by the model's library")
        return ModuleDecision(compute=self.dtype)


class FP32(Uniform):
    name = "fp32"
    description = "store and compute in float32"
    dtype = "float32"


class BF16(Uniform):
    name = "bf16"
    description = "store and compute in bfloat16 (library-declared fp32 modules stay float32)"
    dtype = "bfloat16"


class FP16(Uniform):
    name = "fp16"
    description = "store and compute in float16 (library-declared fp32 modules stay float32)"
    dtype = "float16"


@hookimpl
def loaderkit_register_strategies(register):
    for cls in (FP32, BF16, FP16):
        register(cls)
