"""Runtime cast rules: modules that store tensors in one dtype and compute in another.

A *cast rule* is an accelerate :class:`~accelerate.hooks.ModelHook` attached with
``add_hook_to_module(module, hook, append=True)``. Just before the module's forward it swaps each
covered tensor whose stored dtype differs from the compute dtype (or that has a scale) for its
decoded compute-dtype copy (:func:`loaderkit.kernels.quant.upcast`), and just after it puts the stored
tensor back. Tensors already in the compute dtype are not touched, the module is never cast as a
whole (diffusers' layerwise casting does ``module.to(compute)`` and ``module.to(storage)`` around
every call), and ``module.forward`` is left to accelerate's hook machinery.

* **Offload**: a rule appended after accelerate's ``AlignDevicesHook`` runs after it, so the fp8
  weights are first brought to the execution device, then decoded there; when the offload hook
  releases the tensors to the meta device after forward, the rule keeps them released and in the
  stored dtype. Attach rules *after* ``cpu_offload``/``dispatch_model`` (``dispatch_model``
  replaces existing hooks); a rule that meets weights still on the meta device says so.
* **Exceptions**: a forward hook registered with ``always_call=True`` restores the stored tensors
  when the forward raises, so parameters never stay in the compute dtype.
* **Resident**: ``resident=True`` keeps the decoded copy between calls (faster, more memory).
* **Workspace**: on the CPU, under ``torch.no_grad``/``inference_mode`` and for the standard
  layers (Linear, Conv, Embedding, norms), decoded copies go to reused buffers: a fresh 32-64 MB
  allocation costs more than the decode itself on small-core machines (page faults).
* **Folded scales**: ``fold_scale=True`` on an ``nn.Linear`` whose weight has one scale per output
  channel decodes the weight *unscaled* (``q.to(compute)``, exact) and applies the scale to the
  output instead: ``y = (linear(x, q) * s + b)``, the product and sum in float32. The same math
  with a different rounding (the matmul's result is rounded before the scale instead of each
  weight after it), so it is opt-in; it applies on the CPU without gradients, on a module with
  no other hook and no low-rank update, and decodes through the cheaper unscaled table route.
* **Native kernels**: ``native=True`` on an ``nn.Linear`` whose weight is ``float8_e4m3fn`` on a CUDA
  device with compute capability >= 8.9 runs ``torch._scaled_mm`` with a dynamically quantized
  activation instead of decoding the weight; one whose weight is ``int8`` with per-channel scales
  on the CPU runs ``aten._weight_int8pack_mm`` (:mod:`loaderkit.kernels.int8`) with bfloat16
  activations. Elsewhere the rule decodes (``q.float() * scale``), and says why in
  :attr:`CastRule.native_reason`. Whether it can is decided once, when the rule is attached:
  from the plan's device capabilities when loaderkit binds the plan, from the module's device
  when a rule is attached by hand. Nothing is re-decided at forward time.

What a rule covers is checked in :mod:`loaderkit.cast_spec`; the input casts live in
:mod:`loaderkit.input_cast`, the low-rank update record in :mod:`loaderkit.low_rank` and the
workspace in :mod:`loaderkit.kernels.workspace`; this module exports their public names too.

Cast rules are for inference: gradients do not flow into the stored tensors, and a model must not
run forward from several threads at once. Code that calls ``module.forward`` directly (not
``module(...)``) skips the exception guard.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from torch import nn

from .contract.dtypes import dtype_name
from .contract.modules import KERNEL_LAYERS
from .contract.records import DeviceCaps
from .errors import CastRuleError
from .hooks import find, hooks_of, remove_hooks
from .cast_spec import TensorCast, default_names, is_dtensor, resolve, tensor_cast
from .input_cast import InputCastHook, attach_input_cast, input_cast_of  # noqa: F401 - the runtime's API
from .low_rank import LowRank
from .kernels.native import NATIVE_REASON, native_problem, native_reason
from .kernels.quant import decode_stored
from .kernels.workspace import POOL, release_workspace, workspace  # noqa: F401 - the runtime's API


@dataclass
class CastRule:
    """The inspectable state of a cast rule (what :func:`cast_rule_of` returns).

    :ivar compute_dtype: the dtype the module's kernel sees its tensors in.
    :ivar tensors: local tensor name -> :class:`TensorCast`, for every tensor the rule covers.
    :ivar resident: whether decoded copies are kept between calls.
    :ivar native: whether the native fp8 matmul runs (decided when the rule is attached).
    :ivar native_reason: when native fp8 matmul was asked for, why it is (not) used.
    :ivar deltas: low-rank updates added to the decoded tensors at each forward (LoRAs).
    :ivar for_deltas: the rule was attached only to add :attr:`deltas` (the module stores its
        tensors in the compute dtype); it goes away with its last delta.
    :ivar fold_scale: apply a Linear weight's per-channel scale to the output (see the module
        docstring); where it does not apply the weight is decoded with its scale as usual.
    """

    compute_dtype: torch.dtype
    tensors: dict[str, TensorCast]
    resident: bool = False
    native: bool = False
    native_reason: str = ""
    deltas: list["LowRank"] = field(default_factory=list)
    for_deltas: bool = False
    fold_scale: bool = False

    @property
    def params(self) -> tuple[str, ...]:
        """Names of the covered tensors."""
        return tuple(self.tensors)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly summary."""
        return {
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "tensors": {
                n: {"scale": t.scale, "granularity": t.granularity, "block": list(t.block) if t.block else None}
                for n, t in self.tensors.items()
            },
            "resident": self.resident,
            "native": self.native,
            "native_reason": self.native_reason,
            "fold_scale": self.fold_scale,
            "deltas": [{"name": d.name, "tensor": d.tensor, "rank": d.rank, "scale": d.scale} for d in self.deltas],
        }


