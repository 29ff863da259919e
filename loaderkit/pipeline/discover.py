"""Stage 1, discover: plugin discovery and the registries of formats, schemes, strategies, builders.

Built-in plugins are plain modules registered by name, through the same door as third-party
plugins, which come from the ``loaderkit`` entry-point group or :func:`loaderkit.register`.
Nothing is imported or registered when ``loaderkit`` is imported: the default manager is made on
first use.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable, Iterable, Iterator

import pluggy

from ..contract import hookspecs
from ..contract.assembly import Assembler
from ..contract.bases import Builder, Format, Scheme, Strategy
from ..contract.lora import LoraFormat
from ..contract.env import env_flag
from ..errors import LoaderKitError, PluginError, StrategyError

ENTRY_POINT_GROUP = "loaderkit"
DISABLE_AUTOLOAD_ENV = "LOADERKIT_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "LOADERKIT_BLOCK_PLUGINS"

#: Built-in plugins: name -> module. Registered like any other plugin.
BUILTIN_PLUGINS: dict[str, str] = {
    "devices": "loaderkit.plugins.devices",
    "safetensors": "loaderkit.plugins.safetensors_format",
    "sharded": "loaderkit.plugins.sharded",
    "torchzip": "loaderkit.plugins.torchzip",
    "uniform": "loaderkit.plugins.uniform",
    "auto": "loaderkit.plugins.auto",
    "fp8-formats": "loaderkit.plugins.fp8_formats",
    "fp8": "loaderkit.plugins.fp8",
    "int8": "loaderkit.plugins.int8",
    "transformers": "loaderkit.plugins.transformers_builder",
    "diffusers": "loaderkit.plugins.diffusers_builder",
    "diffusers-single-file": "loaderkit.plugins.diffusers_single_file",
    "diffusers-pipelines": "loaderkit.plugins.diffusers_pipeline",
    "lora-formats": "loaderkit.plugins.lora_formats",
}

_KINDS = {
    "formats": "loaderkit_register_formats",
    "schemes": "loaderkit_register_schemes",
    "strategies": "loaderkit_register_strategies",
    "builders": "loaderkit_register_builders",
    "assemblers": "loaderkit_register_assemblers",
    "lora_formats": "loaderkit_register_lora_formats",
}


@dataclass(frozen=True)
class Entry:
    """A registered format, scheme, strategy or builder, with the plugin that contributed it."""

    obj: Any
    plugin: str
    kind: str = ""

    @property
    def name(self) -> str:
        return self.obj.name

    def label(self) -> str:
        """``"strategy 'fp8' of plugin 'fp8'"`` (what error messages call it)."""
        kind = {"strategies": "strategy"}.get(self.kind, self.kind[:-1]) or "object"
        return f"{kind} {self.name!r} of plugin {self.plugin!r}"


@dataclass(frozen=True)
class Layout:
    """A registered fp8 on-disk layout: the :class:`~loaderkit.plugin.Encoder` a scheme returned,
    and the scheme's entry (which reads the layout back)."""

    encoder: Any
    scheme: Entry

    @property
    def name(self) -> str:
        return self.encoder.name


@dataclass
class PluginRecord:
    """How a plugin came to be registered (shown by ``loaderkit plugins``)."""

    name: str
    source: str  # "built-in", "entry point", "runtime"
    version: str
    module: str
    provides: dict[str, list[str]] = field(default_factory=dict)


#: the hook specifications by name: calling a hook that is not here fails at once.
HOOK_NAMES = frozenset(n for n in dir(hookspecs) if n.startswith("loaderkit_"))


class Hooks:
    """``manager.hook.<name>(**kwargs)``: call every implementation of a hook, each through the
    manager (so a failing plugin is named), and return the non-None results as
    ``[(plugin, result), ...]``. ``returns=T`` checks each result is a ``T``. A misspelt hook
    name is an :class:`AttributeError` at once, not a hook that silently never runs."""

    def __init__(self, manager: "PluginManager") -> None:
        self._manager = manager

    def __getattr__(self, name: str) -> Callable[..., list[tuple[str, Any]]]:
        if name not in HOOK_NAMES:
            raise AttributeError(f"loaderkit has no hook {name!r}; hooks: {', '.join(sorted(HOOK_NAMES))}")
        manager = self._manager

        def call(*, returns: type | tuple[type, ...] | None = None, **kwargs: Any) -> list[tuple[str, Any]]:
            return manager._call_hook(name, returns, kwargs)

        call.__name__ = name
        return call


