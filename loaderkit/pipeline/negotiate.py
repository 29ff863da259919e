"""Stage 4, negotiate: a plan from the checkpoint, the skeleton, the strategy and the device.

Everything here works on headers, shapes and dtypes: no tensor data is read. A configuration
that cannot satisfy the invariant (every module's kernel sees its weights in its compute dtype)
fails here with a :class:`PlanError` naming the module, the dtypes and the fix.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..contract.bases import BuildContext, Encoder, ModelContext, ModuleContext, ModuleDecision, Strategy
from ..contract.dtypes import dtype_name, holds_weights, is_float, is_fp8, to_torch
from ..contract.layout import DEFAULT_BLOCK, block_problem, scale_numel
from ..contract.modules import module_kind, read_by_parent
from ..contract.plan import Decision, ModulePlan, Plan, TensorPlan
from ..contract.records import CheckpointInfo, DeviceCaps, KeyMap, ModelFacts, TensorInfo
from ..errors import (
    LoaderKitError,
    PlanError,
    PluginError,
    StrategyError,
    UnsupportedCheckpointError,
)
from ..kernels.int8 import INT8_REASON
from ..kernels.native import NATIVE_REASON, native_problem, native_reason
from .discover import Entry, PluginManager
from .match import LIBRARY_IGNORES, fused_info, library_keymap, match_keys, model_slots

def resolve_strategy(arg: Any, mgr: PluginManager) -> tuple[Strategy, Entry]:
    """The strategy object to plan with and the registry entry (plugin) it belongs to."""
    if isinstance(arg, Strategy):
        entry = mgr.get("strategies", arg.name)
        plugin = entry.plugin if entry is not None and isinstance(arg, entry.obj) else "user"
        return arg, Entry(type(arg), plugin, "strategies")
    if isinstance(arg, str):
        entry = mgr.strategy_entry(arg)
        return mgr.call(entry, entry.obj, returns=Strategy), entry
    raise StrategyError(
        f"strategy must be a name or a loaderkit.strategy(...) object, not {type(arg).__name__}"
    )


def with_granularity(arg: Any, granularity: str, mgr: PluginManager) -> Any:
    """``arg`` (a strategy name or object) made with ``granularity`` when its options have a
    ``granularity`` the caller did not set; otherwise ``arg`` as it is. How a layout's default
    scale granularity reaches a strategy that left it open (the plan records the result)."""
    if isinstance(arg, str):
        entry = mgr.strategy_entry(arg)
        cls, given = entry.obj, {}
    elif isinstance(arg, Strategy):
        entry, cls, given = None, type(arg), arg.options.model_dump(exclude_unset=True)
    else:
        return arg
    if "granularity" not in cls.Options.model_fields or "granularity" in given:
        return arg
    options = {**given, "granularity": granularity}
    return cls(**options) if entry is None else mgr.call(entry, cls, **options)


def device_caps(device: str | torch.device, mgr: PluginManager) -> DeviceCaps:
    """Capabilities of ``device`` from the ``loaderkit_device_capabilities`` hook."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PlanError(f"invalid device {device!r}: {exc}") from None
    results = mgr.hook.loaderkit_device_capabilities(device=str(dev), returns=DeviceCaps)
    if not results:
        raise PlanError(f"no plugin describes device {str(dev)!r}; loaderkit knows cpu and cuda devices")
    return results[0][1]


def build_context(checkpoint: CheckpointInfo, device: DeviceCaps, mgr: PluginManager) -> BuildContext:
    return BuildContext(checkpoint=checkpoint, device=device, strategies=mgr.strategy_classes())


def build_dtype(strategy: Strategy, entry: Entry, ctx: BuildContext, mgr: PluginManager) -> torch.dtype:
    """The dtype the skeleton is built in, as the strategy asks (a checked dtype name)."""
    name = mgr.call(entry, strategy.build_dtype, ctx)
    try:
        return to_torch(name)
    except LoaderKitError as exc:
        raise PluginError(
            f"strategy {strategy.name!r} asked to build the model in {name!r}: {exc.message}",
            plugin=entry.plugin,
        ) from None


