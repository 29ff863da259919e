"""The orchestrator: discover -> inspect -> build -> negotiate -> place -> stream -> finalize ->
dispatch -> bind -> verify.

Each stage lives in its own module under :mod:`loaderkit.pipeline`; this one only wires them in
order. ``load``, ``plan`` and ``convert`` all start from one typed :class:`LoadRequest`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .contract.bases import Strategy
from .contract.io import gc_paused
from .contract.plan import Plan
from .contract.records import CheckpointInfo, KeyMap, ModelFacts
from .errors import PlanError, UsageError
from .contract.lora import LoraPlan
from .errors import LoraError
from .pipeline import bind, build, distribute, lora, negotiate, place, stream
from .pipeline.discover import PluginManager, get_manager
from .pipeline.inspect import describe
from .pipeline.verify import verify

StrategyArg = str | Strategy
DeviceMap = str | torch.device | dict
ModelArg = torch.nn.Module | Callable[[], torch.nn.Module] | None
LoraArg = list | tuple | None


@dataclass(frozen=True)
class LoadRequest:
    """Everything ``load``/``plan``/``convert`` were asked, in one record (see :func:`load`)."""

    path: str | os.PathLike
    strategy: StrategyArg = "auto"
    model: ModelArg = None
    device_map: DeviceMap = "cpu"
    max_memory: dict | None = None
    offload_folder: str | os.PathLike | None = None
    offload_buffers: bool = False
    no_split_module_classes: list[str] | None = None
    strict: bool = True
    format: str | None = None
    cast_inputs: bool = True
    progress: bool | None = None
    layout: str | None = None
    zero_copy: bool = True
    lora: tuple[lora.LoraRequest, ...] = ()
    lora_mode: str = "cast"
    parallel: distribute.Parallel | None = None

    def placement(self) -> place.Placement:
        device_map = self.device_map
        if self.parallel is not None:
            if not (isinstance(device_map, str) and device_map == "cpu") or self.max_memory or self.offload_folder:
                raise UsageError("device_mesh= puts each rank's shards on the mesh's device: leave device_map, "
                                 "max_memory and offload_folder unset")
            if isinstance(self.model, torch.nn.Module):
                raise UsageError("device_mesh= parallelizes the skeleton in place: pass model= a class or a "
                                 "factory, not a module instance")
            device_map = self.parallel.device
        return place.normalise(
            device_map, self.max_memory, self.offload_folder, self.offload_buffers,
            self.no_split_module_classes,
        )


@dataclass
class Prepared:
    """A negotiated plan and the skeleton it was made for, before any tensor data is read."""

    request: LoadRequest
    checkpoint: CheckpointInfo
    model: torch.nn.Module
    facts: ModelFacts
    plan: Plan
    placement: place.Placement = field(repr=False)
    keymap: KeyMap = field(default_factory=KeyMap, repr=False)


def prepare(request: LoadRequest, mgr: PluginManager) -> Prepared:
    """Stages 1-5: discover (the manager), inspect, build, negotiate and place — headers and config only."""
    with gc_paused():  # many small acyclic records: full collections would cost more than the work
        return _prepare(request, mgr)


def _prepare(request: LoadRequest, mgr: PluginManager) -> Prepared:
    placement = request.placement()
    layout = None if request.layout is None else mgr.layout(request.layout).encoder
    arg = request.strategy if layout is None else negotiate.with_granularity(request.strategy, layout.granularities[0], mgr)
    strat, entry = negotiate.resolve_strategy(arg, mgr)
    checkpoint = describe(request.path, mgr, request.format)
    caps = negotiate.device_caps(placement.main_device, mgr)
    dtype = negotiate.build_dtype(strat, entry, negotiate.build_context(checkpoint, caps, mgr), mgr)
    skeleton, builder = build.skeleton(request.model, mgr, checkpoint, dtype)
    facts = build.collect_facts(skeleton, mgr)
    keymap = negotiate.library_keymap(checkpoint, facts)
    plan_ = negotiate.negotiate(
        checkpoint=checkpoint, model=skeleton, facts=facts, strategy=strat, strategy_entry=entry,
        device=caps, builder=builder, manager=mgr, strict=request.strict, layout=layout, keymap=keymap,
    )
    plan_ = lora.plan_all(request.lora, request.lora_mode, skeleton, plan_, mgr)
    plan_ = place.place(skeleton, plan_, placement, facts.no_split)
    if request.parallel is not None:
        reader = stream.open_source(checkpoint, mgr)
        try:
            plan_ = distribute.plan_shards(skeleton, plan_, facts, request.parallel, reader, keymap)
        finally:
            reader.close()
    mgr.hook.loaderkit_plan_ready(plan=plan_)
    return Prepared(request, checkpoint, skeleton, facts, plan_, placement, keymap)


def execute(prep: Prepared, mgr: PluginManager) -> torch.nn.Module:
    """Stages 6-10: stream (and check the assignment), finalize, dispatch, bind the runtime, verify.
    A failure leaves the model as it was."""
    if prep.plan.parallel is not None:
        return distribute.execute(prep, mgr)
    plan_, model_, request = prep.plan, prep.model, prep.request
    snapshot = _Snapshot(model_)
    writer = None
    try:
        writer = place.DiskWriter(plan_.offload_folder) if plan_.offload_folder else None
        _stream_into(prep, mgr, writer)
        if plan_.initialized:
            with torch.no_grad():
                prep.facts.initialize(model_, plan_.initialized)
        for fn in prep.facts.finalize:
            fn(model_)
        stream.check_complete(model_, plan_)
        place.dispatch(model_, plan_, prep.placement, writer)
        bind.bind_runtime(model_, plan_, request.cast_inputs)
        for lp in plan_.loras:
            if lp.mode == "cast":
                lora.attach(model_, lp)
        model_.eval()
        report = verify(model_, plan=plan_)
        if not report.ok:
            raise PlanError(
                f"{plan_.checkpoint.path}: the loaded model failed its dtype check, which is a bug in a "
                f"plugin or in loaderkit; please report it: {report}"
            )
        bind.remember(model_, plan_)
        mgr.hook.loaderkit_model_loaded(model=model_, plan=plan_)
    except BaseException:
        snapshot.restore()
        if writer is not None:
            writer.abandon()  # the offload files this load wrote
        raise
    return model_


def _stream_into(prep: Prepared, mgr: PluginManager, writer: place.DiskWriter | None) -> None:
    from .progress import progress_bar

    plan_ = prep.plan
    reader = stream.open_source(plan_.checkpoint, mgr)
    try:
        total = sum(t.nbytes for t in plan_.tensors.values())
        with torch.no_grad(), progress_bar(total, "loading", progress=prep.request.progress, delay=2.0) as update:
            loaded = stream.read_all(plan_, reader, mgr, writer, prep.placement.offload_buffers, progress=update,
                                     keymap=prep.keymap, zero_copy=prep.request.zero_copy,
                                     merges=lora.merges(plan_, _quantized(plan_)))
        if writer is not None:
            writer.finish()
    finally:
        reader.close()
    with torch.no_grad():
        stream.assign(prep.model, plan_, loaded)
    stream.check_assigned(prep.model, plan_)


def _quantized(plan_: Plan) -> set[str]:
    q = plan_.checkpoint.quantization
    return set(q.weights) if q is not None else set()


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


# -- the public functions -------------------------------------------------------------------------


def inspect(
    path: str | os.PathLike, *, format: str | None = None, manager: PluginManager | None = None
) -> CheckpointInfo:
    """Describe a checkpoint from its headers (no tensor data is read).

    :param format: force a format plugin by name instead of letting formats claim the path.
    """
    with gc_paused():
        return describe(path, manager or get_manager(), format)


def strategy(name: str, *, manager: PluginManager | None = None, **options: Any) -> Strategy:
    """Make a strategy by registered name with validated options (an unknown option is an error).

    ``loaderkit.strategy("fp8", compute_dtype=torch.float32)``
    """
    mgr = manager or get_manager()
    entry = mgr.strategy_entry(name)
    return mgr.call(entry, entry.obj, **options)


def plan(
    path: str | os.PathLike,
    strategy: StrategyArg = "auto",
    *,
    model: ModelArg = None,
    device_map: DeviceMap = "cpu",
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    offload_buffers: bool = False,
    no_split_module_classes: list[str] | None = None,
    strict: bool = True,
    format: str | None = None,
    layout: str | None = None,
    lora: LoraArg = None,
    lora_mode: str = "cast",
    device_mesh: Any = None,
    parallelize: Any = None,
    manager: PluginManager | None = None,
) -> Plan:
    """Negotiate the plan for loading ``path``, from headers and config alone (no tensor data).

    Takes the same arguments as :func:`load`; ``print(plan)`` shows it readably. Nothing is
    read, allocated or written (the offload folder is only checked for writability).

    :param layout: plan for writing this fp8 layout (``"compressed-tensors"``, ``"comfy-mixed"``,
        or a plugin's) instead of for loading: the plan :func:`convert` executes.
    """
    request = LoadRequest(
        path, strategy, model, device_map, max_memory, offload_folder, offload_buffers,
        no_split_module_classes, strict, format, layout=layout, lora=_lora_requests(lora), lora_mode=lora_mode,
        parallel=distribute.request(device_mesh, parallelize),
    )
    if request.parallel is not None and layout is not None:
        raise UsageError("layout= plans a conversion, which runs in one process: drop device_mesh=")
    return prepare(request, manager or get_manager()).plan


def load(
    path: str | os.PathLike,
    strategy: StrategyArg = "auto",
    *,
    model: ModelArg = None,
    device_map: DeviceMap = "cpu",
    max_memory: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    offload_buffers: bool = False,
    no_split_module_classes: list[str] | None = None,
    strict: bool = True,
    format: str | None = None,
    cast_inputs: bool = True,
    progress: bool | None = None,
    zero_copy: bool = True,
    lora: LoraArg = None,
    lora_mode: str = "cast",
    device_mesh: Any = None,
    parallelize: Any = None,
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
    :param cast_inputs: cast floating-point tensors of two or more dimensions passed to the
        model's ``forward`` to the dtype its modules mostly compute in (as pipelines do with latents
        and embeddings); integer inputs and 0-d/1-d tensors (timesteps) are never touched.
        Default on; pass ``False`` to feed activations as they are.
    :param progress: show a progress bar for loads that take more than two seconds (default:
        when standard error is a terminal and ``LOADERKIT_PROGRESS`` is not ``0``).
    :param zero_copy: tensors that need no conversion stay views of the checkpoint's memory map
        (default): no copy and no extra memory, but the model then *aliases the file* — rewriting
        the file in place afterwards changes the loaded weights (and truncating it can crash the
        process). ``False`` copies them into private memory.
    :param lora: LoRA safetensors files to apply: paths, ``(path, strength)`` or
        ``(path, strength, name)``; checked against the model at plan time (see ``docs/lora.md``).
    :param lora_mode: ``"cast"`` (default): the cast rules add each LoRA in the compute dtype at
        every forward, the stored weights untouched, so :func:`remove_lora` can take it off;
        ``"merge"``: merged into the weights as they load (re-quantized per channel when stored
        in fp8); no forward overhead, not removable.
    :param device_mesh: a ``torch.distributed`` DeviceMesh to load over (every rank of it calls
        ``load`` with the same arguments): each rank reads only the parts of the tensors its
        shards hold and gets DTensor parameters (see ``docs/distributed.md``).
    :param parallelize: with ``device_mesh``: ``"fsdp"`` (default; FSDP2 ``fully_shard`` per
        block the model's library declares, then the root), ``"tp"`` (the model library's own
        tensor-parallel plan), a dict of module pattern -> torch parallel style, or a
        ``callable(model, mesh)`` that parallelizes the meta skeleton in place.
    :returns: the model in eval mode. A failed load raises and returns nothing.
    """
    request = LoadRequest(
        path, strategy, model, device_map, max_memory, offload_folder, offload_buffers,
        no_split_module_classes, strict, format, cast_inputs, progress, zero_copy=zero_copy,
        lora=_lora_requests(lora), lora_mode=lora_mode, parallel=distribute.request(device_mesh, parallelize),
    )
    mgr = manager or get_manager()
    return execute(prepare(request, mgr), mgr)


def _lora_requests(arg: LoraArg) -> tuple[lora.LoraRequest, ...]:
    if isinstance(arg, (str, os.PathLike)):
        raise LoraError("lora= takes a list of LoRAs: lora=[path] or lora=[(path, strength)]")
    return lora.requests(arg)


def add_lora(
    model: torch.nn.Module, path: str | os.PathLike, scale: float = 1.0, *, name: str | None = None,
    manager: PluginManager | None = None,
) -> LoraPlan:
    """Add a LoRA to a loaded model, at cast time: each updated module's cast rule adds
    ``scale * up @ down`` in its compute dtype at every forward (a module without one gets a
    rule that only adds it); the stored weights are not touched.

    The file is checked against the model before anything changes: keys that match no module
    and shapes that do not fit are one :class:`LoraError` listing them all, and the model is
    left as it was. Works on any model; for one loaded by loaderkit, the LoRA is added to
    :func:`plan_of`'s plan.

    :param scale: the LoRA's strength (multiplies the format's ``alpha / r``).
    :param name: its name, for :func:`remove_lora` (default: the file's stem).
    :returns: the LoRA's plan: the modules it updates, with rank and scale.
    """
    (req,) = lora.requests([(path, scale) if name is None else (path, scale, name)])
    old = bind.plan_of(model)
    used = [lp.name for lp in old.loras] if old is not None else lora.names_on(model)
    if req.name in used:
        raise LoraError(f"the model already has a LoRA named {req.name!r}; remove it first or pass another name=",
                        path=req.path)
    lp = lora.plan_one(req, "cast", lora.weight_shapes(model), manager or get_manager())
    lora.attach(model, lp)
    if old is not None:
        bind.remember(model, old.replace(loras=old.loras + (lp,)))
    return lp


def remove_lora(model: torch.nn.Module, name: str) -> None:
    """Remove a LoRA added at cast time (by ``load(..., lora=...)`` or :func:`add_lora`): the
    model computes exactly as it did without it. A merged LoRA cannot be removed (reload without
    it); an unknown name is a :class:`LoraError` listing the model's LoRAs."""
    old = bind.plan_of(model)
    loras = old.loras if old is not None else ()
    lp = next((x for x in loras if x.name == name), None)
    if lp is not None and lp.mode == "merge":
        raise LoraError(f"LoRA {name!r} was merged into the weights at load; reload the model without it "
                        "(or load it with lora_mode='cast' to remove it later)", path=lp.path)
    if lp is None and not lora.remove_named(model, name):
        have = [x.name for x in loras] or lora.names_on(model)
        raise LoraError(f"the model has no LoRA named {name!r}; it has: {', '.join(have) or 'none'}")
    if lp is not None:
        lora.detach(model, lp)
        bind.remember(model, old.replace(loras=tuple(x for x in loras if x.name != name)))
