"""The orchestrator: inspect -> negotiate -> build -> stream -> place -> runtime -> verify.

Each stage lives in its own module; this one only wires them in order.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .build import ModelFacts, build_skeleton, from_argument
from .capabilities import DeviceCaps
from .checkpoint import CheckpointInfo
from .dtypes import to_torch
from .errors import BuildError, LoaderKitError, PlanError, PluginError, StrategyError
from .inspect import describe
from .manager import Entry, PluginManager, get_manager
from .negotiate import negotiate
from .place import DiskWriter, Placement, dispatch, normalise, place
from .plan import Plan
from .strategy import Strategy

StrategyArg = str | Strategy
DeviceMap = str | torch.device | dict
_plans: "weakref.WeakKeyDictionary[torch.nn.Module, Plan]" = weakref.WeakKeyDictionary()


def inspect(
    path: str | os.PathLike, *, format: str | None = None, manager: PluginManager | None = None
) -> CheckpointInfo:
    """Describe a checkpoint from its headers (no tensor data is read).

    :param format: force a format plugin by name instead of letting formats claim the path.
    """
    return describe(path, manager or get_manager(), format)


def strategy(name: str, **options: Any) -> Strategy:
    """Make a strategy by registered name with validated options (an unknown option is an error).

    ``loaderkit.strategy("fp8", compute_dtype=torch.float32)``
    """
    return _strategy_entry(name, get_manager()).obj(**options)


def _strategy_entry(name: str, mgr: PluginManager) -> Entry:
    entry = mgr.get("strategies", name)
    if entry is None:
        names = ", ".join(e.name for e in mgr.strategies()) or "none"
        raise StrategyError(f"unknown strategy {name!r}; registered strategies: {names}")
    return entry


def _resolve_strategy(arg: StrategyArg, mgr: PluginManager) -> tuple[Strategy, Entry]:
    if isinstance(arg, Strategy):
        entry = mgr.get("strategies", arg.name)
        plugin = entry.plugin if entry is not None and isinstance(arg, entry.obj) else "user"
        return arg, Entry(type(arg), plugin)
    if isinstance(arg, str):
        entry = _strategy_entry(arg, mgr)
        return mgr.call(entry, entry.obj), entry
    raise StrategyError(
        f"strategy must be a name or a loaderkit.strategy(...) object, not {type(arg).__name__}"
    )


def device_caps(device: str | torch.device, mgr: PluginManager) -> DeviceCaps:
    """Capabilities of ``device`` from the ``loaderkit_device_capabilities`` hook."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PlanError(f"invalid device {device!r}: {exc}") from None
    results = mgr.hook("loaderkit_device_capabilities", device=str(dev))
    if not results:
        raise PlanError(f"no plugin describes device {str(dev)!r}; loaderkit knows cpu and cuda devices")
    plugin, caps = results[0]
    if not isinstance(caps, DeviceCaps):
        raise PluginError(
            f"plugin {plugin!r} described device {str(dev)!r} as {type(caps).__name__}, not DeviceCaps",
            plugin=plugin,
        )
    return caps


@dataclass
class _Prepared:
    checkpoint: CheckpointInfo
    model: torch.nn.Module
    facts: ModelFacts
    plan: Plan
    placement: Placement


def _prepare(
    path, strategy_arg, model, placement: Placement, strict, format, mgr: PluginManager
) -> _Prepared:
    strat, entry = _resolve_strategy(strategy_arg, mgr)
    checkpoint = describe(path, mgr, format)
    caps = device_caps(placement.main_device, mgr)
    dtype = to_torch(mgr.call(entry, strat.build_dtype, checkpoint, caps))
    if model is not None:
        skeleton, builder = from_argument(model, dtype), "model="
    else:
        skeleton, builder = build_skeleton(mgr, checkpoint, dtype)
    facts = ModelFacts()
    for plugin, f in mgr.hook("loaderkit_model_facts", model=skeleton):
        if not isinstance(f, ModelFacts):
            raise PluginError(
                f"plugin {plugin!r} returned {type(f).__name__} from loaderkit_model_facts, not ModelFacts",
                plugin=plugin,
            )
        facts = facts.merge(f)
    plan = negotiate(
        checkpoint=checkpoint,
        model=skeleton,
        facts=facts,
        strategy=strat,
        strategy_entry=entry,
        device=caps,
        builder=builder,
        manager=mgr,
        strict=strict,
    )
    plan = place(skeleton, plan, placement, facts.no_split)
    mgr.hook("loaderkit_plan_ready", plan=plan)
    return _Prepared(checkpoint, skeleton, facts, plan, placement)