def negotiate(
    *,
    checkpoint: CheckpointInfo,
    model: torch.nn.Module,
    facts: ModelFacts,
    strategy: Strategy,
    strategy_entry: Entry,
    device: DeviceCaps,
    builder: str,
    manager: PluginManager,
    strict: bool = True,
    layout: Encoder | None = None,
    keymap: KeyMap | None = None,
) -> Plan:
    """Make the plan. Raises :class:`PlanError` or :class:`StateDictMismatchError` when impossible.

    :param layout: plan for writing this on-disk layout (``convert``): what it cannot hold in
        fp8 is planned in the compute dtype, and the plan says so.
    """
    refuse_unreadable(checkpoint)
    slots = model_slots(model)
    keymap = keymap if keymap is not None else library_keymap(checkpoint, facts)
    source_of, also, ignored, kept, decisions, initialized = match_keys(checkpoint, slots, facts, strict, keymap)
    described = {mk: fused_info(checkpoint, keymap.fused[mk], slots[mk]) for mk in keymap.fused if mk in source_of}
    virtual = {mk: d[0] for mk, d in described.items()}
    virtual_q = {mk: d[1] for mk, d in described.items() if d[1] is not None}
    stacked = set(facts.stacked_linear)
    ctx = ModelContext(checkpoint=checkpoint, device=device, strategies=manager.strategy_classes(), facts=facts)
    state = manager.call(strategy_entry, strategy.prepare, ctx)
    refits: dict[str, list[str]] = {}
    tensors: dict[str, TensorPlan] = {}
    modules: dict[str, ModulePlan] = {}
    by_module: dict[str, list[str]] = {}
    for key in source_of:
        by_module.setdefault(slots[key].module, []).append(key)
    named = dict(model.named_modules())
    for mname, keys in by_module.items():
        module = named[mname]
        infos = {slots[k].local: virtual.get(k) or checkpoint.tensors[source_of[k]] for k in keys}
        locked = read_by_parent(mname, named) or (
            "the model's library reads model.dtype from its first floating parameter, which is this "
            "module's: a storage-only dtype here would make model.dtype report it" if mname in facts.dtype_source else ""
        )
        mctx = ModuleContext(
            name=mname,
            type=type(module).__name__,
            kind="linear" if type(module).__name__ in facts.linear_types else module_kind(module),
            tensors=infos,
            keep_fp32=_keeps_fp32(facts, mname, infos),
            keep_fp32_fp16=_keeps_fp32(facts, mname, infos, fp16=True),
            skip_low_precision=facts.skips_low_precision(mname),
            stacked_linear=tuple(slots[k].local for k in keys if k in stacked),
            locked=locked,
        )
        decision = _decide(strategy, strategy_entry, mctx, state, manager)
        if layout is not None:
            decision = _fit_layout(layout, mctx, decision, refits)
        try:
            mplan, tplans = _plan_module(mctx, module, decision, keys, slots, source_of, also, checkpoint, device,
                                         virtual_q)
        except LoaderKitError as exc:
            raise exc.with_context(module=mname, plugin=strategy_entry.plugin)
        for k in keys:
            if k in virtual:
                f = keymap.fused[k]
                extra = {}
                if k in virtual_q:  # the sources' scales travel with them, fused the same way
                    extra["companions"] = tuple(checkpoint.quantization.weights[s_].scale for s_ in f.sources)
                tplans[k] = tplans[k].replace(sources=f.sources, transform=f.transform, **extra)
        modules[mname] = mplan
        tensors.update(tplans)
    decisions.extend(
        Decision(subject=s, choice=c, reason=r, by=f"strategy {strategy.name}") for s, c, r in ctx.notes
    )
    decisions.extend(_native_summary(modules))
    decisions.extend(_kept_summary(modules))
    decisions.extend(
        Decision(subject=f"layout {layout.name}", choice=f"{len(names)} tensors kept in their compute dtype",
                 reason=f"{why}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}", by=f"layout {layout.name}")
        for why, names in refits.items()
    )
    order = {k: i for i, k in enumerate(checkpoint.tensors)}
    tensors = dict(sorted(tensors.items(), key=lambda kv: order[(kv[1].sources or (kv[1].source,))[0]]))
    if virtual:
        n = len({s_ for k in virtual for s_ in keymap.fused[k].sources})
        transforms = sorted({keymap.fused[k].transform for k in virtual})
        decisions.append(Decision(
            subject="library conversions",
            choice=f"{len(virtual)} tensors built from {n} checkpoint tensors",
            reason=f"the model's library fuses them on load ({'; '.join(transforms[:5])}"
                   f"{f'; and {len(transforms) - 5} more' if len(transforms) > 5 else ''})", by="the model's library",
        ))
    renamed = sum(1 for ck, mk in keymap.renamed.items() if source_of.get(mk) == ck)
    if renamed:
        decisions.append(Decision(subject="library conversions", choice=f"{renamed} checkpoint keys renamed",
                                  reason="the model's library renames them on load", by="the model's library"))
    return Plan(
        checkpoint=checkpoint,
        strategy=strategy.name,
        options=strategy.options.model_dump(exclude_defaults=True),
        device=device,
        builder=builder,
        model_type=type(model).__name__,
        tensors=tensors,
        modules=modules,
        decisions=tuple(decisions),
        ignored=ignored,
        library_ignored=tuple(k for k, why in ignored.items() if why == LIBRARY_IGNORES),
        kept=tuple(kept),
        initialized=tuple(initialized),
    )


