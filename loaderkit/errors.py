"""The exceptions loaderkit raises. Every one derives from :class:`LoaderKitError`.

Each error carries the objects it is about (``path``, ``tensor``, ``module``, ``plugin``) as
attributes. Code deeper down raises with what it knows; callers fill in the rest with
:meth:`LoaderKitError.with_context`, and ``str(error)`` composes the message from both — the
one place where context is written into a message.
"""

from __future__ import annotations

from typing import Any


class LoaderKitError(Exception):
    """Base class of every error loaderkit raises.

    :param message: what went wrong and what to do about it.
    :param path: the checkpoint file or directory concerned, if any.
    :param tensor: the tensor name concerned, if any.
    :param module: the module name concerned, if any.
    :param plugin: the name of the plugin that caused it, if any.

    ``str(error)`` is the message prefixed with whichever of plugin, path and module it does not
    already name: ``plugin 'fp8': /ckpt: module 'blocks.0': ...``.
    """

    def __init__(
        self,
        message: str,
        *,
        path: object | None = None,
        tensor: str | None = None,
        module: str | None = None,
        plugin: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = str(message)
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.module = module
        self.plugin = plugin

    def with_context(
        self,
        *,
        path: object | None = None,
        tensor: str | None = None,
        module: str | None = None,
        plugin: str | None = None,
    ) -> "LoaderKitError":
        """Fill in the context this error did not know (what is already set is kept); returns it."""
        if self.path is None and path is not None:
            self.path = str(path)
        if self.tensor is None and tensor is not None:
            self.tensor = tensor
        if self.module is None and module is not None:
            self.module = module
        if self.plugin is None and plugin is not None:
            self.plugin = plugin
        return self

    def __str__(self) -> str:
        msg = self.message
        if self.module and f"'{self.module}'" not in msg and f"'{self.module}." not in msg:
            msg = f"module {self.module!r}: {msg}"
        if self.path is not None and self.path not in msg:
            msg = f"{self.path}: {msg}"
        if self.plugin is not None and f"{self.plugin!r}" not in msg:
            msg = f"plugin {self.plugin!r}: {msg}"
        return msg

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self.message, self.__dict__.copy()))


def _rebuild(cls: type, message: str, state: dict) -> LoaderKitError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class CheckpointError(LoaderKitError):
    """A checkpoint is missing, unreadable, corrupt, or of a kind no format plugin claims."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path given does not exist."""


class UnsupportedCheckpointError(CheckpointError):
    """No registered format plugin claims the checkpoint, or its layout is one loaderkit refuses."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file's header, index or tensor data is malformed."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need code execution or a read outside its directory; it is refused."""


class PluginError(LoaderKitError):
    """A plugin failed to load, contributed something invalid, or raised while working."""


class StrategyError(LoaderKitError):
    """An unknown strategy name, or options a strategy does not accept."""


class BuildError(LoaderKitError):
    """The model skeleton could not be built from the checkpoint or the ``model=`` argument."""


class PlanError(LoaderKitError):
    """The strategy, the checkpoint and the device cannot be reconciled; raised at plan time."""


class StateDictMismatchError(LoaderKitError):
    """The checkpoint's tensors and the model's parameters disagree (missing, unexpected, shape).

    :ivar missing: model keys the checkpoint lacks.
    :ivar unexpected: checkpoint keys the model does not have.
    :ivar mismatched: ``(key, checkpoint_shape, model_shape)`` triples.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] = (),
        unexpected: list[str] = (),
        mismatched: list[tuple[str, tuple, tuple]] = (),
        **kwargs,
    ) -> None:
        super().__init__(message, **kwargs)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class ConversionError(LoaderKitError):
    """A tensor cannot be converted as asked (quantized, decoded, cast): wrong dtype, shape,
    granularity, or values (inf/NaN) the conversion cannot represent."""


class CastRuleError(LoaderKitError):
    """A runtime cast rule cannot be attached to a module, or cannot run."""


class DtypeError(LoaderKitError, ValueError):
    """A name that is not a torch dtype, or a dtype used where it cannot be."""


class UsageError(LoaderKitError, ValueError):
    """An argument that loaderkit cannot use (command-line options, ``MODULE:ATTR`` specs)."""


class OffloadError(LoaderKitError):
    """Writing tensors to the offload folder failed (a full disk, a folder that went away)."""


class ConvertError(LoaderKitError):
    """A conversion cannot be done (bad destination, unsupported combination) or failed to write."""


class LoraError(LoaderKitError):
    """A LoRA file cannot be applied: unreadable, in no known format, with keys that match no module
    or shapes that do not fit, or asked to do what its mode cannot (remove a merged LoRA)."""


class VerifyError(LoaderKitError):
    """A model fails the dtype-consistency check; raised by ``verify(..., strict=True)``."""


__all__ = [
    "BuildError",
    "CastRuleError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConversionError",
    "ConvertError",
    "CorruptCheckpointError",
    "DtypeError",
    "LoaderKitError",
    "LoraError",
    "OffloadError",
    "PlanError",
    "PluginError",
    "StateDictMismatchError",
    "StrategyError",
    "UnsafeCheckpointError",
    "UnsupportedCheckpointError",
    "UsageError",
    "VerifyError",
]
