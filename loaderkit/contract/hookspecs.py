"""Hook specifications, in pipeline order. Every hook is prefixed ``loaderkit_``.

Plugins implement these with the :data:`loaderkit.hookimpl` marker::

    import loaderkit

    @loaderkit.hookimpl
    def loaderkit_register_strategies(register):
        register(MyStrategy)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    import torch

    from .assembly import Assembler
    from .bases import Builder, Format, Scheme, Strategy
    from .lora import LoraFormat
    from .plan import Plan
    from .records import DeviceCaps, ModelFacts

hookspec = pluggy.HookspecMarker("loaderkit")
hookimpl = pluggy.HookimplMarker("loaderkit")


# -------------------------------------------------------------------------------------------
# Registration: called once per plugin manager, when its registries are first needed.
# -------------------------------------------------------------------------------------------


@hookspec
def loaderkit_register_formats(register: Callable[["Format"], None]) -> None:
    """Register checkpoint container formats.

    Call ``register(format)`` once per :class:`loaderkit.plugin.Format` instance. Names must be unique
    across all plugins; a duplicate is a :class:`loaderkit.PluginError` naming both plugins.

    :param register: the callback that validates and records a format.

    .. versionadded:: 0.1
    """


@hookspec
def loaderkit_register_schemes(register: Callable[["Scheme"], None]) -> None:
    """Register quantization schemes (how quantized weights and their scales are encoded).

    Call ``register(scheme)`` once per :class:`loaderkit.plugin.Scheme` instance.

    :param register: the callback that validates and records a scheme.

    .. versionadded:: 0.1
    """


@hookspec
def loaderkit_register_strategies(register: Callable[[type["Strategy"]], None]) -> None:
    """Register precision strategies.

    Call ``register(StrategyClass)`` once per :class:`loaderkit.plugin.Strategy` subclass; the class
    is instantiated per load with the user's options.

    :param register: the callback that validates and records a strategy class.

    .. versionadded:: 0.1
    """


@hookspec
def loaderkit_register_builders(register: Callable[["Builder"], None]) -> None:
    """Register model builders (skeletons from a checkpoint's config).

    Call ``register(builder)`` once per :class:`loaderkit.plugin.Builder` instance.

    :param register: the callback that validates and records a builder.

    .. versionadded:: 0.1
    """


@hookspec
def loaderkit_register_assemblers(register: Callable[["Assembler"], None]) -> None:
    """Register pipeline assemblers (whole pipelines from a library's pipeline directory).

    Call ``register(assembler)`` once per :class:`loaderkit.plugin.Assembler` instance. Names must
    be unique across all plugins; a duplicate is a :class:`loaderkit.PluginError` naming both.

    :param register: the callback that validates and records an assembler.

    .. versionadded:: 0.2
    """


@hookspec
def loaderkit_register_lora_formats(register: Callable[["LoraFormat"], None]) -> None:
    """Register LoRA key formats (how a LoRA file names its low-rank factors and their scaling).

    Call ``register(lora_format)`` once per :class:`loaderkit.plugin.LoraFormat` instance. Names
    must be unique across all plugins; a duplicate is a :class:`loaderkit.PluginError` naming both.

    :param register: the callback that validates and records a LoRA format.

    .. versionadded:: 0.2
    """


# -------------------------------------------------------------------------------------------
# Negotiation
# -------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def loaderkit_device_capabilities(device: str) -> "DeviceCaps | None":
    """Describe what ``device`` can represent and compute fast.

    Stops at first non-None result. Return ``None`` for devices the plugin does not know.
    The built-in ``devices`` plugin answers for ``cpu`` and ``cuda`` devices by probing them.

    :param device: a torch device string such as ``"cpu"`` or ``"cuda:0"``.
    :return: a :class:`loaderkit.plugin.DeviceCaps`, or ``None``.

    .. versionadded:: 0.1
    """


@hookspec
def loaderkit_model_facts(model: "torch.nn.Module") -> "ModelFacts | None":
    """Declare what a model's library knows about it: fp32-kept modules, tied weights,
    keys to ignore on load, modules not to split, steps to run after loading.

    All non-None results are merged. Return ``None`` for models the plugin does not know.

    :param model: the skeleton (parameters on the meta device) about to be loaded.
    :return: a :class:`loaderkit.plugin.ModelFacts`, or ``None``.

    .. versionadded:: 0.1
    """


@hookspec
def loaderkit_plan_ready(plan: "Plan") -> None:
    """Inspect a negotiated plan before any tensor data is read.

    Called for every plan, by :func:`loaderkit.plan` and :func:`loaderkit.load`. Raise a
    :class:`loaderkit.PlanError` to refuse the plan (it is reported with the plugin's name);
    return value is ignored.

    :param plan: the plan. It is immutable all the way down (frozen records, read-only
        mappings): a hook can refuse it, never rewrite it.

    .. versionadded:: 0.1
    """


# -------------------------------------------------------------------------------------------
# Loading
# -------------------------------------------------------------------------------------------


@hookspec
def loaderkit_model_loaded(model: "torch.nn.Module", plan: "Plan") -> None:
    """Called once a model is fully loaded, placed and verified, just before ``load`` returns.

    Return value is ignored; an exception fails the load (the model is not returned).

    :param model: the loaded model, in eval mode.
    :param plan: the plan it was loaded by.

    .. versionadded:: 0.1
    """
