"""loaderkit: load PyTorch checkpoints into models whose dtypes are a negotiated, checked plan.

::

    import loaderkit
    model = loaderkit.load("path/to/checkpoint", strategy="bf16")
    print(loaderkit.plan("path/to/checkpoint", strategy="fp8"))
    assert loaderkit.verify(model).ok

Plugin authors import what they need from :mod:`loaderkit.plugin`; every error class is in
:mod:`loaderkit.errors`; cast rules are in :mod:`loaderkit.runtime`.
"""

from __future__ import annotations

from .version import __version__

from . import plugin as plugin  # the plugin authors' namespace, reachable as loaderkit.plugin
from .contract.hookspecs import hookimpl
from .contract.plan import Plan
from .errors import (
    CheckpointError,
    ConvertError,
    LoaderKitError,
    PlanError,
    PluginError,
    StateDictMismatchError,
    StrategyError,
    VerifyError,
)
from .assembly import load_pipeline, plan_pipeline
from .loader import add_lora, inspect, load, plan, remove_lora, strategy
from .pipeline.bind import plan_of
from .pipeline.convert import convert
from .pipeline.discover import register, unregister
from .pipeline.verify import verify

__all__ = [
    "CheckpointError",
    "ConvertError",
    "LoaderKitError",
    "Plan",
    "PlanError",
    "PluginError",
    "StateDictMismatchError",
    "StrategyError",
    "VerifyError",
    "__version__",
    "add_lora",
    "convert",
    "hookimpl",
    "inspect",
    "load",
    "load_pipeline",
    "plan",
    "plan_pipeline",
    "plan_of",
    "register",
    "remove_lora",
    "strategy",
    "unregister",
    "verify",
]
