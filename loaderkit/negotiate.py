"""Stage 2: negotiate a plan from the checkpoint, the skeleton, the strategy and the device.

Everything here works on headers, shapes and dtypes: no tensor data is read. A configuration
that cannot satisfy the invariant (every module's kernel sees its weights in its compute dtype)
fails here with a :class:`PlanError` naming the module, the dtypes and the fix.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .build import ModelFacts
from .capabilities import DeviceCaps
from .checkpoint import CheckpointInfo, TensorInfo
from .dtypes import dtype_name, is_float, is_fp8, to_torch
from .errors import LoaderKitError, PlanError, PluginError, StateDictMismatchError
from .manager import Entry, PluginManager
from .plan import Decision, ModulePlan, Plan, TensorPlan
from .strategy import ModelContext, ModuleContext, ModuleDecision, Strategy

_NORM = re.compile(r"norm", re.IGNORECASE)


@dataclass
class Slot:
    """One tensor the model holds in its state dict (a parameter or a persistent buffer)."""

    key: str
    module: str
    local: str
    tensor: torch.Tensor
    is_param: bool


def model_slots(model: torch.nn.Module) -> dict[str, Slot]:
    """Parameters and persistent buffers by state-dict key (tied tensors appear under each key)."""
    slots: dict[str, Slot] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for local, p in mod._parameters.items():
            if p is not None:
                slots[prefix + local] = Slot(prefix + local, mname, local, p, True)
        for local, b in mod._buffers.items():
            if b is not None and local not in mod._non_persistent_buffers_set:
                slots[prefix + local] = Slot(prefix + local, mname, local, b, False)
    return slots


def module_kind(module: torch.nn.Module) -> str:
    """Classify a module for strategies: linear, conv, embedding, norm or other."""
    nn = torch.nn
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(module, nn.modules.batchnorm._NormBase) or _NORM.search(type(module).__name__):
        return "norm"
    return "other"


def _read_by_parent(name: str, named: dict[str, torch.nn.Module]) -> bool:
    """True for a module whose parent reads its tensors without calling it (so a cast rule on
    the module itself would never run): ``nn.MultiheadAttention.out_proj``."""
    parent, _, _ = name.rpartition(".")
    return bool(name) and isinstance(named.get(parent), torch.nn.MultiheadAttention)


def _tie_groups(slots: dict[str, Slot], facts: ModelFacts) -> dict[str, list[str]]:
    """Canonical-less groups of keys that must share one tensor (by identity, then by facts)."""
    by_id: dict[int, list[str]] = {}
    for key, slot in slots.items():
        by_id.setdefault(id(slot.tensor), []).append(key)
    groups = [g for g in by_id.values() if len(g) > 1]
    for target, source in facts.tied.items():
        if target not in slots or source not in slots:
            continue
        for g in groups:
            if target in g or source in g:
                g.extend(k for k in (target, source) if k not in g)
                break
        else:
            groups.append([source, target])
    return {k: g for g in groups for k in g}


def match_keys(
    checkpoint: CheckpointInfo, slots: dict[str, Slot], facts: ModelFacts, strict: bool
) -> tuple[dict[str, str], dict[str, list[str]], dict[str, str], list[str], list[Decision]]:
    """Map model keys to checkpoint keys.

    Returns ``(source_of, also, ignored, kept, decisions)``: ``source_of`` maps each loaded model
    key to its checkpoint key; ``also`` the tied keys sharing it; ``ignored`` the checkpoint keys
    not loaded, with why; ``kept`` model keys that keep the skeleton's real values (buffers the
    model computes, and parameters its library allows to be missing). A missing parameter is an
    error even when the skeleton holds random initial values for it.
    """
    q = checkpoint.quantization
    companions = q.companion_keys() if q else set()
    ckpt_keys = [k for k in checkpoint.tensors if k not in companions]
    ignored: dict[str, str] = {}
    if q:
        for k in q.auxiliary:
            ignored[k] = f"{q.family} marker"
    groups = _tie_groups(slots, facts)
    source_of: dict[str, str] = {}
    also: dict[str, list[str]] = {}
    done: set[str] = set()
    unexpected = []
    for ck in ckpt_keys:
        if ck not in slots:
            if any(re.search(p, ck) for p in facts.ignore_unexpected):
                ignored[ck] = "the model's library ignores this key on load"
            else:
                unexpected.append(ck)
            continue
        if ck in done:
            ignored[ck] = f"tied to {next(k for k, v in also.items() if ck in v)}; loaded once"
            continue
        group = groups.get(ck, [ck])
        source_of[ck] = ck
        also[ck] = [k for k in group if k != ck]
        done.update(group)
    missing, kept = [], []
    for key, slot in slots.items():
        if key in done:
            continue
        real = slot.tensor.device.type != "meta"
        allowed = not slot.is_param or any(re.search(p, key) for p in facts.ignore_missing)
        if real and allowed:
            kept.append(key)
        else:
            missing.append(key)
    mismatched = []
    for mk, ck in source_of.items():
        want = tuple(slots[mk].tensor.shape)
        got = checkpoint.tensors[ck].shape
        if want != got:
            mismatched.append((ck, got, want))
    decisions = []
    if unexpected and not strict:
        for k in unexpected:
            ignored[k] = "not in the model (strict=False)"
        decisions.append(
            Decision(subject="unexpected keys", choice=f"ignored {len(unexpected)}", reason="strict=False")
        )
        unexpected = []
    if missing or unexpected or mismatched:
        raise _mismatch_error(checkpoint, missing, unexpected, mismatched)
    if kept:
        decisions.append(
            Decision(
                subject=f"{len(kept)} model tensors absent from the checkpoint",
                choice="kept the values the model was built with",
                reason="they are real (not meta) in the skeleton, e.g. buffers computed by __init__",
            )
        )
    return source_of, also, ignored, kept, decisions


def _mismatch_error(checkpoint, missing, unexpected, mismatched) -> StateDictMismatchError:
    def listing(keys, n=10):
        keys = list(keys)
        more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
        return ", ".join(map(str, keys[:n])) + more

    parts = []
    if mismatched:
        parts.append(
            "shape mismatch: "
            + "; ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched[:10])
        )
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint: {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected in the checkpoint: {listing(unexpected)}")
    fix = (
        "check that the checkpoint matches the model architecture"
        + ("; pass strict=False to ignore unexpected keys" if unexpected and not (missing or mismatched) else "")
    )
    first = (mismatched and mismatched[0][0]) or (missing and missing[0]) or (unexpected and unexpected[0])
    return StateDictMismatchError(
        f"{checkpoint.path}: the checkpoint does not fit the model: " + "; ".join(parts) + f". {fix}",
        path=checkpoint.path,
        tensor=first or None,
        missing=missing,
        unexpected=unexpected,
        mismatched=mismatched,
    )


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
) -> Plan:
    """Make the plan. Raises :class:`PlanError` or :class:`StateDictMismatchError` when impossible."""
    slots = model_slots(model)
    source_of, also, ignored, kept, decisions = match_keys(checkpoint, slots, facts, strict)
    strategy.decisions = []
    manager.call(strategy_entry, strategy.prepare, ModelContext(checkpoint=checkpoint, device=device, facts=facts))
    tensors: dict[str, TensorPlan] = {}
    modules: dict[str, ModulePlan] = {}
    by_module: dict[str, list[str]] = {}
    for key in source_of:
        by_module.setdefault(slots[key].module, []).append(key)
    named = dict(model.named_modules())
    for mname, keys in by_module.items():
        module = named[mname]
        infos = {slots[k].local: checkpoint.tensors[source_of[k]] for k in keys}
        ctx = ModuleContext(
            name=mname,
            type=type(module).__name__,
            kind=module_kind(module),
            tensors=infos,
            keep_fp32=facts.keeps_fp32(mname),
            keep_fp32_fp16=facts.keeps_fp32(mname, fp16=True),
            skip_low_precision=facts.skips_low_precision(mname) or _read_by_parent(mname, named),
        )
        decision = manager.call(strategy_entry, strategy.decide, ctx)
        _check_decision(decision, ctx, strategy_entry)
        mplan, tplans = _plan_module(ctx, module, decision, keys, slots, source_of, also, checkpoint, device)
        modules[mname] = mplan
        tensors.update(tplans)
    decisions.extend(
        Decision(subject=s, choice=c, reason=r, by=f"strategy {strategy.name}") for s, c, r in strategy.decisions
    )
    order = {k: i for i, k in enumerate(checkpoint.tensors)}
    tensors = dict(sorted(tensors.items(), key=lambda kv: order[kv[1].source]))
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
        kept=tuple(kept),
    )


def _check_decision(decision: ModuleDecision, ctx: ModuleContext, entry: Entry) -> None:
    if not isinstance(decision, ModuleDecision):
        raise PluginError(
            f"strategy {entry.name!r} of plugin {entry.plugin!r} returned {type(decision).__name__} "
            f"for module {ctx.name!r}, not a loaderkit.ModuleDecision",
            plugin=entry.plugin,
            module=ctx.name,
        )
    try:
        for d in (decision.compute, *decision.storage.values()):
            dtype_name(d)
    except LoaderKitError as exc:
        raise PluginError(
            f"strategy {entry.name!r} chose an invalid dtype for module {ctx.name!r}: {exc}",
            plugin=entry.plugin,
            module=ctx.name,
        ) from None
    if is_fp8(dtype_name(decision.compute)) or not is_float(dtype_name(decision.compute)):
        raise PlanError(
            f"strategy {entry.name!r} asks module {ctx.name!r} ({ctx.type}) to compute in "
            f"{decision.compute}; kernels compute in float32, bfloat16 or float16 — store in fp8, "
            "compute in a wider dtype",
            module=ctx.name,
        )


def _plan_module(ctx, module, decision, keys, slots, source_of, also, checkpoint, device):
    compute = dtype_name(decision.compute)
    q = checkpoint.quantization
    storage: dict[str, str] = {}
    tplans: dict[str, TensorPlan] = {}
    granularity = None
    for key in keys:
        slot = slots[key]
        info: TensorInfo = ctx.tensors[slot.local]
        qw = q.weights.get(info.name) if q else None
        target, conversion, companions, gran = _tensor_target(
            info, qw, slot, dtype_name(decision.storage.get(slot.local, compute)), decision
        )
        if gran:
            granularity = gran
        storage[slot.local] = target
        nbytes = math.prod(info.shape) * to_torch(target).itemsize + _scale_bytes(
            info, gran, target, companions, checkpoint
        )
        tplans[key] = TensorPlan(
            key=key,
            source=source_of[key],
            shape=info.shape,
            stored_dtype=info.dtype,
            target_dtype=target,
            conversion=conversion,
            companions=companions,
            granularity=gran,
            also=tuple(also.get(key, ())),
            buffer=not slot.is_param,
            device=device.device,
            nbytes=nbytes,
        )
    needs_cast = any(is_float(d) and d != compute for d in storage.values())
    if needs_cast and not _cast_supported(module):
        raise PlanError(
            f"module {ctx.name!r} ({ctx.type}) would store {sorted(set(storage.values()))} and compute in "
            f"{compute}, but no cast rule can cover a {ctx.type}; store it in {compute} (add it to the "
            "strategy's skip list) or pass a strategy that does",
            module=ctx.name,
        )
    return (
        ModulePlan(
            name=ctx.name,
            type=ctx.type,
            compute_dtype=compute,
            storage=storage,
            cast=needs_cast,
            kernel=decision.kernel if needs_cast else "cast",
            resident=decision.resident and needs_cast,
            granularity=granularity,
            device=device.device,
            nbytes=sum(t.nbytes for t in tplans.values()),
            reason=decision.reason,
        ),
        tplans,
    )


def _cast_supported(module: torch.nn.Module) -> bool:
    from . import runtime

    return runtime.supports(module)


def _tensor_target(info, qw, slot, wanted, decision):
    """(target dtype, conversion, companions, granularity) for one tensor."""
    stored = info.dtype
    model_dtype = dtype_name(slot.tensor.dtype)
    if not slot.tensor.is_floating_point():
        # integer / bool model tensors keep the model's dtype, as load_state_dict would
        return model_dtype, "none" if model_dtype == stored else "cast", (), None
    if not is_float(stored) and not (qw and qw.scale):
        raise PlanError(
            f"tensor {info.name!r} in {info.file} is stored as {stored}, but the model's {slot.key!r} is a "
            f"floating-point {'parameter' if slot.is_param else 'buffer'} ({model_dtype}): no kernel can "
            "compute with it; check that the checkpoint matches the model (or that a scheme plugin "
            "for its quantization is installed)",
            tensor=info.name,
            module=slot.module,
        )
    companions = (qw.scale,) if qw and qw.scale else ()
    if is_fp8(stored):
        if is_fp8(wanted):
            # stored fp8 bytes are kept as they are: no requantization
            gran = qw.granularity if qw else "none"
            return stored, "none", companions, gran
        return wanted, "dequantize" if qw else "cast", companions, None
    if is_fp8(wanted):
        return wanted, "quantize", (), decision.granularity
    return wanted, "none" if wanted == stored else "cast", (), None


def _scale_bytes(info, gran, target, companions, checkpoint) -> int:
    if not is_fp8(target) or not gran or gran == "none":
        return 0
    if companions:
        s = checkpoint.tensors[companions[0]]
        return math.prod(s.shape) * 4
    if gran == "tensor":
        return 4
    if gran == "channel":
        return info.shape[0] * 4
    if gran == "block":
        n, k = info.shape[0], math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
        return math.ceil(n / 128) * math.ceil(k / 128) * 4
    return 0
