"""Stage 10, verify: check that a model's dtypes are consistent — statically, and with example inputs.

:func:`verify` works on any module, loaded by loaderkit or not. Statically, every module that
owns floating-point parameters must hand its kernel those parameters in one compute dtype: either
they are stored in it, or a cast rule covers them. With ``example_inputs`` it also runs a forward
pass and checks, at every torch kernel module, that the activations arriving are in the dtype
its weights are seen in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..contract.dtypes import dtype_name, is_fp8
from ..contract.modules import STRICT_KERNELS
from ..errors import VerifyError
from .bind import plan_of


@dataclass(frozen=True)
class Problem:
    """One inconsistency: the module, what kind of problem, and a message saying what to do."""

    module: str
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.module or '(root)'}: {self.message}"


@dataclass
class VerifyReport:
    """The result of :func:`verify`.

    :ivar ok: no problems were found.
    :ivar problems: every problem found, one per module and kind.
    :ivar modules_checked: how many modules owning tensors were checked.
    :ivar compute_dtypes: compute dtype name -> number of modules computing in it.
    :ivar ran_forward: whether a forward pass with example inputs was checked.
    :ivar notes: facts that are not problems (a model re-cast as a whole after loading; modules
        another library's wrapper covers, as the forward check observed).
    :ivar observed: with example inputs, what each module's kernels actually received, as
        ``"linear: input bfloat16, weight bfloat16"`` strings (module name -> kernel calls).
    """

    problems: list[Problem] = field(default_factory=list)
    modules_checked: int = 0
    compute_dtypes: dict[str, int] = field(default_factory=dict)
    ran_forward: bool = False
    notes: list[str] = field(default_factory=list)
    observed: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = (
            f"verify: {'ok' if self.ok else f'{len(self.problems)} problem(s)'}; "
            f"{self.modules_checked} modules checked; compute dtypes "
            + ", ".join(f"{k}: {v}" for k, v in sorted(self.compute_dtypes.items()))
            + ("; forward checked" if self.ran_forward else "")
        )
        return "\n".join([head, *(f"  - {p}" for p in self.problems), *(f"  note: {n}" for n in self.notes)])


def cast_rule_of(module: torch.nn.Module):
    """The module's cast rule (:func:`loaderkit.runtime.cast_rule_of`), importing the runtime
    (and accelerate) only when a model has hooks to look at."""
    if getattr(module, "_hf_hook", None) is None:
        return None
    from ..runtime import cast_rule_of as rule_of

    return rule_of(module)


def input_cast_of(module: torch.nn.Module) -> torch.dtype | None:
    if getattr(module, "_hf_hook", None) is None:
        return None
    from ..runtime import input_cast_of as cast_of

    return cast_of(module)


def kernel_dtype(
    module: torch.nn.Module, covered: dict[str, torch.dtype] | None = None
) -> tuple[torch.dtype | None, list[str]]:
    """The dtype a module's kernel sees its floating parameters in, and any static problems.

    :param covered: parameters a parent module's cast rule hands over in a compute dtype
        (``nn.MultiheadAttention`` reads ``out_proj.weight`` itself), by local name.
    """
    covered = covered or {}
    params = {n: p for n, p in module.named_parameters(recurse=False) if p is not None}
    rule = cast_rule_of(module)
    ruled = {n for n, t in rule.tensors.items() if t.scale} if rule is not None else set()
    # an int8 weight its cast rule decodes (or multiplies natively) with its scale counts as a
    # floating one: the kernel sees it in the rule's compute dtype
    floats = {n: covered.get(n, p.dtype) for n, p in params.items() if p.dtype.is_floating_point or n in ruled}
    if isinstance(module, STRICT_KERNELS):
        ints = [f"{n} ({dtype_name(p.dtype)})" for n, p in params.items()
                if not p.dtype.is_floating_point and n not in ruled]
        if ints:
            return (next(iter(floats.values())) if floats else None), [
                f"holds non-float {', '.join(ints)}: its {type(module).__name__} kernel computes in "
                "floating point; load it with a strategy or scheme that decodes it"
            ]
    if not floats:
        return None, []
    if rule is not None:
        compute = rule.compute_dtype
        uncovered = [
            f"{n} ({dtype_name(d)})" for n, d in floats.items() if d != compute and n not in rule.params
        ]
        if uncovered:
            return compute, [
                f"its cast rule computes in {dtype_name(compute)} but does not cover {', '.join(uncovered)}"
            ]
        return compute, []
    dtypes = set(floats.values())
    problems = []
    fp8 = [n for n, d in floats.items() if is_fp8(dtype_name(d))]
    if fp8:
        problems.append(
            f"stores {', '.join(f'{n} ({dtype_name(floats[n])})' for n in fp8)} with no cast rule: its "
            "kernel would see fp8 and fail (e.g. 'Input type (BFloat16) and bias type (Float8_e4m3fn)'). "
            "Load it with loaderkit.load(..., strategy='fp8'), which attaches cast rules"
        )
    elif len(dtypes) > 1:
        problems.append(
            "holds parameters in mixed dtypes ("
            + ", ".join(f"{n}: {dtype_name(d)}" for n, d in floats.items())
            + ") with no cast rule; cast them to one dtype"
        )
    compute = next(d for d in floats.values() if not is_fp8(dtype_name(d))) if len(fp8) < len(floats) else None
    return compute, problems


def _covered_by_parents(model: torch.nn.Module) -> dict[str, dict[str, torch.dtype]]:
    """module name -> {local tensor: compute dtype} for tensors a parent's cast rule covers."""
    out: dict[str, dict[str, torch.dtype]] = {}
    for name, module in model.named_modules():
        rule = cast_rule_of(module)
        for tname in rule.params if rule is not None else ():
            child, _, local = tname.rpartition(".")
            if child:
                full = f"{name}.{child}" if name else child
                out.setdefault(full, {})[local] = rule.compute_dtype
    return out


def _offload_hook(module: torch.nn.Module):
    """accelerate's AlignDevicesHook on ``module`` (possibly inside a SequentialHook), or None."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", None) or ([hook] if hook is not None else [])
    for h in hooks:
        if hasattr(h, "execution_device") and hasattr(h, "weights_map"):
            return h
    return None


def placement_problems(module: torch.nn.Module) -> list[str]:
    """Whether each of the module's own tensors will reach its execution device at forward time.

    A tensor on the meta device needs an offload hook whose weights map holds it; a tensor on
    another device than the one the hook executes on needs the hook to move it.
    """
    own = {n: t for n, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))}
    if not own:
        return []
    hook = _offload_hook(module)
    problems = []
    meta = [n for n, t in own.items() if t.device.type == "meta"]
    if meta:
        wm = getattr(hook, "weights_map", None) if hook is not None and getattr(hook, "offload", False) else None
        missing = [n for n in meta if wm is None or n not in wm]
        if missing:
            problems.append(
                f"{', '.join(missing)} on the meta device with no offload hook that brings "
                "it back: the forward would fail; load it with loaderkit.load(..., offload_folder=...)"
            )
    if hook is None:
        devices = {t.device for t in own.values() if t.device.type != "meta"}
        if len(devices) > 1:
            problems.append(
                "holds tensors on several devices (" + ", ".join(sorted(map(str, devices)))
                + ") with no hook moving them to one execution device"
            )
    return problems


def verify(
    model: torch.nn.Module,
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    plan: Any = None,
    strict: bool = False,
) -> VerifyReport:
    """Check a model's dtype consistency.

    :param model: any module.
    :param example_inputs: a tensor or tuple of positional inputs; when given (or
        ``example_kwargs``), a forward pass is run under ``torch.no_grad`` and the dtype of the
        activations reaching every kernel module is checked.
    Placement is checked too: every module's tensors must reach its execution device (tensors
    offloaded to the meta device need accelerate's offload hook, which brings them back).

    :param plan: the :class:`loaderkit.Plan` to check each module's compute dtype against
        (default: the plan :func:`loaderkit.load` loaded the model with, if any).
    :param strict: raise :class:`loaderkit.VerifyError` listing the problems instead of returning.
    """
    if plan is None:
        plan = plan_of(model)
    report = VerifyReport()
    computes: dict[str, torch.dtype | None] = {}
    covered = _covered_by_parents(model)
    for name, module in model.named_modules():
        compute, problems = kernel_dtype(module, covered.get(name))
        if compute is None and not problems:
            continue
        report.modules_checked += 1
        computes[name] = compute
        if compute is not None:
            key = dtype_name(compute)
            report.compute_dtypes[key] = report.compute_dtypes.get(key, 0) + 1
        report.problems.extend(Problem(name, "storage", p) for p in problems)
        report.problems.extend(Problem(name, "placement", p) for p in placement_problems(module))
        if plan is not None and name in plan.modules and compute is not None:
            want = plan.modules[name].compute_dtype
            if dtype_name(compute) != want:
                report.problems.append(
                    Problem(name, "plan", f"computes in {dtype_name(compute)} but the plan says {want}")
                )
    if plan is not None and plan is plan_of(model):
        # only the model's own plan can have been re-cast away from, and only as a whole
        _recast_note(report, sum(1 for n in computes if n in plan.modules and computes[n] is not None))
    if example_inputs is not None or example_kwargs:
        report.ran_forward = True
        _check_forward(model, example_inputs, example_kwargs or {}, computes, report)
    if strict and not report.ok:
        first = report.problems[0]
        raise VerifyError(str(report), module=first.module)
    return report


def _recast_note(report: VerifyReport, planned: int) -> None:
    """Plan mismatches that are one uniform re-cast (every module the plan said computes in X
    now computes in Y: ``model.to(Y)`` after loading) are a note, not problems: the model is
    consistent, and its inputs follow it (see :func:`loaderkit.runtime.attach_input_cast`)."""
    plan_problems = [p for p in report.problems if p.kind == "plan"]
    if not plan_problems or len(plan_problems) != len(report.problems) or len(plan_problems) != planned:
        return
    shifts = {p.message for p in plan_problems}
    if len(shifts) != 1:
        return
    report.problems = []
    report.notes.append(
        f"{len(plan_problems)} modules {plan_problems[0].message.replace('computes in', 'compute in', 1)}: "
        "the model was re-cast as a whole after loading; its dtypes are consistent"
    )


def _check_forward(model, inputs, kwargs, computes, report) -> None:
    seen: set[str] = set()
    handles = []

    def make_hook(name: str):
        def hook(module, args, kw):
            want = computes.get(name)
            if want is None or name in seen or input_cast_of(module) == want:
                return  # an input cast hook hands the kernel `want` whatever arrives
            for a in (*args, *kw.values()):
                if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != want:
                    seen.add(name)
                    fix = (
                        "fp8 is a storage dtype: something before it cast the activations to a stored "
                        "dtype (a parent reading a child's weight dtype?)" if is_fp8(dtype_name(a.dtype))
                        else "cast the input (loaderkit casts inputs at the model's entry when loaded "
                        "with cast_inputs=True)"
                    )
                    report.problems.append(
                        Problem(
                            name,
                            "activation",
                            f"receives {dtype_name(a.dtype)} activations but its kernel computes in "
                            f"{dtype_name(want)}; {fix}",
                        )
                    )
                    return

        return hook

    for name, module in model.named_modules():
        if isinstance(module, STRICT_KERNELS) and name in computes:
            handles.append(module.register_forward_pre_hook(make_hook(name), with_kwargs=True))
    watch = _KernelWatch()
    handles += watch.attach(model)
    args = inputs if isinstance(inputs, (tuple, list)) else (() if inputs is None else (inputs,))
    raised = False
    try:
        with torch.no_grad(), watch:
            model(*args, **kwargs)
    except Exception as exc:  # the crash verify exists to predict
        raised = True
        report.problems.append(
            Problem("", "forward", f"forward pass raised {type(exc).__name__}: {exc}")
        )
    finally:
        for h in handles:
            h.remove()
    report.observed = {n: sorted(set(calls)) for n, calls in watch.calls.items()}
    _judge_observed(model, report, watch, raised)


#: functional kernels watched during the forward check: function -> (input index, weight index
#: or keyword). Their weights are what the kernel computes with, whoever handed them over.
_KERNELS = {
    F.linear: ("linear", 0, 1), F.conv1d: ("conv1d", 0, 1), F.conv2d: ("conv2d", 0, 1),
    F.conv3d: ("conv3d", 0, 1), F.conv_transpose1d: ("conv_transpose1d", 0, 1),
    F.conv_transpose2d: ("conv_transpose2d", 0, 1), F.conv_transpose3d: ("conv_transpose3d", 0, 1),
    F.layer_norm: ("layer_norm", 0, 2), F.group_norm: ("group_norm", 0, 2), F.embedding: ("embedding", None, 1),
}  # fmt: skip


class _KernelWatch(TorchFunctionMode):
    """Records, per module being run, the dtypes each functional kernel actually receives."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.calls: dict[str, list[str]] = {}

    def attach(self, model: torch.nn.Module) -> list:
        def enter(name: str):
            def hook(module, args) -> None:
                self.stack.append(name)

            return hook

        def leave(module, args, output) -> None:
            if self.stack:
                self.stack.pop()

        handles = []
        for name, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave, always_call=True))
        return handles

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        spec = _KERNELS.get(func)
        if spec is not None and self.stack:
            what, i, w = spec
            x = args[i] if i is not None and len(args) > i else None
            weight = args[w] if len(args) > w else kwargs.get("weight")
            if isinstance(weight, torch.Tensor):
                seen = f"{what}: " + (f"input {dtype_name(x.dtype)}, " if isinstance(x, torch.Tensor) else "")
                self.calls.setdefault(self.stack[-1], []).append(seen + f"weight {dtype_name(weight.dtype)}")
        return func(*args, **kwargs)


