"""LoRA: plan low-rank updates against the model, merge them while weights stream, or add them at
each forward through the cast rule.

A LoRA file is described from its header; a LoRA format plugin (``loaderkit_register_lora_formats``)
places its factors on the model's modules; this stage checks every pair against the module's
weight (a key that matches nothing, or a shape that does not fit, is one :class:`LoraError`
listing them all) and records the result in the plan, before any weight is read.

* ``"merge"``: each updated weight is read in float32, ``scale * up @ down`` is added, and it is
  stored as planned — re-quantized with fresh per-channel scales when the plan stores it in fp8.
  One tensor at a time; the plan's tensor records say so (conversion ``quantize``/``cast``).
* ``"cast"``: the cast rule adds the product in the compute dtype after decoding; the stored
  bytes are untouched, so the LoRA can be removed. A module without a cast rule gets one that
  only adds the product.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..contract.dtypes import SAFETENSORS_DTYPES, is_fp8, to_torch
from ..contract.lora import LoraFile, LoraLayout, LoraPlan, LoraTarget
from ..contract.plan import Plan, TensorPlan
from ..contract.records import TensorInfo
from ..errors import LoaderKitError, LoraError
from .discover import PluginManager

MODES = ("merge", "cast")
#: how many problems an error lists before "... and N more".
SHOWN = 20


@dataclass(frozen=True)
class LoraRequest:
    """One LoRA asked for: its file, strength and name."""

    path: str
    strength: float
    name: str


def requests(loras: Iterable | None) -> tuple[LoraRequest, ...]:
    """Normalise ``lora=``: paths, ``(path, strength)`` or ``(path, strength, name)``."""
    out: list[LoraRequest] = []
    for item in loras or ():
        parts = (item,) if isinstance(item, (str, os.PathLike)) else tuple(item)
        if not 1 <= len(parts) <= 3 or not isinstance(parts[0], (str, os.PathLike)):
            raise LoraError(f"lora= takes paths, (path, strength) or (path, strength, name) entries, not {item!r}")
        path = os.fspath(parts[0])
        strength = parts[1] if len(parts) > 1 else 1.0
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not torch.isfinite(torch.tensor(float(strength))):
            raise LoraError(f"the strength of LoRA {path} must be a finite number, not {strength!r}", path=path)
        name = str(parts[2]) if len(parts) > 2 else Path(path).stem
        if any(r.name == name for r in out):
            raise LoraError(f"two LoRAs are named {name!r}; give each a distinct name: (path, strength, name)", path=path)
        out.append(LoraRequest(path, float(strength), name))
    return tuple(out)


def describe(path: str) -> LoraFile:
    """A LoRA safetensors file from its header, with the ``adapter_config.json`` beside it."""
    from safetensors import safe_open

    tensors = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            for k in f.keys():
                sl = f.get_slice(k)
                shape = tuple(sl.get_shape())
                dtype = SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
                tensors[k] = TensorInfo(name=k, shape=shape, dtype=dtype, file=Path(path).name, nbytes=0)
    except Exception as exc:  # safetensors raises its own error type besides OSError
        raise LoraError(f"cannot read LoRA file {path} as safetensors ({exc}); LoRAs are read from "
                        ".safetensors files", path=path) from exc
    config = None
    cfg = Path(path).with_name("adapter_config.json")
    if cfg.is_file():
        try:
            config = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LoraError(f"cannot read {cfg}: {exc}; fix or remove it", path=cfg) from exc
    return LoraFile(path=os.fspath(path), tensors=tensors, metadata=metadata, config=config)


def weight_shapes(model: torch.nn.Module, names: Iterable[str] | None = None) -> dict[str, tuple[int, ...]]:
    """module name -> shape of its own ``weight`` (2-D or more): what a LoRA can update."""
    keep = None if names is None else set(names)
    out = {}
    for name, module in model.named_modules():
        w = module._parameters.get("weight")
        if w is not None and w.dim() >= 2 and (keep is None or name in keep):
            out[name] = tuple(w.shape)
    return out


def plan_one(req: LoraRequest, mode: str, shapes: dict[str, tuple[int, ...]], mgr: PluginManager) -> LoraPlan:
    """Place one LoRA on the model's weights and check every pair; no weight is read."""
    if mode not in MODES:
        raise LoraError(f"unknown LoRA mode {mode!r}; use 'merge' or 'cast'", path=req.path)
    lora = describe(req.path)
    entry = next((e for e in mgr.lora_formats() if mgr.call(e, e.obj.claim, lora, returns=bool)), None)
    if entry is None:
        names = ", ".join(e.name for e in mgr.lora_formats()) or "none"
        raise LoraError(f"no LoRA format reads {req.path} (its keys look like {sorted(lora.tensors)[:3]}); "
                        f"registered LoRA formats: {names}", path=req.path)
    scalar = _scalar_reader(req.path, lora)
    layout = mgr.call(entry, entry.obj.read, lora, tuple(shapes), scalar, returns=LoraLayout)
    if layout.derived:  # factors its format computes: described beside the file's own
        lora = lora.replace(tensors={**lora.tensors, **layout.derived})
        _DERIVERS[(req.path, entry.plugin, entry.name)] = (entry, mgr)
    problems = [f"{k!r} matches no module of the model" for k in layout.unmatched]
    targets: dict[str, LoraTarget] = {}
    for pair in layout.pairs:
        problem = _pair_problem(lora, pair.module, pair.down, pair.up, shapes.get(pair.module))
        if problem is None and pair.module in targets:
            problem = f"{pair.module}: updated twice ({targets[pair.module].down!r} and {pair.down!r})"
        if problem is not None:
            problems.append(problem)
            continue
        targets[pair.module] = LoraTarget(module=pair.module, down=pair.down, up=pair.up,
                                          rank=lora.tensors[pair.down].shape[0], scale=req.strength * pair.scale)
    if not targets and not problems:
        problems.append("it updates no module")
    if problems:
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise LoraError(f"LoRA {req.path} ({entry.name} format) does not fit the model; nothing was "
                        f"changed:\n  " + "\n  ".join(problems[:SHOWN]) + more +
                        "\nUse a LoRA made for this model (or the model it was trained on)", path=req.path,
                        plugin=entry.plugin)
    return LoraPlan(name=req.name, path=req.path, format=entry.name, plugin=entry.plugin, strength=req.strength,
                    mode=mode, targets=targets, derived=bool(layout.derived))


