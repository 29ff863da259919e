"""Stage 3, build: the model skeleton, from ``model=`` or a builder plugin, on the meta device;
and the facts its library declares about it (``loaderkit_model_facts``).

A skeleton's parameters live on the meta device (no memory); its non-persistent buffers hold
real values computed by the model's own ``__init__`` (rotary ``inv_freq`` and the like), because
those never come from a checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import sys
import threading
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ..contract.dtypes import dtype_name
from ..contract.records import BuildRequest, CheckpointInfo, ModelFacts, TensorInfo
from ..errors import BuildError
from .discover import PluginManager


#: Skeleton builds run one at a time: the wrappers :func:`meta_init` installs are saved and
#: restored by one thread at a time.
_BUILD_LOCK = threading.RLock()
#: ``dtype``: the default dtype of the build running in this thread, if any.
_BUILDING = threading.local()
_torch_default_dtype = torch.get_default_dtype
_torch_set_default_dtype = torch.set_default_dtype
_SETTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: factories whose result is in the default dtype when no ``dtype`` is given ...
_FLOAT_FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.empty_strided,
                              torch.eye, torch.linspace, torch.logspace, torch.scalar_tensor})
#: ... and those whose result is in it only for Python floats (``torch.arange(0.0, 1.0)``).
_INFERRING_FACTORIES = frozenset({torch.tensor, torch.as_tensor, torch.asarray, torch.full, torch.arange})


def _get_default_dtype() -> torch.dtype:
    """``torch.get_default_dtype()``; in a thread building a skeleton, that build's own default."""
    dtype = getattr(_BUILDING, "dtype", None)
    return _torch_default_dtype() if dtype is None else dtype


def _set_default_dtype(dtype: torch.dtype) -> None:
    """``torch.set_default_dtype``; in a thread building a skeleton, it sets that build's own
    default (a model constructor that sets and restores it changes nothing for other threads)."""
    if getattr(_BUILDING, "dtype", None) is None or dtype not in _SETTABLE:
        return _torch_set_default_dtype(dtype)  # (refuses what torch refuses)
    _BUILDING.dtype = dtype


_tensor_new = torch.Tensor.__new__


def _legacy_new(*args, **kwargs):
    """``torch.Tensor(3)``, the legacy constructor (torch function modes do not see it): in a
    thread building a skeleton, in that build's default dtype.

    Its signature is the wildcard ``(*args, **kwargs)``: torch._dynamo, when it is first imported
    while a skeleton is built (``nn.init`` imports it), checks that whatever ``Tensor.__new__``
    is then has a signature compatible with its own stand-in, and accepts the wildcard."""
    cls, args = args[0], args[1:]
    t = _tensor_new(cls, *args, **kwargs)
    dtype = getattr(_BUILDING, "dtype", None)
    if (dtype is None or cls is not torch.Tensor or t.dtype == dtype or t.dtype != _torch_default_dtype()
            or any(isinstance(a, torch.Tensor) or hasattr(a, "__array__") for a in args)):
        return t
    return t.to(dtype)


