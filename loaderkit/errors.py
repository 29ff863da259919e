"""The exceptions loaderkit raises. Every one derives from :class:`LoaderKitError`.

Each error carries the objects it is about (``path``, ``tensor``, ``module``, ``plugin``) as
attributes, and its message names them and says what to do.
"""

from __future__ import annotations


class LoaderKitError(Exception):
    """Base class of every error loaderkit raises.

    :param message: what went wrong and what to do about it.
    :param path: the checkpoint file or directory concerned, if any.
    :param tensor: the tensor name concerned, if any.
    :param module: the module name concerned, if any.
    :param plugin: the name of the plugin that caused it, if any.
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
        self.path = None if path is None else str(path)
        self.tensor = tensor
        self.module = module
        self.plugin = plugin


def name_checkpoint(exc: LoaderKitError, path: object, plugin: str | None = None) -> LoaderKitError:
    """Fill in the checkpoint (and plugin) an error raised deeper down did not know about."""
    if exc.path is None:
        exc.path = str(path)
        if exc.args and isinstance(exc.args[0], str) and str(path) not in exc.args[0]:
            exc.args = (f"{path}: {exc.args[0]}", *exc.args[1:])
    if exc.plugin is None and plugin is not None:
        exc.plugin = plugin
    return exc


class CheckpointError(LoaderKitError):
    """A checkpoint is missing, unreadable, corrupt, or of a kind no format plugin claims."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path given does not exist."""


class UnsupportedCheckpointError(CheckpointError):
    """No registered format plugin claims the checkpoint."""


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


class ConvertError(LoaderKitError):
    """A conversion cannot be done (bad destination, unsupported combination) or failed to write."""


class VerifyError(LoaderKitError):
    """A model fails the dtype-consistency check; raised by ``verify(..., strict=True)``."""


__all__ = [
    "BuildError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConvertError",
    "CorruptCheckpointError",
    "LoaderKitError",
    "PlanError",
    "PluginError",
    "StateDictMismatchError",
    "StrategyError",
    "UnsafeCheckpointError",
    "UnsupportedCheckpointError",
    "VerifyError",
]