def _keeps_fp32(facts: ModelFacts, module: str, tensors: dict, fp16: bool = False) -> bool:
    """The library keeps this module in float32: by its name, or — as diffusers matches its
    ``_keep_in_fp32_modules`` against every component of a *parameter's* name — by the name of
    one of its own tensors (Wan's ``scale_shift_table`` is a parameter, not a module)."""
    if facts.keeps_fp32(module, fp16=fp16):
        return True
    return any(facts.keeps_fp32(f"{module}.{local}" if module else local, fp16=fp16) for local in tensors)


def refuse_unreadable(checkpoint: CheckpointInfo) -> None:
    """A checkpoint whose quantization a scheme recognised but cannot decode fails here, before
    any decision is made: loading its raw codes as weights would be silently wrong."""
    q = checkpoint.quantization
    if q is not None and q.refused:
        raise UnsupportedCheckpointError(
            f"{checkpoint.path}: {q.family}: {q.refused}", path=checkpoint.path, plugin=None,
        )


def _decide(strategy: Strategy, entry: Entry, ctx: ModuleContext, state: Any, mgr: PluginManager) -> ModuleDecision:
    """The strategy's checked decision for one module; any failure names the module and plugin."""
    try:
        decision = mgr.call(entry, strategy.decide, ctx, state, returns=ModuleDecision)
    except LoaderKitError as exc:
        raise exc.with_context(module=ctx.name, plugin=entry.plugin)
    bad = {k: d for k, d in decision.storage.items() if is_float(d) and not holds_weights(d)}
    if bad:
        local, dtype = next(iter(bad.items()))
        raise PlanError(
            f"strategy {entry.name!r} asks module {ctx.name!r} to store {local} as {dtype}, which cannot hold "
            "weights (float8_e8m0fnu holds power-of-two scales, float4_e2m1fn_x2 packed pairs); store weights "
            "in float8_e4m3fn, float8_e5m2 or a wider float",
            module=ctx.name,
            plugin=entry.plugin,
        )
    ints = {k: d for k, d in decision.storage.items()
            if not is_float(d) and k in ctx.tensors and is_float(ctx.tensors[k].dtype)
            and not (d == "int8" and decision.granularity == "channel")}
    if ints:
        local, dtype = next(iter(ints.items()))
        raise PlanError(
            f"strategy {entry.name!r} asks module {ctx.name!r} to store {local} as {dtype}, an integer dtype, "
            f"but it holds floating-point values ({ctx.tensors[local].dtype}): a cast would keep only their "
            "integer parts; store weights in float8_e4m3fn, float8_e5m2 or a wider float, or in int8 with "
            "one scale per output channel (granularity='channel')",
            module=ctx.name,
            plugin=entry.plugin,
        )
    if is_fp8(decision.compute) or not is_float(decision.compute):
        raise PlanError(
            f"strategy {entry.name!r} asks module {ctx.name!r} ({ctx.type}) to compute in "
            f"{decision.compute}; kernels compute in float32, bfloat16 or float16 — store in fp8, "
            "compute in a wider dtype",
            module=ctx.name,
            plugin=entry.plugin,
        )
    return decision


