"""Built-in plugin: build Hugging Face transformers models from ``config.json`` and declare their facts.

The skeleton is constructed the way ``PreTrainedModel.from_pretrained`` constructs it (same config,
same class, same default dtype, same attention implementation, weight tying deferred), except that
parameters live on the meta device and non-persistent buffers (rotary ``inv_freq``,
``position_ids``) hold the values the model's own initialisation computes.

transformers is imported only inside the functions that need it: a plain torch model never
triggers the import, and without transformers installed this plugin contributes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import torch

from loaderkit.plugin import (
    Builder,
    BuildRequest,
    building_thread_only,
    contained,
    FusedTensor,
    hookimpl,
    KeyMap,
    meta_init,
    ModelFacts,
    thaw,
    to_torch,
)
from loaderkit.errors import BuildError, PlanError

#: Config keys describing a quantized checkpoint; loaderkit decodes such weights itself, so the
#: model is built dense (as if the checkpoint had been dequantized).
_QUANT_KEYS = ("quantization_config",)

#: Extra unexpected-key patterns ``from_pretrained`` ignores for models with these buffers.
_LEGACY_BUFFER_PATTERNS = (
    ("rotary_emb.inv_freq", r"rotary_emb\.inv_freq"),
    ("position_ids", r"(^|\.)position_ids$"),
)


def available() -> bool:
    """True if transformers is installed (checked without importing it)."""
    return importlib.util.find_spec("transformers") is not None


class TransformersBuilder(Builder):
    """Builds transformers models from a config with ``architectures`` or ``model_type``."""

    name = "transformers"
    description = "transformers models from config.json (architectures / model_type)"

    def can_build(self, request: BuildRequest) -> bool:
        cfg = request.checkpoint.config
        if not isinstance(cfg, dict) or "_class_name" in cfg:
            return False
        if not (cfg.get("architectures") or cfg.get("model_type")):
            return False
        return available()

    def build(self, request: BuildRequest) -> torch.nn.Module:
        import transformers

        ckpt = request.checkpoint
        dtype = to_torch(request.dtype)
        model_cls, config = _resolve(transformers, _dense_config(_config_dict(transformers, ckpt)), ckpt.path)
        _set_config_dtype(config, dtype)
        config.name_or_path = ckpt.root
        try:
            with _init_contexts(dtype):
                model = model_cls(config)
                _patch_output_recorders(model)
        except Exception as exc:
            raise BuildError(
                f"transformers could not construct {model_cls.__name__} from the config of "
                f"{ckpt.path}: {type(exc).__name__}: {exc}",
                path=ckpt.path,
            ) from exc
        _load_generation_config(model, ckpt.root)
        return model


def _config_dict(transformers: Any, ckpt) -> dict[str, Any]:
    """config.json as transformers itself reads it (``PretrainedConfig.get_config_dict``: its
    special encodings decoded, such as ``{"__float__": "Infinity"}``); the described config
    when the checkpoint's config did not come from a file beside it."""
    path = Path(ckpt.root) / "config.json"
    if not path.is_file():
        return thaw(ckpt.config) or {}
    contained(Path(ckpt.root), path, "config")
    try:
        cfg, _ = transformers.PretrainedConfig.get_config_dict(str(ckpt.root), local_files_only=True)
    except Exception as exc:
        raise BuildError(
            f"transformers could not read the config.json of {ckpt.path}: {type(exc).__name__}: {exc}",
            path=ckpt.path,
        ) from exc
    return cfg


