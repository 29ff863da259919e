"""Stage 4a, match: which checkpoint tensors fill which model tensors.

The model's state-dict slots, tied groups, the library's own key conversions (renames, fused
tensors) and the checks a checkpoint must pass to fit the model: missing, unexpected and
mismatched keys, and quantization data no scheme reads. Headers and shapes only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..contract.layout import looks_like_quantization_data
from ..contract.plan import Decision
from ..contract.records import CheckpointInfo, FrozenDict, FusedTensor, KeyMap, ModelFacts, QuantizedWeight, TensorInfo
from ..errors import LoaderKitError, PlanError, StateDictMismatchError, UnsupportedCheckpointError


LIBRARY_IGNORES = "the model's library ignores this key on load"


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
    checkpoint: CheckpointInfo, slots: dict[str, Slot], facts: ModelFacts, strict: bool, keymap: KeyMap | None = None
) -> tuple[dict[str, str], dict[str, list[str]], dict[str, str], list[str], list[Decision]]:
    """Map model keys to checkpoint keys.

    Returns ``(source_of, also, ignored, kept, decisions, initialized)``: ``source_of`` maps each loaded model
    key to its checkpoint key; ``also`` the tied keys sharing it; ``ignored`` the checkpoint keys
    not loaded, with why; ``kept`` model keys that keep the skeleton's real values (buffers the
    model computes, and parameters its library allows to be missing); ``initialized`` those the
    library allows to be missing and initializes itself. A missing parameter is an error even
    when the skeleton holds random initial values for it. With the library's
    ``keymap``, renamed checkpoint keys fill their new model keys, and a fused model tensor maps
    to itself (its sources are in ``keymap.fused``).
    """
    keymap = keymap or KeyMap()
    fused_sources = {src for f in keymap.fused.values() for src in f.sources}
    q = checkpoint.quantization
    companions = q.companion_keys() if q else set()
    ckpt_keys = [k for k in checkpoint.tensors if k not in companions]
    ignored: dict[str, str] = {}
    if q:
        for k in q.auxiliary:
            ignored[k] = f"{q.family}: an auxiliary tensor (a marker or a cache scale), not a model tensor"
        for w in q.weights.values():
            if w.input_scale:
                ignored[w.input_scale] = (
                    f"static activation scale of {w.weight}: not applied — loaderkit's kernels decode the "
                    "weight and compute on unquantized activations (its native fp8 matmul scales "
                    "activations dynamically)"
                )
    for k, why in keymap.ignored.items():
        ignored.setdefault(k, why)
    groups = _tie_groups(slots, facts)
    source_of: dict[str, str] = {}
    also: dict[str, list[str]] = {}
    done: set[str] = set()
    unexpected = []
    for mk in keymap.fused:
        if mk in slots and mk not in done:
            group = groups.get(mk, [mk])
            source_of[mk] = mk
            also[mk] = [k for k in group if k != mk]
            done.update(group)
    # a source of a tensor the library builds but the model does not hold is not loaded whole
    absent_sources = {s for mk, f in keymap.fused.items() if mk not in slots for s in f.sources}
    for ck in ckpt_keys:
        if ck in keymap.ignored:
            continue
        if ck in fused_sources:
            if ck in absent_sources:
                unexpected.append(ck)
            continue
        mk = keymap.renamed.get(ck, ck)
        if mk not in slots:
            if any(re.search(p, ck) for p in facts.ignore_unexpected):
                ignored[ck] = LIBRARY_IGNORES
            else:
                unexpected.append(ck)
            continue
        if mk in done:
            ignored[ck] = f"tied to {next(k for k, v in also.items() if mk in v)}; loaded once"
            continue
        group = groups.get(mk, [mk])
        source_of[mk] = ck
        also[mk] = [k for k in group if k != mk]
        done.update(group)
    missing, kept, initialized = [], [], []
    for key, slot in slots.items():
        if key in done:
            continue
        real = slot.tensor.device.type != "meta"
        allowed = not slot.is_param or any(re.search(p, key) for p in facts.ignore_missing)
        if real and allowed:
            kept.append(key)
        elif allowed and slot.is_param and facts.initialize is not None:
            initialized.append(key)  # the library computes it itself (a sinusoidal table)
        else:
            missing.append(key)
    mismatched = []
    for mk, ck in source_of.items():
        if mk in keymap.fused:
            shape = keymap.fused[mk].shape  # the library's result: known from headers, or checked as built
            if shape is not None and tuple(shape) != tuple(slots[mk].tensor.shape):
                mismatched.append((mk, tuple(shape), tuple(slots[mk].tensor.shape)))
            continue
        want = tuple(slots[mk].tensor.shape)
        got = checkpoint.tensors[ck].shape
        if want != got:
            mismatched.append((ck, got, want))
    decisions = []
    quantized = [k for k in unexpected if looks_like_quantization_data(k, checkpoint.tensors)]
    if quantized:
        raise _unread_quantization_error(checkpoint, quantized)
    if unexpected and not strict:
        for k in unexpected:
            ignored[k] = "not in the model (strict=False)"
        decisions.append(
            Decision(subject="unexpected keys", choice=f"ignored {len(unexpected)}", reason="strict=False")
        )
        unexpected = []
    if missing or unexpected or mismatched:
        raise _mismatch_error(checkpoint, missing, unexpected, mismatched)
    dropped = [w.input_scale for w in q.weights.values() if w.input_scale] if q else []
    if dropped:
        decisions.append(
            Decision(
                subject="static activation scales",
                choice=f"{len(dropped)} not applied",
                reason="weights are decoded exactly; activations are not quantized with static scales "
                       f"(e.g. {dropped[0]})",
            )
        )
    if initialized:
        decisions.append(
            Decision(
                subject=f"{len(initialized)} model tensors absent from the checkpoint",
                choice="initialized by the model's library",
                reason=f"its library allows them to be missing and computes them itself (e.g. {initialized[0]})",
                by="the model's library",
            )
        )
    if kept:
        decisions.append(
            Decision(
                subject=f"{len(kept)} model tensors absent from the checkpoint",
                choice="kept the values the model was built with",
                reason="they are real (not meta) in the skeleton, e.g. buffers computed by __init__",
            )
        )
    return source_of, also, ignored, kept, decisions, initialized


def _unread_quantization_error(checkpoint: CheckpointInfo, keys: list[str]) -> UnsupportedCheckpointError:
    shown = ", ".join(keys[:5]) + (f" ... and {len(keys) - 5} more" if len(keys) > 5 else "")
    q = checkpoint.quantization
    known = f" ({q.family} does not account for them)" if q else ""
    return UnsupportedCheckpointError(
        f"{checkpoint.path}: {len(keys)} tensors are named like quantization data (scales, zero points, "
        f"packed weights) that no installed scheme reads{known}: {shown}. Loading the weights without "
        "them would load raw codes as weights, so the checkpoint is refused (strict=False does not "
        "change this). Install a scheme plugin for this layout, or dequantize the checkpoint with "
        "the tool that wrote it",
        path=checkpoint.path,
        tensor=keys[0],
    )


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


def library_keymap(checkpoint: CheckpointInfo, facts: ModelFacts) -> KeyMap:
    """The model library's key conversions for this checkpoint (an empty map when it has none)."""
    if facts.key_mapping is None:
        return KeyMap()
    q = checkpoint.quantization
    companions = q.companion_keys() if q else set()
    tensors = FrozenDict({k: t for k, t in checkpoint.tensors.items() if k not in companions})
    try:
        return facts.key_mapping(tensors)
    except LoaderKitError as exc:
        raise exc.with_context(path=checkpoint.path)