def _fit_layout(layout: Encoder, ctx: ModuleContext, decision: ModuleDecision, refits: dict) -> ModuleDecision:
    """The decision with fp8 storage the layout cannot hold moved to the compute dtype."""
    storage = dict(decision.storage)
    why = ""
    for local, dtype in decision.storage.items():
        if not is_fp8(dtype) or local not in ctx.tensors or is_fp8(ctx.tensors[local].dtype):
            continue
        problem = layout.holds(ctx, local, dtype)
        if problem:
            del storage[local]
            why = problem
            refits.setdefault(problem, []).append(f"{ctx.name}.{local}" if ctx.name else local)
        elif decision.granularity not in layout.granularities:
            raise PlanError(
                f"the {layout.name} layout writes {'/'.join(layout.granularities)} scales; the strategy "
                f"asks {decision.granularity} scales for {ctx.name!r}; choose one the layout writes",
                module=ctx.name,
            )
    if not why:
        return decision
    return decision.replace(storage=storage, reason=f"{why} ({layout.name} layout)")


def _plan_module(ctx, module, decision, keys, slots, source_of, also, checkpoint, device, virtual_q=None):
    compute = decision.compute
    q = checkpoint.quantization
    storage: dict[str, str] = {}
    tplans: dict[str, TensorPlan] = {}
    granularity = None
    for key in keys:
        slot = slots[key]
        info: TensorInfo = ctx.tensors[slot.local]
        qw = (virtual_q or {}).get(key) or (q.weights.get(info.name) if q else None)
        tp = _tensor_plan(info, qw, slot, decision.storage.get(slot.local, compute), decision, checkpoint)
        tp = tp.replace(key=key, source=source_of[key], also=tuple(also.get(key, ())), device=device.device)
        if tp.granularity:
            granularity = tp.granularity
        storage[slot.local] = tp.target_dtype
        tplans[key] = tp
    needs_cast = any(is_float(d) and d != compute for d in storage.values()) or any(
        _int8_weight(t) for t in tplans.values())
    if needs_cast and not _cast_supported(module):
        raise PlanError(
            f"module {ctx.name!r} ({ctx.type}) would store {sorted(set(storage.values()))} and compute in "
            f"{compute}, but no cast rule can cover a {ctx.type}; store it in {compute} (add it to the "
            "strategy's skip list) or pass a strategy that does",
            module=ctx.name,
        )
    kernel, kernel_reason = _kernel(ctx, decision, needs_cast, storage, tplans, compute, device)
    return (
        ModulePlan(
            name=ctx.name,
            type=ctx.type,
            kind=ctx.kind,
            compute_dtype=compute,
            storage=storage,
            cast=needs_cast,
            kernel=kernel,
            kernel_reason=kernel_reason,
            resident=decision.resident and needs_cast,
            fold_scale=decision.fold_scale and needs_cast,
            granularity=granularity,
            device=device.device,
            nbytes=sum(t.nbytes for t in tplans.values()),
            reason=decision.reason,
        ),
        tplans,
    )