def plan(
    path: str | os.PathLike,
    strategy: StrategyArg = "auto",
    *,
    model: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
    device_map: DeviceMap = "cpu",
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    offload_buffers: bool = False,
    no_split_module_classes: list[str] | None = None,
    strict: bool = True,
    format: str | None = None,
    manager: PluginManager | None = None,
) -> Plan:
    """Negotiate the plan for loading ``path``, from headers and config alone (no tensor data).

    Takes the same arguments as :func:`load`; ``print(plan)`` shows it readably. Nothing is
    read, allocated or written (the offload folder is only checked for writability).
    """
    mgr = manager or get_manager()
    placement = normalise(device_map, max_memory, offload_folder, offload_buffers, no_split_module_classes)
    return _prepare(path, strategy, model, placement, strict, format, mgr).plan


def load(
    path: str | os.PathLike,
    strategy: StrategyArg = "auto",
    *,
    model: torch.nn.Module | Callable[[], torch.nn.Module] | None = None,
    device_map: DeviceMap = "cpu",
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    offload_buffers: bool = False,
    no_split_module_classes: list[str] | None = None,
    strict: bool = True,
    format: str | None = None,
    cast_inputs: bool = True,
    progress: bool | None = None,
    manager: PluginManager | None = None,
) -> torch.nn.Module:
    """Load a checkpoint into a model whose dtypes follow the negotiated plan.

    :param path: a safetensors file, an index ``.json``, a torch ``.bin``/``.pt``/``.pth`` file,
        or a directory holding one (transformers / diffusers layouts).
    :param strategy: a strategy name (``"auto"``, ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"fp8"``,
        or a plugin's) or a :func:`strategy` object carrying options.
    :param model: the architecture: a module (any device, meta included), a module class or a
        zero-argument factory. Without it, builder plugins build it from the checkpoint's config.
    :param device_map: where the model goes: a device (``"cpu"``, ``"cuda:0"``), a policy
        (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) or a dict of module
        name -> device (GPU index, ``"cuda:N"``, ``"cpu"``, ``"disk"``), as accelerate takes it.
        Sizes are those of the plan's storage dtypes (fp8 is one byte; scales count).
    :param max_memory: device -> bytes or ``"8GiB"``-style string, for the policies.
    :param offload_folder: where modules mapped to ``"disk"`` are written during loading
        (safetensors tensors that need no conversion are pointed at, not copied).
    :param offload_buffers: offload buffers with the parameters (default: buffers stay in memory).
    :param no_split_module_classes: module classes never split across devices, added to those
        the model's library declares.
    :param strict: unexpected checkpoint keys are an error (missing keys always are, unless the
        model already holds real values for them).
    :param format: force a format plugin by name.
    :param cast_inputs: cast floating-point tensors passed to the model's ``forward`` to the
        dtype its modules mostly compute in (as pipelines do with latents and timesteps); integer
        inputs are never touched. Default on; pass ``False`` to feed activations as they are.
    :param progress: show a progress bar for loads that take more than two seconds (default:
        when standard error is a terminal and ``LOADERKIT_PROGRESS`` is not ``0``).
    :returns: the model in eval mode. A failed load raises and returns nothing.
    """
    mgr = manager or get_manager()
    placement = normalise(device_map, max_memory, offload_folder, offload_buffers, no_split_module_classes)
    prep = _prepare(path, strategy, model, placement, strict, format, mgr)
    plan_, model_ = prep.plan, prep.model
    snapshot = _Snapshot(model_)
    try:
        writer = _stream_into(prep, mgr, progress)
        for fn in prep.facts.finalize:
            fn(model_)
        _check_complete(model_, plan_)
        dispatch(model_, plan_, placement, writer)
        _attach_runtime(model_, plan_, cast_inputs)
        model_.eval()
        from .verify import verify

        report = verify(model_, plan=plan_)
        if not report.ok:
            raise PlanError(
                f"{plan_.checkpoint.path}: the loaded model failed its dtype check, which is a bug in a "
                f"plugin or in loaderkit; please report it: {report}"
            )
        _plans[model_] = plan_
        mgr.hook("loaderkit_model_loaded", model=model_, plan=plan_)
    except BaseException:
        snapshot.restore()
        raise
    return model_


