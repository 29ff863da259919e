"""Stage 2, inspect: find the format plugin that claims a path, read the config beside it, and let
the schemes recognise its quantization — headers only."""

from __future__ import annotations

import os
from pathlib import Path

from ..contract.io import contained, read_json
from ..contract.records import CheckpointInfo, QuantizationInfo, freeze
from ..errors import CheckpointNotFoundError, LoaderKitError, UnsupportedCheckpointError
from .discover import PluginManager


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
    info = manager.call(entry, entry.obj.describe, p, returns=CheckpointInfo)
    if info.config is None:
        cfg = Path(info.root) / "config.json"
        if cfg.is_file():
            contained(Path(info.root), cfg, "config")
            config = read_json(cfg, "config")
            if isinstance(config, dict):
                info = info.model_copy(update={"config": freeze(config)})
    for scheme in manager.schemes():
        try:
            q = manager.call(scheme, scheme.obj.detect, info, returns=(QuantizationInfo, type(None)))
        except LoaderKitError as exc:
            raise exc.with_context(path=info.path, plugin=scheme.plugin)
        if q is not None:
            return info.model_copy(update={"quantization": q})
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