def _kernel(ctx, decision, needs_cast, storage, tplans, compute, device) -> tuple[str, str]:
    """Negotiate native fp8 matmul for one module: ``("native", why)`` where the module, its
    weight and the device allow it, else ``("cast", why not)``."""
    if decision.kernel != "native" or not needs_cast:
        return "cast", ""
    weight = next((t for t in tplans.values() if t.key.rpartition(".")[2] == "weight"), None)
    if weight is None or "weight" not in storage:
        return "cast", "no weight to multiply natively"
    problem = native_problem(
        linear=ctx.kind == "linear",
        weight_dtype=weight.target_dtype,
        shape=weight.shape,
        granularity=weight.granularity or "none",
        compute=compute,
        caps=device,
    )
    return ("cast", problem) if problem else ("native", native_reason(weight.target_dtype))


def _int8_weight(tp: TensorPlan) -> bool:
    """A floating weight quantized to int8 on load (stored with its per-channel scale)."""
    return tp.target_dtype == "int8" and tp.conversion == "quantize"


def _low(dtype: str) -> bool:
    """A weight storage dtype narrower than any compute dtype: fp8 or int8 (with scales)."""
    return is_fp8(dtype) or dtype == "int8"


def _kept_summary(modules: dict[str, ModulePlan]) -> list[Decision]:
    """When some weights are stored in fp8 or int8: the Linear/conv weights kept in their compute
    dtype, grouped by reason, with their bytes — what each skip rule costs."""
    if not any(is_fp8(d) or (d == "int8" and m.cast) for m in modules.values() for d in m.storage.values()):
        return []
    groups: dict[str, list[ModulePlan]] = {}
    for m in modules.values():
        if m.kind in ("linear", "conv") and not _low(m.storage.get("weight", "")) and "weight" in m.storage:
            groups.setdefault(m.reason or "not stored in fp8 by the strategy", []).append(m)
    out = []
    for reason, ms in sorted(groups.items(), key=lambda kv: -sum(m.nbytes for m in kv[1])):
        out.append(Decision(
            subject="kept in compute dtype",
            choice=f"{len(ms)} modules, {sum(m.nbytes for m in ms):,} bytes",
            reason=f"{reason} (e.g. {ms[0].name})",
        ))
    return out


def _native_summary(modules: dict[str, ModulePlan]) -> list[Decision]:
    """One decision per family of native kernels asked for (fp8 matmul, int8 weight-only): how
    many modules run it, and why the others do not."""
    out = []
    for int8, subject, default in ((False, "native fp8 kernels", NATIVE_REASON), (True, "int8 kernels", INT8_REASON)):
        mine = [m for m in modules.values() if (m.storage.get("weight") == "int8") == int8]
        native = [m for m in mine if m.kernel == "native"]
        fallback = [m for m in mine if m.kernel == "cast" and m.kernel_reason]
        if not native and not fallback:
            continue
        reasons: dict[str, list[str]] = {}
        for m in fallback:
            reasons.setdefault(m.kernel_reason, []).append(m.name)
        why = "; ".join(f"{len(v)} cast ({r}: {v[0]}{', ...' if len(v) > 1 else ''})" for r, v in reasons.items())
        out.append(Decision(subject=subject, choice=f"{len(native)} modules native, {len(fallback)} cast",
                            reason=why or default))
    return out


def _cast_supported(module: torch.nn.Module) -> bool:
    from .. import runtime

    return runtime.supports(module)


