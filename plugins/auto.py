"""Built-in plugin ``auto``: choose a strategy from the checkpoint's dtypes and the device's speed.

The policy, in order (every step is recorded as a decision in the plan):

1. An fp8 checkpoint keeps its fp8 storage (strategy ``fp8``) and computes in the fastest
   wide dtype of the device, as ``fp8``'s ``compute_dtype="auto"`` chooses it
   (:func:`loaderkit.plugins.fp8.choose_compute`): on a probed CPU the dtype in which an fp8
   Linear measured faster, else bfloat16 where it is native and float32 where it is not (on a CPU
   without native bf16 a bf16 matmul is emulated and measured ~4.9x slower than fp32).
2. Otherwise the checkpoint's dominant float dtype is kept if the device computes it natively.
3. A bf16/fp16 checkpoint on a device that only emulates that dtype is computed in float32
   (``prefer="speed"``, the default: 2x the memory, several times faster), or kept as stored
   (``prefer="memory"``).
4. auto never lowers precision: a float32 checkpoint stays float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from loaderkit.errors import PlanError
from loaderkit.plugins.fp8 import choose_compute
from loaderkit.plugin import (
    BuildContext,
    hookimpl,
    is_float,
    is_fp8,
    ModelContext,
    ModuleContext,
    ModuleDecision,
    Strategy,
    StrategyOptions,
)


class AutoOptions(StrategyOptions):
    """Options of ``auto``.

    :ivar prefer: ``"speed"`` computes in a dtype the device runs natively even when it needs more
        memory than the checkpoint's; ``"memory"`` keeps the checkpoint's dtype.
    """

    prefer: Literal["speed", "memory"] = "speed"


_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _speed(device, dtype: str) -> str:
    """What the device capabilities say about ``dtype``'s speed (measured where probed)."""
    for note in device.notes:
        if note.startswith(dtype):
            return note
    return f"{dtype} {'fast' if device.is_fast(dtype) else 'slow'}"


def dominant_dtype(checkpoint) -> str:
    """The float dtype holding most of the checkpoint's model-tensor bytes (scales excluded)."""
    q = checkpoint.quantization
    skip = q.companion_keys() if q else set()
    counts: dict[str, int] = {}
    for t in checkpoint.tensors.values():
        if t.name not in skip and is_float(t.dtype):
            counts[t.dtype] = counts.get(t.dtype, 0) + t.nbytes
    return max(counts, key=counts.get) if counts else "float32"


@dataclass(frozen=True)
class AutoState:
    """The strategy ``auto`` delegates to for one load, and that strategy's own state."""

    inner: Strategy
    state: Any


class Auto(Strategy):
    name = "auto"
    description = "pick storage and compute dtypes from the checkpoint and the device (see docs)"
    Options = AutoOptions

    def _choose(self, ctx: BuildContext) -> tuple[Strategy, list[tuple[str, str, str]]]:
        """The strategy to delegate to, found through the registry (a blocked plugin's
        strategies are not there), and the notes explaining the choice."""
        checkpoint, device = ctx.checkpoint, ctx.device
        stored = dominant_dtype(checkpoint)
        notes = [("checkpoint dtype", stored, "dominant float dtype by bytes")]
        if is_fp8(stored) or checkpoint.quantization is not None:
            wide, why = choose_compute(device)
            fp8 = ctx.strategy("fp8", compute_dtype=wide)
            if fp8 is not None:
                notes.append(("strategy", f"fp8 (compute {wide})", f"fp8 checkpoint kept as stored; {why}"))
                return fp8, notes
            notes.append(("strategy", _NAMES[wide], f"fp8 checkpoint dequantized (strategy fp8 is not "
                                                    f"registered); {why}"))
            return _uniform(ctx, _NAMES[wide]), notes
        if stored == "float32" or stored == "float64":
            notes.append(("strategy", "fp32", "the checkpoint is float32; auto never lowers precision"))
            return _uniform(ctx, "fp32"), notes
        if device.is_fast(stored):
            notes.append(("strategy", _NAMES[stored], f"{device.device}: {_speed(device, stored)}"))
            return _uniform(ctx, _NAMES[stored]), notes
        if self.options.prefer == "memory":
            notes.append(
                ("strategy", _NAMES[stored], f"prefer='memory': kept as stored although {device.device} computes {stored} slowly")
            )
            return _uniform(ctx, _NAMES[stored]), notes
        notes.append(
            (
                "strategy",
                "fp32",
                f"{device.device}: {_speed(device, stored)}; float32 computes faster there but doubles "
                f"the memory: pass prefer='memory' to keep {stored}",
            )
        )
        return _uniform(ctx, "fp32"), notes

    def build_dtype(self, ctx: BuildContext) -> str:
        inner, _ = self._choose(ctx)
        return inner.build_dtype(ctx)

    def prepare(self, ctx: ModelContext) -> AutoState:
        inner, notes = self._choose(ctx)
        for n in notes:
            ctx.note(*n)
        return AutoState(inner, inner.prepare(ctx))

    def decide(self, module: ModuleContext, state: AutoState) -> ModuleDecision:
        return state.inner.decide(module, state.state)


def _uniform(ctx: BuildContext, name: str) -> Strategy:
    strategy = ctx.strategy(name)
    if strategy is None:
        raise PlanError(
            f"strategy auto chose {name!r}, but no plugin registers it (blocked?); pass a strategy "
            "by name, or unblock the plugin that provides it"
        )
    return strategy


@hookimpl
def loaderkit_register_strategies(register):
    register(Auto)