class _DefaultDtype(TorchFunctionMode):
    """Gives factory calls without a ``dtype`` the building thread's default dtype, as
    ``torch.set_default_dtype`` would, but in this thread only (torch function modes are per
    thread; torch's default dtype is not)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        dtype = _BUILDING.dtype
        if func in _SIZED_FACTORIES and kwargs.get("device") is None and kwargs.get("out") is None:
            if _nbytes(args, kwargs, dtype) >= META_FACTORY_BYTES:
                kwargs["device"] = "meta"  # a parameter-sized tensor: never allocated (see below)
        if dtype == _torch_default_dtype() or kwargs.get("dtype") is not None or kwargs.get("out") is not None:
            return func(*args, **kwargs)
        if func in _FLOAT_FACTORIES:
            return func(*args, **{**kwargs, "dtype": dtype})
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor) or out.dtype != _torch_default_dtype():
            return out
        if func in _INFERRING_FACTORIES:
            if args and hasattr(args[0], "dtype"):  # a tensor or an array keeps its own dtype
                return out
            return func(*args, **{**kwargs, "dtype": dtype})
        return _promoted(func, args, kwargs, out, dtype)


#: factories taking a size first, which a model's ``__init__`` makes its parameters with ...
_SIZED_FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full,
                              torch.empty_strided})
#: ... made on the meta device from this many bytes. Parameters move to the meta device when they
#: are registered, but ``nn.Parameter(torch.empty(E, 2 * I, H))`` allocates first: DeepSeek-V3's
#: fused experts ask for 15-30 GB at once, which a machine with less memory refuses. Buffers
#: (which stay on the CPU with their computed values) are never this large.
META_FACTORY_BYTES = 1 << 30


def _nbytes(args, kwargs, default: torch.dtype) -> int:
    """Bytes of the tensor a sized factory call asks for (0 when its size cannot be read)."""
    size = kwargs.get("size", args[0] if len(args) == 1 or (args and not isinstance(args[0], int)) else args)
    if isinstance(size, int):
        size = (size,)
    try:
        count = math.prod(int(n) for n in size)
    except (TypeError, ValueError):
        return 0
    dtype = kwargs.get("dtype") or default
    return count * (dtype.itemsize if isinstance(dtype, torch.dtype) else 4)


#: tensor methods whose float32 result was asked for explicitly (``ids.float()``, ``.to(...)``).
_EXPLICIT = frozenset({"float", "double", "half", "bfloat16", "to", "type", "type_as", "view", "new_tensor",
                       "new_empty", "new_zeros", "new_ones", "new_full"})


def _promoted(func, args, kwargs, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An operation on integer tensors whose result is floating (``torch.log(ids)``,
    ``ids / 2``) gets the default dtype; under ``dtype`` as the default, torch would have cast the
    integer operands to ``dtype`` first: done so here. Results from floating inputs are untouched."""
    leaves = tree_flatten((args, kwargs))[0]
    if getattr(func, "__name__", "") in _EXPLICIT or any(
        isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()) for x in leaves
    ):
        return out

    def cast(x):
        return x.to(dtype) if isinstance(x, torch.Tensor) and x.dtype != torch.bool else x

    try:
        again = func(*tree_map(cast, args), **tree_map(cast, kwargs))
    except (RuntimeError, TypeError, ValueError):  # an integer operand that must stay one (an index)
        return out.to(dtype)
    return again if isinstance(again, torch.Tensor) and again.dtype == dtype else out.to(dtype)


@contextlib.contextmanager
def meta_init(dtype: torch.dtype | None = None):
    """Construct modules with parameters on the meta device and buffers on the CPU.

    Inside, tensors made without a ``dtype`` are made in ``dtype`` (when given) and
    ``torch.get_default_dtype()`` answers ``dtype``, so buffers that a model creates in the
    default dtype match what ``from_pretrained(dtype=...)`` would create. A parameter registered
    twice (``self.head.weight = self.embed.weight``) stays one meta parameter, so ties made in
    ``__init__`` survive.

    Only the calling thread is affected: torch's default dtype is never changed, and other
    threads constructing modules meanwhile get ordinary parameters in torch's default dtype.
    ``torch.set_default_dtype`` called by the model's constructor sets this build's default only.
    Builds in several threads take turns (a process-wide lock, re-entrant), so the wrappers
    installed meanwhile (``Module.register_parameter``, ``torch.get_default_dtype``,
    ``torch.set_default_dtype`` and the legacy ``torch.Tensor(...)`` constructor, each passing other
    threads' calls through) are always removed.
    """
    with _BUILD_LOCK:
        outer = torch.nn.Module.register_parameter
        base = getattr(outer, "_loaderkit_base", outer)  # the unpatched method, when nested
        outer_get, outer_set = torch.get_default_dtype, torch.set_default_dtype
        owner = threading.get_ident()
        moved: dict[int, torch.nn.Parameter] = {}
        keep = []  # keep originals alive so their ids stay unique while constructing

        def register_on_meta(module, name, param):
            base(module, name, param)
            if param is None or param.device.type == "meta":
                return  # a parameter registered again (tied) stays the same object
            if id(param) not in moved:
                kwargs = dict(module._parameters[name].__dict__)
                kwargs["requires_grad"] = param.requires_grad
                moved[id(param)] = type(param)(param.to("meta"), **kwargs)
            module._parameters[name] = moved[id(param)]

        def register_parameter(module, name, param):
            if threading.get_ident() != owner:
                return outer(module, name, param)  # another thread's module: untouched
            keep.append(param)
            return register_on_meta(module, name, param)

        register_parameter._loaderkit_base = base
        was = getattr(_BUILDING, "dtype", None)
        _BUILDING.dtype = dtype if dtype in _SETTABLE else _get_default_dtype()
        outer_new = torch.Tensor.__dict__.get("__new__")
        try:
            torch.nn.Module.register_parameter = register_parameter
            torch.get_default_dtype, torch.set_default_dtype = _get_default_dtype, _set_default_dtype
            torch.Tensor.__new__ = _legacy_new
            with _DefaultDtype():
                yield
        finally:
            torch.nn.Module.register_parameter = outer
            torch.get_default_dtype, torch.set_default_dtype = outer_get, outer_set
            if outer_new is None:
                del torch.Tensor.__new__
            else:
                torch.Tensor.__new__ = outer_new
            _BUILDING.dtype = was


