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

from typing import TYPE_CHECKING, Any

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
from .version import __version__

if TYPE_CHECKING:
    from . import plugin as plugin
    from .assembly import load_pipeline, plan_pipeline
    from .contract.hookspecs import hookimpl
    from .contract.plan import Plan
    from .loader import add_lora, inspect, load, plan, remove_lora, strategy
    from .pipeline.bind import plan_of
    from .pipeline.convert import convert
    from .pipeline.discover import register, unregister
    from .pipeline.verify import verify

#: public name -> the module that defines it. These are imported on first access (PEP 562), so
#: that ``import loaderkit`` imports neither torch nor pydantic, pluggy or loaderkit's pipeline.
_LAZY = {
    "plugin": "loaderkit.plugin",  # the plugin authors' namespace, reachable as loaderkit.plugin
    "hookimpl": "loaderkit.contract.hookspecs",
    "Plan": "loaderkit.contract.plan",
    "load_pipeline": "loaderkit.assembly",
    "plan_pipeline": "loaderkit.assembly",
    "add_lora": "loaderkit.loader",
    "inspect": "loaderkit.loader",
    "load": "loaderkit.loader",
    "plan": "loaderkit.loader",
    "remove_lora": "loaderkit.loader",
    "strategy": "loaderkit.loader",
    "plan_of": "loaderkit.pipeline.bind",
    "convert": "loaderkit.pipeline.convert",
    "register": "loaderkit.pipeline.discover",
    "unregister": "loaderkit.pipeline.discover",
    "verify": "loaderkit.pipeline.verify",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loaderkit' has no attribute {name!r}")
    import importlib

    mod = importlib.import_module(module)
    value = mod if module == f"loaderkit.{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