def _dense_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` without quantization configs (top level and nested sub-configs)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key in _QUANT_KEYS:
            continue
        out[key] = _dense_config(value) if isinstance(value, dict) and "model_type" in value else value
    return out


def _resolve(transformers: Any, cfg: dict[str, Any], path: str) -> tuple[type, Any]:
    """Pick the model class and make its config, as ``from_pretrained`` would."""
    archs = cfg.get("architectures") or []
    if archs:
        model_cls = getattr(transformers, str(archs[0]), None)
        if not (isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel)):
            raise BuildError(
                f"config.json of {path} names architecture {archs[0]!r}, which transformers "
                f"{transformers.__version__} does not provide (custom-code models are not built "
                "from config); pass the architecture yourself: loaderkit.load(path, model=...)",
                path=path,
            )
        return model_cls, _make_config(model_cls.config_class, cfg, path)
    from transformers.models.auto.auto_factory import _get_model_class
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise BuildError(
            f"config.json of {path} has model_type {model_type!r}, unknown to transformers "
            f"{transformers.__version__}; upgrade transformers or pass model=...",
            path=path,
        )
    config = _make_config(CONFIG_MAPPING[model_type], cfg, path)
    try:
        return _get_model_class(config, transformers.AutoModel._model_mapping), config
    except KeyError:
        raise BuildError(
            f"config.json of {path} (model_type {model_type!r}) has no 'architectures' and "
            "transformers has no AutoModel for it; pass model=...",
            path=path,
        ) from None


def _make_config(config_cls: type, cfg: dict[str, Any], path: str) -> Any:
    try:
        return config_cls.from_dict(dict(cfg))
    except Exception as exc:
        raise BuildError(
            f"transformers could not read the config.json of {path} as {config_cls.__name__}: "
            f"{type(exc).__name__}: {exc}",
            path=path,
        ) from exc


def _set_config_dtype(config: Any, dtype: torch.dtype) -> None:
    """Record the load dtype on the config and its sub-configs, as ``from_pretrained`` does."""
    config.dtype = dtype
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            sub.dtype = dtype


@contextlib.contextmanager
def _init_contexts(dtype: torch.dtype):
    """meta_init plus transformers' own construction contexts (tying deferred, patches applied)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(meta_init(dtype))
        try:
            from transformers import initialization

            stack.enter_context(initialization.no_tie_weights())
        except (ImportError, AttributeError):  # older transformers tie in post_init; harmless
            pass
        try:
            from transformers import initialization

            # parameters are on the meta device: their initialisers would only cost time
            stack.enter_context(building_thread_only(initialization.no_init_weights()))
        except (ImportError, AttributeError):
            pass
        try:
            from transformers.monkey_patching import apply_patches

            stack.enter_context(apply_patches())
        except ImportError:
            pass
        yield


def _patch_output_recorders(model: torch.nn.Module) -> None:
    try:
        from transformers.monkey_patching import patch_output_recorders
    except ImportError:
        return
    patch_output_recorders(model)


def _load_generation_config(model: Any, root: str) -> None:
    """Use ``generation_config.json`` beside the weights, as ``from_pretrained`` does (local only)."""
    if (Path(root) / "generation_config.json").is_file():
        contained(Path(root), Path(root) / "generation_config.json", "generation config")
    if not (Path(root) / "generation_config.json").is_file():
        return
    if not (hasattr(model, "can_generate") and model.can_generate()):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BuildError(
            f"cannot read {Path(root) / 'generation_config.json'}: {exc}", path=root
        ) from exc


# -------------------------------------------------------------------------------------------
# Facts
# -------------------------------------------------------------------------------------------


def tie_weights(model: torch.nn.Module) -> None:
    """Tie the model's weights after loading (``PreTrainedModel.tie_weights``)."""
    model.tie_weights()


def _patterns(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(sorted(str(v) for v in value))


def _keep_fp32_facts(model: Any) -> dict[str, tuple[str, ...]]:
    """transformers' fp32 lists, as the exact names of the modules they reach.

    transformers 5 matches each entry (``*`` meaning ``.*``) with ``re.search`` against the
    model's state-dict keys, so entries may name parameters (``"gate.weight"``) or fragments;
    the owning modules of the matching keys are what loaderkit keeps in float32.
    ``_keep_in_fp32_modules_strict`` applies under bf16 and fp16, ``_keep_in_fp32_modules`` only
    under fp16: the fp16-only modules go to ``ModelFacts.keep_fp32_fp16``. Modules the model
    itself creates in float32 are kept like strict ones.
    """
    keys = model.state_dict(keep_vars=True)
    strict = _owners(keys, _patterns(getattr(model, "_keep_in_fp32_modules_strict", None)))
    strict = tuple(dict.fromkeys((*strict, *_created_fp32(keys))))
    fp16 = _owners(keys, _patterns(getattr(model, "_keep_in_fp32_modules", None)))
    fp16_only = tuple(m for m in fp16 if m not in strict)
    return {"keep_fp32": strict, "keep_fp32_fp16": fp16_only}


def _owners(keys: dict[str, torch.Tensor], patterns: tuple[str, ...]) -> tuple[str, ...]:
    """Modules owning the state-dict keys that transformers' fp32 patterns match."""
    if not patterns:
        return ()
    rx = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns))
    return tuple(dict.fromkeys(k.rpartition(".")[0] for k in keys if rx.search(k)))


def _created_fp32(keys: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """Modules whose constructor made float32 tensors while the default dtype was bf16/fp16.

    ``from_pretrained`` loads such a tensor in the dtype the model created it with (routers'
    ``weight`` and ``e_score_correction_bias`` in MoE models), not in the load dtype.
    """
    dtypes = {t.dtype for t in keys.values() if t.is_floating_point()}
    if torch.float32 not in dtypes or not dtypes & {torch.bfloat16, torch.float16}:
        return ()
    return tuple(dict.fromkeys(k.rpartition(".")[0] for k, t in keys.items() if t.dtype == torch.float32))


def _ignore_unexpected(model: torch.nn.Module) -> tuple[str, ...]:
    pats = list(_patterns(getattr(model, "_keys_to_ignore_on_load_unexpected", None)))
    buffers = [name for name, _ in model.named_buffers()]
    for suffix, pattern in _LEGACY_BUFFER_PATTERNS:
        if any(b.endswith(suffix) for b in buffers):
            pats.append(pattern)
    return tuple(dict.fromkeys(pats))


def _tied(model: Any) -> dict[str, str]:
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None and hasattr(model, "get_expanded_tied_weights_keys"):
        tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    return {str(k): str(v) for k, v in (tied or {}).items()}


def facts_for(model: torch.nn.Module) -> ModelFacts:
    """The facts transformers declares about a ``PreTrainedModel``."""
    return ModelFacts(
        **_keep_fp32_facts(model),
        ignore_unexpected=_ignore_unexpected(model),
        ignore_missing=_patterns(getattr(model, "_keys_to_ignore_on_load_missing", None)),
        tied=_tied(model),
        no_split=_patterns(getattr(model, "_no_split_modules", None)),
        finalize=(tie_weights,),
        dtype_source=_dtype_source(model),
        key_mapping=functools.partial(key_map, model),
        initialize=initialize_missing,
        linear_types=_linear_types(model),
        stacked_linear=_stacked_linear(model),
        tp_plan=functools.partial(tp_plan, model) if getattr(model, "tp_plan", None) else None,
        source=("transformers",),
    )


def _torch_style(name: str):
    """A maker of torch's parallel style for a transformers style name that torch's own styles
    express for inference (making ``None``: the module stays replicated, as
    ``replicated_with_grad_allreduce`` only matters to gradients), or ``None``."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(),
        "colwise_gather_output": lambda: ColwiseParallel(output_layouts=Replicate()),
        "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
        "replicated_with_grad_allreduce": lambda: None,
    }.get(name)


#: transformers' styles of a module's own parameter (the plan names ``module.param``), as a
#: placement of the parameter: what ``PackedColwiseParallel`` / ``RowwiseParallel.shard_param``
#: give a fused MoE expert weight. Biases, and other styles, are refused.
_PARAM_STYLES = ("packed_colwise", "rowwise", "colwise")
#: transformers' module styles that run the module on its parameters' local shards, and whether
#: they sum its output over the ranks.
_LOCAL_MODULE_STYLES = {"moe_tp_experts": True}


def _param_placement(model: torch.nn.Module, pattern: str, style: str, param: torch.nn.Parameter, module):
    """The placement transformers gives a parameter for ``style``, checked."""
    from torch.distributed.tensor import Shard

    from loaderkit.plugin import packed_placement

    name = type(model).__name__
    nd = param.dim()
    if nd < 2 or "bias" in pattern.rpartition(".")[2]:
        raise PlanError(f"{name}: transformers' tensor-parallel plan shards the {nd}-D parameter {pattern!r} as "
                        f"{style!r}; loaderkit shards only weight matrices (and stacks of them) this way, not biases; pass your "
                        "own plan (parallelize={pattern: style}) or parallelize='fsdp'")
    if getattr(module, "is_transposed", False):
        raise PlanError(f"{name}: {pattern!r} is stored transposed ([experts, in, out]); transformers' "
                        f"{style!r} style shards the other layout, so loaderkit refuses it; pass your own plan "
                        "or parallelize='fsdp'")
    if style == "packed_colwise":  # gate and up along the output dimension: each rank its slice of both
        return packed_placement(nd - 2, 2)
    if style == "colwise":
        return Shard(nd - 2)
    return Shard(nd - 1)  # rowwise: along the input dimension; the module's output is a partial sum


def _matches(pattern: str, name: str) -> bool:
    import fnmatch

    a, b = pattern.split("."), name.split(".")
    return len(a) == len(b) and all(fnmatch.fnmatchcase(y, x) for x, y in zip(a, b))


def tp_plan(model: torch.nn.Module, degree: int) -> dict[str, Any]:
    """The model's own tensor-parallel plan (``model.tp_plan``: its config's
    ``base_model_tp_plan`` under the model's prefix, and the head's ``_tp_plan``) in torch's
    parallel styles, for ``degree`` ranks. Heads must divide evenly (the attention reshapes by
    head count).

    Entries naming a module's own parameters (``experts.gate_up_proj: packed_colwise``,
    ``experts.down_proj: rowwise``) and the module's ``moe_tp_experts`` entry become one
    :func:`loaderkit.plugin.parameter_parallel` style for the module: each parameter a DTensor
    placed as transformers shards it (the packed gate/up as a strided shard: every rank its slice
    of gate and of up), the forward run on the local shards and its partial output all-reduced.
    Parameters sharded without a module entry that runs the forward on local shards, and styles
    neither torch nor these express (``packed_rowwise``, expert-parallel dispatch, ...), are
    refused."""
    from loaderkit.plugin import parameter_parallel

    config = getattr(model, "config", None)
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, field, None)
        if isinstance(heads, int) and heads % degree:
            raise PlanError(f"{type(model).__name__}: config {field}={heads} is not divisible by the "
                            f"tensor-parallel degree {degree}; use a degree that divides it, or parallelize='fsdp'")
    name = type(model).__name__
    modules = dict(model.named_modules())
    plan = dict(model.tp_plan)

    def refuse(pattern: str, style: str):
        return PlanError(f"{name}: transformers' tensor-parallel plan shards {pattern!r} as {style!r}, which "
                         "torch's parallel styles do not express; pass your own plan (parallelize={pattern: "
                         "style}) or parallelize='fsdp'")

    params: dict[str, dict[str, Any]] = {}  # module pattern -> parameter -> placement
    for pattern, style in plan.items():
        owner, _, local = pattern.rpartition(".")
        owned = [m for n, m in modules.items() if owner and _matches(owner, n) and local in m._parameters]
        if not owned or any(_matches(pattern, n) for n in modules):
            continue  # a module entry
        if style not in _PARAM_STYLES:
            raise refuse(pattern, style)
        placement = _param_placement(model, pattern, style, owned[0]._parameters[local], owned[0])
        params.setdefault(owner, {})[local] = placement
    out: dict[str, Any] = {}
    for pattern, style in plan.items():
        owner, _, local = pattern.rpartition(".")
        if local in params.get(owner, {}):
            continue
        if style in _LOCAL_MODULE_STYLES:
            out[pattern] = parameter_parallel(params.pop(pattern, {}), sum_output=_LOCAL_MODULE_STYLES[style])
            continue
        make = _torch_style(style)
        if make is None:
            raise refuse(pattern, style)
        if pattern in params:
            raise PlanError(f"{name}: transformers' tensor-parallel plan shards the parameters of {pattern!r} "
                            f"({', '.join(params[pattern])}) and also styles the module {style!r}; loaderkit runs "
                            "a module on its parameters' shards only under 'moe_tp_experts'; pass your own plan or "
                            "parallelize='fsdp'")
        out[pattern] = make()
    for owner, placed in params.items():
        raise PlanError(f"{name}: transformers' tensor-parallel plan shards {', '.join(f'{owner}.{p}' for p in placed)}"
                        f" but gives {owner!r} no style that runs it on their local shards (such as "
                        "'moe_tp_experts'); its forward would mix shards and whole tensors; pass your own plan or "
                        "parallelize='fsdp'")
    return out


def initialize_missing(model: torch.nn.Module, keys: tuple[str, ...]) -> None:
    """Parameters the checkpoint lacks and transformers allows to be missing: made real on the
    CPU and filled by the model's own ``_init_weights`` for their module, as ``from_pretrained``
    initializes missing keys (Marian's sinusoidal position tables)."""
    modules = {}
    for key in keys:
        name, _, local = key.rpartition(".")
        module = model.get_submodule(name)
        p = module._parameters[local]
        module._parameters[local] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        modules[name] = module
    for module in modules.values():
        model._init_weights(module)


def key_map(model: torch.nn.Module, keys: tuple[str, ...]) -> KeyMap:
    """transformers' own key conversions for ``model``, applied to a checkpoint's ``keys``.

    The conversions are the library's (``get_model_conversion_mapping``: renamed prefixes of
    vision-language models, per-expert ``w1``/``w3`` fused into ``experts.gate_up_proj``, ...),
    applied the way ``from_pretrained`` applies them (``rename_source_key`` on the keys in
    ``dot_natural_key`` order, one converter per target); ``run`` builds a fused tensor with the
    converter's own operations, reading each source when the converter asks for it.
    """
    from copy import deepcopy

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return KeyMap()
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    prefix = model.base_model_prefix
    renamed: dict[str, str] = {}
    groups: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if target not in meta and key in meta:
            target, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta)
        if target not in meta:
            continue  # not the model's: loaderkit's matcher reports it
        if pattern is None:
            if target != key:
                renamed[key] = target
            continue
        converter = by_pattern[pattern]
        if len(converter.target_patterns) > 1:
            raise BuildError(f"transformers converts {key!r} into several tensors ({converter}); one-to-many "
                             "conversions are not supported yet")
        groups.setdefault(target, (converter, []))[1].append((key, pattern))

    def run(target: str, fetch, rows: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        converter, sources = groups[target]
        if rows is not None:
            keep = {k for per in _per_row(converter, sources)[rows[0]:rows[1]] for k in per}
            sources = [(k, p) for k, p in sources if k in keep]
        fresh = deepcopy(converter)
        for key, pattern in sources:
            fresh.add_tensor(target, key, pattern, functools.partial(fetch, key))
        with torch.no_grad():
            return fresh.convert(target, model=model, config=model.config)

    fused = {
        t: FusedTensor(key=t, sources=tuple(k for k, _ in srcs), transform=", ".join(map(repr, conv.operations)),
                       per_row=_per_row(conv, srcs), cat_dim=_cat_dim(conv, srcs))
        for t, (conv, srcs) in groups.items()
    }
    return KeyMap(renamed=renamed, fused=fused, run=run)


def _per_row(converter: Any, sources: list[tuple[str, str]]) -> tuple[tuple[str, ...], ...]:
    """The sources of each index of dimension 0, when the converter's operations are transformers'
    ``MergeModulelist(dim=0)`` (a stack of each pattern's tensors, in the order read) and then only
    ``Concatenate`` along a later dimension: index ``e`` is then made of every pattern's
    ``e``-th tensor alone. Empty for any other conversion."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(converter.operations)
    if not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
        return ()
    if any(type(op) is not Concatenate or op.dim < 1 for op in ops[1:]):
        return ()
    by_pattern: dict[str, list[str]] = {}
    for key, pattern in sources:
        by_pattern.setdefault(pattern, []).append(key)
    counts = {len(v) for v in by_pattern.values()}
    if len(counts) != 1:
        return ()
    return tuple(zip(*(by_pattern[p] for p in converter.source_patterns if p in by_pattern)))


def _cat_dim(converter: Any, sources: list[tuple[str, str]]) -> int:
    """How a part of a per-row fused tensor's index is made of parts of its sources
    (``FusedTensor.cat_dim``): ``MergeModulelist(dim=0)`` then ``Concatenate(dim=c)`` puts each
    index's sources side by side along ``c``, in ``source_patterns`` order (a later
    ``Concatenate`` sees one tensor and changes nothing); a lone ``MergeModulelist`` stacks one
    source per index (``0``). ``-1`` for anything else."""
    from transformers.core_model_loading import Concatenate

    if not _per_row(converter, sources):
        return -1
    cats = [op for op in list(converter.operations)[1:] if type(op) is Concatenate]
    if cats:
        return cats[0].dim
    return 0 if len({p for _, p in sources}) == 1 else -1


def _dtype_source(model: torch.nn.Module) -> tuple[str, ...]:
    """The module whose parameter ``PreTrainedModel.dtype`` reports: the first floating one."""
    for name, param in model.named_parameters():
        if param.is_floating_point():
            return (name.rpartition(".")[0],)
    return ()


def _stacked_linear(model: torch.nn.Module) -> tuple[str, ...]:
    """Fused MoE expert weights: the 3-D parameters of the modules transformers' experts
    decorator (``use_experts_implementation``) marks, read as Linear weights by the experts'
    forward. Stored ``[experts, out, in]``, a scale per row is one per output channel; stored
    transposed (``is_transposed``, gpt-oss: ``[experts, in, out]``), one per input channel —
    still an exact decode, with scales along the other axis."""
    out = []
    for name, module in model.named_modules():
        if not hasattr(module, "has_gate"):
            continue
        for local, p in module.named_parameters(recurse=False):
            if p.dim() == 3 and p.is_floating_point() and "bias" not in local:
                out.append(f"{name}.{local}" if name else local)
    return tuple(out)


def _linear_types(model: torch.nn.Module) -> tuple[str, ...]:
    """transformers' ``Conv1D`` (GPT-2 and kin): a Linear whose weight is stored transposed."""
    from transformers.pytorch_utils import Conv1D

    return ("Conv1D",) if any(isinstance(m, Conv1D) for m in model.modules()) else ()


# -------------------------------------------------------------------------------------------
# Hooks
# -------------------------------------------------------------------------------------------


@hookimpl
def loaderkit_register_builders(register) -> None:
    """Register the transformers builder when transformers is installed."""
    if available():
        register(TransformersBuilder())


@hookimpl
def loaderkit_model_facts(model: torch.nn.Module) -> ModelFacts | None:
    """Facts for ``PreTrainedModel`` instances; ``None`` for anything else (no import triggered)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is None or not isinstance(model, modeling.PreTrainedModel):
        return None
    return facts_for(model)