# -- public API --------------------------------------------------------------------------------


def supports(module: nn.Module) -> bool:
    """Whether a cast rule can cover ``module``.

    Any module whose forward reads its own tensors by attribute can be covered. Not covered:
    TorchScript modules (their compiled forward does not read attributes through Python),
    parametrized modules (``weight`` is computed, not stored) and modules holding tensor-subclass
    parameters of other quantization libraries.
    """
    if isinstance(module, torch.jit.ScriptModule):
        return False
    if torch.nn.utils.parametrize.is_parametrized(module):
        return False
    return all(type(p) in (nn.Parameter, torch.Tensor) or is_dtensor(p) for p in module.parameters(recurse=False))


def attach_cast(
    module: nn.Module,
    compute_dtype: torch.dtype,
    *,
    scales: dict[str, tuple[str, str, tuple[int, int] | None]] | None = None,
    resident: bool = False,
    native: bool = False,
    names: list[str] | None = None,
    name: str = "",
    device: DeviceCaps | None = None,
    fold_scale: bool = False,
) -> CastRule:
    """Attach a cast rule so that ``module``'s kernel sees its tensors in ``compute_dtype``.

    :param compute_dtype: a floating, non-fp8 dtype.
    :param scales: covered tensor name -> ``(scale buffer name, granularity, block)``; the scale
        is a float32 buffer on ``module`` and a multiplier (``W = q.float() * scale``).
    :param resident: keep the decoded copies between calls (faster forward, more memory).
    :param native: use native fp8 matmul for an ``nn.Linear`` where the device has it.
    :param names: the tensors to cover (default: the module's own floating parameters, plus
        ``out_proj``'s for ``nn.MultiheadAttention``, which reads them itself).
    :param name: the module's qualified name, used in error messages.
    :param device: the capabilities of the execution device, for deciding ``native``
        (default: the CUDA capability of the module's weight's device, or its offload hook's).
    :param fold_scale: for an ``nn.Linear`` with per-channel weight scales, scale the output
        instead of the weight (faster on the CPU; rounds differently, see the module docstring).
    :returns: the rule (also available later through :func:`cast_rule_of`).
    :raises CastRuleError: for an unsuitable dtype, an unknown tensor or a malformed scale.
    """
    label = name or type(module).__name__
    if not compute_dtype.is_floating_point or compute_dtype.itemsize == 1:
        raise CastRuleError(f"{label}: compute dtype {compute_dtype} is not a compute dtype", module=name)
    if not supports(module):
        raise CastRuleError(
            f"{label}: a cast rule cannot cover a {type(module).__name__} (scripted, parametrized or "
            "holding foreign tensor subclasses); store it in its compute dtype instead",
            module=name,
        )
    remove_hooks(module, lambda h: isinstance(h, CastHook))
    scales = dict(scales or {})
    covered = list(names) if names is not None else default_names(module)
    covered += [n for n in scales if n not in covered]
    tensors = {n: tensor_cast(module, n, scales.get(n), label, name) for n in covered}
    rule = CastRule(compute_dtype=compute_dtype, tensors=tensors, resident=resident, fold_scale=fold_scale)
    if native:
        problem = _native_problem(module, rule, device)
        weight = module._parameters.get("weight")
        reason = native_reason(dtype_name(weight.dtype)) if weight is not None else NATIVE_REASON
        rule.native, rule.native_reason = not problem, problem or reason
    hook = CastHook(rule, pooled=isinstance(module, KERNEL_LAYERS))
    add_hook_to_module(module, hook, append=True)
    hook.guard = module.register_forward_hook(hook.forward_exit, always_call=True)
    return rule


