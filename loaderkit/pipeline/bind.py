"""Stage 9, bind the runtime: attach the runtime the plan prescribes, and remember which plan a model has.

Cast rules are bound from the plan alone — each module's compute dtype, the tensors it stores in
another dtype, their scale buffers, granularities and block shapes, whether the kernel is native
— never re-derived from the checkpoint or the device.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..contract.dtypes import to_torch
from ..contract.plan import Plan

_plans: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def bind_runtime(model: torch.nn.Module, plan: Plan, cast_inputs: bool) -> None:
    """Attach a cast rule to every module the plan marks ``cast``, an input cast to modules
    computing in another dtype than the model's entry, and (``cast_inputs``) one at the root."""
    from .. import runtime  # accelerate's hooks: imported on first load, not by `import loaderkit`

    named = dict(model.named_modules())
    for m in plan.modules.values():
        if not m.cast:
            continue
        scales = {}
        for local in m.storage:
            tp = plan.tensors[f"{m.name}.{local}" if m.name else local]
            if tp.scale is not None:
                scales[local] = (tp.scale, tp.granularity, tp.block)
        runtime.attach_cast(
            named[m.name],
            to_torch(m.compute_dtype),
            scales=scales or None,
            resident=m.resident,
            native=m.kernel == "native",
            fold_scale=m.fold_scale,
            name=m.name,
            device=plan.device,
        )
    entry = plan.entry_dtype()
    for m in plan.modules.values():
        if m.compute_dtype != entry and m.name and _computes(named[m.name]) and _is_leaf(named[m.name]):
            # e.g. a module the library keeps in float32 inside a bf16 model: its kernel must
            # receive float32 activations (its output is left as it is)
            runtime.attach_input_cast(named[m.name], to_torch(m.compute_dtype), _follow(named, plan, m.name))
    if cast_inputs:
        follow = _follow(named, plan, None, entry)
        runtime.attach_input_cast(model, to_torch(entry), follow, vectors=False)
        for sub in _entry_points(model, plan, entry):
            runtime.attach_input_cast(named[sub], to_torch(entry), follow, entry_of=model, vectors=False)


def _follow(named: dict, plan: Plan, module: str | None, dtype: str | None = None) -> torch.Tensor | None:
    """A tensor stored in its module's compute dtype (of ``module``, or of any module computing
    in ``dtype``): an input cast follows its dtype when the user re-casts the model."""
    for m in plan.modules.values():
        if (module is not None and m.name != module) or (dtype is not None and m.compute_dtype != dtype):
            continue
        for local, stored in m.storage.items():
            if stored == m.compute_dtype and not m.cast:
                owner = named[m.name]
                t = owner._parameters.get(local, owner._buffers.get(local))
                if t is not None and t.is_floating_point() and t.device.type != "meta":
                    return t
    return None


def _entry_points(model: torch.nn.Module, plan: Plan, entry: str) -> list[str]:
    """Sub-models libraries call directly instead of the root's ``forward``: a VAE's
    ``encode``/``decode`` run ``encoder``/``decoder``/``post_quant_conv``; Whisper's ``generate``
    runs ``model.encoder``. The children and grandchildren of the root that hold parameters
    (and are not plain containers) get the same input cast as the root, so floating inputs fed
    through those entry points are cast too. Inside the model, activations arrive in the entry
    dtype already and the cast does nothing."""
    out = []
    for name, module in model.named_modules():
        depth = name.count(".") + 1 if name else 0
        if not 1 <= depth <= 2 or isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            continue
        if not any(True for _ in module.parameters()):
            continue
        m = plan.modules.get(name)
        if m is not None and (m.cast or m.compute_dtype != entry):
            continue  # a cast rule or its own input cast already handles it
        if runtime_has_input_cast(module):
            continue
        out.append(name)
    return out


def runtime_has_input_cast(module: torch.nn.Module) -> bool:
    from .. import runtime

    return runtime.input_cast_of(module) is not None


def _is_leaf(module: torch.nn.Module) -> bool:
    """No child holds parameters: casting this module's inputs reaches only its own kernel. (A
    container that owns an fp32 parameter — Wan's ``scale_shift_table`` — uses it in its own
    code; its children keep the model's dtype, so its inputs are left alone.)"""
    return not any(p is not None for c in module.children() for p in c.parameters())


def _computes(module: torch.nn.Module) -> bool:
    return any(p.is_floating_point() for p in module.parameters(recurse=False))


def remember(model: Any, plan: Any) -> None:
    """Record that ``model`` (or a pipeline) was loaded by ``plan`` (what :func:`plan_of` answers)."""
    _plans[model] = plan


def plan_of(model: Any) -> Any:
    """The :class:`~loaderkit.Plan` a model was loaded with by :func:`loaderkit.load`, the
    :class:`~loaderkit.PipelinePlan` a pipeline was loaded with by :func:`loaderkit.load_pipeline`,
    or ``None``."""
    try:
        return _plans.get(model)
    except TypeError:  # not weakly referenceable: loaderkit did not load it
        return None
