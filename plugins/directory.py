"""The one directory resolver of the built-in formats: which checkpoint a directory holds.

``safetensors``, ``sharded`` and ``torchzip`` each claim a directory exactly when
:func:`pick_in_directory` names them, and describe the file it picked, so a directory is never
claimed by two formats or described from a different file than the one that won.
"""

from __future__ import annotations

import re
from pathlib import Path

from loaderkit.errors import UnsupportedCheckpointError
from loaderkit.plugin import contained

INDEX_RE = re.compile(r"^(?P<stem>.+)\.(?P<kind>safetensors|bin)\.index(?:\.(?P<variant>[^.]+))?\.json$")
_SINGLE_RE = re.compile(
    r"^(?P<stem>model|diffusion_pytorch_model|pytorch_model)(?:\.(?P<variant>[^.]+))?\.(?P<kind>safetensors|bin)$"
)
_SHARD_RE = re.compile(r"-\d+-of-\d+$")
_SINGLE_STEMS = {"safetensors": ("model", "diffusion_pytorch_model"), "bin": ("pytorch_model", "diffusion_pytorch_model")}
_STEM_RANK = {"model": 0, "pytorch_model": 0, "diffusion_pytorch_model": 1}


def _candidate(name: str) -> tuple[tuple, str] | None:
    """Rank a file name found in a checkpoint directory; lower ranks win. ``None``: not a candidate.

    Order: safetensors before bin; within a kind, plain before variant; at the same variant level
    an index before a single file; transformers names before diffusers names, then by name.
    """
    m = INDEX_RE.match(name)
    if m:
        kind, variant, stem = m["kind"], m["variant"], m["stem"]
        fmt = "sharded"
        shape_rank = 0
    else:
        m = _SINGLE_RE.match(name)
        if not m or m["stem"] not in _SINGLE_STEMS[m["kind"]]:
            return None
        kind, variant, stem = m["kind"], m["variant"], m["stem"]
        if variant and _SHARD_RE.search(variant):
            return None
        fmt = "safetensors" if kind == "safetensors" else "torchzip"
        shape_rank = 1
    rank = (kind != "safetensors", variant is not None, shape_rank, _STEM_RANK.get(stem, 2), name)
    return rank, fmt


def pick_in_directory(directory: Path) -> tuple[str, Path] | None:
    """Choose the checkpoint a directory holds: ``(format name, file)``, or ``None``.

    Deterministic: a plain (non-variant) checkpoint beats a variant (``model.fp16.safetensors``,
    ``model.safetensors.index.fp16.json``); an index beats a single file of the same variant;
    safetensors beats torch ``.bin``.
    """
    best: tuple[tuple, str, Path] | None = None
    try:
        children = list(directory.iterdir())
    except OSError:
        return None
    for child in children:
        ranked = _candidate(child.name)
        if ranked is None or not child.is_file():
            continue
        if best is None or ranked[0] < best[0]:
            best = (ranked[0], ranked[1], child)
    return None if best is None else (best[1], best[2])


#: what each format needs a directory to hold, for the error when it does not.
WANTS = {
    "safetensors": "a single-file safetensors checkpoint (model.safetensors, diffusion_pytorch_model."
    "safetensors or a variant such as model.fp16.safetensors)",
    "sharded": "a *.index.json",
    "torchzip": "a single torch checkpoint (pytorch_model.bin)",
}


def claims_directory(path: Path, fmt: str) -> bool:
    """True when ``path`` is a directory whose preferred checkpoint is of format ``fmt``."""
    picked = pick_in_directory(path)
    return picked is not None and picked[0] == fmt


def checkpoint_file(path: Path, fmt: str) -> Path:
    """The file a format describes for ``path``: the path itself, or the file a directory holds
    (which must stay inside it: the containment rule of :func:`loaderkit.plugin.contained`)."""
    if not path.is_dir():
        return path
    picked = pick_in_directory(path)
    if picked is None or picked[0] != fmt:
        raise UnsupportedCheckpointError(f"directory {path} holds no {WANTS[fmt]}", path=path)
    return contained(path, picked[1], "checkpoint file")


def output_names(checkpoint, count: int) -> tuple[tuple[str, ...], str | None]:
    """File names for a safetensors copy of ``checkpoint`` in ``count`` shards, named the way
    its own files are: ``diffusion_pytorch_model*`` for a diffusers checkpoint, else ``model*``
    (what transformers reads; ``pytorch_model.bin`` becomes ``model.safetensors``)."""
    from loaderkit.plugin import shard_names

    diffusers = any(Path(f).name.startswith("diffusion_pytorch_model") for f in checkpoint.files)
    return shard_names("diffusion_pytorch_model" if diffusers else "model", count)