def add_low_rank(module: nn.Module, delta: LowRank, *, name: str = "") -> CastRule:
    """Add ``delta`` to ``module``'s cast rule, attaching one that only adds deltas when the
    module has none. The stored tensors are not changed; :func:`remove_low_rank` undoes it.

    :raises CastRuleError: for a native fp8 rule (it never decodes the weight), a name already
        used on the module, or a delta whose shape does not fit the tensor.
    """
    label = name or type(module).__name__
    owner, key = resolve(module, delta.tensor)
    stored = owner._parameters.get(key, owner._buffers.get(key))
    up, down = tuple(delta.up.shape), tuple(delta.down.shape)
    if stored is not None and (len(up) < 2 or up[0] != stored.shape[0] or down[1:] != tuple(stored.shape[1:])
                               or up[1] != down[0] or any(s != 1 for s in up[2:])):
        raise CastRuleError(f"{label}.{delta.tensor}: up {list(up)} and down {list(down)} do not make its shape "
                            f"{list(stored.shape)}", module=name, tensor=delta.tensor)
    rule = cast_rule_of(module)
    if rule is None:
        if stored is None or not stored.is_floating_point() or stored.dtype.itemsize == 1:
            raise CastRuleError(f"{label}.{delta.tensor} has no cast rule and is not stored in a compute dtype",
                                module=name, tensor=delta.tensor)
        rule = attach_cast(module, stored.dtype, names=[delta.tensor], name=name)
        rule.for_deltas = True
    if rule.native:
        raise CastRuleError(f"{label} runs a native kernel (fp8 matmul or int8 weight-only), which never decodes "
                            "its weight, so a LoRA "
                            "cannot be added at cast time; merge it at load (lora_mode='merge')", module=name)
    if any(d.name == delta.name for d in rule.deltas):
        raise CastRuleError(f"{label} already has an update named {delta.name!r}", module=name)
    rule.deltas.append(delta)
    return rule


def remove_low_rank(module: nn.Module, delta_name: str) -> bool:
    """Remove the update named ``delta_name`` from ``module``'s cast rule; a rule attached only
    for deltas goes with its last one. Returns whether there was one."""
    rule = cast_rule_of(module)
    if rule is None or not any(d.name == delta_name for d in rule.deltas):
        return False
    rule.deltas[:] = [d for d in rule.deltas if d.name != delta_name]
    if rule.for_deltas and not rule.deltas:
        remove_hooks(module, lambda h: isinstance(h, CastHook))
    return True


def delta_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a low-rank update of ``module``'s weight is added in: its cast rule's compute
    dtype, else its weight's dtype."""
    rule = cast_rule_of(module)
    return rule.compute_dtype if rule is not None else module._parameters["weight"].dtype


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module``'s forward runs: its offload hook's execution device, else its weight's."""
    return _execution_device(module, module._parameters["weight"])


def cast_rule_of(module: nn.Module) -> CastRule | None:
    """The cast rule attached to ``module`` by :func:`attach_cast`, or ``None``."""
    hook = find(getattr(module, "_hf_hook", None), CastHook)
    return hook.rule if hook is not None else None


def cast_rules(model: nn.Module) -> dict[str, CastRule]:
    """Every cast rule in ``model``, by qualified module name."""
    return {n: r for n, m in model.named_modules() if (r := cast_rule_of(m)) is not None}


def detach(model: nn.Module, recurse: bool = True) -> None:
    """Remove loaderkit's hooks (cast rules, input casts) from ``model`` and its submodules.

    Other hooks (accelerate's offload hooks) stay in place and keep working. Stored tensors are
    left as they are stored.
    """
    modules = model.modules() if recurse else [model]
    for module in list(modules):
        remove_hooks(module, lambda h: isinstance(h, (CastHook, InputCastHook)))


