"""Built-in format ``torchzip``: legacy torch checkpoints (``.bin``, ``.pt``, ``.pth``).

Files are read only with ``torch.load(path, weights_only=True, mmap=True, map_location="cpu")``.
A pickle that needs code (a class, a function call) is refused with
:class:`~loaderkit.UnsafeCheckpointError`; loaderkit never falls back to an unsafe load.

Because a torch checkpoint has no separate header, :meth:`TorchZipFormat.describe` has to unpickle
the file's small ``data.pkl`` record. With ``mmap=True`` the tensor storages are memory-mapped,
not read: describing touches no tensor data. The most recently loaded file is kept (one slot,
keyed by path, size and modification time) so that ``open`` right after ``describe`` does not
unpickle it again; ``open`` takes it out of the slot.

What counts as the state dict: the top-level mapping's tensor values. If it holds no tensors but
exactly one of ``"state_dict"`` / ``"model"`` is a mapping of tensors (a training checkpoint), that
mapping is used. Non-tensor entries (``"epoch"``, an optimizer state, ...) are skipped, and their
names are recorded in the metadata under ``"torch.ignored_entries"`` so nothing disappears
silently; ``"torch.state_dict_key"`` records an unwrapped key.
"""

from __future__ import annotations

import os
import pickle
import re
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch

from loaderkit.plugin import CheckpointInfo, dtype_name, fd_path, Format, hookimpl, opened_contained, TensorInfo
from loaderkit.errors import (
    CheckpointError, CorruptCheckpointError, LoaderKitError, UnsafeCheckpointError, UnsupportedCheckpointError,
)

from ._st_header import looks_like_safetensors
from .directory import checkpoint_file, claims_directory, output_names
from .safetensors_format import ClosingReader, check_tensor

SUFFIXES = (".bin", ".pt", ".pth")
_ZIP_MAGIC = b"PK\x03\x04"


class Loaded:
    """A loaded torch checkpoint: its tensors (memory-mapped) and metadata about what was skipped."""

    __slots__ = ("tensors", "metadata")

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        self.tensors = tensors
        self.metadata = metadata


_slot: tuple[tuple, Loaded] | None = None
_slot_lock = threading.Lock()


def _key(path: Path) -> tuple:
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


def _take_cached(path: Path, st: os.stat_result) -> Loaded | None:
    """Take the slot's file if it is ``path`` as ``st`` describes it (the same inode, unchanged)."""
    global _slot
    with _slot_lock:
        if _slot is not None and _slot[0] == (str(path), st.st_ino, st.st_size, st.st_mtime_ns):
            loaded, _slot = _slot[1], None
            return loaded
    return None


def load_file(path: Path, *, keep: bool) -> Loaded:
    """Load ``path`` safely (weights only, memory-mapped), reusing the one-slot cache.

    :param keep: leave the result in the slot (``describe``) or take it out (``open``).
    """
    global _slot
    key = _key(path)
    with _slot_lock:
        if _slot is not None and _slot[0] == key:
            loaded = _slot[1]
            if not keep:
                _slot = None
            return loaded
    loaded = _load_uncached(path)
    if keep:
        with _slot_lock:
            _slot = (key, loaded)
    return loaded


def _check_container(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:
        _check_records(path)
        return
    if looks_like_safetensors(path):
        raise UnsupportedCheckpointError(
            f"{path} is a safetensors file with a torch suffix; rename it to end in .safetensors",
            path=path,
        )
    raise UnsupportedCheckpointError(
        f"{path} is not a zip-based torch checkpoint (it may use the legacy format of "
        "torch.save(..., _use_new_zipfile_serialization=False), which cannot be memory-mapped). "
        "Convert it to safetensors with trusted tools, e.g. load it in a trusted environment and "
        "write it with safetensors.torch.save_file",
        path=path,
    )


#: The largest pickle record read: a state dict's pickle holds names and storage keys only
#: (about 100 bytes a tensor), so this is ~1e6 tensors; a larger one is refused before unpickling.
MAX_PICKLE_BYTES = 100_000_000


def _check_records(path: Path) -> None:
    """Read the zip's directory before unpickling: torch writes every record stored (uncompressed,
    so it can be memory-mapped); a compressed record (which torch would inflate, at any cost) or an
    oversized pickle is refused."""
    try:
        with zipfile.ZipFile(path) as z:
            records = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"torch checkpoint {path} is not a readable zip archive: {exc}", path=path) from exc
    for r in records:
        if r.compress_type != zipfile.ZIP_STORED:
            raise UnsupportedCheckpointError(
                f"torch checkpoint {path} has a compressed record {r.filename!r}; torch.save writes records "
                "uncompressed, and loaderkit does not inflate them (it cannot memory-map them, and their "
                "size is unbounded). Re-save it with torch.save, or convert it to safetensors",
                path=path,
            )
        if r.filename.endswith(".pkl") and r.file_size > MAX_PICKLE_BYTES:
            raise UnsupportedCheckpointError(
                f"torch checkpoint {path}: pickle record {r.filename!r} is {r.file_size} bytes, over the "
                f"{MAX_PICKLE_BYTES}-byte limit (a state dict's pickle is about 100 bytes a tensor); "
                "convert it to safetensors with trusted tools",
                path=path,
            )