def _scalar_reader(path: str, lora: LoraFile) -> Callable[[str], float]:
    def scalar(key: str) -> float:
        info = lora.tensors.get(key)
        if info is None or len(info.shape) > 1 or (info.shape and info.shape[0] != 1):
            raise LoraError(f"{path}: {key!r} is not a one-element tensor", path=path, tensor=key)
        value = float(_read(path, (key,))[key].float().reshape(()))
        if not value == value or value in (float("inf"), float("-inf")):
            raise LoraError(f"{path}: {key!r} is {value}; the file is corrupt", path=path, tensor=key)
        return value

    return scalar


def _pair_problem(lora: LoraFile, module: str, down: str, up: str, weight: tuple[int, ...] | None) -> str | None:
    """Why ``up @ down`` cannot update ``module``'s weight, or ``None``."""
    if weight is None:
        return f"{down!r}: module {module!r} has no weight a LoRA can update"
    d, u = lora.tensors[down], lora.tensors[up]
    bad = [k for k, i in ((down, d), (up, u)) if i.dtype not in ("float32", "float16", "bfloat16")]
    if bad:
        return f"{', '.join(repr(k) for k in bad)}: stored in {d.dtype}/{u.dtype}; LoRA factors must be float"
    fits = (len(d.shape) == len(weight) and len(u.shape) == len(weight) and d.shape[0] == u.shape[1]
            and u.shape[0] == weight[0] and tuple(d.shape[1:]) == tuple(weight[1:]) and all(s == 1 for s in u.shape[2:]))
    if not fits:
        return (f"{module}: down {list(d.shape)} and up {list(u.shape)} do not make its weight's shape "
                f"{list(weight)}")
    return None


