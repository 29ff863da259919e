"""A strict safetensors header parser, and the checkpoint file names shared by the built-in formats.

The parser reads only the 8-byte length prefix and the JSON header of a file, never its tensor
data, and checks everything the safetensors format requires (the reference reader is lenient on
some of it, e.g. it accepts duplicate tensor names):

* an 8-byte little-endian ``u64`` header length ``N`` of at most 100,000,000 bytes, and a file at
  least ``8 + N`` bytes long;
* at most :data:`MAX_TENSORS_PER_FILE` tensors (250,000; the environment variable
  ``LOADERKIT_MAX_TENSORS_PER_FILE`` changes it), refused before the JSON is parsed, or while it
  is parsed where the names are spelt with escapes;
* ``N`` bytes of UTF-8 JSON that start with ``{`` (trailing space padding is allowed), with no
  duplicate keys and no ``NaN``/``Infinity`` constants;
* ``__metadata__`` (optional) mapping strings to strings;
* per tensor: a known ``dtype``, a ``shape`` of non-negative integers (each at most
  ``2**63 - 1``, torch's limit, as is the byte size of the shape with its zero dimensions left
  out, which torch computes even for an empty tensor) and ``data_offsets`` ``[begin, end]``
  whose length is exactly ``numel * itemsize``;
* offsets that tile the data buffer exactly: no gap, no overlap, no trailing bytes, so that the
  file size is ``8 + N + buffer``.

Unknown keys inside a tensor entry are ignored, as the reference reader does. ``F4`` tensors
(two fp4 values per byte) are described the way torch holds them: ``float4_e2m1fn_x2`` with the
last dimension halved.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from loaderkit.plugin import SAFETENSORS_DTYPES, TensorInfo, gc_paused, to_torch
from loaderkit.errors import CorruptCheckpointError, UnsupportedCheckpointError

#: the largest header the safetensors format allows.
MAX_HEADER_BYTES = 100_000_000
#: the most tensors one file may hold, unless the environment variable
#: ``LOADERKIT_MAX_TENSORS_PER_FILE`` says otherwise. Describing a tensor costs about 20 us and
#: 1 KB while the header is parsed, so a header of a million tiny tensors (it fits the format's
#: 100 MB) would cost ~20 s and ~1.3 GB; real files hold far fewer (DeepSeek-V3, ~91,000 tensors
#: with its scales, is split over 163 files), and a whole model of that size in one file fits.
MAX_TENSORS_PER_FILE = 250_000
#: the largest dimension torch can hold (sizes are int64).
MAX_DIM = 2**63 - 1
_FIX = "the file is corrupt or truncated; download or save it again"


@dataclass(frozen=True, slots=True)
class StEntry:
    """One tensor of a safetensors header: loaderkit dtype, torch shape, and byte range in the buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class StHeader:
    """A validated safetensors header.

    :ivar path: the file it was read from.
    :ivar header_len: ``N``, the JSON header's length in bytes.
    :ivar metadata: the ``__metadata__`` strings (empty when absent).
    :ivar entries: the tensors, sorted by data offset.
    """

    path: str
    header_len: int
    metadata: dict[str, str]
    entries: tuple[StEntry, ...]

    @property
    def data_start(self) -> int:
        """Absolute file offset of the data buffer."""
        return 8 + self.header_len

    def tensor_infos(self, file: str) -> dict[str, TensorInfo]:
        """The tensors as :class:`TensorInfo` records whose ``file`` is ``file``, in offset order."""
        make = TensorInfo.from_checked  # the parser checked every value
        return {
            e.name: make(name=e.name, shape=e.shape, dtype=e.dtype, file=file, nbytes=e.end - e.begin)
            for e in self.entries
        }


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateKey(k)
            seen.add(k)
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"the JSON constant {name} is not allowed")


class TooManyObjects(ValueError):
    """More JSON objects than :func:`loads_strict` was allowed to parse."""


