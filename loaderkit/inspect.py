"""Stage 1: find the format plugin that claims a path and describe the checkpoint (headers only)."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import CheckpointInfo, QuantizationInfo, read_json
from .errors import (
    CheckpointNotFoundError,
    LoaderKitError,
    PluginError,
    UnsupportedCheckpointError,
    name_checkpoint,
)
from .manager import PluginManager


def describe(path: str | os.PathLike, manager: PluginManager, format: str | None = None) -> CheckpointInfo:
    """Describe the checkpoint at ``path``: claim it with a format, read its config, detect its scheme.

    :param format: force a format plugin by name instead of asking each in turn.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointNotFoundError(
            f"checkpoint {p} does not exist; pass a safetensors file, a torch .bin/.pt/.pth file, "
            "an index .json, or a directory holding one",
            path=p,
        )
    p = p.absolute()
    entry = _claim(p, manager, format)
    info = manager.call(entry, entry.obj.describe, p)
    if not isinstance(info, CheckpointInfo):
        raise PluginError(
            f"format {entry.name!r} of plugin {entry.plugin!r} described {p} as "
            f"{type(info).__name__}, not a loaderkit.CheckpointInfo",
            plugin=entry.plugin,
        )
    if info.config is None:
        cfg = Path(info.root) / "config.json"
        if cfg.is_file():
            config = read_json(cfg, "config")
            if isinstance(config, dict):
                info = info.model_copy(update={"config": config})
    for scheme in manager.schemes():
        try:
            q = manager.call(scheme, scheme.obj.detect, info)
        except LoaderKitError as exc:
            raise name_checkpoint(exc, info.path, scheme.plugin)
        if q is None:
            continue
        if not isinstance(q, QuantizationInfo):
            raise PluginError(
                f"scheme {scheme.name!r} of plugin {scheme.plugin!r} returned {type(q).__name__}, "
                "not a loaderkit.QuantizationInfo",
                plugin=scheme.plugin,
            )
        info = info.model_copy(update={"quantization": q})
        break
    return info


def _claim(p: Path, manager: PluginManager, format: str | None):
    formats = manager.formats()
    if format is not None:
        entry = manager.get("formats", format)
        if entry is None:
            names = ", ".join(e.name for e in formats) or "none"
            raise UnsupportedCheckpointError(
                f"no format named {format!r} is registered (registered: {names})", path=p
            )
        return entry
    for entry in formats:
        if manager.call(entry, entry.obj.claim, p):
            return entry
    names = ", ".join(e.name for e in formats) or "none"
    hint = (
        "a directory must hold model.safetensors, diffusion_pytorch_model.safetensors, a "
        "*.safetensors.index.json or pytorch_model.bin"
        if p.is_dir()
        else "supported files are .safetensors, *.index.json and torch .bin/.pt/.pth"
    )
    raise UnsupportedCheckpointError(
        f"no format plugin claims {p} (formats tried: {names}); {hint}", path=p
    )