def plan_all(reqs: Sequence[LoraRequest], mode: str, model: torch.nn.Module, plan: Plan, mgr: PluginManager) -> Plan:
    """The plan with its LoRAs: each placed and checked, merged tensors re-planned."""
    if not reqs:
        return plan
    loaded = {tp.key.rpartition(".")[0] for tp in plan.tensors.values() if tp.key.endswith("weight") and not tp.sources}
    shapes = weight_shapes(model, {m for m in loaded if f"{m}.weight" in plan.tensors})
    loras = tuple(plan_one(r, mode, shapes, mgr) for r in reqs)
    tied = sorted(f"{m} (tied to {', '.join(plan.tensors[f'{m}.weight'].also)})" for lp in loras if lp.mode == "merge"
                  for m in lp.targets if plan.tensors[f"{m}.weight"].also)
    if tied:
        raise LoraError(f"a merged LoRA would change tied weights too: {', '.join(tied)}; use lora_mode='cast'",
                        module=tied[0].split(" ")[0])
    native = sorted(m for lp in loras if lp.mode == "cast" for m in lp.targets if plan.modules[m].kernel == "native")
    if native:
        raise LoraError(f"{', '.join(native)} run a native kernel (fp8 matmul or int8 weight-only), which never "
                        "decodes the weight, so a LoRA "
                        "cannot be added at cast time; use lora_mode='merge'", module=native[0])
    tensors, modules = dict(plan.tensors), dict(plan.modules)
    for key in merged_keys(loras):
        tp = tensors[key]
        if is_fp8(tp.target_dtype) or tp.target_dtype == "int8":  # re-quantized after the merge
            n = tp.shape[0]
            tensors[key] = tp.replace(conversion="quantize", granularity="channel", block=None,
                                      scale=tp.scale or "weight_scale", scale_encoding="float",
                                      nbytes=_numel(tp.shape) * 1 + n * 4)
            mod = key.rpartition(".")[0]
            modules[mod] = modules[mod].replace(granularity="channel")
        else:
            tensors[key] = tp.replace(conversion="cast", granularity=None, block=None, scale=None)
    return plan.replace(tensors=tensors, modules=modules, loras=plan.loras + loras)