def has_hooks(model: nn.Module) -> bool:
    """True if ``model`` or a submodule carries a loaderkit cast rule or input cast."""
    return any(isinstance(h, (CastHook, InputCastHook)) for m in model.modules() for h in hooks_of(m))


def detach_others(model: nn.Module) -> None:
    """Remove every accelerate hook from ``model`` and its submodules *except* loaderkit's (cast
    rules, input casts), which stay attached and keep working.

    What a library's "remove all hooks" must do to a loaderkit-loaded model before it attaches its
    own offload hooks: accelerate's ``remove_hook_from_module(model, recurse=True)`` would take the
    cast rules with it, and the next forward would reach an fp8 weight with bf16 activations.
    """
    for module in list(model.modules()):
        remove_hooks(module, lambda h: not isinstance(h, (CastHook, InputCastHook)))


def _native_problem(module: nn.Module, rule: CastRule, caps: DeviceCaps | None) -> str:
    weight = module._parameters.get("weight") if isinstance(module, nn.Module) else None
    if weight is None:
        return "no weight to multiply natively"
    if caps is None:
        caps = _caps_of(_execution_device(module, weight))
    tc = rule.tensors.get("weight")
    return native_problem(
        linear=isinstance(module, nn.Linear),
        weight_dtype=dtype_name(weight.dtype),
        shape=tuple(weight.shape),
        granularity=tc.granularity if tc is not None and tc.scale else "none",
        compute=dtype_name(rule.compute_dtype),
        caps=caps,
    )


def _execution_device(module: nn.Module, weight: torch.Tensor) -> torch.device:
    for hook in hooks_of(module):
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    return weight.device


def _caps_of(device: torch.device) -> DeviceCaps:
    """Capabilities of a device, for rules attached without a plan."""
    fp8 = native_fp8_available(device)
    cap = torch.cuda.get_device_capability(device) if fp8 and device.type == "cuda" else None
    return DeviceCaps(device=str(device), kind=device.type, fp8_matmul=fp8, capability=cap)


def native_fp8_available(device: torch.device | str | None = None) -> bool:
    """Whether ``device`` has native fp8 matmul: CUDA compute capability >= 8.9 and
    ``torch._scaled_mm``. CPUs (where ``_scaled_mm`` is a slow reference loop) answer ``False``.
    """
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm") or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


# -- the hooks ---------------------------------------------------------------------------------


