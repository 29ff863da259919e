"""Capture what a state-dict conversion function does, from tensor shapes alone, and redo it
one output tensor at a time.

A library's converter (``convert_*_checkpoint_to_diffusers`` and the like) takes a whole state
dict and returns a new one. :func:`capture` runs it over meta tensors (shapes and dtypes, no data)
while a :class:`torch.overrides.TorchFunctionMode` records every torch operation that makes a
tensor. Each output is then a small graph over the input keys: a plain rename when the output is
an input tensor itself, otherwise the library's own operations (``chunk``, ``split``, ``cat``,
``transpose``...). :meth:`Capture.replay` re-runs exactly those recorded calls on real tensors
for one output, fetching only the inputs it needs — so a converted checkpoint is never held in
memory as a whole.

An output the converter sets to ``None`` (a ``checkpoint.get(key)`` of a key the checkpoint does
not have) is no tensor: it is left out of the outputs and listed in :attr:`Capture.absent`, so the
model's key is missing from the checkpoint like any other.

Operations that need tensor values (``item``, comparisons turned into Python booleans) cannot run
on meta tensors and make :func:`capture` fail with :class:`CaptureError`; so do in-place
operations, which would write into the source tensors during replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode


class CaptureError(Exception):
    """The converter does something that cannot be captured from shapes alone."""


@dataclass(frozen=True)
class Leaf:
    """An input tensor of the converter, by its key."""

    key: str


@dataclass(frozen=True)
class Call:
    """One recorded torch call; tensor arguments are other nodes."""

    func: Callable
    args: tuple
    kwargs: tuple  # sorted (name, value) pairs

    def __str__(self) -> str:
        return _show(self)


@dataclass(frozen=True)
class Item:
    """Element ``index`` of a call that returned a tuple or list of tensors."""

    call: Call
    index: int

    def __str__(self) -> str:
        return _show(self)


Node = Leaf | Call | Item


def _show(value: Any, names: dict[str, str] | None = None) -> str:
    if isinstance(value, Leaf):
        return (names or {}).get(value.key, value.key)
    if isinstance(value, Item):
        return f"{_show(value.call, names)}[{value.index}]"
    if isinstance(value, Call):
        name = getattr(value.func, "__name__", repr(value.func))
        shown = [_show(a, names) for a in value.args] + [f"{k}={_show(v, names)}" for k, v in value.kwargs]
        return f"{name}({', '.join(shown)})"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_show(v, names) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, slice):
        return ":".join("" if x is None else str(x) for x in (value.start, value.stop, value.step))
    return repr(value)


#: recorded tensor methods that only read metadata and never make a new tensor from data
_METADATA = {"__get__", "size", "dim", "numel", "__len__", "element_size", "is_floating_point", "stride"}
#: in-place methods that are harmless during capture and replay
_HARMLESS_INPLACE = {"requires_grad_"}


class _Recorder(TorchFunctionMode):
    def __init__(self, nodes: dict[int, Node]) -> None:
        super().__init__()
        self.nodes = nodes
        self.alive: list[Any] = []  # keep every traced tensor alive, so ids stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and name not in _HARMLESS_INPLACE or name == "__setitem__":
            raise CaptureError(f"the converter modifies a tensor in place ({name})")
        out = func(*args, **kwargs)
        if name in _METADATA or not _has_tensor(out):
            return out
        call = Call(func, self._template(args), tuple(sorted((k, self._template(v)) for k, v in kwargs.items())))
        if isinstance(out, torch.Tensor):
            self._bind(out, call)
        elif isinstance(out, (tuple, list)):
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    self._bind(t, Item(call, i))
        return out

    def _bind(self, tensor: torch.Tensor, node: Node) -> None:
        self.alive.append(tensor)
        if id(tensor) not in self.nodes:  # a call that returns its input keeps the input's node
            self.nodes[id(tensor)] = node

    def _template(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            node = self.nodes.get(id(value))
            if node is None:
                raise CaptureError("the converter combines checkpoint tensors with a tensor it made itself")
            return node
        if isinstance(value, (list, tuple)):
            return type(value)(self._template(v) for v in value)
        if isinstance(value, dict):
            raise CaptureError("the converter passes a dict to a torch operation")
        return value


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value)


@dataclass
class Capture:
    """What a converter did: each output key's node, the input keys nothing used, and the output
    keys it set to ``None`` (made of no input: the checkpoint lacks them)."""

    outputs: dict[str, Node]
    unused: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    absent: tuple[str, ...] = ()

    def sources(self, key: str) -> tuple[str, ...]:
        """The input keys output ``key`` is made of, in the order the converter used them."""
        found: list[str] = []
        _leaves(self.outputs[key], found)
        return tuple(dict.fromkeys(found))

    def is_rename(self, key: str) -> bool:
        """True when output ``key`` is an input tensor itself (no operation on it)."""
        return isinstance(self.outputs[key], Leaf)

    def describe(self, key: str, placeholders: bool = False) -> str:
        """The library's operations that make output ``key``, in words; with ``placeholders``
        its inputs are written ``#0``, ``#1``... in the order of :meth:`sources`."""
        names = {k: f"#{i}" for i, k in enumerate(self.sources(key))} if placeholders else None
        return _show(self.outputs[key], names)

    def replay(self, key: str, fetch: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Output ``key`` from real inputs: the recorded calls run again, each input fetched once."""
        cache: dict[int, Any] = {}
        return _evaluate(self.outputs[key], fetch, cache)


def _leaves(node: Any, found: list[str]) -> None:
    if isinstance(node, Leaf):
        found.append(node.key)
    elif isinstance(node, Item):
        _leaves(node.call, found)
    elif isinstance(node, Call):
        for a in (*node.args, *(v for _, v in node.kwargs)):
            _leaves(a, found)
    elif isinstance(node, (list, tuple)):
        for a in node:
            _leaves(a, found)


def _evaluate(node: Any, fetch: Callable[[str], torch.Tensor], cache: dict[int, Any]) -> Any:
    if isinstance(node, (Leaf, Call, Item)):
        if id(node) in cache:
            return cache[id(node)]
        if isinstance(node, Leaf):
            value = fetch(node.key)
        elif isinstance(node, Item):
            value = _evaluate(node.call, fetch, cache)[node.index]
        else:
            args = _evaluate(node.args, fetch, cache)
            kwargs = {k: _evaluate(v, fetch, cache) for k, v in node.kwargs}
            value = node.func(*args, **kwargs)
        cache[id(node)] = value
        return value
    if isinstance(node, (list, tuple)):
        return type(node)(_evaluate(v, fetch, cache) for v in node)
    return node


def meta_tensors(shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Meta tensors (no data) of the given shapes and dtypes, by key."""
    return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in shapes.items()}


