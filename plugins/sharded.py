"""Built-in format ``sharded``: an index JSON and the shard files its ``weight_map`` names.

Claims an index given directly (``model.safetensors.index.json``, the variant
``model.safetensors.index.fp16.json``, diffusers' ``diffusion_pytorch_model.safetensors.index.json``,
the legacy ``pytorch_model.bin.index.json``) or a directory whose preferred checkpoint is one.

The index is authoritative: every tensor it lists must be in the shard it names; tensors a shard
holds but the index does not list are skipped. A tensor name present in two shards is an error.
Shard names come from a file and are untrusted: absolute paths, ``..`` components and symlinks
that resolve outside the checkpoint directory are refused before anything is opened, and checked
again when each shard is opened for streaming (the one exception is the Hugging Face cache layout,
where ``snapshots/<rev>/`` files link into the same repository's ``blobs/``). Every shard's header
is validated strictly; ``.bin`` shards are read by the ``torchzip`` logic (weights only,
memory-mapped).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PureWindowsPath
from typing import Callable

import torch

from loaderkit.plugin import escapes, CheckpointInfo, Format, hookimpl, TensorInfo
from loaderkit.errors import (
    CheckpointError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
)

from . import torchzip
from ._st_header import MAX_HEADER_BYTES, gc_paused, loads_strict, read_header
from .directory import INDEX_RE, checkpoint_file, claims_directory, output_names
from .safetensors_format import ClosingReader, SafetensorsReader

_FIX = "the index is corrupt; download or save the checkpoint again"


def read_index(index: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Parse an index file into ``(weight_map, metadata)``; metadata values are stringified.

    :raises CorruptCheckpointError: naming the index file, for malformed JSON, a missing or
        non-string ``weight_map``, or duplicate keys.
    """
    try:
        with open(index, "rb") as f:
            raw = f.read(MAX_HEADER_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"cannot read index {index}: {exc}", path=index) from exc
    if len(raw) > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(f"index {index} is larger than {MAX_HEADER_BYTES} bytes; {_FIX}", path=index)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptCheckpointError(f"index {index} is not UTF-8 ({exc}); {_FIX}", path=index) from None
    obj = loads_strict(text, index, "index")
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise CorruptCheckpointError(
            f"index {index} has no 'weight_map' object (tensor name -> shard file); {_FIX}", path=index
        )
    weight_map = obj["weight_map"]
    if not weight_map:
        raise CorruptCheckpointError(f"index {index} has an empty 'weight_map'; {_FIX}", path=index)
    for k, v in weight_map.items():
        if not isinstance(v, str) or not v:
            raise CorruptCheckpointError(
                f"index {index} maps tensor {k!r} to {v!r}, not a shard file name; {_FIX}",
                path=index,
                tensor=k,
            )
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise CorruptCheckpointError(
            f"index {index} has 'metadata' of type {type(meta).__name__}, not an object; {_FIX}", path=index
        )
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in (meta or {}).items()}
    return weight_map, metadata


def shard_path(root: Path, name: str, index: Path) -> Path:
    """Resolve an untrusted shard name against ``root``; refuse anything that escapes it.

    :raises UnsafeCheckpointError: absolute names, ``..`` components, links leading outside.
    :raises CheckpointError: the shard does not exist.
    """
    unsafe = None
    parts = re.split(r"[\\/]", name)
    if "\x00" in name or os.path.isabs(name) or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        unsafe = "is an absolute path"
    elif ".." in parts:
        unsafe = "has a '..' component"
    else:
        real = escapes(root, root / name)
        if real is not None:
            unsafe = f"resolves (through a symbolic link) to {real}, outside {root.resolve()}"
    if unsafe:
        raise UnsafeCheckpointError(
            f"index {index} names shard {name!r}, which {unsafe}; shards must be files inside the "
            "checkpoint directory, so it was not opened. Fix the index's weight_map",
            path=index,
        )
    path = root / name
    if not path.is_file():
        raise CheckpointError(
            f"shard {name!r} named by index {index} is missing from {root}; download the complete "
            "checkpoint",
            path=path,
        )
    return path