class CastHook(ModelHook):
    """The accelerate hook behind a :class:`CastRule` (see the module docstring)."""

    def __init__(self, rule: CastRule, pooled: bool = False) -> None:
        self.rule = rule
        self.pooled = pooled
        self.guard: torch.utils.hooks.RemovableHandle | None = None
        # How many forwards of the module are in flight. A module can be re-entered (a forward
        # that calls itself, or a hook chain calling pre_forward twice): only the outermost
        # entry swaps the stored tensors for decoded ones, and only its exit (post_forward, or
        # forward_exit when the forward raised) puts them back. Inner exits just count down.
        self._depth = 0
        # The swaps the outermost entry made, undone in reverse order on exit.
        self._swapped: list[_Swap] = []
        self._cache: dict[str, tuple[tuple, torch.Tensor]] = {}
        # (float32 scale [N], stored bias or None) while a folded forward runs
        self._fold: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        self._depth += 1
        if self._depth == 1:
            try:
                self._swap_in(module)
            except BaseException:
                self._depth -= 1
                self._restore()
                raise
        return args, kwargs

    def post_forward(self, module: nn.Module, output):
        if self._depth == 1 and self._fold is not None:
            scale, bias = self._fold
            # y = linear(x, q) * s + b, in float32, rounded once to the compute dtype
            y = output.mul_(scale) if output.dtype == torch.float32 else torch.mul(output, scale)
            if bias is not None:
                y.add_(bias)
            output = y.to(self.rule.compute_dtype)
        self._leave(output)
        return output

    def forward_exit(self, module: nn.Module, args, output) -> None:
        """Always-called forward hook: restores the stored tensors if the forward raised."""
        if self._depth:
            self._depth = 1
            self._leave(None)

    def detach_hook(self, module: nn.Module) -> nn.Module:
        self._depth = 1
        self._leave(None)
        self._cache.clear()
        if self.guard is not None:
            self.guard.remove()
            self.guard = None
        return module

    def _leave(self, output) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            self._restore(output)

    def _swap_in(self, module: nn.Module) -> None:
        native = ("weight",) if self.rule.native else ()
        fold = self._folds(module)
        for tc in self.rule.tensors.values():
            if fold and tc.name == "bias":
                continue  # left out of the kernel, added to its output (post_forward)
            owner, key = resolve(module, tc.name)
            is_param = key in owner._parameters
            stored = owner._parameters[key] if is_param else owner._buffers.get(key)
            deltas = [d for d in self.rule.deltas if d.tensor == tc.name]
            if stored is None or (stored.dtype == self.rule.compute_dtype and tc.scale is None and not deltas):
                continue
            if stored.device.type == "meta":
                raise CastRuleError(
                    f"{type(module).__name__}.{tc.name} is still on the meta device when its cast rule "
                    "runs: attach cast rules after accelerate's offload/dispatch hooks",
                    tensor=tc.name,
                )
            scale = getattr(module, tc.scale) if tc.scale else None
            if tc.name in native:
                from .kernels.int8 import Int8LinearWeight  # noqa: PLC0415 - the native kernels' code
                from .kernels.native import Fp8LinearWeight  # noqa: PLC0415

                wrapper = Int8LinearWeight if stored.dtype == torch.int8 else Fp8LinearWeight
                compute, pooled = wrapper.wrap(stored, scale, self.rule.compute_dtype), False
                swapped = compute
            elif is_dtensor(stored):
                compute, pooled = self._decode_shard(tc, stored, scale, deltas), False
                swapped = nn.Parameter(compute, requires_grad=False) if is_param else compute
            elif fold and tc.name == "weight":
                compute = decode_stored(stored.detach(), self.rule.compute_dtype, None, None, None,
                                        out=POOL.take(tuple(stored.shape), self.rule.compute_dtype))
                swapped, pooled = nn.Parameter(compute, requires_grad=False), True
            else:
                compute, pooled = self._patched(tc, stored, scale, deltas) if deltas else self._decode(tc, stored, scale)
                swapped = nn.Parameter(compute, requires_grad=False) if is_param else compute
            (owner._parameters if is_param else owner._buffers)[key] = swapped
            self._swapped.append(_Swap(owner, key, is_param, stored, swapped, compute if pooled else None))
        if fold:
            bias = module._parameters.get("bias")
            if bias is not None:
                module._parameters["bias"] = None
                self._swapped.append(_Swap(module, "bias", True, bias, None, None))
            self._fold = (getattr(module, self.rule.tensors["weight"].scale).reshape(-1).float(),
                          None if bias is None else bias.detach())

    def _folds(self, module: nn.Module) -> bool:
        """Whether this forward scales the output instead of the weight (``fold_scale``): an
        ``nn.Linear`` with one fp8 weight scale per output channel, decoded on the CPU into the
        workspace, no low-rank update, and no other hook that could read or move its tensors."""
        rule = self.rule
        tc = rule.tensors.get("weight")
        if not rule.fold_scale or rule.native or rule.resident or type(module) is not nn.Linear:
            return False
        if tc is None or tc.scale is None or tc.granularity != "channel" or any(d.tensor == "weight" for d in rule.deltas):
            return False
        weight, scale = module._parameters.get("weight"), module._buffers.get(tc.scale)
        if weight is None or scale is None or type(weight) is not nn.Parameter or weight.dtype.itemsize != 1:
            return False
        if weight.device.type != "cpu" or scale.device.type != "cpu" or torch.is_grad_enabled():
            return False
        return scale.numel() == weight.shape[0] > 1 and len(hooks_of(module)) == 1

    def _patched(self, tc: TensorCast, stored: torch.Tensor, scale: torch.Tensor | None, deltas: list[LowRank]):
        """The decoded tensor plus its low-rank updates. A tensor already in the compute dtype is
        not copied first: the first update writes ``stored + delta`` into a fresh (or pooled)
        buffer; a decoded copy is private, so updates go into it in place — except a resident
        decoded copy, which stays as decoded."""
        if stored.dtype == self.rule.compute_dtype and tc.scale is None:
            data = stored.detach()
            pool = self.pooled and data.device.type == "cpu" and not torch.is_grad_enabled()
            out = POOL.take(tuple(data.shape), data.dtype) if pool else None
            first, rest = deltas[0], deltas[1:]
            compute = first.add_to(data, out=out)
        else:
            compute, pool = self._decode(tc, stored, scale)
            rest = deltas
            if self.rule.resident:
                compute = rest[0].add_to(compute, out=None)
                rest = rest[1:]
        for d in rest:
            d.add_to(compute, out=compute)
        return compute, pool

    def _decode_shard(self, tc: TensorCast, stored: torch.Tensor, scale: torch.Tensor | None, deltas: list[LowRank]):
        """A tensor-parallel shard (a DTensor the kernel reads as it is): its local part decoded
        with its own rows' scale, wrapped back with the same placements."""
        from torch.distributed.tensor import DTensor

        if deltas:
            raise CastRuleError(f"{tc.name}: low-rank updates of a tensor-parallel shard are not supported; "
                                "merge the LoRA at load (lora_mode='merge')", tensor=tc.name)
        local = stored.to_local().detach()
        if self.rule.resident:
            key = (weakref.ref(stored), local._version, local.data_ptr(), _version(scale))
            hit = self._cache.get(tc.name)
            if hit is not None and hit[0][0]() is stored and hit[0][1:] == key[1:]:
                return hit[1]
        out = decode_stored(local, self.rule.compute_dtype, scale, tc.granularity, tc.block)
        out = DTensor.from_local(out, stored.device_mesh, stored.placements, shape=stored.shape,
                                 stride=stored.stride(), run_check=False)
        if self.rule.resident:
            self._cache[tc.name] = (key, out)
        return out

    def _decode(self, tc: TensorCast, stored: torch.Tensor, scale: torch.Tensor | None):
        """(decoded tensor, whether it came from the workspace pool)."""
        dtype = self.rule.compute_dtype
        data = stored.detach()
        if self.rule.resident:
            key = (weakref.ref(stored), stored._version, data.data_ptr(), _version(scale))
            hit = self._cache.get(tc.name)
            if hit is not None and hit[0][0]() is stored and hit[0][1:] == key[1:]:
                return hit[1], False
            out = decode_stored(data, dtype, scale, tc.granularity, tc.block)
            self._cache[tc.name] = (key, out)
            return out, False
        if self.pooled and data.device.type == "cpu" and not torch.is_grad_enabled():
            out = POOL.take(tuple(data.shape), dtype)
            return decode_stored(data, dtype, scale, tc.granularity, tc.block, out=out), True
        return decode_stored(data, dtype, scale, tc.granularity, tc.block), False

    def _restore(self, output=None) -> None:
        swaps, self._swapped, self._fold = self._swapped, [], None
        alias = _storages(output) if any(s.pooled is not None for s in swaps) else set()
        for s in reversed(swaps):
            s.restore()
            if s.pooled is not None and s.pooled.untyped_storage().data_ptr() not in alias:
                POOL.give(s.pooled)