class PluginManager:
    """Owns a :class:`pluggy.PluginManager` and the registries built from its plugins.

    :param autoload: load plugins from the ``loaderkit`` entry-point group (default: yes unless
        ``LOADERKIT_DISABLE_PLUGIN_AUTOLOAD`` is set).
    :param block: plugin names never to register (adds to ``LOADERKIT_BLOCK_PLUGINS``,
        a comma-separated list). Built-ins can be blocked too.
    :param builtins: register the built-in plugins (default: yes).
    """

    def __init__(
        self, *, autoload: bool | None = None, block: Iterable[str] = (), builtins: bool = True
    ) -> None:
        self.pm = pluggy.PluginManager("loaderkit")
        self.pm.add_hookspecs(hookspecs)
        self.hook = Hooks(self)
        self.records: dict[str, PluginRecord] = {}
        self._registries: dict[str, list[Entry]] | None = None
        self._lock = threading.RLock()
        env_block = [b.strip() for b in os.environ.get(BLOCK_ENV, "").split(",") if b.strip()]
        for name in (*env_block, *block):
            self.pm.set_blocked(name)
        if builtins:
            self._load_builtins()
        if autoload if autoload is not None else not env_flag(DISABLE_AUTOLOAD_ENV, False):
            self._load_entry_points()
        self.check_pending()

    # -- discovery ----------------------------------------------------------------------------

    def _load_builtins(self) -> None:
        from ..version import __version__

        for name, modname in BUILTIN_PLUGINS.items():
            if self.pm.is_blocked(name):
                continue  # blocked by the user: skipped, not an error
            try:
                module = importlib.import_module(modname)
            except Exception as exc:  # a broken install, reported with the plugin's name
                raise PluginError(
                    f"built-in plugin {name!r} ({modname}) failed to import: {type(exc).__name__}: {exc}",
                    plugin=name,
                ) from exc
            self._register(module, name, "built-in", __version__)

    def _load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self.pm.is_blocked(ep.name) or self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {ep.name!r} (entry point {ep.value!r} in group {ENTRY_POINT_GROUP!r}) "
                    f"failed to import: {type(exc).__name__}: {exc}. Uninstall it, or block it with "
                    f"{BLOCK_ENV}={ep.name}",
                    plugin=ep.name,
                ) from exc
            version = ep.dist.version if ep.dist is not None else "unknown"
            self._register(plugin, ep.name, "entry point", version)

    def _register(self, plugin: Any, name: str, source: str, version: str) -> str:
        with self._lock:
            if name in self.records:
                raise PluginError(
                    f"a plugin named {name!r} is already registered (from {self.records[name].module}); "
                    f"cannot register {_describe(plugin)} under the same name",
                    plugin=name,
                )
            try:
                registered = self.pm.register(plugin, name=name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"plugin {name!r} is invalid: {exc}", plugin=name) from exc
            except ValueError as exc:
                raise PluginError(f"cannot register plugin {name!r}: {exc}", plugin=name) from exc
            if registered is None:
                raise PluginError(
                    f"plugin {name!r} is blocked ({BLOCK_ENV} or PluginManager(block=...)); "
                    "unblock it to register it",
                    plugin=name,
                )
            wrappers = [
                h.name
                for h in self.pm.get_hookcallers(plugin) or []
                for impl in h.get_hookimpls()
                if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper)
            ]
            if wrappers:
                self.pm.unregister(plugin)
                raise PluginError(
                    f"plugin {name!r} implements {', '.join(wrappers)} as a hook wrapper; loaderkit calls "
                    "each implementation itself (to name the plugin that fails), so wrappers are not "
                    "supported: use a plain @hookimpl",
                    plugin=name,
                )
            self.records[name] = PluginRecord(name, source, version, _describe(plugin))
            self._registries = None
            return name

    def register(self, plugin: Any, name: str | None = None) -> str:
        """Register ``plugin`` (a module or object with ``loaderkit_*`` hook implementations)."""
        name = name or getattr(plugin, "__name__", None) or f"plugin-{id(plugin):x}"
        version = str(getattr(plugin, "__version__", "unknown"))
        self._register(plugin, name, "runtime", version)
        try:
            self.check_pending()
            self.registries()
        except LoaderKitError:
            self.unregister(name)
            raise
        return name

    def unregister(self, plugin: Any) -> None:
        """Unregister a plugin given by name or object. Unknown plugins are an error."""
        with self._lock:
            name = plugin if isinstance(plugin, str) else self.pm.get_name(plugin)
            if name is None or self.pm.get_plugin(name) is None:
                raise PluginError(f"no plugin {plugin!r} is registered", plugin=str(plugin))
            self.pm.unregister(name=name)
            self.records.pop(name, None)
            self._registries = None

    def check_pending(self) -> None:
        """Fail if any plugin implements a ``loaderkit_`` hook that does not exist."""
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self.pm.get_name(exc.plugin) or _describe(exc.plugin)
            raise PluginError(f"plugin {name!r}: {exc}", plugin=name) from exc

    # -- registries ---------------------------------------------------------------------------

    def registries(self) -> dict[str, list[Entry]]:
        with self._lock:
            if self._registries is None:
                self._registries = self._collect()
            return self._registries

    def _collect(self) -> dict[str, list[Entry]]:
        bases = {"formats": Format, "schemes": Scheme, "strategies": Strategy, "builders": Builder,
                 "assemblers": Assembler, "lora_formats": LoraFormat}
        out: dict[str, list[Entry]] = {}
        for rec in self.records.values():
            rec.provides = {}
        for kind, hookname in _KINDS.items():
            seen: dict[str, Entry] = {}
            for impl in reversed(getattr(self.pm.hook, hookname).get_hookimpls()):
                plugin = impl.plugin_name

                def register(obj: Any, _kind=kind, _plugin=plugin) -> None:
                    _check_contribution(obj, bases[_kind], _kind, _plugin)
                    if obj.name in seen:
                        raise PluginError(
                            f"duplicate {_kind[:-1].replace('_', ' ') if _kind != 'strategies' else 'strategy'} name "
                            f"{obj.name!r}: registered by plugin {seen[obj.name].plugin!r} and by "
                            f"plugin {_plugin!r}; block one of them ({BLOCK_ENV}=<name>)",
                            plugin=_plugin,
                        )
                    seen[obj.name] = Entry(obj, _plugin, _kind)
                    if _plugin in self.records:
                        self.records[_plugin].provides.setdefault(_kind, []).append(obj.name)

                self.invoke(plugin, impl.function, register=register)
            entries = list(seen.values())
            entries.sort(key=lambda e: -getattr(e.obj, "priority", 0))
            out[kind] = entries
        for rec in self.records.values():
            hooks = [
                h.name
                for h in self.pm.get_hookcallers(self.pm.get_plugin(rec.name)) or []
                if h.name not in _KINDS.values()
            ]
            if hooks:
                rec.provides["hooks"] = hooks
        return out

    def formats(self) -> list[Entry]:
        return self.registries()["formats"]

    def schemes(self) -> list[Entry]:
        return self.registries()["schemes"]

    def strategies(self) -> list[Entry]:
        return self.registries()["strategies"]

    def builders(self) -> list[Entry]:
        return self.registries()["builders"]

    def assemblers(self) -> list[Entry]:
        return self.registries()["assemblers"]
    def lora_formats(self) -> list[Entry]:
        return self.registries()["lora_formats"]

    def get(self, kind: str, name: str) -> Entry | None:
        for e in self.registries()[kind]:
            if e.name == name:
                return e
        return None

    def strategy_entry(self, name: str) -> Entry:
        """The registered strategy ``name``; an unknown name is a :class:`StrategyError` listing them."""
        entry = self.get("strategies", name)
        if entry is None:
            names = ", ".join(e.name for e in self.strategies()) or "none"
            raise StrategyError(f"unknown strategy {name!r}; registered strategies: {names}")
        return entry

    def layouts(self) -> list[Layout]:
        """Every registered scheme's layout (:meth:`loaderkit.plugin.Scheme.encoder`), in scheme
        priority order."""
        from ..contract.bases import Encoder

        out = []
        for entry in self.schemes():
            enc = self.call(entry, entry.obj.encoder, returns=(Encoder, type(None)))
            if enc is not None:
                out.append(Layout(enc, entry))
        return out

    def layout(self, name: str) -> Layout:
        """The layout ``name``; an unknown name is a :class:`~loaderkit.errors.ConvertError`."""
        found = self.layouts()
        for lay in found:
            if lay.name == name:
                return lay
        from ..errors import ConvertError

        raise ConvertError(f"no fp8 layout named {name!r} is registered (layouts: "
                           f"{', '.join(lay.name for lay in found) or 'none'})")

    def strategy_classes(self) -> dict[str, type]:
        """Registered strategy classes by name (what :class:`loaderkit.plugin.BuildContext` holds)."""
        return {e.name: e.obj for e in self.strategies()}

    # -- calling plugin code ------------------------------------------------------------------

    def invoke(self, plugin: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Call plugin code; any exception becomes an error naming ``plugin``."""
        try:
            return fn(*args, **kwargs)
        except LoaderKitError as exc:
            raise exc.with_context(plugin=plugin)
        except (Exception, SystemExit) as exc:  # a plugin cannot end the process (SystemExit(0) in a hook)
            raise PluginError(
                f"plugin {plugin!r} raised {type(exc).__name__} in {getattr(fn, '__qualname__', fn)}: {exc}",
                plugin=plugin,
            ) from exc

    def call(
        self,
        entry: Entry,
        fn: Callable,
        *args: Any,
        returns: type | tuple[type, ...] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Call a registered object's method; any exception becomes an error naming the plugin.

        :param returns: the type (or types) the result must have; anything else is a
            :class:`PluginError` naming the plugin, the method and what it returned.
        """
        result = self.invoke(entry.plugin, fn, *args, **kwargs)
        if returns is not None:
            _check_returns(entry.plugin, fn, result, returns, entry.label() if entry.kind else None)
        return result

    def _call_hook(self, name: str, returns, kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
        caller = getattr(self.pm.hook, name)
        first = bool(caller.spec and caller.spec.opts.get("firstresult"))
        results = []
        for impl in reversed(caller.get_hookimpls()):
            args = {k: kwargs[k] for k in impl.argnames}
            res = self.invoke(impl.plugin_name, impl.function, **args)
            if res is not None:
                if returns is not None:
                    _check_returns(impl.plugin_name, impl.function, res, returns)
                results.append((impl.plugin_name, res))
                if first:
                    break
        return results


def _check_returns(
    plugin: str, fn: Callable, result: Any, returns: type | tuple[type, ...], who: str | None = None
) -> None:
    if isinstance(result, returns):
        return
    kinds = [t for t in (returns if isinstance(returns, tuple) else (returns,)) if t is not type(None)]
    want = " or ".join(
        f"loaderkit.plugin.{t.__name__}" if t.__module__.startswith("loaderkit") else f"{t.__module__}.{t.__qualname__}"
        for t in kinds
    ) + (" or None" if len(kinds) < (len(returns) if isinstance(returns, tuple) else 1) else "")
    raise PluginError(
        f"{who or f'plugin {plugin!r}'} returned {type(result).__name__} from "
        f"{getattr(fn, '__qualname__', fn)}, not {want}",
        plugin=plugin,
    )


def _describe(plugin: Any) -> str:
    mod = getattr(plugin, "__name__", None)
    if mod:
        return mod
    return f"{type(plugin).__module__}.{type(plugin).__qualname__}"


def _check_contribution(obj: Any, base: type, kind: str, plugin: str) -> None:
    is_class = kind == "strategies"
    ok = (isinstance(obj, type) and issubclass(obj, base)) if is_class else isinstance(obj, base)
    if not ok:
        want = (f"a subclass of loaderkit.plugin.{base.__name__}" if is_class
                else f"an instance of loaderkit.plugin.{base.__name__}")
        raise PluginError(
            f"plugin {plugin!r} registered {obj!r} as one of its {kind}, but it must be {want}",
            plugin=plugin,
        )
    name = getattr(obj, "name", "")
    if not isinstance(name, str) or not name:
        raise PluginError(f"plugin {plugin!r} registered a {base.__name__} with no name", plugin=plugin)


_default: PluginManager | None = None
_default_lock = threading.Lock()


def get_manager() -> PluginManager:
    """The process-wide plugin manager, made on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = PluginManager()
        return _default


def reset_manager() -> None:
    """Forget the process-wide manager; the next use rediscovers plugins (re-reads the env vars)."""
    global _default
    with _default_lock:
        _default = None


@contextlib.contextmanager
def use_manager(manager: PluginManager | None) -> Iterator[PluginManager | None]:
    """Make ``manager`` the process-wide manager inside the block (``None``: a fresh one is
    discovered on first use), and restore the previous one after. For tests and hosts."""
    global _default
    with _default_lock:
        saved, _default = _default, manager
    try:
        yield manager
    finally:
        with _default_lock:
            _default = saved


def register(plugin: Any, name: str | None = None) -> str:
    """Register a plugin at runtime with the process-wide manager; returns its name."""
    return get_manager().register(plugin, name)


def unregister(plugin: Any) -> None:
    """Unregister a runtime (or any) plugin, by name or object."""
    get_manager().unregister(plugin)
