"""loaderkit: load PyTorch checkpoints into models whose dtypes are a negotiated, checked plan.

::

    import loaderkit
    model = loaderkit.load("path/to/checkpoint", strategy="bf16")
    print(loaderkit.plan("path/to/checkpoint", strategy="fp8"))
    assert loaderkit.verify(model).ok
"""

from __future__ import annotations

__version__ = "0.1.0"

from .build import Builder, BuildRequest, ModelFacts, meta_init
from .capabilities import DeviceCaps
from .checkpoint import (
    CheckpointInfo,
    Format,
    QuantizationInfo,
    QuantizedWeight,
    Scheme,
    TensorInfo,
)
from .errors import (
    BuildError,
    CheckpointError,
    CheckpointNotFoundError,
    ConvertError,
    CorruptCheckpointError,
    LoaderKitError,
    PlanError,
    PluginError,
    StateDictMismatchError,
    StrategyError,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
    VerifyError,
)
from .hookspecs import hookimpl, hookspec
from .loader import inspect, load, plan, plan_of, strategy
from .manager import PluginManager, get_manager, register, unregister
from .plan import Decision, ModulePlan, Plan, TensorPlan
from .strategy import ModelContext, ModuleContext, ModuleDecision, Strategy, StrategyOptions
from .verify import VerifyReport, verify
from .write import convert

__all__ = [
    "BuildError",
    "BuildRequest",
    "Builder",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "ConvertError",
    "CorruptCheckpointError",
    "Decision",
    "DeviceCaps",
    "Format",
    "LoaderKitError",
    "ModelContext",
    "ModelFacts",
    "ModuleContext",
    "ModuleDecision",
    "ModulePlan",
    "Plan",
    "PlanError",
    "PluginError",
    "PluginManager",
    "QuantizationInfo",
    "QuantizedWeight",
    "Scheme",
    "StateDictMismatchError",
    "Strategy",
    "StrategyError",
    "StrategyOptions",
    "TensorInfo",
    "TensorPlan",
    "UnsafeCheckpointError",
    "UnsupportedCheckpointError",
    "VerifyError",
    "VerifyReport",
    "__version__",
    "convert",
    "get_manager",
    "hookimpl",
    "hookspec",
    "inspect",
    "load",
    "meta_init",
    "plan",
    "plan_of",
    "register",
    "strategy",
    "unregister",
    "verify",
]