class _Snapshot:
    """The tensors, hooks and modes of a model before loading, to undo a failed load.

    A model passed as ``model=`` belongs to the user: a load that fails after tensors were
    assigned must give it back exactly as it was (same tensor objects, no hooks, same mode).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.state = [
            (m, dict(m._parameters), dict(m._buffers), set(m._non_persistent_buffers_set), m.training)
            for m in model.modules()
        ]
        self.attrs = {k: model.__dict__[k] for k in ("to", "cuda", "hf_device_map") if k in model.__dict__}

    def restore(self) -> None:
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(self.model, recurse=True)
        for m, params, buffers, non_persistent, training in self.state:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            m._non_persistent_buffers_set = non_persistent
            m.training = training
        for k in ("to", "cuda", "hf_device_map"):
            self.model.__dict__.pop(k, None)
        self.model.__dict__.update(self.attrs)


def _stream_into(prep: _Prepared, mgr: PluginManager, progress: bool | None = None) -> DiskWriter | None:
    from .progress import progress_bar
    from .stream import Source, assign, read_all

    plan_ = prep.plan
    entry = mgr.get("formats", plan_.checkpoint.format)
    if entry is None:
        raise LoaderKitError(f"format {plan_.checkpoint.format!r} is no longer registered")
    writer = DiskWriter(plan_.offload_folder) if plan_.offload_folder else None
    reader = Source(mgr.call(entry, entry.obj.open, plan_.checkpoint), plan_.checkpoint, entry.plugin)
    try:
        total = sum(t.nbytes for t in plan_.tensors.values())
        with torch.no_grad(), progress_bar(total, "loading", progress=progress, delay=2.0) as update:
            loaded = read_all(plan_, reader, mgr, writer, prep.placement.offload_buffers, progress=update)
        if writer is not None:
            writer.finish()
    finally:
        mgr.call(entry, reader.close)
    with torch.no_grad():
        assign(prep.model, plan_, loaded)
    return writer


def _check_complete(model: torch.nn.Module, plan_: Plan) -> None:
    from .stream import meta_leftovers

    offloaded = {k for t in plan_.tensors.values() if t.device == "disk" for k in (t.key, *t.also)}
    left = [k for k in meta_leftovers(model) if k not in offloaded]
    if left:
        more = f" ... and {len(left) - 10} more" if len(left) > 10 else ""
        raise BuildError(
            f"{plan_.checkpoint.path}: after loading, {len(left)} tensors are still empty (meta): "
            f"{', '.join(left[:10])}{more}. They are neither in the checkpoint nor computed by the "
            "model's constructor; add them to the checkpoint or pass a model that initialises them",
            path=plan_.checkpoint.path,
            tensor=left[0],
        )


def _attach_runtime(model: torch.nn.Module, plan_: Plan, cast_inputs: bool) -> None:
    from . import runtime

    cast_modules = [m for m in plan_.modules.values() if m.cast]

    named = dict(model.named_modules())
    q = plan_.checkpoint.quantization
    for m in cast_modules:
        module = named[m.name]
        scales = {}
        for local, dt in m.storage.items():
            tp = plan_.tensors[f"{m.name}.{local}" if m.name else local]
            if tp.granularity and tp.granularity != "none":
                block = None
                if q and tp.source in q.weights:
                    block = q.weights[tp.source].block
                scales[local] = (f"{local}_scale", tp.granularity, block)
        runtime.attach_cast(
            module,
            to_torch(m.compute_dtype),
            scales=scales or None,
            resident=m.resident,
            native=m.kernel == "native",
        )
    entry = _entry_dtype(plan_)
    for m in plan_.modules.values():
        if m.compute_dtype != entry and m.name and _computes(named[m.name]):
            # e.g. a module the library keeps in float32 inside a bf16 model: its kernel must
            # receive float32 activations (its output is left as it is)
            runtime.attach_input_cast(named[m.name], to_torch(m.compute_dtype))
    if cast_inputs:
        runtime.attach_input_cast(model, to_torch(entry))


def _computes(module: torch.nn.Module) -> bool:
    return any(p.is_floating_point() for p in module.parameters(recurse=False))


def _entry_dtype(plan_: Plan) -> str:
    counts: dict[str, int] = {}
    for m in plan_.modules.values():
        counts[m.compute_dtype] = counts.get(m.compute_dtype, 0) + m.nbytes
    return max(counts, key=counts.get) if counts else "float32"


def plan_of(model: torch.nn.Module) -> Plan | None:
    """The plan a model was loaded with by :func:`load`, or ``None``."""
    return _plans.get(model)