def _judge_observed(model: torch.nn.Module, report: VerifyReport, watch: _KernelWatch, raised: bool) -> None:
    """After a forward that ran: a module the static check flagged (fp8 storage, no loaderkit
    cast rule) whose kernels were all seen receiving compute-dtype weights is covered by
    something else (another library's wrapper): a note naming what was observed, not a problem.
    Any kernel seen receiving fp8 activations is a problem (a storage-only dtype reached it)."""
    flagged = {p.module for p in report.problems if p.kind == "activation"}
    for name, calls in watch.calls.items():
        fp8_inputs = [c for c in calls if "input float8" in c]
        if fp8_inputs and name not in flagged:
            report.problems.append(Problem(name, "activation", f"a kernel received fp8 activations ({fp8_inputs[0]}): "
                                           "fp8 is a storage dtype, and it reached a kernel as activations"))
    if raised:
        return
    named = dict(model.named_modules())
    kept = []
    for p in report.problems:
        calls = watch.calls.get(p.module, [])
        weights = {c.rpartition("weight ")[2] for c in calls}
        if p.kind == "storage" and "with no cast rule" in p.message and calls and not any(is_fp8(w) for w in weights):
            report.notes.append(
                f"{p.module} ({type(named[p.module]).__name__}): not covered by loaderkit — it stores fp8 weights "
                f"without a loaderkit cast rule, but its own forward handed its kernels {', '.join(sorted(weights))} "
                f"weights (observed: {calls[0]})"
            )
            continue
        kept.append(p)
    report.problems = kept