def _describe_shard(path: Path, name: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    lower = name.lower()
    if lower.endswith(".safetensors"):
        header = read_header(path)
        return header.tensor_infos(name), header.metadata
    if lower.endswith(torchzip.SUFFIXES):
        loaded = torchzip.load_file(path, keep=False)
        return torchzip.tensor_infos(loaded.tensors, name), loaded.metadata
    raise UnsupportedCheckpointError(
        f"shard {name!r} of {path.parent} is neither .safetensors nor a torch .bin/.pt/.pth file",
        path=path,
    )


def _collect(
    index: Path, root: Path, weight_map: dict[str, str]
) -> tuple[tuple[str, ...], dict[str, TensorInfo], dict[str, str]]:
    """Describe every shard the index names; cross-check the index against the shards."""
    shards = tuple(sorted(set(weight_map.values())))
    paths = {s: shard_path(root, s, index) for s in shards}  # all checked before any is opened
    owner: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    listed: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        listed.setdefault(shard, set()).add(name)
    for shard in shards:
        infos, meta = _describe_shard(paths[shard], shard)
        for k, v in meta.items():
            metadata.setdefault(k, v)
        if infos.keys() == listed[shard] and owner.keys().isdisjoint(infos):  # the usual shard, as listed
            owner.update(dict.fromkeys(infos, shard))
            tensors.update(infos)
            continue
        for name, info in infos.items():
            if name in owner:
                raise CorruptCheckpointError(
                    f"tensor {name!r} is stored in two shards of {root}: {owner[name]!r} and {shard!r}; "
                    "a reader could load either. Remove one or save the checkpoint again",
                    path=paths[shard],
                    tensor=name,
                )
            owner[name] = shard
            if weight_map.get(name) == shard:
                tensors[name] = info
    for name, shard in weight_map.items():
        if name not in tensors:
            raise CorruptCheckpointError(
                f"index {index} maps tensor {name!r} to shard {shard!r}, which does not contain it"
                + (f" (it is in {owner[name]!r})" if name in owner else "")
                + f"; {_FIX}",
                path=index,
                tensor=name,
            )
    return shards, tensors, metadata


class ShardedReader(ClosingReader):
    """Serves tensors of a sharded checkpoint, dispatching by shard type (each opened on first use)."""

    def __init__(self, checkpoint: CheckpointInfo) -> None:
        self.checkpoint = checkpoint
        root, index = Path(checkpoint.root), Path(checkpoint.path)

        def locate(name: str) -> Path:  # checked again on opening: a shard may have changed since
            return shard_path(root, name, index)

        self._st = SafetensorsReader(checkpoint, locate)
        self._torch = torchzip.TorchReader(checkpoint, locate)

    def get(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` on the CPU as stored (lazy, memory-mapped)."""
        info = self.checkpoint.tensors.get(name)
        if info is not None and not info.file.lower().endswith(".safetensors"):
            return self._torch.get(name)
        return self._st.get(name)  # also reports unknown names

    def _safetensors(self, name: str) -> bool:
        info = self.checkpoint.tensors.get(name)
        return info is None or info.file.lower().endswith(".safetensors")

    def read_box(self, name: str, box: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """The part ``box`` of tensor ``name``: only its bytes from a safetensors shard."""
        return self._st.read_box(name, box) if self._safetensors(name) else super().read_box(name, box)

    def reads_box(self, name: str) -> bool:
        return self._safetensors(name)

    def close(self) -> None:
        """Close every shard."""
        self._st.close()
        self._torch.close()


class ShardedFormat(Format):
    """A ``*.safetensors.index.json`` / ``*.bin.index.json`` index and its shards."""

    name = "sharded"
    description = "sharded checkpoints: an *.index.json weight_map and its .safetensors or .bin shards"
    priority = 20

    def claim(self, path: Path) -> bool:
        """Claim index files by name, and directories whose preferred checkpoint is an index."""
        if path.is_dir():
            return claims_directory(path, self.name)
        return path.is_file() and INDEX_RE.match(path.name) is not None

    def describe(self, path: Path) -> CheckpointInfo:
        """Describe from the index and every shard's header (no tensor data is read).

        ``.bin`` shards are unpickled memory-mapped, which reads no tensor data either.
        """
        path = Path(path)
        index = checkpoint_file(path, self.name).absolute()
        with gc_paused():
            weight_map, metadata = read_index(index)
            shards, tensors, shard_meta = _collect(index, index.parent, weight_map)
        for k, v in shard_meta.items():
            metadata.setdefault(k, v)
        return CheckpointInfo(
            path=str(path.absolute()),
            root=str(index.parent),
            format=self.name,
            files=shards,
            tensors=tensors,
            metadata=metadata,
        )

    def open(self, checkpoint: CheckpointInfo) -> ShardedReader:
        """A reader over all shards; close it (or use ``with``) when done."""
        return ShardedReader(checkpoint)


    def output_names(self, checkpoint: CheckpointInfo, count: int) -> tuple[tuple[str, ...], str | None]:
        """Named as the checkpoint's own files are (see :func:`.directory.output_names`)."""
        return output_names(checkpoint, count)


@hookimpl
def loaderkit_register_formats(register: Callable[[Format], None]) -> None:
    register(ShardedFormat())