@contextlib.contextmanager
def building_thread_only(context, namespace: Any = torch.nn.init):
    """Enter a model library's construction ``context`` so that what it replaces in ``namespace``
    applies to the building thread only.

    transformers' and diffusers' ``no_init_weights`` (which their ``from_pretrained`` uses, as
    loaderkit's builders do: parameters on the meta device need no initialising) replace
    ``torch.nn.init``'s functions for the whole process. Inside this wrapper every function the
    context replaced dispatches by thread: the building thread gets the library's, any other
    thread torch's own, so a module another thread constructs meanwhile is initialised as usual.
    (The library installs its replacements a moment before they are wrapped: for that moment,
    the entering and the wrapping run under a long GIL switch interval, so that no other thread
    runs between them unless one was already due. On exit torch's functions are put back before
    the library's exit puts back the same ones.)
    """
    before = dict(vars(namespace))
    with _no_thread_switch():
        context.__enter__()
        owner = threading.get_ident()
        patched = {n: v for n, v in vars(namespace).items() if n in before and before[n] is not v}
        for name, mine in patched.items():
            setattr(namespace, name, _per_thread(owner, mine, before[name]))

    def leave(*exc) -> bool:
        with _no_thread_switch():
            for name in patched:
                setattr(namespace, name, before[name])
            return bool(context.__exit__(*exc))

    try:
        yield
    except BaseException:
        if not leave(*sys.exc_info()):
            raise
    else:
        leave(None, None, None)


