"""Built-in plugin ``fp8``: store weights in fp8, compute in bf16 / fp16 / fp32.

The compute dtype is, by default (``compute_dtype="auto"``), the one the device runs fastest
(:func:`choose_compute`): where the device was measured (the CPU probe), the dtype in which an
fp8 Linear — decode plus matmul — ran faster, at the number of rows the model is said to run
(``tokens``); elsewhere bfloat16 where the device computes it natively, else float32. The
choice and its numbers are recorded in the plan.

What is stored in fp8 (by default):

* the ``weight`` of every ``Linear`` and ``Conv1d/2d/3d`` (and transposed convolutions);
* except in modules the model's library keeps in float32 (``_keep_in_fp32_modules``) or never
  casts (``_skip_layerwise_casting_patterns``), and modules matching :data:`DEFAULT_SKIP`
  (positional/patch embeddings, output heads) or the user's ``skip`` patterns / ``skip_types``.

Biases, norms and embeddings stay in the compute dtype. Every module that stores fp8 gets a cast
rule (``loaderkit.runtime``) that hands its kernel the weight in the compute dtype.

From an fp8 checkpoint the stored fp8 bytes and their scales are kept as they are: nothing is
requantized and no full-precision copy of a weight is ever made; fp8 tensors other than weights
(rare fp8 biases) are dequantized into the compute dtype. From a bf16/fp16/fp32 checkpoint each
weight is quantized as it streams, with one scale per output channel by default (``granularity``:
``"channel"``, ``"tensor"`` or ``"none"`` — unscaled fp8 flushes small weights to zero).

Native fp8 matmul (``native="auto"`` or ``"always"``) needs ``torch._scaled_mm`` on CUDA sm >= 8.9;
elsewhere ``"auto"`` records the fallback to the cast path and ``"always"`` fails at plan time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, field_validator

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
from loaderkit.errors import PlanError

#: module-name regexes never quantized on load: positional / patch / time embeddings and output
#: heads, whose precision matters most for the least memory. Embedding roles are matched as a
#: word of a name component (``patch_embedding``, ``vace_patch_embedding``, ``time_embedder``),
#: not only at its start. Output heads only outside the repeated blocks: the model's own
#: ``proj_out`` (also under a wrapper prefix such as ``model.diffusion_model.``), never
#: ``single_transformer_blocks.3.proj_out``.
DEFAULT_SKIP: tuple[str, ...] = (
    r"(^|[._])(pos|patch|time|timestep|position|positional)_?embed",
    r"^(?!.*\.\d+\.)(.*\.)?(lm_head|head|proj_out|final_layer|norm_out|output)$",
)


def _as_dtype_name(value, allowed: tuple[str, ...], what: str) -> str:
    name = dtype_name(value) if isinstance(value, (str, torch.dtype)) else value
    if name not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
    return name


class FP8Options(StrategyOptions):
    """Options of the ``fp8`` strategy.

    :ivar storage_dtype: ``float8_e4m3fn`` (default) or ``float8_e5m2``, for weights quantized on load.
    :ivar compute_dtype: ``"auto"`` (default: the fastest on the device, see
        :func:`choose_compute`), ``bfloat16``, ``float16`` or ``float32``.
    :ivar tokens: rows of activations a forward mostly runs (``1``: token-by-token generation;
        ``None``: many — prompts, batches, diffusion steps); only ``compute_dtype="auto"`` uses it.
    :ivar granularity: scale granularity when quantizing a high-precision checkpoint:
        ``"channel"`` (default), ``"tensor"``, ``"block"`` (2-D weights; others per channel) or
        ``"none"`` (unscaled).
    :ivar block: the block shape for ``"block"`` (default 128x128).
    :ivar skip: extra module-name regexes kept in the compute dtype.
    :ivar skip_types: extra module class names kept in the compute dtype.
    :ivar default_skips: apply :data:`DEFAULT_SKIP` (default on).
    :ivar native: ``"never"`` (cast path), ``"auto"`` (native fp8 matmul where the device has it)
        or ``"always"`` (fail at plan time where it does not).
    :ivar resident: keep a compute-dtype copy of every fp8 weight resident: the forward costs no
        upcast but memory grows by the compute-dtype size of those weights.
    :ivar fold_scales: a Linear with per-channel scales multiplies its output by them instead of
        decoding its weight with them, ``y = linear(x, q) * s + b`` (CPU, inference): the cheaper
        unscaled decode and the same math, rounded differently — off by default, so the output is
        bit-identical to computing with the decoded weight.
    :ivar library_skips: honour the model library's "never store in low precision" patterns
        (``_skip_layerwise_casting_patterns``; default on). ``False`` stores those modules in fp8
        too (diffusers skips every ``norm`` module, which in Flux-style models holds the AdaLN
        projections: a large share of the bytes). Modules that must stay in their compute dtype
        for the model to run (``ModuleContext.locked``) are never stored in fp8.
    :ivar quantize_sensitive: store in fp8 even a model its library marks as sensitive to
        low-precision storage as a whole (VAEs; default off: they stay in the compute dtype).
    """

    storage_dtype: str = "float8_e4m3fn"
    compute_dtype: str = "auto"
    tokens: int | None = Field(default=None, ge=1)
    granularity: Literal["channel", "tensor", "block", "none"] = "channel"
    block: tuple[int, int] | None = None
    skip: tuple[str, ...] = ()
    skip_types: tuple[str, ...] = ()
    default_skips: bool = True
    native: Literal["never", "auto", "always"] = "never"
    resident: bool = False
    fold_scales: bool = False
    library_skips: bool = True
    quantize_sensitive: bool = False

    @field_validator("storage_dtype", mode="before")
    @classmethod
    def _storage(cls, v):
        return _as_dtype_name(v, ("float8_e4m3fn", "float8_e5m2"), "storage_dtype")

    @field_validator("compute_dtype", mode="before")
    @classmethod
    def _compute(cls, v):
        if v == "auto":
            return v
        return _as_dtype_name(v, ("bfloat16", "float16", "float32"), "compute_dtype")

    @field_validator("skip")
    @classmethod
    def _regexes(cls, v):
        for pat in v:
            re.compile(pat)
        return v


@dataclass(frozen=True)
class FP8State:
    """What :class:`FP8` works out once per load."""

    skips: tuple[re.Pattern, ...]
    native: bool
    compute: str = "bfloat16"  # the compute dtype, resolved for this device
    keep_all: str = ""  # the reason the whole model stays in the compute dtype, if it does


def kept_reason(
    module: ModuleContext,
    *,
    keeps_fp32: bool,
    keep_all: str,
    library_skips: bool,
    skip_types: tuple[str, ...],
    skips: tuple[re.Pattern, ...],
    storage: str,
) -> str | None:
    """Why ``module`` stays in its compute dtype instead of a low-precision ``storage`` (``"fp8"``,
    ``"int8"``), or ``None``: the rules of the fp8 strategy's docs, in order — the library's
    float32 modules, locked modules, a whole model kept, the library's skips, ``skip_types``,
    then the skip patterns. Shared by the strategies that store weights in 8 bits."""
    if keeps_fp32:
        return "kept in float32 by the model's library"
    if module.keep_fp32_fp16:
        return ("the model's library keeps it in float32 under float16 (_keep_in_fp32_modules): "
                f"precision-sensitive, so never stored in {storage}")
    if module.locked:
        return module.locked
    if keep_all:
        return keep_all
    if module.skip_low_precision and library_skips:
        return "the model's library never stores it in low precision (library_skips=False overrides)"
    if module.type in skip_types:
        return f"{module.type} is in skip_types"
    for pat in skips:
        if pat.search(module.name):
            return f"matches skip pattern {pat.pattern!r}"
    return None


class FP8(Strategy):
    name = "fp8"
    description = "fp8 (e4m3fn) weight storage, compute in the device's fastest wide dtype; cast rules on every fp8 module"
    Options = FP8Options

    def _compute(self, device) -> tuple[str, str]:
        o = self.options
        if o.compute_dtype != "auto":
            return o.compute_dtype, "compute_dtype given"
        return choose_compute(device, o.tokens)

    def build_dtype(self, ctx: BuildContext) -> str:
        return self._compute(ctx.device)[0]

    def prepare(self, ctx: ModelContext) -> FP8State:
        o = self.options
        skips = tuple(re.compile(p) for p in (*(DEFAULT_SKIP if o.default_skips else ()), *o.skip))
        compute, why = self._compute(ctx.device)
        if compute not in ctx.device.compute_dtypes:
            raise PlanError(
                f"strategy fp8: {ctx.device.device} cannot compute in {compute}; pass "
                f"compute_dtype= one of {', '.join(ctx.device.compute_dtypes)}"
            )
        native = False
        if o.native != "never":
            if ctx.device.fp8_matmul:
                native = True
                ctx.note("fp8 kernel", "native scaled fp8 matmul", f"{ctx.device.device} supports it")
            elif o.native == "always":
                raise PlanError(
                    f"strategy fp8 with native='always': {ctx.device.device} ({ctx.device.name}) has no "
                    "native fp8 matmul (needs CUDA sm >= 8.9 and torch._scaled_mm); use native='auto' "
                    "to fall back to the cast path, or run on such a GPU"
                )
            else:
                ctx.note(
                    "fp8 kernel",
                    f"cast path (upcast to {compute})",
                    f"native fp8 matmul unavailable on {ctx.device.device}: needs CUDA sm >= 8.9",
                )
        q = ctx.checkpoint.quantization
        if q is not None:
            ctx.note("fp8 checkpoint", f"kept as stored ({q.family})", "no requantization, scales kept")
        slow = "" if ctx.device.is_fast(compute) else (
            f"; note {ctx.device.device} computes {compute} slowly — compute_dtype=torch.float32 may be faster")
        ctx.note("compute", compute, f"{why}; fp8 storage is upcast per module at forward time{slow}")
        keep_all = ""
        if ctx.facts.low_precision_advice and not o.quantize_sensitive:
            keep_all = f"{ctx.facts.low_precision_advice}; pass quantize_sensitive=True to store it in fp8 anyway"
            ctx.note("whole model", f"kept in {compute}", keep_all)
        if not o.library_skips and ctx.facts.skip_low_precision:
            ctx.note("library skips", "not applied", "library_skips=False: modules the library never stores "
                     f"in low precision ({', '.join(ctx.facts.skip_low_precision)}) are stored in fp8 too")
        return FP8State(skips=skips, native=native, compute=compute, keep_all=keep_all)

    @staticmethod
    def _keeps_fp32(module: ModuleContext, state: FP8State) -> bool:
        return module.keep_fp32 or (state.compute == "float16" and module.keep_fp32_fp16)

    def _skipped(self, module: ModuleContext, state: FP8State) -> str | None:
        return kept_reason(module, keeps_fp32=self._keeps_fp32(module, state), keep_all=state.keep_all,
                           library_skips=self.options.library_skips, skip_types=self.options.skip_types,
                           skips=state.skips, storage="fp8")

    def decide(self, module: ModuleContext, state: FP8State) -> ModuleDecision:
        o = self.options
        compute = "float32" if self._keeps_fp32(module, state) else state.compute
        storage: dict[str, str] = {}
        weight = module.tensors.get("weight")
        reason = ""
        if weight is not None and is_fp8(weight.dtype) and module.locked:
            reason = f"fp8 in the checkpoint, decoded to {compute}: {module.locked}"
        elif weight is not None and is_fp8(weight.dtype):
            storage["weight"] = weight.dtype  # stored fp8 stays fp8, whatever the module
            reason = "fp8 in the checkpoint, kept"
        elif weight is not None and module.kind in ("linear", "conv"):
            skipped = self._skipped(module, state)
            if skipped is None:
                storage["weight"] = o.storage_dtype
                reason = f"quantized on load, {o.granularity} scales"
            else:
                reason = skipped
        elif module.stacked_linear:
            skipped = self._skipped(module, state)
            kept = [n for n in module.stacked_linear if is_fp8(module.tensors[n].dtype)]
            for n in module.stacked_linear:
                storage[n] = module.tensors[n].dtype if n in kept else o.storage_dtype
            if skipped is not None and not kept:
                storage.clear()
                reason = skipped
            else:
                reason = (f"stacked Linear weights ({', '.join(module.stacked_linear)}): quantized on load, "
                          "one scale per expert and output channel") if not kept else "fp8 in the checkpoint, kept"
        elif weight is not None and weight.torch_dtype.is_floating_point:
            reason = f"a {module.type} ({module.kind}), not a Linear or convolution: stored in {compute}"
        native = state.native and module.kind == "linear" and "weight" in storage
        granularity = o.granularity
        if module.stacked_linear and granularity in ("channel", "block"):
            granularity = "row"  # a stack of Linear weights: per (expert, output channel)
        if granularity == "block" and (weight is None or len(weight.shape) != 2):
            granularity = "channel"  # block scales cover 2-D weights; a conv's go per channel
            if "weight" in storage:
                reason += " (per channel: block scales need a 2-D weight)"
        return ModuleDecision(
            compute=compute,
            storage=storage,
            granularity=granularity,
            block=o.block,
            kernel="native" if native else "cast",
            resident=o.resident,
            fold_scale=o.fold_scales,
            reason=reason,
        )


#: ``compute_dtype="auto"`` computes in bfloat16 where the device's measured fp8 Linear in
#: bfloat16 takes at most this factor of its time in float32 (bfloat16 also halves the
#: activations and the decoded weight; a near tie goes to it), as :data:`devices.FAST_RATIO`.
BF16_TIE = 1.15
#: ``tokens`` up to this many rows are judged by the probe's one-row timing (generation).
FEW_ROWS = 16


def choose_compute(device, tokens: int | None = None) -> tuple[str, str]:
    """The compute dtype for fp8 storage on ``device`` (a :class:`DeviceCaps`), and why.

    Where the device's probe timed the fp8 cast path (:attr:`DeviceCaps.speeds`
    ``"fp8-bfloat16-rows1"`` / ``"fp8-bfloat16-rows128"``): bfloat16 if its measured time, at
    one row when ``tokens`` is at most :data:`FEW_ROWS` and at 128 rows otherwise, is at most
    :data:`BF16_TIE` times float32's; else float32. Where nothing was timed: bfloat16 if the
    device computes it natively, else float32.
    """
    rows = 1 if tokens is not None and tokens <= FEW_ROWS else 128
    ratio = device.speeds.get(f"fp8-bfloat16-rows{rows}")
    if ratio is not None:
        what = f"{'one row' if rows == 1 else '128 rows'} of activations{'' if tokens is None else f' (tokens={tokens})'}"
        choice = "bfloat16" if ratio <= BF16_TIE else "float32"
        return choice, (f"compute_dtype='auto': on {device.device} an fp8 Linear on {what} measured "
                        f"{ratio:.2f}x float32's time in bfloat16")
    if device.is_fast("bfloat16"):
        return "bfloat16", f"compute_dtype='auto': {device.device} computes bfloat16 natively"
    return "float32", f"compute_dtype='auto': {device.device} computes bfloat16 slowly (not native)"


@hookimpl
def loaderkit_register_strategies(register):
    register(FP8)
