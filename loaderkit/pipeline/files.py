"""Files ``convert`` writes: safetensors shards whose headers are known up front, and atomic moves.

Every shard's header (names, dtypes, shapes, offsets) comes from the plan before any tensor is
read, so each tensor's bytes can be written as it streams; the output directory is made beside
its destination and appears there only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from ..contract.bases import EncodedTensor
from ..contract.dtypes import SAFETENSORS_DTYPES, to_torch
from ..errors import ConvertError

_ST_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class ShardWriter:
    """Writes one safetensors file whose header is known up front.

    The header (data offsets included) is written first; :meth:`write` then puts each tensor's
    bytes at its offset, in any order. Tensors are laid out by descending item size so that
    every tensor is aligned to its dtype, as safetensors' own writer does.
    """

    def __init__(self, path: Path, items: list[EncodedTensor]) -> None:
        self.path = path
        order = sorted(items, key=lambda it: -to_torch(it.dtype).itemsize)
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for it in order:
            header[it.name] = {"dtype": _ST_NAMES[it.dtype], "shape": list(it.shape),
                               "data_offsets": [pos, pos + it.nbytes]}
            self.offsets[it.name] = (pos, it.nbytes)
            pos += it.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self.prefix = struct.pack("<Q", len(raw)) + raw
        self.size = len(self.prefix) + pos
        self.pending = set(self.offsets)
        self.items = {it.name: it for it in items}
        self.file = open(path, "wb")
        self.file.write(self.prefix)
        self.file.truncate(self.size)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` as the entry ``name`` (its dtype and shape must match the header)."""
        it = self.items[name]
        if to_torch(it.dtype) != tensor.dtype or tuple(tensor.shape) != it.shape:
            raise ConvertError(f"tensor {name} came out as {tensor.dtype} {list(tensor.shape)}, but "
                               f"{it.dtype} {list(it.shape)} was planned; this is a bug in loaderkit",
                               tensor=name)
        begin, _ = self.offsets[name]
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.seek(len(self.prefix) + begin)
        self.file.write(memoryview(data))
        self.pending.discard(name)

    def close(self) -> None:
        """Flush to disk and close; every planned tensor must have been written."""
        if self.pending:
            raise ConvertError(f"{self.path}: tensors {sorted(self.pending)[:5]} were never written; "
                               "this is a bug in loaderkit", path=self.path)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def abandon(self) -> None:
        self.file.close()


def temp_dir(dst: Path, what: str) -> Path:
    """A new directory beside ``dst`` (same filesystem, so renames are atomic), mode as mkdir's."""
    for _ in range(100):
        path = dst.parent / f".{dst.name}.{os.urandom(4).hex()}.{what}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConvertError(f"cannot make a temporary directory beside {dst}", path=dst)


def make_parents(parent: Path) -> list[Path]:
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    return missing


def cleanup(tmp: Path, created: list[Path]) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    for p in created:  # innermost first
        try:
            p.rmdir()
        except OSError:
            break


def move_into_place(output: Path, dst: Path) -> None:
    """Rename ``output`` to ``dst``; an existing ``dst`` is renamed aside first, restored if the
    rename fails, and deleted once the new copy is in place."""
    if not (dst.exists() or dst.is_symlink()):
        os.rename(output, dst)
        return
    aside = temp_dir(dst, "old")
    old = aside / dst.name
    os.rename(dst, old)
    try:
        os.rename(output, dst)
    except BaseException:
        os.rename(old, dst)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
