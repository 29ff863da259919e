"""Property-based tests of the safetensors header parser and the sharded index reader.

For arbitrary bytes, arbitrary (valid-ish) JSON headers and arbitrary index files, each input
either describes successfully — and then the description is self-consistent (offsets tile the
buffer, byte counts match shapes and dtypes, and the reference reader ``safe_open`` agrees) — or
raises a :class:`~loaderkit.LoaderKitError`. Never another exception, never a hang (every example
runs under a hard time limit), and never a read outside the checkpoint directory (every way of
opening a file is spied on for the duration of each example).

Bounded and deterministic: at most 200 examples per property, ``derandomize=True``, no example
database.
"""

from __future__ import annotations

import contextlib
import json
import signal
import struct
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import loaderkit
import loaderkit.plugin
from loaderkit import LoaderKitError
from loaderkit.plugin import SAFETENSORS_DTYPES, to_torch
from loaderkit.plugins._st_header import StHeader, _entries, _entry, parse_file_bytes, read_header

from test_hostile import watch_opens

FUZZ = settings(
    max_examples=200,
    deadline=timedelta(seconds=2),
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMIT_S = 5.0  # a hard per-example limit: a parser that loops forever fails here


class Hang(Exception):
    """Raised when an example runs past :data:`LIMIT_S`."""


@contextlib.contextmanager
def time_limit(seconds: float = LIMIT_S) -> Iterator[None]:
    """Interrupt the block with :class:`Hang` after ``seconds`` (SIGALRM; main thread only)."""

    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def outcome(fn, *args) -> Any:
    """``fn(*args)``, or the :class:`LoaderKitError` it raised; any other exception propagates."""
    with time_limit():
        try:
            got = fn(*args)
        except LoaderKitError as exc:
            event(f"refused: {type(exc).__name__}")
            return exc
    event("described")
    return got


# -------------------------------------------------------------------------------------------
# the invariants of a successful description
# -------------------------------------------------------------------------------------------


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def assert_consistent(h: StHeader, file_size: int) -> None:
    """Offsets tile the data buffer exactly; each byte range holds ``numel * itemsize`` bytes."""
    assert h.data_start == 8 + h.header_len <= file_size
    pos = 0
    names = set()
    for e in h.entries:
        assert e.name not in names and e.name != "__metadata__"
        names.add(e.name)
        assert e.begin == pos and e.end >= e.begin, f"{e.name} does not tile: {e.begin} after {pos}"
        assert e.end - e.begin == numel(e.shape) * to_torch(e.dtype).itemsize, e
        assert all(type(d) is int and d >= 0 for d in e.shape)
        pos = e.end
    assert h.data_start + pos == file_size, "the tensors do not cover the data buffer"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in h.metadata.items())
    infos = h.tensor_infos("f.safetensors")
    assert list(infos) == [e.name for e in h.entries]
    for e in h.entries:
        t = infos[e.name]
        assert (t.shape, t.dtype, t.nbytes) == (e.shape, e.dtype, e.end - e.begin)


def assert_reference_agrees(path: Path, h: StHeader, header: dict) -> None:
    """What loaderkit accepts, ``safe_open`` opens, with the same names and shapes."""
    with time_limit(), safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {e.name for e in h.entries}
        for e in h.entries:
            assert f.get_slice(e.name).get_shape() == header[e.name]["shape"], e.name


# -------------------------------------------------------------------------------------------
# arbitrary bytes
# -------------------------------------------------------------------------------------------

prefixed = st.builds(
    lambda n, body: struct.pack("<Q", n) + body,
    st.one_of(st.integers(0, 600), st.integers(0, 2**64 - 1)),
    st.binary(max_size=600),
)
json_ish = st.builds(
    lambda text, pad, data: (lambda raw: struct.pack("<Q", len(raw)) + raw + data)(text.encode() + b" " * pad),
    st.text(alphabet='{}[]":,0123456789 abFIU8_-.\\e\n', max_size=120).map(lambda t: "{" + t),
    st.integers(0, 3),
    st.binary(max_size=64),
)


@FUZZ
@given(st.one_of(st.binary(max_size=600), prefixed, json_ish))
def test_arbitrary_bytes_parse_or_raise(data: bytes) -> None:
    got = outcome(parse_file_bytes, data, "<fuzz>")
    if not isinstance(got, LoaderKitError):
        assert_consistent(got, len(data))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-files")


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), prefixed, json_ish))
def test_reading_a_file_agrees_with_parsing_its_bytes(scratch: Path, data: bytes) -> None:
    path = scratch / "f.safetensors"
    path.write_bytes(data)
    with watch_opens() as log:
        from_file = outcome(read_header, path)
    assert log.outside(scratch) == []
    from_bytes = outcome(parse_file_bytes, data, path)
    if isinstance(from_bytes, LoaderKitError):
        assert type(from_file) is type(from_bytes) and str(from_file) == str(from_bytes)
    else:
        assert from_file == from_bytes


