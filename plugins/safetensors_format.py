"""Built-in format ``safetensors``: one ``.safetensors`` file, or a directory holding one.

A directory is claimed when it holds a single-file checkpoint named the transformers/diffusers
way (``model.safetensors``, ``diffusion_pytorch_model.safetensors`` or a variant such as
``model.fp16.safetensors``) and no index that would make it a sharded checkpoint; see
:func:`loaderkit.plugins.directory.pick_in_directory` for the exact order.

The header is validated strictly by loaderkit itself (``_st_header``); tensors are then served by
``safetensors.safe_open`` as lazy zero-copy views of a private memory map.
"""

from __future__ import annotations

import itertools
import os

from pathlib import Path
from typing import Callable

import torch

from loaderkit.plugin import (
    CheckpointInfo, dtype_name, fd_path, Format, hookimpl, opened_contained, TensorInfo, TensorReader,
)
from loaderkit.errors import CheckpointError, CorruptCheckpointError

from ._st_header import gc_paused, looks_like_safetensors, read_header
from .directory import checkpoint_file, claims_directory, output_names


#: the memory page size: the read scratch is placed at each tensor's offset within a page.
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ClosingReader(TensorReader):
    """Base of the built-in readers: a :class:`loaderkit.plugin.TensorReader` (a context manager
    that closes on exit) with the lookup of a tensor's description (``self.checkpoint`` is set
    by subclasses)."""

    checkpoint: CheckpointInfo

    def _info(self, name: str) -> TensorInfo:
        info = self.checkpoint.tensors.get(name)
        if info is None:
            raise CheckpointError(
                f"tensor {name!r} is not in checkpoint {self.checkpoint.path}; its tensors are listed "
                "by loaderkit.inspect()",
                path=self.checkpoint.path,
                tensor=name,
            )
        return info