@contextlib.contextmanager
def _no_thread_switch():
    """A long GIL switch interval for a few statements (other threads wait unless already due)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


def _per_thread(owner: int, mine, theirs):
    @functools.wraps(theirs)
    def dispatch(*args, **kwargs):
        return (mine if threading.get_ident() == owner else theirs)(*args, **kwargs)

    return dispatch


def from_argument(model: Any, dtype: torch.dtype) -> torch.nn.Module:
    """Turn the ``model=`` argument (a module, a module class or a zero-arg factory) into a module."""
    if isinstance(model, torch.nn.Module):
        return model
    if callable(model):
        try:
            with meta_init(dtype):
                built = model()
        except Exception as exc:
            raise BuildError(
                f"model= factory {getattr(model, '__name__', model)!r} raised {type(exc).__name__}: {exc}; "
                "pass a zero-argument callable that returns a torch.nn.Module"
            ) from exc
        if not isinstance(built, torch.nn.Module):
            raise BuildError(
                f"model= factory returned {type(built).__name__}, not a torch.nn.Module"
            )
        return built
    raise BuildError(
        f"model= must be a torch.nn.Module, a module class or a zero-argument factory, "
        f"not {type(model).__name__}"
    )


#: A config's layer count may exceed the layers its checkpoint numbers (weights shared between
#: layers, ALBERT) by this factor plus :data:`LAYER_SLACK`; beyond that it cannot be the
#: checkpoint's config, and building its skeleton would cost time for nothing.
LAYER_FACTOR = 2
LAYER_SLACK = 256
_LAYER_FIELD = re.compile(r"(^|_)layers?$")
#: a dotted component of a key (keys joined by newlines) that is a number
_NUMBERED = re.compile(r"(?:^|\.)(\d+)(?=\.|$)", re.MULTILINE)


def check_layer_counts(checkpoint: CheckpointInfo) -> None:
    """Refuse a config whose layer counts (``num_hidden_layers``, ``n_layer``, ``num_layers``,
    ``encoder_layers`` ... in it or its sub-configs) are far more than its checkpoint's tensors
    number: ``num_hidden_layers=10000`` beside a 2-layer checkpoint fails here, in milliseconds,
    instead of after a 10,000-layer skeleton is built. Checked from headers and config alone."""
    fields = list(_layer_fields(checkpoint.config))
    if not fields:
        return
    numbered = 1 + max(map(int, set(_NUMBERED.findall("\n".join(checkpoint.tensors)))), default=-1)
    allowed = LAYER_FACTOR * numbered + LAYER_SLACK
    for name, value in fields:
        if value > allowed:
            raise BuildError(
                f"the config of {checkpoint.path} sets {name}={value}, but the tensor names of the checkpoint "
                f"number at most {numbered} layers: the config does not belong to these weights (refused "
                f"before building a {value}-layer model). Fix {name} in config.json, or pass model=",
                path=checkpoint.path,
            )


def _layer_fields(config: Any, prefix: str = "", depth: int = 0):
    """``(dotted name, value)`` of the integer fields named like a layer count, sub-configs included."""
    if not isinstance(config, dict) or depth > 8:
        return
    for key, value in config.items():
        if isinstance(value, dict):
            yield from _layer_fields(value, f"{prefix}{key}.", depth + 1)
        elif type(value) is int and _LAYER_FIELD.search(str(key)):
            yield f"{prefix}{key}", value


def build_skeleton(
    manager: PluginManager, checkpoint: CheckpointInfo, dtype: torch.dtype
) -> tuple[torch.nn.Module, str]:
    """Ask builder plugins, in priority order, for a skeleton. Returns ``(model, builder_name)``."""
    check_layer_counts(checkpoint)
    request = BuildRequest(checkpoint=checkpoint, dtype=dtype_name(dtype))
    for entry in manager.builders():
        if manager.call(entry, entry.obj.can_build, request):
            model = manager.call(entry, entry.obj.build, request, returns=torch.nn.Module)
            return model, entry.obj.name
    cfg = checkpoint.config
    what = "no config.json" if not cfg else (
        "a config.json no builder recognises"
        + (f" (architectures={cfg.get('architectures')}, model_type={cfg.get('model_type')!r},"
           f" _class_name={cfg.get('_class_name')!r})")
    )
    raise BuildError(
        f"cannot build a model for {checkpoint.path}: it has {what}. Pass the architecture "
        "yourself: loaderkit.load(path, model=MyNet) with a module, a module class or a "
        "zero-argument factory (install transformers or diffusers to build their models from config).",
        path=checkpoint.path,
    )


def skeleton(model: Any, manager: PluginManager, checkpoint: CheckpointInfo, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """The skeleton for ``model=`` (when given) or from the builders, and who made it.

    A class passed as ``model=`` is first offered to the builders (``Builder.build_class``): the
    first that builds it for this checkpoint (with a config it finds) makes the skeleton.
    """
    if isinstance(model, type) and issubclass(model, nn.Module):
        check_layer_counts(checkpoint)
        request = BuildRequest(checkpoint=checkpoint, dtype=dtype_name(dtype))
        for entry in manager.builders():
            built = manager.call(entry, entry.obj.build_class, request, model)
            if built is not None:
                if not isinstance(built, nn.Module):
                    raise BuildError(f"builder {entry.obj.name!r} built {type(built).__name__} for model="
                                     f"{model.__name__}, not a torch.nn.Module", plugin=entry.plugin)
                return built, f"{entry.obj.name} (model={model.__name__})"
    if model is not None:
        return from_argument(model, dtype), "model="
    return build_skeleton(manager, checkpoint, dtype)


def collect_facts(model: nn.Module, manager: PluginManager) -> ModelFacts:
    """Every plugin's :class:`ModelFacts` about ``model``, merged."""
    facts = ModelFacts()
    for plugin, f in manager.hook.loaderkit_model_facts(model=model, returns=ModelFacts):
        # a plugin's finalize steps run later, outside the hook: they still fail naming it
        f = f.replace(
            finalize=tuple(functools.partial(manager.invoke, plugin, fn) for fn in f.finalize),
            key_mapping=None if f.key_mapping is None else functools.partial(_key_mapping, manager, plugin, f.key_mapping),
            initialize=None if f.initialize is None else functools.partial(manager.invoke, plugin, f.initialize),
            tp_plan=None if f.tp_plan is None else functools.partial(manager.invoke, plugin, f.tp_plan),
        )
        facts = facts.merge(f)
    return facts