def _unpickler_reason(message: str) -> str:
    """What torch's weights-only unpickler refused, without its advice to load unsafely."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        return f"its pickle references {m.group(1)}, which is code, not data"
    if "WeightsUnpickler error:" in message:
        lines = message.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        if lines:
            return lines[0][:400]
    return "its pickle holds more than tensors and plain containers"


def _load_uncached(path: Path) -> Loaded:
    try:
        _check_container(path)
        obj = torch.load(str(path), weights_only=True, mmap=True, map_location="cpu")
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"torch checkpoint {path} was refused by torch.load(weights_only=True): "
            f"{_unpickler_reason(str(exc))}. It needs code to be unpickled, and loaderkit never falls "
            "back to an unsafe load. If you trust the file, convert it to safetensors with trusted "
            "tools (load it in a trusted environment, write it with safetensors.torch.save_file).",
            path=path,
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read torch checkpoint {path}: {exc}", path=path) from exc
    except Exception as exc:
        raise CorruptCheckpointError(
            f"torch checkpoint {path} could not be loaded: {type(exc).__name__}: {exc}; the file is "
            "corrupt or truncated; download or save it again",
            path=path,
        ) from exc
    tensors, metadata = extract_state_dict(obj, path)
    return Loaded(tensors, metadata)


def extract_state_dict(obj: object, path: object) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Find the state dict in an unpickled checkpoint (see the module docstring for the rule)."""
    if not isinstance(obj, Mapping):
        raise UnsupportedCheckpointError(
            f"torch checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors "
            "(a state dict); save model.state_dict() instead",
            path=path,
        )
    metadata: dict[str, str] = {}
    prefix = ""
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        nested = [k for k in ("state_dict", "model") if _holds_tensors(obj.get(k))]
        if len(nested) != 1:
            what = "both 'state_dict' and 'model' hold tensors" if nested else "it holds no tensors"
            raise UnsupportedCheckpointError(
                f"torch checkpoint {path} has no state dict loaderkit can pick: {what}", path=path
            )
        metadata["torch.state_dict_key"] = nested[0]
        ignored_top = [str(k) for k in obj if k != nested[0]]
        obj, prefix = obj[nested[0]], f"{nested[0]}."
    else:
        ignored_top = []
    tensors: dict[str, torch.Tensor] = {}
    ignored = list(ignored_top)
    for k, v in obj.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor):
            _check_layout(v, k, path)
            tensors[k] = v
        else:
            ignored.append(f"{prefix}{k}")
    if ignored:
        metadata["torch.ignored_entries"] = ", ".join(ignored)
    return tensors, metadata


def _holds_tensors(v: object) -> bool:
    return isinstance(v, Mapping) and any(isinstance(x, torch.Tensor) for x in v.values())


def _check_layout(t: torch.Tensor, name: str, path: object) -> None:
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        kind = f"{type(t).__module__}.{type(t).__qualname__}"
        raise UnsupportedCheckpointError(
            f"tensor {name!r} in {path} unpickles as a {kind}, a tensor subclass (another library's "
            "quantized tensor, such as torchao's Float8Tensor), not a plain tensor; loaderkit does not "
            "decode it. Dequantize the model with that library and save plain tensors (safetensors)",
            path=path,
            tensor=name,
        )
    if t.layout != torch.strided:
        raise UnsupportedCheckpointError(
            f"tensor {name!r} in {path} has layout {t.layout}; only dense tensors are supported "
            "(save it with .to_dense())",
            path=path,
            tensor=name,
        )


