"""Built-in plugin ``int8``: int8 weight-only storage for ``nn.Linear``, bfloat16 compute, on the CPU.

Every ``nn.Linear`` weight that the kernel can serve is quantized as it streams to ``int8`` with
one symmetric scale per output channel (:mod:`loaderkit.kernels.int8`), and its forward runs
``aten._weight_int8pack_mm`` with bfloat16 activations. Everything else computes in bfloat16,
and the modules the ``fp8`` strategy keeps in their compute dtype (the library's float32 and
never-low-precision modules, locked modules, embeddings and output heads, ``skip`` and
``skip_types``) stay in bfloat16 here too. A Linear the kernel cannot serve (``in_features`` not
a multiple of 16) stays in bfloat16, and the plan says why.

Refused at plan time, with the fix in the message: a device other than the CPU, a compute dtype
other than bfloat16, and an fp8 checkpoint (stored fp8 is never requantized; use ``fp8``).
``auto`` never picks this strategy: int8 is opt-in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from pydantic import field_validator

from loaderkit.errors import PlanError
from loaderkit.kernels.int8 import INT8_REASON, int8_problem, kernel_available
from loaderkit.plugin import (
    BuildContext,
    dtype_name,
    hookimpl,
    is_fp8,
    ModelContext,
    ModuleContext,
    ModuleDecision,
    Strategy,
    StrategyOptions,
)
from loaderkit.plugins.fp8 import DEFAULT_SKIP, kept_reason


class Int8Options(StrategyOptions):
    """Options of the ``int8`` strategy.

    :ivar compute_dtype: ``bfloat16``, the only dtype loaderkit runs the kernel in (aten's float32
        path is hundreds of times slower, and float16 would hold the per-channel scales: float16
        cannot represent the scales of rows whose largest weight is below ~7.8e-3 at full precision).
    :ivar skip: extra module-name regexes kept in bfloat16.
    :ivar skip_types: extra module class names kept in bfloat16.
    :ivar default_skips: apply the fp8 strategy's default skip patterns (embeddings, output heads).
    :ivar library_skips: honour the model library's "never store in low precision" patterns.
    :ivar quantize_sensitive: store in int8 even a model its library marks sensitive (a VAE).
    """

    compute_dtype: str = "bfloat16"
    skip: tuple[str, ...] = ()
    skip_types: tuple[str, ...] = ()
    default_skips: bool = True
    library_skips: bool = True
    quantize_sensitive: bool = False

    @field_validator("compute_dtype", mode="before")
    @classmethod
    def _compute(cls, v):
        name = dtype_name(v) if isinstance(v, (str, torch.dtype)) else v
        if name != "bfloat16":
            raise ValueError(
                f"compute_dtype must be bfloat16, not {v!r}: the int8 kernel runs with bfloat16 activations "
                "(its float32 path is hundreds of times slower; float16 scales lose small rows); for another "
                "compute dtype use strategy 'fp8' or a float strategy"
            )
        return name

    @field_validator("skip")
    @classmethod
    def _regexes(cls, v):
        for pat in v:
            re.compile(pat)
        return v


@dataclass(frozen=True)
class Int8State:
    """What :class:`Int8` works out once per load."""

    skips: tuple[re.Pattern, ...]
    device: str
    kind: str
    library_linears: tuple[str, ...]
    keep_all: str = ""


class Int8(Strategy):
    name = "int8"
    description = "int8 weight-only storage for nn.Linear (per-channel scales), bf16 compute; CPU"
    Options = Int8Options

    def build_dtype(self, ctx: BuildContext) -> str:
        return self.options.compute_dtype

    def prepare(self, ctx: ModelContext) -> Int8State:
        o = self.options
        dev = ctx.device
        if dev.kind != "cpu":
            raise PlanError(
                f"strategy int8: {dev.device} is not a CPU; loaderkit runs aten._weight_int8pack_mm on the CPU "
                "only (torch registers a CUDA kernel, which loaderkit does not check); on GPUs use strategy "
                "'fp8' (native fp8 matmul on sm >= 8.9)"
            )
        if not kernel_available():
            raise PlanError("strategy int8: this torch has no CPU kernel aten._weight_int8pack_mm; upgrade torch "
                            "(2.3 or newer) or use strategy 'fp8'")
        if o.compute_dtype not in dev.compute_dtypes:
            raise PlanError(f"strategy int8: {dev.device} cannot compute in {o.compute_dtype}; use strategy 'fp8' "
                            "with compute_dtype='float32'")
        _refuse_fp8(ctx)
        ctx.note("int8 kernel", "aten._weight_int8pack_mm", "nn.Linear weights stored in int8 with one scale per "
                 "output channel, activations cast to bfloat16")
        if not dev.is_fast("bfloat16"):
            ctx.note("compute", "bfloat16", f"note {dev.device} computes bfloat16 slowly: the modules kept in "
                     "bfloat16 run emulated (strategy 'fp32' may be faster)")
        keep_all = ""
        if ctx.facts.low_precision_advice and not o.quantize_sensitive:
            keep_all = f"{ctx.facts.low_precision_advice}; pass quantize_sensitive=True to store it in int8 anyway"
            ctx.note("whole model", f"kept in {o.compute_dtype}", keep_all)
        skips = tuple(re.compile(p) for p in (*(DEFAULT_SKIP if o.default_skips else ()), *o.skip))
        return Int8State(skips=skips, device=dev.device, kind=dev.kind,
                         library_linears=tuple(ctx.facts.linear_types), keep_all=keep_all)

    def decide(self, module: ModuleContext, state: Int8State) -> ModuleDecision:
        o = self.options
        keeps_fp32 = module.keep_fp32
        compute = "float32" if keeps_fp32 else o.compute_dtype
        weight = module.tensors.get("weight")
        if module.stacked_linear:
            return ModuleDecision(compute=compute, reason=f"stacked Linear weights ({', '.join(module.stacked_linear)}) "
                                  f"of a {module.type}: the int8 kernel covers nn.Linear only; stored in {compute}")
        if weight is None or module.kind != "linear" or not weight.torch_dtype.is_floating_point:
            reason = f"a {module.type} ({module.kind}), not an nn.Linear: stored in {compute}" if weight else ""
            return ModuleDecision(compute=compute, reason=reason)
        reason = kept_reason(module, keeps_fp32=keeps_fp32, keep_all=state.keep_all, library_skips=o.library_skips,
                             skip_types=o.skip_types, skips=state.skips, storage="int8")
        if reason is None and module.type in state.library_linears:
            reason = (f"a {module.type}, which the model's library declares linear but is not an nn.Linear: the "
                      "int8 kernel runs through F.linear")
        if reason is None:
            problem = int8_problem(linear=True, shape=weight.shape, compute=compute, device=state.device,
                                   kind=state.kind)
            reason = f"kept in {compute}: {problem}" if problem else None
        if reason is not None:
            return ModuleDecision(compute=compute, reason=reason)
        return ModuleDecision(compute=compute, storage={"weight": "int8"}, granularity="channel", kernel="native",
                              reason=f"{INT8_REASON}; quantized on load, one scale per output channel")


def _refuse_fp8(ctx: ModelContext) -> None:
    """An fp8 checkpoint stays fp8: quantizing its weights again would round them twice."""
    q = ctx.checkpoint.quantization
    stored = next((t for t in ctx.checkpoint.tensors.values() if is_fp8(t.dtype)), None)
    if q is None and stored is None:
        return
    what = ", ".join(([f"{stored.name!r} is stored in {stored.dtype}"] if stored is not None else [])
                     + ([q.family] if q is not None else []))
    raise PlanError(
        f"strategy int8: {ctx.checkpoint.path} is an fp8 checkpoint ({what}); stored fp8 is never requantized "
        "to int8 (it would be rounded twice); load it with strategy 'fp8', which keeps its bytes and scales",
        path=ctx.checkpoint.path,
        tensor=stored.name if stored is not None else None,
    )


@hookimpl
def loaderkit_register_strategies(register):
    register(Int8)
