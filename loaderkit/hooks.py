"""accelerate hook chains: the hooks a module carries, and removing some of them while the
others stay attached (loaderkit's cast rules and input casts live in the same chain as
accelerate's offload hooks)."""

from __future__ import annotations

from typing import Iterator

from accelerate.hooks import ModelHook, SequentialHook, remove_hook_from_module
from torch import nn


def flatten(hook) -> Iterator[ModelHook]:
    if isinstance(hook, SequentialHook):
        for h in hook.hooks:
            yield from flatten(h)
    elif hook is not None:
        yield hook


def hooks_of(module: nn.Module) -> list[ModelHook]:
    return list(flatten(getattr(module, "_hf_hook", None)))


def find(hook, kind: type):
    return next((h for h in flatten(hook) if isinstance(h, kind)), None)


def remove_hooks(module: nn.Module, drop) -> None:
    """Remove the hooks matching ``drop`` from ``module``'s chain, leaving the others attached."""
    hooks = hooks_of(module)
    gone = [h for h in hooks if drop(h)]
    if not gone:
        return
    for h in gone:
        h.detach_hook(module)
    kept = [h for h in hooks if not drop(h)]
    if kept:
        module._hf_hook = kept[0] if len(kept) == 1 else SequentialHook(*kept)
        return
    module._hf_hook = ModelHook()  # remove_hook_from_module calls detach_hook on what is left
    remove_hook_from_module(module)
