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
    """A new directory beside ``dst`` (same filesystem, so renames are atomic), mode as mkdir's;
    its name carries this process's id, so a later convert can clean up after a killed one."""
    for _ in range(100):
        path = dst.parent / f".{dst.name}.{os.getpid()}.{os.urandom(4).hex()}.{what}"
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


def clean_stale(dst: Path) -> list[Path]:
    """Remove what killed converts to ``dst`` left beside it (their process no longer runs)."""
    removed = []
    try:
        siblings = list(dst.parent.iterdir())
    except OSError:
        return removed
    prefix = f".{dst.name}."
    for p in siblings:
        parts = p.name[len(prefix):].split(".") if p.name.startswith(prefix) else []
        if len(parts) == 3 and parts[2] in ("partial", "old") and parts[0].isdigit() and not _alive(int(parts[0])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; ``False`` where the system or filesystem does not offer it."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), ctypes.c_uint(flags)) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def move_into_place(output: Path, dst: Path) -> None:
    """Put ``output`` at ``dst`` atomically.

    A new ``dst`` is never created over one that appeared meanwhile (another convert to the
    same destination): ``renameat2(RENAME_NOREPLACE)``, or a hard link for a file where that is
    not available; the loser gets a :class:`ConvertError`. An existing ``dst`` (``overwrite``)
    is swapped with the new copy in one step (``RENAME_EXCHANGE``), so there is no moment
    without one; where the system lacks it, the old copy is renamed aside first and restored if
    the second rename fails.
    """
    if not (dst.exists() or dst.is_symlink()):
        try:
            if _renameat2(output, dst, _RENAME_NOREPLACE):
                return
            if output.is_file():
                os.link(output, dst)
                os.unlink(output)
                return
            os.rename(output, dst)  # a directory: fails if dst appeared meanwhile and is not empty
            return
        except FileExistsError:
            raise ConvertError(f"{dst} appeared while it was being written (another convert to the same "
                               "destination?); it was left as it is", path=dst) from None
    if _renameat2(output, dst, _RENAME_EXCHANGE):
        shutil.rmtree(output, ignore_errors=True) if output.is_dir() and not output.is_symlink() else output.unlink()
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