def merged_keys(loras: Iterable[LoraPlan]) -> list[str]:
    return sorted({f"{m}.weight" for lp in loras if lp.mode == "merge" for m in lp.targets})


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# -- merge at load ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Merge:
    """How one merged weight is read (in float32) and finished (``apply``)."""

    read: TensorPlan
    final: TensorPlan
    updates: tuple[tuple[LoraPlan, LoraTarget], ...]

    def apply(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``w`` (float32) plus every update, stored as :attr:`final` says."""
        shape, w = w.shape, w.float().flatten(1)
        for i, (lp, t) in enumerate(self.updates):
            path = lp.path
            down, up = _factors(path, t, torch.float32, torch.device("cpu"), factors_of(lp, (t.down, t.up)))
            if (up.shape[0], down[0].numel()) != tuple(w.shape):
                raise LoraError(f"LoRA file {path}: {t.up!r} / {t.down!r} no longer fit {self.final.key!r}: the file "
                                "changed since it was planned; plan again", path=path, tensor=t.down)
            if i == 0:  # out of place: ``w`` may be a view of the checkpoint
                w = torch.addmm(w, up.flatten(1), down.flatten(1), alpha=t.scale)
            else:
                w.addmm_(up.flatten(1), down.flatten(1), alpha=t.scale)
        w = w.view(shape)
        target = to_torch(self.final.target_dtype)
        if self.final.conversion == "quantize":
            from ..errors import ConversionError
            from ..kernels.int8 import quantize_int8
            from ..kernels.quant import quantize

            try:
                if target == torch.int8:
                    return quantize_int8(w)
                return quantize(w, target, granularity="channel")
            except ConversionError as exc:  # inf/NaN after the merge
                raise self._overflow(exc) from exc
        out = w.to(target)
        if not bool(torch.isfinite(out).all()):
            raise self._overflow(None)
        return out, None

    def _overflow(self, exc) -> LoraError:
        paths = ", ".join(sorted({lp.path for lp, _ in self.updates}))
        return LoraError(f"merging LoRA {paths} into {self.final.key!r} gives values {self.final.target_dtype} cannot "
                         f"hold{f' ({exc.message})' if exc is not None else ''}; lower its strength or use lora_mode='cast'",
                         path=paths, tensor=self.final.key)


def merges(plan: Plan, checkpoint_quantized: set[str]) -> dict[str, Merge]:
    """model key -> :class:`Merge`, for every weight a LoRA merges into."""
    out = {}
    for key in merged_keys(plan.loras):
        final = plan.tensors[key]
        conversion = "dequantize" if final.source in checkpoint_quantized else "cast"
        read = final.replace(target_dtype="float32", conversion=conversion, granularity=None, block=None, scale=None)
        mod = key.rpartition(".")[0]
        ups = tuple((lp, lp.targets[mod]) for lp in plan.loras if lp.mode == "merge" and mod in lp.targets)
        out[key] = Merge(read, final, ups)
    return out


# -- at cast time -------------------------------------------------------------------------------


#: (file, plugin, format) -> the format that derives that LoRA's factors, and its manager
_DERIVERS: dict[tuple[str, str, str], tuple] = {}


def factors_of(lp: LoraPlan, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The factors ``keys`` of a planned LoRA: read from its file, or computed by its format."""
    if not lp.derived:
        return _read(lp.path, keys)
    found = _DERIVERS.get((lp.path, lp.plugin, lp.format))
    if found is None:
        raise LoraError(f"LoRA {lp.path} was planned in another process; plan it again here", path=lp.path)
    entry, mgr = found
    got = mgr.call(entry, entry.obj.tensors, describe(lp.path), tuple(keys), returns=dict)
    missing = [k for k in keys if not isinstance(got.get(k), torch.Tensor)]
    if missing:
        raise LoraError(f"LoRA format {lp.format!r} gave no tensors for {', '.join(missing)} of {lp.path}",
                        path=lp.path, plugin=lp.plugin)
    return got


def _read(path: str, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in keys}
    except Exception as exc:  # the file changed or broke since it was planned
        raise LoraError(f"cannot read {', '.join(keys)} from LoRA file {path}: {exc}", path=path) from exc


def _factors(path: str, t: LoraTarget, dtype: torch.dtype, device: torch.device,
             got: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    got = got if got is not None else _read(path, (t.down, t.up))
    down, up = (got[k].to(device=device, dtype=dtype) for k in (t.down, t.up))
    if down.dim() < 2 or up.dim() < 2 or down.shape[0] != t.rank or up.shape[1] != t.rank:
        raise LoraError(f"LoRA file {path}: {t.down!r} / {t.up!r} are not of rank {t.rank} as planned: the file "
                        "changed since; plan again", path=path, tensor=t.down)
    if not (bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())):
        raise LoraError(f"LoRA file {path}: {t.down!r} or {t.up!r} holds NaN or infinite values", path=path)
    return down, up


def attach(model: torch.nn.Module, lp: LoraPlan) -> None:
    """Add a ``"cast"``-mode LoRA to ``model``'s cast rules; all of it or, on error, none of it."""
    from .. import runtime

    named = dict(model.named_modules())
    done = []
    try:
        got = factors_of(lp, [k for t in lp.targets.values() for k in (t.down, t.up)])
        for mod, t in lp.targets.items():
            module = named[mod]
            compute = runtime.delta_dtype(module)
            down, up = _factors(lp.path, t, compute, runtime.execution_device(module), got)
            runtime.add_low_rank(module, runtime.LowRank(lp.name, "weight", up, down, t.scale), name=mod)
            done.append(module)
    except LoaderKitError as exc:
        for module in done:
            runtime.remove_low_rank(module, lp.name)
        if isinstance(exc, LoraError):
            raise
        raise LoraError(f"LoRA {lp.path}: {exc.message}", path=lp.path, module=exc.module) from exc


def detach(model: torch.nn.Module, lp: LoraPlan) -> None:
    """Remove a ``"cast"``-mode LoRA from ``model``."""
    from .. import runtime

    named = dict(model.named_modules())
    for mod in lp.targets:
        if mod in named:
            runtime.remove_low_rank(named[mod], lp.name)


def names_on(model: torch.nn.Module) -> list[str]:
    """The names of the low-rank updates on ``model``'s cast rules (for models loaderkit did not load)."""
    from .. import runtime

    return sorted({d.name for rule in runtime.cast_rules(model).values() for d in rule.deltas})


def remove_named(model: torch.nn.Module, name: str) -> bool:
    """Remove every update named ``name``; whether there was one."""
    from .. import runtime

    return any([runtime.remove_low_rank(m, name) for m in model.modules()])