# -------------------------------------------------------------------------------------------
# arbitrary JSON headers: valid-ish structures with random offsets, shapes and dtypes
# -------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**66) | st.floats(allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
DTYPES = [*SAFETENSORS_DTYPES, "F6_E2M3", "F6_E3M2", "Q4", "f32", "", "F32 "]
#: mostly known dtypes and small dimensions (so that many headers are valid), some hostile ones
dtypes = st.sampled_from([*SAFETENSORS_DTYPES] * 3 + DTYPES[len(SAFETENSORS_DTYPES):] + [None, 4, ["F32"]])
dims = st.sampled_from([0, 1, 2, 3, 4, 5, 6] * 4 + [-1, 2**63, 2**64, 2**70, True, 1.0])
slips = st.sampled_from([0] * 12 + [1, -1])  # an offset or a buffer length off by one, sometimes


@st.composite
def headers(draw) -> tuple[dict, bytes]:
    """A header of 0-5 tensors and a data buffer: mostly well-formed, with random damage."""
    names = draw(st.lists(st.text(max_size=6), max_size=5, unique=True))
    header: dict[str, Any] = {}
    pos = 0
    for name in names:
        dtype = draw(dtypes)
        shape = draw(st.lists(dims, max_size=3))
        known = isinstance(dtype, str) and dtype in SAFETENSORS_DTYPES
        size = int(numel(shape)) * (to_torch(SAFETENSORS_DTYPES[dtype]).itemsize if known else 1)
        if dtype == "F4":
            size //= 2
        size = size if 0 <= size < 4096 else draw(st.integers(0, 64))
        begin = pos + draw(slips)
        end = begin + size + draw(slips)
        pos = end
        spec: dict[str, Any] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        if draw(st.integers(0, 19)) == 0:  # damage the structure itself
            spec[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(json_values)
        if draw(st.integers(0, 29)) == 0:
            del spec[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        header[name] = spec
    if draw(st.booleans()):
        strings = st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3)
        header["__metadata__"] = draw(st.sampled_from([strings] * 4 + [json_values]).flatmap(lambda s: s))
    buffer = max(pos, 0) + draw(slips)
    header = dict(draw(st.permutations(list(header.items()))))
    return header, bytes(max(buffer, 0))


def _huge(dim: int) -> tuple[dict, bytes]:
    return {"a": {"dtype": "F32", "shape": [0, dim], "data_offsets": [0, 0]}}, b""


@FUZZ
@given(case=headers(), pad=st.integers(0, 4))
@example(case=_huge(2**64), pad=0)  # safe_open refuses dimensions over u64
@example(case=_huge(2**63), pad=0)  # torch sizes are int64
def test_arbitrary_headers_describe_consistently_or_raise(scratch: Path, case, pad: int) -> None:
    header, buffer = case
    raw = (json.dumps(header) + " " * pad).encode()
    data = struct.pack("<Q", len(raw)) + raw + buffer
    got = outcome(parse_file_bytes, data, "<fuzz>")
    if isinstance(got, LoaderKitError):
        return
    assert_consistent(got, len(data))
    for e in got.entries:  # the description is the header's, with F4's last dimension halved
        shape = list(header[e.name]["shape"])
        if header[e.name]["dtype"] == "F4":
            shape[-1] //= 2
        assert list(e.shape) == shape and e.dtype == SAFETENSORS_DTYPES[header[e.name]["dtype"]]
    path = scratch / "h.safetensors"
    path.write_bytes(data)
    assert_reference_agrees(path, got, header)


@FUZZ
@given(case=headers(), surrogates=st.booleans())
@example(case=({"a": {"dtype": "F32", "shape": [2**39, 2**39, 0], "data_offsets": [0, 0]}}, b""), surrogates=False)
def test_the_inline_entry_check_agrees_with_the_full_one(case, surrogates: bool) -> None:
    """The header parser's fast check of common entries accepts exactly what :func:`_entry`
    accepts, with the same result, and leaves every refusal (and its message) to it."""
    header, buffer = case
    header = {k: v for k, v in header.items() if k != "__metadata__"}

    def full():
        return [_entry(name, spec, len(buffer), "<fuzz>") for name, spec in header.items()]

    expected, got = outcome(full), outcome(_entries, header, len(buffer), "<fuzz>", surrogates)
    if isinstance(expected, LoaderKitError):
        assert type(got) is type(expected) and str(got) == str(expected)
    else:
        assert got == expected


@FUZZ
@given(name=st.text(max_size=6), dtype=st.sampled_from(DTYPES))
def test_duplicate_names_are_always_refused(name: str, dtype: str) -> None:
    entry = json.dumps({"dtype": dtype, "shape": [0], "data_offsets": [0, 0]})
    raw = f"{{{json.dumps(name)}: {entry}, {json.dumps(name)}: {entry}}}".encode()
    got = outcome(parse_file_bytes, struct.pack("<Q", len(raw)) + raw, "<fuzz>")
    assert isinstance(got, LoaderKitError)


# -------------------------------------------------------------------------------------------
# arbitrary index files
# -------------------------------------------------------------------------------------------

SHARD_CONTENT = {
    "s1.safetensors": {"a": torch.ones(2), "b": torch.zeros(3, dtype=torch.bfloat16)},
    "s2.safetensors": {"c": torch.arange(4, dtype=torch.int64)},
    "sub/s3.safetensors": {"d": torch.ones(1, 2)},
}
BIN_CONTENT = {"w.bin": {"e": torch.ones(3, dtype=torch.float16)}}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, Path]:
    """``(checkpoint dir, outside dir)``: shards, a torch shard, and links leading outside."""
    base = tmp_path_factory.mktemp("index-fuzz")
    ckpt, outside = base / "ckpt", base / "outside"
    (ckpt / "sub").mkdir(parents=True)
    outside.mkdir()
    for name, tensors in SHARD_CONTENT.items():
        save_file(tensors, str(ckpt / name))
    for name, tensors in BIN_CONTENT.items():
        torch.save(tensors, ckpt / name)
    save_file({"a": torch.ones(2), "x": torch.ones(1)}, str(outside / "secret.safetensors"))
    torch.save({"e": torch.ones(3, dtype=torch.float16)}, outside / "secret.bin")
    (ckpt / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (ckpt / "dirlink").symlink_to(outside, target_is_directory=True)
    (ckpt / "notes.txt").write_text("not a shard")
    return ckpt, outside


@pytest.fixture(scope="module")
def manager(tree) -> loaderkit.plugin.PluginManager:
    """A plugin manager made (entry points read) and warmed up before any file is spied on."""
    mgr = loaderkit.plugin.PluginManager(autoload=False)
    index = tree[0] / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "e": "w.bin"}}))
    assert set(loaderkit.inspect(index, manager=mgr).tensors) == {"a", "e"}
    return mgr


