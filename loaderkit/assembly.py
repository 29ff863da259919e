"""Whole pipelines: one plan for every model of a pipeline directory, then the library's pipeline.

``plan_pipeline`` asks the assembler plugin that claims the directory for its components,
negotiates one plan per model (each with its own builder, strategy and cast rules, exactly as
:func:`loaderkit.plan` would), checks the dtype at every boundary between components, and
places the models against one memory budget. ``load_pipeline`` executes the model plans one by
one, loads the other components by their library's own loaders, and assembles the library's
pipeline object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from .contract.assembly import Component, ComponentPlan, Flow, PipelinePlan
from .contract.plan import Plan
from .errors import CheckpointNotFoundError, LoaderKitError, PlanError, UnsupportedCheckpointError, UsageError
from .loader import LoadRequest, Prepared, StrategyArg, execute, prepare
from .pipeline import bind
from .pipeline.discover import Entry, PluginManager, get_manager

PipelineStrategy = StrategyArg | Mapping[str, StrategyArg]
OFFLOAD = ("auto", "none", "model")


def plan_pipeline(
    path: str | os.PathLike,
    strategy: PipelineStrategy = "auto",
    *,
    device: str = "cpu",
    max_memory: Mapping | None = None,
    offload: str = "auto",
    cast_inputs: bool | None = None,
    components: Mapping[str, Any] | None = None,
    manager: PluginManager | None = None,
) -> PipelinePlan:
    """Negotiate the plan of a whole pipeline directory from headers and configs alone.

    Takes the same arguments as :func:`load_pipeline`; ``print(plan)`` shows the pipeline summary
    followed by each model's own plan. No tensor data is read.
    """
    mgr = manager or get_manager()
    return _prepare(Path(path), strategy, device, max_memory, offload, cast_inputs, mgr, {}, components or {})[0]


def load_pipeline(
    path: str | os.PathLike,
    strategy: PipelineStrategy = "auto",
    *,
    device: str = "cpu",
    max_memory: Mapping | None = None,
    offload: str = "auto",
    cast_inputs: bool | None = None,
    components: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    zero_copy: bool = True,
    manager: PluginManager | None = None,
) -> Any:
    """Load a pipeline directory (diffusers' ``model_index.json``) as the library's pipeline object.

    Every component with weights is loaded by loaderkit, by its own plan; the others (schedulers,
    tokenizers, processors) by their library's own loaders.

    :param strategy: one strategy for every model, or a mapping of component name -> strategy
        (components it does not name use ``"auto"``). The fp8 strategies keep a VAE in its compute
        dtype unless asked otherwise, and say so in its plan.
    :param device: the execution device of every model.
    :param max_memory: the memory budget of the pipeline: ``{device: bytes or "8GiB", "cpu": ...}``
        (a GPU may be keyed by its index). Sizes are those of the plans (fp8 counts one byte).
    :param offload: ``"none"``: every model resident on ``device``; ``"model"``: models rest on
        the CPU and move to ``device`` one at a time when they run, in the pipeline's order (as
        diffusers' model CPU offload does, with loaderkit's cast rules kept); ``"auto"``
        (default): resident when everything fits the budget, else model offload when each model
        fits alone.
    :param cast_inputs: ``None`` (default): the pipeline's own code hands activations between its
        components, cast to each component's ``.dtype`` (which a loaded model reports as its compute
        dtype) as it does with its library's loader, so no input cast is attached, except to a
        component that computes in another dtype than a component feeding it: that one casts its
        inputs (as :func:`load`'s ``cast_inputs``), and the plan records the boundary. ``True``: every
        model casts its inputs. ``False``: none does, and a boundary between different compute dtypes
        is a plan-time error naming both components.
    :param components: components you loaded yourself, by name (as diffusers'
        ``from_pretrained(..., transformer=model)`` takes them): a model loaded by
        :func:`loaderkit.load` (a single original-layout file, say) brings its plan into the
        pipeline plan; anything else is used as it is.
    :returns: the pipeline, ready to call. :func:`loaderkit.plan_of` returns its
        :class:`PipelinePlan`; every model is verified before it returns.
    """
    mgr = manager or get_manager()
    options = {"progress": progress, "zero_copy": zero_copy}
    given = dict(components or {})
    pplan, entry, prepared = _prepare(Path(path), strategy, device, max_memory, offload, cast_inputs, mgr, options,
                                      given)
    parts: dict[str, Any] = dict(given)
    for name, cp in pplan.components.items():  # models first, in the library's order
        if name in prepared:
            with _naming(cp.component):
                parts[name] = execute(prepared[name], mgr)
    for name, cp in pplan.components.items():
        if name not in prepared and name not in given:
            comp = cp.component
            parts[name] = None if comp.class_name is None else mgr.call(entry, entry.obj.load_component, Path(path), comp)
    pipe = mgr.call(entry, entry.obj.assemble, Path(path), parts)
    if pplan.offload == "model" and not mgr.call(entry, entry.obj.offload, pipe, pplan.device, pplan.order):
        _model_offload(pipe, parts, pplan)
    try:
        bind.remember(pipe, pplan)  # what loaderkit.plan_of(pipe) answers
    except TypeError:  # pragma: no cover - an assembler returning an object without weak references
        pass
    return pipe


def pipeline_components(path: str | os.PathLike, manager: PluginManager | None = None) -> tuple[Component, ...]:
    """The components of the pipeline directory ``path``, as its assembler reads them."""
    mgr = manager or get_manager()
    entry = _assembler(Path(path), mgr)
    return mgr.call(entry, entry.obj.components, Path(path), returns=tuple)


def is_pipeline(path: str | os.PathLike, manager: PluginManager | None = None) -> bool:
    """True if an assembler plugin claims ``path`` as a pipeline directory."""
    mgr = manager or get_manager()
    p = Path(path)
    return any(mgr.call(e, e.obj.can_assemble, p, returns=bool) for e in mgr.assemblers())


# -- planning --------------------------------------------------------------------------------------


def _prepare(path: Path, strategy, device, max_memory, offload, cast_inputs, mgr, options, given):
    if offload not in OFFLOAD:
        raise UsageError(f"offload={offload!r}: use one of {', '.join(map(repr, OFFLOAD))}")
    entry = _assembler(path, mgr)
    components = pipeline_components(path, mgr)
    _check_given(given, components)
    strategies = _strategies(strategy, tuple(c for c in components if c.name not in given))
    prepared: dict[str, Prepared] = {}
    for comp in components:
        if comp.weights and comp.name not in given:
            request = LoadRequest(comp.directory, strategies[comp.name], device_map=device, **options)
            with _naming(comp):
                prepared[comp.name] = prepare(request, mgr)
    plans = {n: p.plan for n, p in prepared.items()}
    plans.update({n: bind.plan_of(obj) for n, obj in given.items() if isinstance(bind.plan_of(obj), Plan)})
    flows = _flows(components, plans, cast_inputs, given)
    for name, prep in prepared.items():  # who casts its inputs, now that the boundaries are known
        casts = bool(cast_inputs) or any(f.consumer == name and f.action == "cast" for f in flows)
        prepared[name] = dataclasses.replace(prep, request=dataclasses.replace(prep.request, cast_inputs=casts))
    order = mgr.call(entry, entry.obj.offload_order, path, components, returns=tuple)
    sizes = {n: _nbytes(plans.get(n), given.get(n)) for n in [*prepared, *given] if n in plans or _is_module(given.get(n))}
    mode, budget, reason = _placement(sizes, device, max_memory, offload)
    records = {}
    for comp in components:
        weighted = comp.name in sizes
        rests = None if not weighted else (device if mode == "none" else "cpu")
        plan_ = plans.get(comp.name)
        strat = "given" if comp.name in given else (None if plan_ is None else plan_.strategy)
        records[comp.name] = ComponentPlan(component=comp, strategy=strat, plan=plan_, device=rests,
                                           given=comp.name in given, nbytes=sizes.get(comp.name, 0))
    pplan = PipelinePlan(
        path=str(path), assembler=entry.name, pipeline_class=mgr.call(entry, entry.obj.pipeline_class, path, returns=str),
        components=records, flows=flows, device=device, offload=mode,
        order=order, budget=budget, reason=reason,
    )
    return pplan, entry, prepared


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def _nbytes(plan_: Plan | None, obj: Any) -> int:
    """A model's bytes: its plan's, or (a model loaderkit did not load) its tensors' as they are."""
    if plan_ is not None:
        return sum(t.nbytes for t in plan_.tensors.values())
    seen, total = set(), 0
    for t in (*obj.parameters(), *obj.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _check_given(given: Mapping[str, Any], components: tuple[Component, ...]) -> None:
    names = [c.name for c in components if c.class_name]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UsageError(
            f"components= names {', '.join(map(repr, unknown))}, which this pipeline does not have; its "
            f"components are: {', '.join(names)}"
        )


def _assembler(path: Path, mgr: PluginManager) -> Entry:
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} does not exist", path=str(path))
    for e in mgr.assemblers():
        if mgr.call(e, e.obj.can_assemble, path, returns=bool):
            return e
    names = ", ".join(e.name for e in mgr.assemblers()) or "none (install diffusers)"
    raise UnsupportedCheckpointError(
        f"{path} is not a pipeline directory any assembler knows (assemblers: {names}); a diffusers "
        "pipeline directory holds model_index.json. For a single model use loaderkit.load(path)",
        path=str(path),
    )


def _strategies(strategy: PipelineStrategy, components: tuple[Component, ...]) -> dict[str, StrategyArg]:
    models = [c.name for c in components if c.weights]
    if not isinstance(strategy, Mapping):
        return {n: strategy for n in models}
    unknown = sorted(set(strategy) - set(models))
    if unknown:
        raise UsageError(
            f"strategy names {', '.join(map(repr, unknown))}, which {'is' if len(unknown) == 1 else 'are'} not a "
            f"model of this pipeline; its models are: {', '.join(models)}"
        )
    return {n: strategy.get(n, "auto") for n in models}


@contextlib.contextmanager
def _naming(comp: Component):
    """Errors raised for one component name it (and its class) first."""
    try:
        yield
    except LoaderKitError as exc:
        exc.message = f"pipeline component {comp.name!r} ({comp.class_name}): {exc.message}"
        exc.args = (exc.message, *exc.args[1:])
        raise


def _flows(components, plans: dict[str, Plan], cast_inputs: bool | None, given: Mapping[str, Any]) -> tuple[Flow, ...]:
    out = []
    for comp in components:
        if comp.name not in plans:
            continue
        expected = plans[comp.name].entry_dtype()
        for producer in comp.consumes:
            if producer not in plans:
                continue
            produced = plans[producer].entry_dtype()
            if produced == expected:
                out.append(Flow(producer=producer, consumer=comp.name, produced=produced, expected=expected))
                continue
            if cast_inputs is False or (comp.name in given and not _casts_inputs(given[comp.name])):
                why = ("cast_inputs=False leaves nothing to cast at that boundary" if cast_inputs is False else
                       f"{comp.name!r} was given without an input cast (load it with cast_inputs=True)")
                raise PlanError(
                    f"{producer!r} computes in {produced} and hands its output to {comp.name!r}, which computes "
                    f"in {expected}, and {why}; give both the same compute dtype (strategy=...) or let the "
                    "consumer cast its inputs (cast_inputs=True)"
                )
            out.append(Flow(producer=producer, consumer=comp.name, produced=produced, expected=expected,
                            action="cast"))
    return tuple(out)


def _casts_inputs(model: Any) -> bool:
    from .runtime import input_cast_of

    return input_cast_of(model) is not None


def _budget(max_memory: Mapping | None, device: str) -> tuple[int | None, int | None]:
    """The execution device's and the CPU's budgets in bytes (``None``: no budget given)."""
    if not max_memory:
        return None, None
    from accelerate.utils import convert_file_size_to_int

    keys = {device}
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        keys |= {int(index), index, "cuda" if index == "0" else device}
    dev = next((max_memory[k] for k in max_memory if k in keys), None)
    cpu = max_memory.get("cpu") if device != "cpu" else None

    def size(v):
        try:
            return None if v is None else int(convert_file_size_to_int(v))
        except (ValueError, TypeError) as exc:
            raise UsageError(f"max_memory: {v!r} is not a size (bytes or a string like '8GiB'): {exc}") from None

    return size(dev), size(cpu)


def _placement(sizes: dict[str, int], device: str, max_memory, offload: str) -> tuple[str, int | None, str]:
    from .contract.plan import fmt_bytes

    budget, cpu = _budget(max_memory, device)
    total = sum(sizes.values())
    largest = max(sizes, key=sizes.get) if sizes else None
    summary = f"all models {fmt_bytes(total)}" + (f", the largest ({largest}) {fmt_bytes(sizes[largest])}" if largest else "")
    fits_all = budget is None or total <= budget
    if offload == "none" or (offload == "auto" and fits_all):
        if not fits_all:
            raise PlanError(
                f"the pipeline's models need {fmt_bytes(total)} on {device} ({_sizes(sizes)}), over the budget of "
                f"{fmt_bytes(budget)}; pass offload='model' (models take turns on {device}) or a larger max_memory"
            )
        why = "no memory budget given" if budget is None else "every model fits the budget at once"
        return "none", budget, f"{summary}; {why}"
    if budget is not None and sizes[largest] > budget:
        raise PlanError(
            f"model {largest!r} alone needs {fmt_bytes(sizes[largest])} on {device}, over the budget of "
            f"{fmt_bytes(budget)} ({_sizes(sizes)}); store it in less (strategy={{{largest!r}: 'fp8'}}) or raise "
            "max_memory; one model split across devices is loaderkit.load(..., device_map='auto')"
        )
    if cpu is not None and total > cpu:
        raise PlanError(
            f"model offload rests every model on the CPU: {fmt_bytes(total)} ({_sizes(sizes)}), over the CPU "
            f"budget of {fmt_bytes(cpu)}; raise max_memory['cpu']"
        )
    if offload == "model" and fits_all:
        why = "model offload was asked for"
    else:
        why = f"they do not fit the budget at once, each fits alone; models take turns on {device}"
    if device == "cpu":
        why += " (the execution device is the CPU: offloading moves nothing)"
    return "model", budget, f"{summary}; {why}"


def _sizes(sizes: dict[str, int]) -> str:
    from .contract.plan import fmt_bytes

    return ", ".join(f"{n} {fmt_bytes(b)}" for n, b in sorted(sizes.items(), key=lambda kv: -kv[1]))


# -- model offload ---------------------------------------------------------------------------------


def _model_offload(pipe: Any, parts: dict[str, Any], pplan: PipelinePlan) -> None:
    """For assemblers whose library has no model offload of its own: rest every model on the CPU
    and move it to the execution device when it runs, moving the one before it back (accelerate's
    ``cpu_offload_with_hook``, chained in the pipeline's order; the last model is moved back when
    the first runs again). loaderkit's cast rules stay."""
    import torch
    from accelerate import cpu_offload_with_hook

    device = torch.device(pplan.device)
    hooks = []
    prev = None
    for name in pplan.order:
        model = parts.get(name)
        if not isinstance(model, torch.nn.Module):
            continue
        model.to("cpu")
        _, prev = cpu_offload_with_hook(model, device, prev_module_hook=prev)
        hooks.append(prev)
    if len(hooks) > 1:
        hooks[0].hook.prev_module_hook = hooks[-1]