class SafetensorsReader(ClosingReader):
    """Serves tensors of one or more safetensors files through ``safe_open`` (one handle per file).

    Files are opened on first use. Each returned tensor is checked against the described shape and
    dtype, so a file replaced after it was described cannot slip through.

    :param checkpoint: the described checkpoint; ``TensorInfo.file`` is resolved against its root.
    :param locate: turns a ``TensorInfo.file`` into the path to open, raising if it may not be
        opened (the sharded format re-checks untrusted shard names here); default: under the root.
    """

    def __init__(self, checkpoint: CheckpointInfo, locate: Callable[[str], Path] | None = None) -> None:
        self.checkpoint = checkpoint
        self._root = Path(checkpoint.root)
        self._locate = locate or (lambda file: self._root / file)
        self._fds: dict[str, int] = {}
        self._handles: dict[str, object] = {}
        self._raws: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def _fd(self, file: str) -> tuple[int, str]:
        """The descriptor ``file`` is open on (opened once, and checked where it really is: a
        name swapped for an outside link after it was described is refused), and a path that
        reopens that same file."""
        fd = self._fds.get(file)
        path = self._locate(file)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise CorruptCheckpointError(f"cannot open safetensors file {path}: {exc}", path=path) from exc
            try:
                if Path(self.checkpoint.path) != path:  # a file of a checkpoint directory
                    opened_contained(self._root, fd, path, "safetensors file")
            except BaseException:
                os.close(fd)
                raise
            self._fds[file] = fd
        return fd, fd_path(fd) or str(path)

    def _handle(self, file: str):
        h = self._handles.get(file)
        if h is None:
            from safetensors import safe_open

            _, path = self._fd(file)
            try:
                h = safe_open(path, framework="pt", device="cpu")
            except Exception as exc:
                raise CorruptCheckpointError(
                    f"cannot open safetensors file {self._locate(file)}: {exc}", path=self._locate(file)
                ) from exc
            self._handles[file] = h
        return h

    def get(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` on the CPU as stored (nothing is read until it is touched)."""
        info = self._info(name)
        path = self._root / info.file
        try:
            t = self._handle(info.file).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CorruptCheckpointError(
                f"cannot read tensor {name!r} from {path}: {exc}", path=path, tensor=name
            ) from exc
        check_tensor(t, info, path)
        return t

    def read(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` read with ``pread`` into a scratch buffer rather than mapped.

        For tensors that are converted anyway: their bytes pass through one reused buffer instead
        of staying mapped (and counted in the process's resident memory) after use. The result is
        only valid until the next ``read``: convert it before reading another tensor.
        """
        info = self._info(name)
        fd, spans = self._raw(info.file)
        begin, end = spans[name]
        buf = self._scratch_at(begin, end - begin, info.torch_dtype.itemsize)
        got = os.preadv(fd, [buf], begin) if len(buf) else 0
        path = self._root / info.file
        if got != len(buf):
            raise CorruptCheckpointError(
                f"safetensors file {path} ended inside tensor {name!r} (it changed since it was described)",
                path=path,
                tensor=name,
            )
        t = torch.frombuffer(buf, dtype=info.torch_dtype) if len(buf) else torch.empty(0, dtype=info.torch_dtype)
        t = t.reshape(info.shape)
        check_tensor(t, info, path)
        return t

    def _scratch_at(self, offset: int, size: int, item: int) -> memoryview:
        """``size`` bytes of the reused scratch buffer (grown to the largest tensor read), placed
        at the same offset within a page as ``offset`` in the file: ``preadv`` into a destination
        a few bytes out of step with the source runs several times slower on some CPUs."""
        pad = offset % PAGE if offset % item == 0 else 0  # a misaligned element: start aligned
        if self._scratch.numel() < size + PAGE:
            self._scratch = torch.empty(size + PAGE, dtype=torch.uint8)
        start = (pad - self._scratch.data_ptr()) % PAGE
        return memoryview(self._scratch.numpy())[start:start + size]

    def reads_box(self, name: str) -> bool:
        return True

    def read_box(self, name: str, box: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """Return the part ``box`` of tensor ``name``, read with ``pread`` straight into a new
        tensor: one read per contiguous run of the box, nothing else of the tensor."""
        info = self._info(name)
        fd, spans = self._raw(info.file)
        begin, end = spans[name]
        path = self._root / info.file
        shape = tuple(b - a for a, b in box)
        item = info.torch_dtype.itemsize
        runs = list(box_runs(info.shape, box, item)) if all(b > a for a, b in box) else []
        if len(runs) == 1 and (begin + runs[0][0]) % item == 0:
            # one run (whole rows): read into a buffer at the file's offset within a page, where
            # preadv runs at full speed (see _scratch_at)
            size = runs[0][1]
            buf = torch.empty(size + PAGE, dtype=torch.uint8)
            start = ((begin + runs[0][0]) % PAGE - buf.data_ptr()) % PAGE
            out = buf[start:start + size].view(info.torch_dtype).view(shape)
        else:
            out = torch.empty(shape, dtype=info.torch_dtype)
        if out.numel() == 0:
            return out
        dst = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        for offset, length, at in runs:
            got = os.preadv(fd, [dst[at:at + length]], begin + offset)
            if got != length or begin + offset + length > end:
                raise CorruptCheckpointError(
                    f"safetensors file {path} ended inside tensor {name!r} (it changed since it was described)",
                    path=path,
                    tensor=name,
                )
        return out

    def _raw(self, file: str) -> tuple[int, dict[str, tuple[int, int]]]:
        """An open descriptor and the absolute byte spans of ``file``'s tensors (header re-read)."""
        raw = self._raws.get(file)
        if raw is None:
            fd, path = self._fd(file)
            header = read_header(path, shown=self._locate(file))
            spans = {e.name: (header.data_start + e.begin, header.data_start + e.end) for e in header.entries}
            raw = self._raws[file] = (fd, spans)
        return raw

    def close(self) -> None:
        """Close every file handle (tensors already returned stay valid)."""
        handles, self._handles = self._handles, {}
        for h in handles.values():
            h.__exit__(None, None, None)
        self._raws = {}
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
        self._scratch = torch.empty(0, dtype=torch.uint8)


def box_runs(shape: tuple[int, ...], box: tuple[tuple[int, int], ...], item: int):
    """The contiguous byte runs of ``box`` in a row-major tensor of ``shape``: ``(offset in the
    tensor, length, offset in the box's own buffer)``, in order. The box's trailing whole
    dimensions merge into each run."""
    if not shape:
        yield 0, item, 0
        return
    d = len(shape) - 1  # the innermost dimension that is not whole starts the runs
    inner = item
    while d > 0 and box[d] == (0, shape[d]):
        inner *= shape[d]
        d -= 1
    run = (box[d][1] - box[d][0]) * inner
    strides = [item] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    at = 0
    for index in itertools.product(*(range(a, b) for a, b in box[:d])):
        offset = sum(i * s for i, s in zip(index, strides)) + box[d][0] * strides[d]
        yield offset, run, at
        at += run


def check_tensor(t: torch.Tensor, info: TensorInfo, path: object) -> None:
    """Fail if a tensor read back does not match its description (the file changed since)."""
    if tuple(t.shape) != info.shape or dtype_name(t.dtype) != info.dtype:
        raise CorruptCheckpointError(
            f"tensor {info.name!r} in {path} is {dtype_name(t.dtype)} {tuple(t.shape)} but was described "
            f"as {info.dtype} {info.shape}; the file changed after it was inspected — inspect it again",
            path=path,
            tensor=info.name,
        )


class SafetensorsFormat(Format):
    """A single safetensors file (``.safetensors``), or a directory holding one."""

    name = "safetensors"
    description = "single-file safetensors (a .safetensors file or a directory with model.safetensors)"
    priority = 10

    def claim(self, path: Path) -> bool:
        """Claim ``*.safetensors`` files, files whose first bytes are a safetensors header, and
        directories whose preferred checkpoint is a single safetensors file."""
        if path.is_dir():
            return claims_directory(path, self.name)
        if not path.is_file():
            return False
        if path.name.lower().endswith(".safetensors"):
            return True
        return "." not in path.name and looks_like_safetensors(path)

    def describe(self, path: Path) -> CheckpointInfo:
        """Describe from the header alone (the 8-byte prefix and the JSON header are all that is read)."""
        path = Path(path)
        file = checkpoint_file(path, self.name)
        with gc_paused():
            header = read_header(file)
            return CheckpointInfo(
                path=str(path.absolute()),
                root=str(file.parent.absolute()),
                format=self.name,
                files=(file.name,),
                tensors=header.tensor_infos(file.name),
                metadata=dict(header.metadata),
            )

    def open(self, checkpoint: CheckpointInfo) -> SafetensorsReader:
        """A reader serving lazy, zero-copy CPU tensors; close it (or use ``with``) when done."""
        return SafetensorsReader(checkpoint)


    def output_names(self, checkpoint: CheckpointInfo, count: int) -> tuple[tuple[str, ...], str | None]:
        """Named as the checkpoint's own files are (see :func:`.directory.output_names`)."""
        return output_names(checkpoint, count)


@hookimpl
def loaderkit_register_formats(register: Callable[[Format], None]) -> None:
    register(SafetensorsFormat())
