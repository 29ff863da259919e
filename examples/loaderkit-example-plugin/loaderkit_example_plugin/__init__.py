"""An example third-party loaderkit plugin.

It contributes:

- the precision strategy ``example-fp32-norms``: every module is stored and computed in bfloat16
  (or float16, ``dtype="float16"``) except normalisation layers (LayerNorm, GroupNorm, RMSNorm,
  BatchNorm, and modules the model's library keeps in float32), which stay float32 — their
  mean/variance reductions are where half precision loses most accuracy, and they are a tiny
  fraction of the weights;
- ``loaderkit_model_loaded``: on models loaded with that strategy, casts the activations entering
  each float32 normalisation layer to float32 and its output back to the model's dtype, so the
  bfloat16 layers around it keep receiving bfloat16;
- ``loaderkit_plan_ready``: an optional memory budget. With ``LOADERKIT_EXAMPLE_MAX_BYTES`` set
  (an integer), any plan that needs more bytes on one device is refused before a tensor is read.

Installed, it is discovered through the ``loaderkit`` entry-point group (see pyproject.toml);
``loaderkit plugins`` lists it as ``example``.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from loaderkit.plugin import ModuleContext, ModuleDecision, PlanError, Strategy, StrategyOptions, hookimpl

__version__ = "0.1.0"

#: environment variable holding the optional per-device memory budget, in bytes.
BUDGET_ENV = "LOADERKIT_EXAMPLE_MAX_BYTES"


class FP32NormsOptions(StrategyOptions):
    """Options of ``example-fp32-norms``.

    :ivar dtype: the dtype every module other than the normalisation layers is stored and
        computed in.
    """

    dtype: Literal["bfloat16", "float16"] = "bfloat16"


class FP32Norms(Strategy):
    """Half precision everywhere, normalisation layers in float32."""

    name = "example-fp32-norms"
    description = "bfloat16 (or float16) storage and compute; normalisation layers stay float32"
    Options = FP32NormsOptions

    def build_dtype(self, ctx) -> str:
        return self.options.dtype

    def prepare(self, ctx) -> None:
        ctx.note(
            "normalisation layers",
            "float32",
            f"their reductions lose accuracy in {self.options.dtype}; they hold few weights",
        )

    def decide(self, module: ModuleContext, state: None) -> ModuleDecision:
        if module.kind == "norm":
            return ModuleDecision(compute="float32", reason="normalisation layer kept in float32")
        if module.keep_fp32:
            return ModuleDecision(compute="float32", reason="kept in float32 by the model's library")
        return ModuleDecision(compute=self.options.dtype)


@hookimpl
def loaderkit_register_strategies(register):
    register(FP32Norms)


@hookimpl
def loaderkit_plan_ready(plan):
    """Refuse a plan that needs more than ``LOADERKIT_EXAMPLE_MAX_BYTES`` on any device."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return
    try:
        budget = int(raw)
    except ValueError:
        raise PlanError(f"{BUDGET_ENV}={raw!r} is not an integer number of bytes") from None
    for device, nbytes in plan.bytes_per_device().items():
        if nbytes > budget:
            raise PlanError(
                f"{plan.checkpoint.path} needs {nbytes} bytes on {device} under strategy "
                f"{plan.strategy!r}, over the budget {BUDGET_ENV}={budget}; pick a strategy that "
                "stores less (e.g. 'fp8') or raise the budget"
            )


def _to(dtype: torch.dtype):
    def cast(x):
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return cast


@hookimpl
def loaderkit_model_loaded(model, plan):
    """Cast activations into and out of the float32 normalisation layers of our strategy's loads."""
    if plan.strategy != FP32Norms.name:
        return
    outer = getattr(torch, plan.options.get("dtype", FP32NormsOptions().dtype))
    to32, back = _to(torch.float32), _to(outer)
    named = dict(model.named_modules())
    for name, mplan in plan.modules.items():
        if mplan.compute_dtype != "float32" or name not in named:
            continue
        module = named[name]
        module.register_forward_pre_hook(
            lambda m, args, kwargs: (tuple(map(to32, args)), {k: to32(v) for k, v in kwargs.items()}),
            with_kwargs=True,
        )
        module.register_forward_hook(
            lambda m, args, out: back(out) if isinstance(out, torch.Tensor) else out
        )