#: per-source scale granularities the library's operations can fuse: per tensor and per channel
#: become one scale per row of the fused tensor; block grids fuse as grids when every source's
#: dimensions are multiples of the block (then no block straddles two sources).
FUSABLE_SCALES = ("tensor", "channel", "block")


def fused_info(
    checkpoint: CheckpointInfo, fused: FusedTensor, slot: Slot
) -> tuple[TensorInfo, QuantizedWeight | None]:
    """The description of a fused tensor — its model shape, its sources' dtype and bytes — and,
    when its sources are quantized weights, how the fused tensor decodes: the library's own
    operations applied to the sources' scales too give one scale per row (``"row"``)."""
    q = checkpoint.quantization
    infos = [checkpoint.tensors[s] for s in fused.sources]
    dtypes = sorted({i.dtype for i in infos})
    if len(dtypes) > 1:
        raise PlanError(
            f"{checkpoint.path}: the model's library builds {fused.key!r} from {len(infos)} tensors of different "
            f"dtypes ({', '.join(dtypes)})", path=checkpoint.path, tensor=fused.key)
    info = TensorInfo(name=fused.key, shape=tuple(slot.tensor.shape), dtype=dtypes[0], file=infos[0].file,
                      nbytes=sum(i.nbytes for i in infos))
    quantized = [q.weights[s] for s in fused.sources if q is not None and s in q.weights]
    if not quantized or (len(quantized) == len(infos) and all(w.granularity == "none" and not w.scale for w in quantized)):
        return info, None  # unscaled fp8 sources fuse to unscaled fp8: the bytes are all there is
    bad = [w for w in quantized if not w.scale or w.granularity not in FUSABLE_SCALES
           or len(checkpoint.tensors[w.weight].shape) != 2 or (w.granularity == "block") != (quantized[0].granularity == "block")]
    blocks = {w.block for w in quantized if w.granularity == "block"}
    straddle = [w for w in quantized if w.granularity == "block"
                and any(d % b for d, b in zip(checkpoint.tensors[w.weight].shape, w.block))]
    if len(quantized) != len(infos) or bad or len(blocks) > 1 or straddle:
        what = (bad or straddle or [None])[0]
        why = (f"{what.weight} is {what.granularity}-scaled with shape {list(checkpoint.tensors[what.weight].shape)}; "
               "fusing block scales is supported only when every source's dimensions are multiples of the block"
               if straddle else f"{what.weight} is {what.granularity}-scaled, and mixing or fusing such scales is "
               "not supported" if what else "its sources mix block sizes, or some are not quantized")
        raise PlanError(
            f"{checkpoint.path}: the model's library builds {fused.key!r} from {len(infos)} tensors quantized as "
            f"{q.family}; {why}: load the high-precision checkpoint",
            path=checkpoint.path,
            tensor=fused.key,
        )
    if blocks:
        return info, QuantizedWeight(weight=fused.key, granularity="block", block=blocks.pop())
    return info, QuantizedWeight(weight=fused.key, granularity="row")
