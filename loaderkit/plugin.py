"""Everything a plugin author needs, in one namespace.

::

    from loaderkit.plugin import Strategy, ModuleDecision, hookimpl

    class Half(Strategy):
        name = "half"

        def decide(self, module, state):
            return ModuleDecision(compute="float16")

    @hookimpl
    def loaderkit_register_strategies(register):
        register(Half)

The records and base classes come from :mod:`loaderkit.contract` (which imports nothing from the
pipeline); :func:`meta_init` and the plugin manager come from the pipeline's discovery and build
stages. End users need only the top-level :mod:`loaderkit` names.
"""

from __future__ import annotations

from .contract.assembly import Assembler, Component, ComponentPlan, Flow, PipelinePlan
from .contract.bases import (
    BuildContext,
    EncodedTensor,
    Encoder,
    Builder,
    Format,
    Kernel,
    ModelContext,
    ModuleContext,
    ModuleDecision,
    Scheme,
    Strategy,
    StrategyOptions,
    TensorReader,
    shard_names,
)
from .contract.dtypes import FP8_NAMES, SAFETENSORS_DTYPES, dtype_name, is_float, is_fp8, to_torch
from .contract.env import env_flag
from .contract.hookspecs import hookimpl, hookspec
from .contract.io import contained, escapes, fd_path, gc_paused, opened_contained, read_json
from .contract.layout import (
    CHANNEL,
    DEFAULT_BLOCK,
    GRANULARITIES,
    TENSOR,
    Layout,
    block_grid,
    describe_layout,
    expected_scale_shapes,
    looks_like_quantization_data,
    scale_fits,
)
from .contract.lora import LoraFile, LoraFormat, LoraLayout, LoraPair, LoraPlan, LoraTarget
from .contract.modules import KERNEL_LAYERS, STRICT_KERNELS, module_kind, read_by_parent
from .contract.plan import Conversion, Decision, ModulePlan, Plan, TensorPlan
from .contract.records import (
    BuildRequest,
    CheckpointInfo,
    DeviceCaps,
    Frozen,
    FrozenDict,
    FrozenList,
    FusedTensor,
    Granularity,
    KeyMap,
    ModelFacts,
    QuantizationInfo,
    QuantizedWeight,
    ScaleEncoding,
    TensorInfo,
    freeze,
    thaw,
)
from .errors import *  # noqa: F403 - every error class, for plugins to raise
from .errors import __all__ as _errors
from .pipeline.build import building_thread_only, meta_init
from .pipeline.discover import PluginManager, get_manager, use_manager

__all__ = [
    "Assembler",
    "BuildContext",
    "BuildRequest",
    "Builder",
    "CHANNEL",
    "CheckpointInfo",
    "Component",
    "ComponentPlan",
    "Conversion",
    "DEFAULT_BLOCK",
    "Decision",
    "DeviceCaps",
    "FP8_NAMES",
    "Flow",
    "Format",
    "EncodedTensor",
    "Encoder",
    "Frozen",
    "FrozenDict",
    "FrozenList",
    "FusedTensor",
    "KeyMap",
    "GRANULARITIES",
    "Granularity",
    "KERNEL_LAYERS",
    "Kernel",
    "Layout",
    "LoraFile",
    "LoraFormat",
    "LoraLayout",
    "LoraPair",
    "LoraPlan",
    "LoraTarget",
    "ModelContext",
    "ModelFacts",
    "ModuleContext",
    "ModuleDecision",
    "ModulePlan",
    "PipelinePlan",
    "Plan",
    "PluginManager",
    "QuantizationInfo",
    "QuantizedWeight",
    "SAFETENSORS_DTYPES",
    "STRICT_KERNELS",
    "ScaleEncoding",
    "Scheme",
    "Strategy",
    "StrategyOptions",
    "TENSOR",
    "TensorInfo",
    "TensorPlan",
    "TensorReader",
    "block_grid",
    "describe_layout",
    "detach_others",
    "dtype_name",
    "env_flag",
    "expected_scale_shapes",
    "fd_path",
    "freeze",
    "get_manager",
    "has_runtime_hooks",
    "hookimpl",
    "hookspec",
    "is_float",
    "is_fp8",
    "looks_like_quantization_data",
    "meta_init",
    "building_thread_only",
    "module_kind",
    "opened_contained",
    "packed_placement",
    "parameter_parallel",
    "gc_paused",
    "read_by_parent",
    "read_json",
    "contained",
    "escapes",
    "scale_fits",
    "shard_names",
    "thaw",
    "to_torch",
    "use_manager",
    *_errors,
]


def detach_others(model) -> None:
    """Remove every accelerate hook from ``model`` except loaderkit's cast rules and input casts
    (:func:`loaderkit.runtime.detach_others`; accelerate is imported on first use)."""
    from .runtime import detach_others as _detach_others

    _detach_others(model)


def parameter_parallel(placements: dict, *, sum_output: bool = False, local_forward: bool = True):
    """A torch ``ParallelStyle`` that shards a module's own parameters by name and runs its
    forward on their local shards, optionally summing its output over the mesh
    (:class:`loaderkit.parallel_styles.ParameterParallel`: fused MoE experts; torch.distributed
    is imported on first use)."""
    from .parallel_styles import ParameterParallel

    return ParameterParallel(placements, sum_output=sum_output, local_forward=local_forward)


def packed_placement(dim: int, parts: int = 2):
    """The placement of a weight packing ``parts`` blocks along ``dim`` (a fused gate/up): each rank
    holds its slice of every block (:func:`loaderkit.parallel_styles.packed`)."""
    from .parallel_styles import packed

    return packed(dim, parts)


def has_runtime_hooks(model) -> bool:
    """True if ``model`` or a submodule carries a loaderkit cast rule or input cast
    (:func:`loaderkit.runtime.has_hooks`)."""
    from .runtime import has_hooks

    return has_hooks(model)