def loads_strict(text: str, path: object, what: str, max_objects: int | None = None) -> Any:
    """Parse JSON text, refusing duplicate keys and ``NaN``/``Infinity``.

    :param max_objects: stop parsing (raising :class:`TooManyObjects`) once more than this many
        JSON objects are complete, without parsing the rest; ``None``: no limit.
    :raises CorruptCheckpointError: naming ``path`` (and the duplicated key as ``tensor``).
    """
    hook = _no_duplicates
    if max_objects is not None:
        count = [0]

        def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            count[0] += 1
            if count[0] > max_objects:
                raise TooManyObjects()
            return _no_duplicates(pairs)

    try:
        return json.loads(text, object_pairs_hook=hook, parse_constant=_no_constant)
    except TooManyObjects:
        raise
    except _DuplicateKey as exc:
        raise CorruptCheckpointError(
            f"{what} of {path} lists the key {exc.key!r} twice; duplicate names are forbidden "
            f"(a reader would silently keep only one of them); {_FIX}",
            path=path,
            tensor=exc.key,
        ) from None
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{what} of {path} is not valid JSON: {exc}; {_FIX}", path=path) from None


@functools.cache
def _dtype_table() -> dict[str, tuple[str, int]]:
    """safetensors dtype string -> (loaderkit dtype name, bytes per stored element of torch's dtype)."""
    table: dict[str, tuple[str, int]] = {}
    for st, name in SAFETENSORS_DTYPES.items():
        try:
            table[st] = (name, to_torch(name).itemsize)
        except Exception:  # this torch build lacks the dtype
            continue
    return table


def read_header(path: str | os.PathLike, shown: object | None = None) -> StHeader:
    """Read and validate the header of the safetensors file at ``path`` (tensor data is not read).

    :param shown: the name errors give the file (default ``path``): a file reopened through its
        descriptor (``/proc/self/fd/N``) is named by the path it was opened as.
    :raises CorruptCheckpointError: for any violation of the format, naming the file and tensor.
    """
    name = path if shown is None else shown
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            n = _check_prefix(prefix, size, name)
            raw = f.read(n)
    except OSError as exc:
        raise CorruptCheckpointError(f"cannot read safetensors file {name}: {exc}", path=name) from exc
    if len(raw) != n:
        raise CorruptCheckpointError(f"safetensors file {name} ended inside its header; {_FIX}", path=name)
    return parse_header(raw, size, name)


def parse_file_bytes(data: bytes, path: object = "<bytes>") -> StHeader:
    """Validate a whole safetensors file image held in memory (handy for tests)."""
    n = _check_prefix(data[:8], len(data), path)
    return parse_header(data[8 : 8 + n], len(data), path)


def _check_prefix(prefix: bytes, size: int, path: object) -> int:
    if len(prefix) < 8:
        raise CorruptCheckpointError(
            f"safetensors file {path} is {size} bytes long, too short to hold the 8-byte header "
            f"length; {_FIX}",
            path=path,
        )
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(
            f"safetensors file {path} declares a {n}-byte header, over the format's limit of "
            f"{MAX_HEADER_BYTES} bytes; it is not a safetensors file or {_FIX}",
            path=path,
        )
    if 8 + n > size:
        raise CorruptCheckpointError(
            f"safetensors file {path} declares a {n}-byte header but holds only {size - 8} bytes "
            f"after the length prefix; {_FIX}",
            path=path,
        )
    return n