@dataclass
class _Swap:
    """One tensor swapped for the duration of a forward: ``owner._parameters[key]`` (or
    ``_buffers``) held ``stored`` and now holds ``swapped``; ``pooled`` is the workspace buffer
    behind ``swapped``, returned to the pool after the forward unless the output aliases it."""

    owner: nn.Module
    key: str
    is_param: bool
    stored: torch.Tensor
    swapped: torch.Tensor
    pooled: torch.Tensor | None

    def restore(self) -> None:
        """Put the stored tensor back — unless something else replaced the slot meanwhile.

        Three cases: the slot still holds our swapped tensor (the usual case: restore it); an
        offload hook released the slot to the meta device after the forward (keep it released,
        but as a meta tensor of the *stored* dtype, so the next forward's offload hook and
        this rule see fp8 again); or the forward assigned a new tensor (that assignment wins).
        """
        table = self.owner._parameters if self.is_param else self.owner._buffers
        current = table.get(self.key)
        if current is self.swapped:
            table[self.key] = self.stored
        elif current is not None and current.device.type == "meta" and self.stored.device.type != "meta":
            # an offload hook released the tensor after forward: keep it released, as stored
            empty = torch.empty_like(self.stored, device="meta")
            table[self.key] = type(self.stored)(empty, self.stored.requires_grad) if self.is_param else empty
        # otherwise someone assigned a new tensor during forward: it stays


# -- helpers -----------------------------------------------------------------------------------


def _version(t: torch.Tensor | None) -> tuple:
    return () if t is None else (t.data_ptr(), t._version)


def _storages(output) -> set[int]:
    found: set[int] = set()

    def visit(x) -> None:
        if isinstance(x, torch.Tensor):
            found.add(x.untyped_storage().data_ptr())
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)

    visit(output)
    return found