def shard_names(tree_root: str) -> st.SearchStrategy[str]:
    known = [
        *SHARD_CONTENT, *BIN_CONTENT, "missing.safetensors", "../outside/secret.safetensors",
        "../outside/secret.bin", f"{tree_root}/../outside/secret.safetensors", "/etc/passwd",
        "link.safetensors", "dirlink/secret.safetensors", "dirlink/secret.bin", "sub/../s1.safetensors",
        "./s1.safetensors", "sub//s3.safetensors", "sub\\s3.safetensors", "..\\outside\\secret.safetensors",
        "C:\\x.safetensors", "C:x.safetensors", "\\\\server\\share\\x.safetensors", "s1.safetensors\x00",
        "S1.SAFETENSORS", "notes.txt", "model.safetensors.index.json", ".", "..", "sub", "sub/", "",
        "~/s1.safetensors", "dirlink", "/",
    ]
    return st.sampled_from(known) | st.text(max_size=12)


TRUTH = {
    name: (shard, tuple(t.shape), str(t.dtype).removeprefix("torch."))
    for shard, tensors in {**SHARD_CONTENT, **BIN_CONTENT}.items()
    for name, t in tensors.items()
}


TENSOR_NAMES = st.sampled_from(["a", "b", "c", "d", "e", "x", "zz", ""]) | st.text(max_size=4)


@st.composite
def index_files(draw, tree_root: str) -> bytes:
    """An index: usually a correct ``weight_map`` over some of the tree's tensors plus a few
    hostile entries (names leading outside, missing shards, wrong tensors, non-strings),
    sometimes any JSON or bytes."""
    kind = draw(st.sampled_from(["map"] * 6 + ["json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    right = draw(st.lists(st.sampled_from(sorted(TRUTH)), min_size=1, unique=True))
    weight_map: dict[str, Any] = {name: TRUTH[name][0] for name in right}
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        weight_map[draw(TENSOR_NAMES)] = draw(shard_names(tree_root) | json_values)
    body: dict[str, Any] = {"weight_map": dict(draw(st.permutations(list(weight_map.items()))))}
    if draw(st.booleans()):
        body["metadata"] = draw(json_values)
    return json.dumps(body).encode()


@FUZZ
@given(data=st.data())
def test_arbitrary_index_describes_consistently_or_raises_and_reads_only_inside(tree, manager, data) -> None:
    ckpt, outside = tree
    raw = data.draw(index_files(str(ckpt)))
    index = ckpt / "model.safetensors.index.json"
    index.write_bytes(raw)
    with watch_opens() as log:
        got = outcome(lambda: loaderkit.inspect(index, manager=manager))
    assert log.outside(ckpt) == [], f"read outside the checkpoint: {log.outside(ckpt)}"
    if isinstance(got, LoaderKitError):
        assert got.path is not None and got.path.startswith(str(ckpt)), got
        return
    weight_map = json.loads(raw)["weight_map"]
    assert set(got.tensors) == set(weight_map) and set(got.files) == set(weight_map.values())
    for name, info in got.tensors.items():
        assert (Path(got.root) / info.file).resolve().is_relative_to(ckpt.resolve())
        shard, shape, dtype = TRUTH[name]
        assert (Path(got.root) / info.file).resolve() == (ckpt / shard).resolve()
        assert (info.shape, info.dtype) == (shape, dtype)
        assert info.nbytes == numel(shape) * to_torch(dtype).itemsize