def tensor_infos(tensors: Mapping[str, torch.Tensor], file: str) -> dict[str, TensorInfo]:
    """Describe memory-mapped tensors (shape, dtype, bytes) without touching their data."""
    return {
        k: TensorInfo(
            name=k,
            shape=tuple(t.shape),
            dtype=dtype_name(t.dtype),
            file=file,
            nbytes=t.numel() * t.element_size(),
        )
        for k, t in tensors.items()
    }


class TorchReader(ClosingReader):
    """Serves tensors of one or more torch zip files (memory-mapped; each file loaded on first use)."""

    def __init__(self, checkpoint: CheckpointInfo, locate: Callable[[str], Path] | None = None) -> None:
        self.checkpoint = checkpoint
        self._root = Path(checkpoint.root)
        self._locate = locate or (lambda file: self._root / file)
        self._files: dict[str, Loaded] = {}

    def get(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` on the CPU as stored (a view of the memory-mapped file)."""
        info = self._info(name)
        path = self._root / info.file
        loaded = self._files.get(info.file)
        if loaded is None:
            loaded = self._files[info.file] = self._load(self._locate(info.file))
        t = loaded.tensors.get(name)
        if t is None:
            raise CorruptCheckpointError(
                f"tensor {name!r} is no longer in {path}; the file changed after it was inspected — "
                "inspect it again",
                path=path,
                tensor=name,
            )
        check_tensor(t, info, path)
        return t

    def _load(self, path: Path) -> Loaded:
        """Load a file of the checkpoint through the descriptor it was opened as, after checking
        where that descriptor really is (a name swapped for an outside link after it was checked
        is refused); a file named directly is the user's choice."""
        if Path(self.checkpoint.path) == path:
            return load_file(path, keep=False)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise CheckpointError(f"cannot read torch checkpoint {path}: {exc}", path=path) from exc
        try:
            opened_contained(self._root, fd, path, "torch checkpoint")
            cached = _take_cached(path, os.fstat(fd))
            if cached is not None:  # what describe loaded from this very file
                return cached
            link = fd_path(fd)
            if link is None:
                return load_file(path, keep=False)
            try:
                return _load_uncached(Path(link))  # the same open file, whatever the name points to now
            except LoaderKitError as exc:
                exc.message = exc.message.replace(link, str(path))
                exc.args = (exc.message, *exc.args[1:])
                exc.path = str(path) if exc.path in (None, link) else exc.path
                raise
        finally:
            os.close(fd)

    def close(self) -> None:
        """Drop the loaded files (tensors already returned stay valid)."""
        self._files = {}


class TorchZipFormat(Format):
    """Legacy torch zip checkpoints read with ``weights_only=True`` and ``mmap=True``."""

    name = "torchzip"
    description = "torch .bin/.pt/.pth zip checkpoints (weights_only, memory-mapped)"
    priority = 0

    def claim(self, path: Path) -> bool:
        """Claim ``.bin``/``.pt``/``.pth`` files and directories whose checkpoint is ``pytorch_model.bin``."""
        if path.is_dir():
            return claims_directory(path, self.name)
        return path.is_file() and path.name.lower().endswith(SUFFIXES)

    def describe(self, path: Path) -> CheckpointInfo:
        """Describe a torch file by unpickling it memory-mapped (no tensor data is read)."""
        path = Path(path)
        file = checkpoint_file(path, self.name).absolute()
        loaded = load_file(file, keep=True)
        return CheckpointInfo(
            path=str(path.absolute()),
            root=str(file.parent),
            format=self.name,
            files=(file.name,),
            tensors=tensor_infos(loaded.tensors, file.name),
            metadata=dict(loaded.metadata),
        )

    def open(self, checkpoint: CheckpointInfo) -> TorchReader:
        """A reader serving memory-mapped CPU tensors; close it (or use ``with``) when done."""
        return TorchReader(checkpoint)


    def output_names(self, checkpoint: CheckpointInfo, count: int) -> tuple[tuple[str, ...], str | None]:
        """Named as the checkpoint's own files are (see :func:`.directory.output_names`)."""
        return output_names(checkpoint, count)


@hookimpl
def loaderkit_register_formats(register: Callable[[Format], None]) -> None:
    register(TorchZipFormat())