def capture(convert: Callable[[dict[str, torch.Tensor]], dict], inputs: dict[str, torch.Tensor]) -> Capture:
    """Run ``convert`` over ``inputs`` (meta tensors by key) and record what makes each output.

    ``convert`` gets a fresh dict it may consume (``pop``); it must return a dict of tensors.
    Raises :class:`CaptureError` when the converter needs tensor values, works in place, or
    returns something else; any exception of the converter itself propagates.
    """
    nodes: dict[int, Node] = {id(t): Leaf(k) for k, t in inputs.items()}
    recorder = _Recorder(nodes)
    recorder.alive.extend(inputs.values())
    try:
        with recorder, torch.no_grad():
            result = convert(dict(inputs))
    except (NotImplementedError, RuntimeError) as exc:  # meta tensors refuse value-dependent operations
        if isinstance(exc, RuntimeError) and "meta" not in str(exc):
            raise
        raise CaptureError(f"the converter reads tensor values, which headers do not have: {exc}") from exc
    if not isinstance(result, dict):
        raise CaptureError(f"the converter returned {type(result).__name__}, not a dict of tensors")
    outputs: dict[str, Node] = {}
    absent = tuple(k for k, v in result.items() if v is None)
    for key, value in result.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or id(value) not in nodes:
            raise CaptureError(f"the converter's output {key!r} is not made from checkpoint tensors")
        outputs[key] = nodes[id(value)]
    used: list[str] = []
    for node in outputs.values():
        _leaves(node, used)
    used_set = set(used)
    return Capture(outputs=outputs, unused=tuple(k for k in inputs if k not in used_set),
                   shapes={k: tuple(v.shape) for k, v in result.items() if v is not None}, absent=absent)
