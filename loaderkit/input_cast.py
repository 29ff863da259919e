"""Input casts: the floating tensors reaching a model (or a sub-module libraries call directly)
cast to the dtype it computes in. A part of the runtime (:mod:`loaderkit.runtime`)."""

from __future__ import annotations

import weakref

import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from torch import nn

from .errors import CastRuleError
from .hooks import find, hooks_of, remove_hooks


def attach_input_cast(
    model: nn.Module, dtype: torch.dtype, follow: torch.Tensor | None = None, *, entry_of: nn.Module | None = None,
    vectors: bool = True,
) -> InputCastHook:
    """Cast the floating-point tensors passed to ``model`` (positional and keyword, nested in
    lists, tuples and dicts) to ``dtype``. Integer and boolean tensors (token ids, masks) and
    non-tensors pass unchanged. Returns the hook; :func:`detach` removes it.

    :param vectors: also cast floating tensors of fewer than two dimensions. ``False`` at a
        model's entry: timesteps, sigmas and guidance scales are passed in float32 on purpose
        and converted by the model's own code (a bf16 cast would round timestep 999 to 1000).

    :param follow: a tensor of the model stored in ``dtype`` (a bias, a norm weight): when the
        user re-casts the model (``model.to(torch.bfloat16)``), inputs follow that tensor's new
        dtype instead of the one the model was loaded in.
    :param entry_of: ``model`` is a sub-module libraries also call directly (a VAE's decoder,
        Whisper's encoder) of this root, which has an input cast: inputs are cast only when the
        sub-module is called from outside the root's forward; inside it, the model's own dtype
        choices are left alone.
    """
    if not dtype.is_floating_point or dtype.itemsize == 1:
        raise CastRuleError(f"input cast dtype {dtype} is not a compute dtype")
    for old in list(hooks_of(model)):
        if isinstance(old, InputCastHook):
            remove_hooks(model, lambda h, old=old: h is old)
    scope = None
    if entry_of is not None:
        root = find(getattr(entry_of, "_hf_hook", None), InputCastHook)
        if root is None:
            raise CastRuleError("entry_of= names a module without an input cast; attach the root's first")
        scope = root.scope
    hook = InputCastHook(dtype, follow, scope, vectors)
    add_hook_to_module(model, hook, append=True)
    if scope is None:
        # the root's forwards are counted by torch's own hooks, which fire only for real forward
        # calls (diffusers' encode/decode call an accelerate hook's pre_forward without one)
        hook.handles = [model.register_forward_pre_hook(hook.forward_enter),
                        model.register_forward_hook(hook.forward_exit, always_call=True)]
    return hook


def input_cast_of(module: nn.Module) -> torch.dtype | None:
    """The dtype :func:`attach_input_cast` casts ``module``'s inputs to, or ``None``."""
    hook = find(getattr(module, "_hf_hook", None), InputCastHook)
    return hook.current if hook is not None else None


class _Scope:
    """How many forwards of a root with an input cast are running (entry casts stand down then)."""

    depth = 0


class InputCastHook(ModelHook):
    """Casts the floating tensors reaching a model's root to its compute dtype: the dtype it was
    loaded in, or — when it follows a tensor of the model — that tensor's current dtype. An entry
    cast (of a sub-module also called directly) casts only outside its root's forward."""

    def __init__(self, dtype: torch.dtype, follow: torch.Tensor | None = None, scope: _Scope | None = None,
                 vectors: bool = True) -> None:
        self.dtype = dtype
        self.min_ndim = 0 if vectors else 2
        self._follow = weakref.ref(follow) if follow is not None else None
        self.entry = scope is not None
        self.scope = scope if scope is not None else _Scope()
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def forward_enter(self, module: nn.Module, args) -> None:
        """Forward pre-hook of a root: one more of its forwards is running."""
        self.scope.depth += 1

    def forward_exit(self, module: nn.Module, args, output) -> None:
        """Always-called forward hook of a root: its forward is over (also when it raised)."""
        self.scope.depth = max(0, self.scope.depth - 1)

    def detach_hook(self, module: nn.Module) -> nn.Module:
        for h in self.handles:
            h.remove()
        self.handles = []
        return module

    @property
    def current(self) -> torch.dtype:
        """The dtype inputs are cast to now."""
        t = self._follow() if self._follow is not None else None
        if t is not None and t.dtype.is_floating_point and t.dtype.itemsize > 1:
            return t.dtype
        return self.dtype

    def pre_forward(self, module: nn.Module, *args, **kwargs):
        if self.entry and self.scope.depth:
            return args, kwargs  # called by the root's own forward: its dtypes are the model's
        dtype = self.current
        return _cast_tree(args, dtype, self.min_ndim), _cast_tree(kwargs, dtype, self.min_ndim)


def _cast_tree(x, dtype: torch.dtype, min_ndim: int = 0):
    """``x`` with its floating tensors of at least ``min_ndim`` dimensions in ``dtype``. A
    container none of whose tensors changes is returned itself, not a copy: a callee that fills a
    list it was given (a VAE's per-frame feature cache) must see its own list."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() and x.dtype != dtype and x.dim() >= min_ndim else x
    if isinstance(x, (list, tuple)):
        items = [_cast_tree(v, dtype, min_ndim) for v in x]
        if all(a is b for a, b in zip(items, x)):
            return x
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    if isinstance(x, dict):
        pairs = {k: _cast_tree(v, dtype, min_ndim) for k, v in x.items()}
        if all(pairs[k] is v for k, v in x.items()):
            return x
        return type(x)(pairs.items())
    return x