def parse_header(raw: bytes, file_size: int, path: object) -> StHeader:
    """Validate the ``N`` header bytes ``raw`` of a file of ``file_size`` bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptCheckpointError(
            f"header of safetensors file {path} is not UTF-8 ({exc}); {_FIX}", path=path
        ) from None
    body = text.rstrip(" ")
    if not body.startswith("{") or not body.endswith("}"):
        raise CorruptCheckpointError(
            f"header of safetensors file {path} is not a JSON object (it must start with '{{' and "
            f"may only be padded with spaces); {_FIX}",
            path=path,
        )
    limit = max_tensors_per_file()
    if body.count('"data_offsets"') > limit:  # every entry has one; found without parsing
        raise _too_many(path, limit)
    try:  # tensors, __metadata__ and the header itself are objects: stop past that many
        obj = loads_strict(body, path, "safetensors header", max_objects=limit + 2)
    except TooManyObjects:
        raise _too_many(path, limit) from None
    if len(obj) - ("__metadata__" in obj) > limit:
        raise _too_many(path, limit)
    metadata = _metadata(obj.pop("__metadata__", None), path)
    buffer_len = file_size - 8 - len(raw)
    entries = _entries(obj, buffer_len, path, surrogates="\\ud" in body or "\\uD" in body)
    entries.sort(key=_by_offsets)
    _check_tiling(entries, buffer_len, path)
    return StHeader(str(path), len(raw), metadata, tuple(entries))


def max_tensors_per_file() -> int:
    """:data:`MAX_TENSORS_PER_FILE`, or the value of ``LOADERKIT_MAX_TENSORS_PER_FILE`` when set."""
    raw = os.environ.get("LOADERKIT_MAX_TENSORS_PER_FILE", "").strip()
    if not raw:
        return MAX_TENSORS_PER_FILE
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = -1
    if value < 1:
        raise UnsupportedCheckpointError(
            f"LOADERKIT_MAX_TENSORS_PER_FILE={raw!r} is not a positive whole number of tensors"
        )
    return value


def _too_many(path: object, limit: int) -> UnsupportedCheckpointError:
    return UnsupportedCheckpointError(
        f"safetensors file {path} holds more than {limit:,} tensors, loaderkit's limit per file (a "
        "header that large costs seconds and gigabytes to describe); if the file is genuine, raise "
        "the limit with the environment variable LOADERKIT_MAX_TENSORS_PER_FILE",
        path=path,
    )


def _metadata(meta: Any, path: object) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(
            f"__metadata__ of safetensors file {path} is {type(meta).__name__}, not an object of "
            f"strings; {_FIX}",
            path=path,
        )
    for k, v in meta.items():
        if not isinstance(v, str):
            raise CorruptCheckpointError(
                f"__metadata__[{k!r}] of safetensors file {path} is {type(v).__name__}, but metadata "
                f"values must be strings; {_FIX}",
                path=path,
            )
    return meta


def _bad(path: object, name: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"tensor {name!r} in safetensors file {path}: {what}; {_FIX}", path=path, tensor=name
    )


def _int_list(x: Any, length: int | None = None) -> bool:
    """True for a list of non-negative ints (``bool`` excluded), of ``length`` items if given."""
    if type(x) is not list or (length is not None and len(x) != length):
        return False
    for v in x:
        if type(v) is not int or v < 0:
            return False
    return True


def _by_offsets(e: StEntry) -> tuple[int, int]:
    return e.begin, e.end


def _entries(obj: dict[str, Any], buffer_len: int, path: object, surrogates: bool) -> list[StEntry]:
    """Every tensor entry of a parsed header, checked.

    The common entry (a known dtype other than ``F4``, a shape of small non-negative ints, offsets
    in the buffer spanning exactly its bytes) is checked inline; any other goes through
    :func:`_entry`, which accepts what it accepts and names what is wrong. A lone surrogate in a
    name can only come from a ``\\ud...`` escape, so names are checked for one only when
    ``surrogates`` says the text holds such an escape.
    """
    table = _dtype_table()
    out = []
    append = out.append
    for name, spec in obj.items():
        if not surrogates and type(spec) is dict:
            st, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
            found = table.get(st) if type(st) is str and st != "F4" else None
            if found is not None and type(shape) is list and type(offsets) is list and len(offsets) == 2:
                begin, end = offsets
                numel = found[1]
                for d in shape:
                    if type(d) is not int or not 0 < d < _SMALL_DIM:  # a zero dimension: see _entry
                        break
                    numel *= d
                else:
                    if (type(begin) is int and type(end) is int and 0 <= begin <= end <= buffer_len
                            and end - begin == numel and numel < _SMALL_DIM):
                        append(StEntry(name, found[0], tuple(shape), begin, end))
                        continue
        append(_entry(name, spec, buffer_len, path))
    return out


#: dimensions and byte sizes below this take the inline check (their products stay far from
#: torch's int64 limits); anything larger is checked by :func:`_entry`.
_SMALL_DIM = 2**40


def _entry(name: str, spec: Any, buffer_len: int, path: object) -> StEntry:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(path, name.encode("utf-8", "backslashreplace").decode(),
                   "the tensor name is not valid UTF-8 (a lone surrogate); safetensors readers refuse it") from None
    if not isinstance(spec, dict):
        raise _bad(path, name, f"entry is {type(spec).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in spec:
            raise _bad(path, name, f"entry lacks {key!r}")
    st, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    dtype, itemsize = _dtype(st, name, path)
    if not _int_list(shape):
        raise _bad(path, name, f"shape {shape!r} is not a list of non-negative integers")
    if any(d > MAX_DIM for d in shape):
        raise _bad(path, name, f"shape {shape!r} has a dimension over {MAX_DIM}, the largest torch can hold")
    if not _int_list(offsets, 2):
        raise _bad(path, name, f"data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if end < begin:
        raise _bad(path, name, f"data_offsets {offsets!r} end before they begin")
    if end > buffer_len:
        raise _bad(path, name, f"data ends at byte {end} of a {buffer_len}-byte data buffer (truncated file)")
    numel = nonzero = 1
    for d in shape:
        numel *= d
        nonzero *= d or 1
    if nonzero * itemsize > MAX_DIM:  # torch sizes even an empty tensor's strides in int64
        raise _bad(path, name, f"shape {shape} of {st} spans more than {MAX_DIM} bytes, more than torch can address")
    if st == "F4":  # two fp4 values per byte; torch's float4_e2m1fn_x2 halves the last dim
        if not shape or shape[-1] % 2:
            raise _bad(path, name, f"F4 shape {shape} needs an even last dimension (two values per byte)")
        shape = [*shape[:-1], shape[-1] // 2]
        numel //= 2
    if end - begin != numel * itemsize:
        raise _bad(
            path,
            name,
            f"shape {shape} of {st} needs {numel * itemsize} bytes but data_offsets {offsets} span "
            f"{end - begin}",
        )
    return StEntry(name, dtype, tuple(shape), begin, end)


def _dtype(st: Any, name: str, path: object) -> tuple[str, int]:
    found = _dtype_table().get(st) if isinstance(st, str) else None
    if found is not None:
        return found
    if isinstance(st, str) and st.startswith("F6"):
        raise _bad(path, name, f"dtype {st} (6-bit float) has no torch dtype and cannot be loaded")
    if isinstance(st, str) and st in SAFETENSORS_DTYPES:  # (a list or an object is unhashable)
        raise UnsupportedCheckpointError(
            f"tensor {name!r} in safetensors file {path} has dtype {st}, which this torch build "
            "lacks; upgrade torch",
            path=path,
            tensor=name,
        )
    known = ", ".join(SAFETENSORS_DTYPES)
    raise _bad(path, name, f"unknown dtype {st!r} (known: {known})")


def _check_tiling(entries: list[StEntry], buffer_len: int, path: object) -> None:
    pos = 0
    for e in entries:
        if e.begin > pos:
            raise _bad(path, e.name, f"bytes {pos}..{e.begin} before it belong to no tensor (gap)")
        if e.begin < pos:
            raise _bad(path, e.name, f"data_offsets [{e.begin}, {e.end}] overlap the previous tensor")
        pos = e.end
    if pos != buffer_len:
        raise CorruptCheckpointError(
            f"safetensors file {path} has {buffer_len - pos} trailing bytes after its last tensor "
            f"(file size must be 8 + header + data); {_FIX}",
            path=path,
        )


def looks_like_safetensors(path: Path) -> bool:
    """Cheap sniff from the first 9 bytes: a plausible header length followed by ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= MAX_HEADER_BYTES and 8 + n <= size