def _tensor_plan(info, qw, slot, wanted, decision, checkpoint) -> TensorPlan:
    """How one tensor is filled (key, source, ties and device are set by the caller)."""
    stored = info.dtype
    model_dtype = dtype_name(slot.tensor.dtype)

    def plan(target, conversion, **extra) -> TensorPlan:
        nbytes = math.prod(info.shape) * to_torch(target).itemsize + extra.pop("scale_bytes", 0)
        return TensorPlan(
            key=slot.key, source=info.name, shape=info.shape, stored_dtype=stored, target_dtype=target,
            conversion=conversion, buffer=not slot.is_param, nbytes=nbytes, **extra,
        )

    if not slot.tensor.is_floating_point():
        # integer / bool model tensors keep the model's dtype, as load_state_dict would
        return plan(model_dtype, "none" if model_dtype == stored else "cast")
    if is_float(stored) and not holds_weights(stored) and not (qw and qw.scale):
        raise PlanError(
            f"tensor {info.name!r} in {info.file} is stored as {stored}, which loaderkit cannot decode into the "
            f"model's {slot.key!r} ({model_dtype}) without a scheme for its layout; install a scheme plugin "
            "for it, or dequantize it with the tool that wrote it",
            tensor=info.name,
            module=slot.module,
        )
    if not is_float(stored) and not (qw and (qw.scale or qw.weight not in checkpoint.tensors)):
        raise PlanError(
            f"tensor {info.name!r} in {info.file} is stored as {stored}, but the model's {slot.key!r} is a "
            f"floating-point {'parameter' if slot.is_param else 'buffer'} ({model_dtype}): no kernel can "
            "compute with it; check that the checkpoint matches the model (or that a scheme plugin "
            "for its quantization is installed)",
            tensor=info.name,
            module=slot.module,
        )
    companions = (qw.scale,) if qw and qw.scale else ()
    if is_fp8(stored) and not is_float(wanted):
        raise PlanError(
            f"tensor {info.name!r} is stored in {stored}; the strategy asks {wanted} for the model's {slot.key!r}, "
            "but stored fp8 is never requantized (each rounding loses precision); keep it in fp8 with strategy "
            "'fp8', or decode it with a float strategy ('bf16')",
            tensor=info.name,
            module=slot.module,
        )
    if wanted == "int8":
        return _int8_plan(info, slot, plan)
    if is_fp8(stored):
        if is_fp8(wanted):
            # stored fp8 bytes are kept as they are: no requantization
            if qw is not None and qw.weight not in checkpoint.tensors:  # fused from scaled sources
                return plan(stored, "none", granularity=qw.granularity, block=qw.block, scale=f"{slot.local}_scale",
                            scale_bytes=scale_numel(info.shape, qw.granularity, qw.block) * 4)
            if not companions:
                return plan(stored, "none", granularity=qw.granularity if qw else "none")
            scale_info = checkpoint.tensors[qw.scale]
            return plan(
                stored, "none", companions=companions, granularity=qw.granularity, block=qw.block,
                scale=f"{slot.local}_scale", scale_encoding=qw.scale_encoding,
                scale_bytes=math.prod(scale_info.shape) * 4,
            )
        return plan(wanted, "dequantize" if qw else "cast", companions=companions)  # fused: set by the caller
    if is_fp8(wanted):
        gran = decision.granularity
        block = (decision.block or DEFAULT_BLOCK) if gran == "block" else None
        problem = block_problem(info.shape, gran, block)
        if problem:
            raise PlanError(
                f"cannot quantize {slot.key!r} on load as asked: {problem}; choose another granularity "
                "for this module",
                tensor=info.name,
                module=slot.module,
            )
        numel = scale_numel(info.shape, gran, block)
        return plan(
            wanted, "quantize", granularity=gran, block=block, scale=f"{slot.local}_scale" if numel else None,
            scale_bytes=numel * 4,
        )
    return plan(wanted, "none" if wanted == stored else "cast")


def _int8_plan(info: TensorInfo, slot, plan) -> TensorPlan:
    """A floating weight quantized to int8 on load, one float32 scale per output channel."""
    if len(info.shape) != 2:
        raise PlanError(
            f"cannot store {slot.key!r} in int8: int8 weights are 2-D (one scale per output channel), this one "
            f"has shape {list(info.shape)}; keep it in its compute dtype",
            tensor=info.name,
            module=slot.module,
        )
    return plan("int8", "quantize", granularity="channel", scale=f"{slot.local}_scale",
                scale_bytes=info.shape[0] * 4)