def _key_mapping(manager: PluginManager, plugin: str, fn, keys):
    """A plugin's key mapping, called through the manager, its ``run`` too (errors name it)."""
    from ..contract.records import KeyMap

    keymap = manager.invoke(plugin, fn, keys)
    if not isinstance(keymap, KeyMap):
        from ..errors import PluginError

        raise PluginError(f"plugin {plugin!r} returned {type(keymap).__name__} from its key mapping, not "
                          "loaderkit.plugin.KeyMap", plugin=plugin)
    if keymap.run is not None:
        keymap = keymap.replace(run=functools.partial(manager.invoke, plugin, keymap.run))
    return keymap


_EMBED = re.compile(r"(^|[._])(embed|embedding|embeddings|embed_tokens|wte|wpe|shared)$")


def infer_model(checkpoint: CheckpointInfo) -> nn.Module:
    """A meta-device model whose state dict is the checkpoint's, module kinds guessed from keys:
    a 2-D ``<m>.weight`` is a Linear (an Embedding when ``<m>`` is named like one), a 3/4/5-D one a
    Conv1d/2d/3d, anything else a plain tensor of a plain module (kept in high precision)."""
    q = checkpoint.quantization
    skip = q.companion_keys() if q else set()
    direct: dict[str, dict[str, TensorInfo]] = {}
    for key, info in checkpoint.tensors.items():
        if key not in skip:
            mod, _, local = key.rpartition(".")
            direct.setdefault(mod, {})[local] = info
    names = {""}
    for mod in direct:
        parts = mod.split(".") if mod else []
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    modules: dict[str, nn.Module] = {}
    for name in sorted(names, key=lambda n: (n.count(".") + bool(n), n)):
        module = _module_for(name, direct.get(name, {}))
        try:
            if name:
                parent, _, leaf = name.rpartition(".")
                modules[parent].add_module(leaf, module)
        except (KeyError, TypeError) as exc:
            raise BuildError(f"cannot infer an architecture for module {name!r} of {checkpoint.path}: "
                               f"{exc}; pass model=", path=checkpoint.path, module=name) from None
        modules[name] = module
    return modules[""]


def _module_for(name: str, tensors: dict[str, TensorInfo]) -> nn.Module:
    w, b = tensors.get("weight"), tensors.get("bias")
    meta = torch.device("meta")
    module: nn.Module = nn.Module()
    if w is not None and w.torch_dtype.is_floating_point:
        out = w.shape[0] if w.shape else 0
        bias = b is not None and b.shape == (out,)
        if len(w.shape) == 2 and _EMBED.search(name.rpartition(".")[2]):
            module = nn.Embedding(w.shape[0], w.shape[1], device=meta)
        elif len(w.shape) == 2:
            module = nn.Linear(w.shape[1], w.shape[0], bias=bias, device=meta)
        elif len(w.shape) in (3, 4, 5):
            conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(w.shape) - 3]
            module = conv(w.shape[1], out, kernel_size=tuple(w.shape[2:]), bias=bias, device=meta)
    for local, info in tensors.items():
        if module._parameters.get(local) is not None:
            continue
        t = torch.empty(info.shape, dtype=info.torch_dtype if not info.torch_dtype.is_floating_point
                        else torch.float32, device=meta)
        try:
            if t.is_floating_point():
                module.register_parameter(local, nn.Parameter(t, requires_grad=False))
            else:
                module.register_buffer(local, t)
        except (KeyError, TypeError) as exc:
            raise BuildError(f"cannot infer an architecture for tensor {info.name!r}: {exc}; pass model=",
                               tensor=info.name) from None
    return module
