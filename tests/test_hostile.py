"""Hostile and broken inputs, end to end: every one fails with a :class:`~loaderkit.LoaderKitError`
that names the file (and tensor), returns no model, leaves a user's module unchanged, runs no
code from the checkpoint and reads nothing outside the checkpoint directory.

The parser-level cases live in ``test_formats.py`` / ``test_fp8_formats.py``; here the same kinds
of damage go through ``loaderkit.load`` / ``loaderkit.plan`` / the ``loaderkit`` command, with
every way of opening a file spied on. Broken files are crafted by hand from real ones (a file
written by ``safetensors.torch.save_file`` whose header is then edited).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import types
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file

import loaderkit
from loaderkit import CheckpointError, LoaderKitError
from loaderkit import cli
from loaderkit.plugin import CorruptCheckpointError, UnsafeCheckpointError
from loaderkit.plugins import fp8_formats
from loaderkit.plugins.safetensors_format import SafetensorsFormat

import fp8_writers as W
from conftest import TinyNet, assert_snapshot_equal, save_st, seeded, snapshot

# -------------------------------------------------------------------------------------------
# spies and helpers
# -------------------------------------------------------------------------------------------


class OpenLog:
    """What was opened while :func:`watch_opens` was active.

    :ivar paths: every path opened by ``builtins.open``/``io.open``, ``os.open``,
        ``safetensors.safe_open`` or ``torch.load`` (file descriptors are not paths and are skipped).
    :ivar resolved: the same paths with links resolved at the moment they were opened.
    :ivar safe_opens: paths given to ``safetensors.safe_open``.
    :ivar torch_loads: ``(path, kwargs)`` of every ``torch.load`` call.
    :ivar unpickles: calls of ``pickle.load``/``pickle.loads``/``pickle.Unpickler`` (unsafe unpickling).
    """

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.resolved: list[Path] = []
        self.safe_opens: list[str] = []
        self.torch_loads: list[tuple[str, dict]] = []
        self.unpickles: list[str] = []

    def note(self, f: object) -> None:
        if isinstance(f, (str, bytes, os.PathLike)):
            self.paths.append(os.fsdecode(f))
            self.resolved.append(Path(os.fsdecode(f)).resolve())

    def under(self, directory: Path) -> list[str]:
        """Opened paths that were, or led (through links), inside ``directory`` when opened."""
        root = directory.resolve()
        return [p for p, r in zip(self.paths, self.resolved) if r.is_relative_to(root)]

    def outside(self, directory: Path) -> list[str]:
        """Opened paths that were not, and did not lead, inside ``directory`` when opened."""
        root = directory.resolve()
        return [p for p, r in zip(self.paths, self.resolved) if not r.is_relative_to(root)]


@contextlib.contextmanager
def watch_opens() -> Iterator[OpenLog]:
    """Record every file opened (see :class:`OpenLog`) for the duration of the block."""
    log = OpenLog()
    real_open, real_os_open = builtins.open, os.open
    real_safe_open, real_torch_load = safetensors.safe_open, torch.load
    real_pickle = (pickle.load, pickle.loads, pickle.Unpickler)

    def spy_open(file, *args, **kwargs):
        log.note(file)
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        log.note(path)
        return real_os_open(path, *args, **kwargs)

    def spy_safe_open(path, *args, **kwargs):
        log.note(path)
        shown = os.fsdecode(path)
        if shown.startswith("/proc/self/fd/"):  # a file reopened through its descriptor: which one
            shown = os.readlink(shown)
        log.safe_opens.append(shown)
        return real_safe_open(path, *args, **kwargs)

    def spy_torch_load(f, *args, **kwargs):
        log.note(f)
        log.torch_loads.append((os.fsdecode(f) if isinstance(f, (str, os.PathLike)) else repr(f), dict(kwargs)))
        return real_torch_load(f, *args, **kwargs)

    class SpyUnpickler(real_pickle[2]):
        def __init__(self, *args, **kwargs):
            log.unpickles.append("Unpickler")
            super().__init__(*args, **kwargs)

    patches = [
        (builtins, "open", spy_open), (io, "open", spy_open), (os, "open", spy_os_open),
        (safetensors, "safe_open", spy_safe_open), (torch, "load", spy_torch_load),
        (pickle, "load", lambda *a, **k: log.unpickles.append("load") or real_pickle[0](*a, **k)),
        (pickle, "loads", lambda *a, **k: log.unpickles.append("loads") or real_pickle[1](*a, **k)),
        (pickle, "Unpickler", SpyUnpickler),
    ]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, fn in patches:
            setattr(obj, name, fn)
        yield log
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


def names_file(err: Exception, path: Path) -> bool:
    """True if the message names ``path`` (as given, absolute or resolved)."""
    msg = str(err)
    return any(str(p) in msg for p in {path, path.absolute(), path.resolve()})


def load_fails(
    path: Path,
    cls: type[Exception] = LoaderKitError,
    *,
    strategy: str = "fp32",
    model: Callable[[], torch.nn.Module] = TinyNet,
    file: Path | None = None,
    tensor: str | None = None,
    needles: tuple[str, ...] = (),
    check_file: bool = True,
) -> LoaderKitError:
    """``loaderkit.load(path)`` into a fresh user module must raise ``cls``, return nothing, name
    ``file`` (default ``path``; unless ``check_file`` is false) and ``tensor``, and leave the
    module exactly as it was."""
    target = model()
    before = snapshot(target)
    params = {k: id(p) for k, p in target.named_parameters()}
    result = None
    with pytest.raises(cls) as exc:
        result = loaderkit.load(path, strategy, model=target)
    err = exc.value
    assert isinstance(err, LoaderKitError)
    assert result is None
    assert not check_file or names_file(err, file or path), f"{file or path} not named in: {err}"
    if tensor is not None:
        assert err.tensor == tensor and tensor in str(err), f"tensor {tensor!r}: {err.tensor!r} / {err}"
    for needle in needles:
        assert needle in str(err), f"{needle!r} missing from: {err}"
    assert_snapshot_equal(target, before)
    assert {k: id(p) for k, p in target.named_parameters()} == params
    return err


def tiny_file(path: Path) -> Path:
    """A float32 :class:`TinyNet` written by ``save_file``."""
    return save_st(path, seeded(TinyNet))


def split_file(path: Path) -> tuple[dict, bytes]:
    """``(header dict, data buffer)`` of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_file(header: dict | str | bytes, data: bytes) -> bytes:
    """A safetensors file image from a header (dict, text or raw bytes) and a data buffer."""
    if isinstance(header, dict):
        header = json.dumps(header)
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + data


def by_offset(header: dict) -> list[str]:
    """Tensor names of a header in data-offset order."""
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


@contextlib.contextmanager
def registered(plugin: Any, name: str) -> Iterator[str]:
    """Register ``plugin`` with the process-wide manager for the block."""
    got = loaderkit.register(plugin, name=name)
    try:
        yield got
    finally:
        loaderkit.unregister(got)


def plugin_module(name: str, **hooks: Callable) -> types.ModuleType:
    mod = types.ModuleType(name)
    for hook, fn in hooks.items():
        setattr(mod, hook, loaderkit.hookimpl(fn))
    return mod


def on_plan_ready(action: Callable[[], None]) -> types.ModuleType:
    """A plugin that runs ``action`` once the plan is made, before any tensor is read: the
    checkpoint changes on disk between describing and streaming."""
    return plugin_module("changer", loaderkit_plan_ready=lambda plan: action())


def test_the_spy_sees_every_way_of_opening(tmp_path: Path) -> None:
    """Positive control for the assertions below that something was *not* opened."""
    _two_shards(tmp_path, both="")
    torch.save(seeded(TinyNet).state_dict(), tmp_path / "w.pt")
    with watch_opens() as log:
        loaderkit.load(tmp_path, "fp32", model=TinyNet())
        loaderkit.load(tmp_path / "w.pt", "fp32", model=TinyNet())
        pickle.loads(pickle.dumps(1))
    shards = {str(tmp_path / f"model-0000{i}-of-00002.safetensors") for i in (1, 2)}
    assert shards <= set(log.safe_opens) and shards <= set(log.paths)
    assert str(tmp_path / "model.safetensors.index.json") in log.paths
    assert [p for p, _ in log.torch_loads] == [str(tmp_path / "w.pt")]
    assert log.unpickles == ["loads"]


# -------------------------------------------------------------------------------------------
# safetensors: every kind of damage, through load and plan
# -------------------------------------------------------------------------------------------


def _truncated(h: dict, data: bytes):
    return h, data[:-10], by_offset(h)[-1], "truncated"


def _header_past_end(h: dict, data: bytes):
    raw = json.dumps(h).encode()
    return struct.pack("<Q", len(raw) + len(data) + 1) + raw + data, None, "byte header"


def _not_json(h: dict, data: bytes):
    raw = json.dumps(h).replace('"shape"', "'shape'", 1)
    return raw, data, None, "not valid JSON"


def _not_utf8(h: dict, data: bytes):
    raw = json.dumps(h).encode().replace(b"proj.bias", b"proj.\xff\xfeas", 1)
    return raw, data, None, "not UTF-8"


def _overlap(h: dict, data: bytes):
    last = by_offset(h)[-1]
    b, e = h[last]["data_offsets"]
    h[last]["data_offsets"] = [b - 4, e - 4]
    return h, data[:-4], last, "overlap"


def _out_of_range(h: dict, data: bytes):
    last = by_offset(h)[-1]
    b, e = h[last]["data_offsets"]
    h[last]["data_offsets"] = [b + 4, e + 4]
    return h, data, last, "data ends at byte"


def _gap(h: dict, data: bytes):
    last = by_offset(h)[-1]
    b, e = h[last]["data_offsets"]
    h[last]["data_offsets"] = [b + 4, e + 4]
    return h, data + bytes(4), last, "gap"


def _trailing(h: dict, data: bytes):
    return h, data + bytes(8), None, "8 trailing bytes"


def _shape_mismatch(h: dict, data: bytes):
    h["proj.weight"]["shape"] = [8, 8]
    return h, data, "proj.weight", "needs 256 bytes"


def _dtype_mismatch(h: dict, data: bytes):
    h["proj.weight"]["dtype"] = "F16"
    return h, data, "proj.weight", "needs 256 bytes"


def _unknown_dtype(h: dict, data: bytes):
    h["norm.bias"]["dtype"] = "Q4_K"
    return h, data, "norm.bias", "unknown dtype"


def _dtype_not_a_string(h: dict, data: bytes):
    h["norm.bias"]["dtype"] = ["F32"]
    return h, data, "norm.bias", "unknown dtype"


def _huge_dimension(h: dict, data: bytes):
    end = h[by_offset(h)[-1]]["data_offsets"][1]
    h["ghost"] = {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [end, end]}  # 0 bytes
    return h, data, "ghost", "largest torch can hold"


def _f6_dtype(h: dict, data: bytes):
    h["norm.bias"]["dtype"] = "F6_E3M2"
    return h, data, "norm.bias", "F6_E3M2"


def _duplicate(h: dict, data: bytes):
    raw = json.dumps(h)
    entry = json.dumps(h["head.bias"])
    return raw[:-1] + f', "head.bias": {entry}}}', data, "head.bias", "twice"


SAFETENSORS_DAMAGE = {
    "truncated": _truncated,
    "header-past-end": _header_past_end,
    "not-json": _not_json,
    "not-utf8": _not_utf8,
    "overlapping-offsets": _overlap,
    "offsets-out-of-range": _out_of_range,
    "offsets-leave-a-gap": _gap,
    "trailing-bytes": _trailing,
    "shape-mismatch": _shape_mismatch,
    "dtype-mismatch": _dtype_mismatch,
    "unknown-dtype": _unknown_dtype,
    "dtype-not-a-string": _dtype_not_a_string,
    "huge-dimension": _huge_dimension,
    "f6-dtype": _f6_dtype,
    "duplicate-name": _duplicate,
}


def damaged(tmp_path: Path, case: str) -> tuple[Path, str | None, str]:
    """A real TinyNet safetensors file with ``case`` applied: ``(path, tensor named, phrase)``."""
    good = tiny_file(tmp_path / "good.safetensors")
    header, data = split_file(good)
    out = SAFETENSORS_DAMAGE[case](header, data)
    content = out[0] if len(out) == 3 else join_file(out[0], out[1])
    tensor, phrase = out[-2], out[-1]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(content)
    return path, tensor, phrase


@pytest.mark.parametrize("case", sorted(SAFETENSORS_DAMAGE))
def test_damaged_safetensors_fail_load_before_any_data_is_read(tmp_path: Path, case: str) -> None:
    path, tensor, phrase = damaged(tmp_path, case)
    with watch_opens() as log:
        err = load_fails(path, CorruptCheckpointError, tensor=tensor, needles=(phrase,))
    assert not log.safe_opens and not log.torch_loads, "tensor data was opened before the header was validated"
    assert err.path in {str(path), str(path.absolute()), str(path.resolve())}


@pytest.mark.parametrize("case", ["truncated", "not-json", "duplicate-name", "f6-dtype"])
def test_damaged_safetensors_fail_plan(tmp_path: Path, case: str) -> None:
    path, tensor, _ = damaged(tmp_path, case)
    with pytest.raises(CorruptCheckpointError) as exc:
        loaderkit.plan(path, "fp8", model=TinyNet)
    assert names_file(exc.value, path) and exc.value.tensor == tensor


def test_damaged_file_inside_a_model_directory_names_the_file(tmp_path: Path) -> None:
    path, tensor, _ = damaged(tmp_path, "overlapping-offsets")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(path, model_dir / "model.safetensors")
    load_fails(model_dir, CorruptCheckpointError, file=model_dir / "model.safetensors", tensor=tensor)


def _two_shards(directory: Path, both: str) -> Path:
    """TinyNet split over two shards; tensor ``both`` is stored in each of them."""
    sd = {k: v.contiguous() for k, v in seeded(TinyNet).state_dict().items()}
    keys = list(sd)
    first, second = keys[:3], keys[3:]
    extra = [both] if both else []
    save_file({k: sd[k] for k in [*first, *extra]}, str(directory / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in [*second, *extra]}, str(directory / "model-00002-of-00002.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in second})
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_duplicate_name_across_shards_fails_load(tmp_path: Path) -> None:
    _two_shards(tmp_path, both="norm.weight")
    err = load_fails(tmp_path, CorruptCheckpointError, tensor="norm.weight", needles=("two shards",))
    assert "'model-00001-of-00002.safetensors'" in str(err) and "'model-00002-of-00002.safetensors'" in str(err)
    assert err.path == str(tmp_path / "model-00002-of-00002.safetensors")


def _deep_json(depth: int = 100_000) -> str:
    return '{"a": ' + "[" * depth + "]" * depth + "}"


def test_deeply_nested_header_and_index_are_refused(tmp_path: Path) -> None:
    raw = _deep_json().encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    load_fails(path, CorruptCheckpointError, needles=("not valid JSON",))
    index, _ = sharded_tiny(tmp_path / "sharded")
    index.write_text(_deep_json())
    load_fails(index, CorruptCheckpointError, needles=("not valid JSON",))


def test_deeply_nested_config_json_is_refused(tmp_path: Path) -> None:
    tiny_file(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(_deep_json())
    load_fails(tmp_path, CorruptCheckpointError, file=tmp_path / "config.json")


# -------------------------------------------------------------------------------------------
# a checkpoint that changes on disk between plan and load
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", ["all-but-4", "half", "20", "0"])
def test_file_truncated_after_describe_fails_cleanly(tmp_path: Path, keep: str) -> None:
    path = tiny_file(tmp_path / "tiny.safetensors")
    size = path.stat().st_size
    cut = {"all-but-4": size - 4, "half": size // 2, "20": 20, "0": 0}[keep]

    def truncate() -> None:
        with open(path, "r+b") as f:
            f.truncate(cut)

    with registered(on_plan_ready(truncate), "truncate-after-plan"):
        load_fails(path, CorruptCheckpointError, strategy="bf16")


def test_file_rewritten_with_other_shapes_after_describe_names_the_tensor(tmp_path: Path) -> None:
    path = tiny_file(tmp_path / "tiny.safetensors")
    sd = load_file(str(path))

    def rewrite() -> None:
        save_file({**sd, "proj.weight": sd["proj.weight"].t().contiguous()}, str(path))

    with registered(on_plan_ready(rewrite), "rewrite-after-plan"):
        load_fails(path, CorruptCheckpointError, tensor="proj.weight", needles=("changed after",))


def test_shard_deleted_after_describe_names_it(tmp_path: Path) -> None:
    _two_shards(tmp_path, both="")
    shard = tmp_path / "model-00002-of-00002.safetensors"
    with registered(on_plan_ready(shard.unlink), "delete-after-plan"):
        load_fails(tmp_path, CheckpointError, needles=(shard.name,))


def test_shard_swapped_for_a_link_outside_after_describe_is_not_read(tmp_path: Path) -> None:
    ckpt, outside = tmp_path / "ckpt", tmp_path / "outside"
    ckpt.mkdir()
    outside.mkdir()
    _two_shards(ckpt, both="")
    shard = ckpt / "model-00002-of-00002.safetensors"
    secret = outside / "secret.safetensors"
    save_file({k: torch.full_like(v, 7.0) for k, v in load_file(str(shard)).items()}, str(secret))

    def swap() -> None:
        shard.unlink()
        shard.symlink_to(secret)

    with registered(on_plan_ready(swap), "swap-after-plan"), watch_opens() as log:
        load_fails(ckpt, UnsafeCheckpointError, needles=(shard.name, "outside"))
    assert not log.under(outside), f"read outside the checkpoint: {log.under(outside)}"


def test_torch_file_truncated_after_describe_fails_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(seeded(TinyNet).state_dict(), path)

    def truncate() -> None:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)

    with registered(on_plan_ready(truncate), "truncate-bin-after-plan"):
        load_fails(tmp_path, CorruptCheckpointError, file=path)


# -------------------------------------------------------------------------------------------
# index files
# -------------------------------------------------------------------------------------------


def sharded_tiny(directory: Path) -> tuple[Path, dict[str, str]]:
    """TinyNet in two safetensors shards; returns ``(index, weight_map)``."""
    directory.mkdir(parents=True, exist_ok=True)
    index = _two_shards(directory, both="")
    return index, json.loads(index.read_text())["weight_map"]


@pytest.mark.parametrize("content,phrase", [
    (b'{"weight_map": {"proj.weight": "model-00001-of-00002.safetensors",', "not valid JSON"),
    (b'{"metadata": {"total_size": 1}}', "weight_map"),
    (b'{"weight_map": ["model-00001-of-00002.safetensors"]}', "weight_map"),
], ids=["malformed-json", "missing-weight-map", "weight-map-not-an-object"])
def test_broken_index_fails_load_without_opening_shards(tmp_path: Path, content: bytes, phrase: str) -> None:
    index, _ = sharded_tiny(tmp_path)
    index.write_bytes(content)
    with watch_opens() as log:
        load_fails(tmp_path, CorruptCheckpointError, file=index, needles=(phrase,))
    assert not log.safe_opens and not [p for p in log.paths if p.endswith(".safetensors")]


def test_index_naming_a_missing_shard_fails_load(tmp_path: Path) -> None:
    index, weight_map = sharded_tiny(tmp_path)
    weight_map["head.bias"] = "model-00003-of-00003.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    err = load_fails(tmp_path, CheckpointError, file=index, needles=("'model-00003-of-00003.safetensors'", "missing"))
    assert not isinstance(err, UnsafeCheckpointError)


def test_index_mapping_a_tensor_to_a_shard_without_it_fails_load(tmp_path: Path) -> None:
    index, weight_map = sharded_tiny(tmp_path)
    weight_map["proj.weight"] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    load_fails(tmp_path, CorruptCheckpointError, file=index, tensor="proj.weight", needles=("does not contain",))


ESCAPES = ["absolute", "dotdot", "file-symlink", "dir-symlink", "bin-dotdot"]


def escaping_index(tmp_path: Path, kind: str) -> tuple[Path, Path, Path]:
    """A checkpoint whose index names a shard leading outside it: ``(ckpt dir, index, outside)``.

    The outside shard holds exactly the tensors the index maps to it, so a reader that followed
    the name would load it without complaint.
    """
    ckpt, outside = tmp_path / "ckpt", tmp_path / "outside"
    outside.mkdir()
    index, weight_map = sharded_tiny(ckpt)
    second = ckpt / "model-00002-of-00002.safetensors"
    stolen = load_file(str(second))
    if kind == "bin-dotdot":
        torch.save(stolen, outside / "secret.bin")
        name = "../outside/secret.bin"
    else:
        save_file(stolen, str(outside / "secret.safetensors"))
        name = {
            "absolute": str(outside / "secret.safetensors"),
            "dotdot": "../outside/secret.safetensors",
            "file-symlink": "link.safetensors",
            "dir-symlink": "sub/secret.safetensors",
        }[kind]
    if kind == "file-symlink":
        (ckpt / "link.safetensors").symlink_to(outside / "secret.safetensors")
    if kind == "dir-symlink":
        (ckpt / "sub").symlink_to(outside, target_is_directory=True)
    second.unlink()
    index.write_text(json.dumps({"weight_map": {k: (name if v == second.name else v) for k, v in weight_map.items()}}))
    return ckpt, index, outside


@pytest.mark.parametrize("kind", ESCAPES)
def test_shards_outside_the_directory_are_never_opened_by_load(tmp_path: Path, kind: str) -> None:
    ckpt, index, outside = escaping_index(tmp_path, kind)
    with watch_opens() as log:
        err = load_fails(ckpt, UnsafeCheckpointError, file=index)
        with pytest.raises(UnsafeCheckpointError):
            loaderkit.plan(index, "fp8", model=TinyNet)
    assert "not opened" in str(err)
    assert not log.under(outside), f"opened outside the checkpoint: {log.under(outside)}"
    assert all(not p.startswith(str(outside)) for p in log.safe_opens + [p for p, _ in log.torch_loads])


# -------------------------------------------------------------------------------------------
# fp8 scales
# -------------------------------------------------------------------------------------------

FP8_WRITERS = {
    "tensor": (W.write_per_tensor_fp8, "a.weight_scale"),
    "channel": (W.write_fbgemm_fp8, "a.weight_scale"),
    "block": (W.write_block_fp8, "a.weight_scale_inv"),
    "block-ue8m0-u8": (lambda d: W.write_block_fp8(d, scale_fmt="ue8m0", scale_dtype=torch.uint8), "a.weight_scale_inv"),
}


@pytest.fixture(scope="module")
def fp8_dirs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """One written checkpoint per fp8 family, copied by :func:`fp8_copy` before editing."""
    return {name: writer(tmp_path_factory.mktemp(name)) for name, (writer, _) in FP8_WRITERS.items()}


def fp8_copy(fp8_dirs, family: str, dest: Path, edit: Callable[[dict], None] | None = None) -> Path:
    """A copy of a family's checkpoint in ``dest`` with ``edit(tensors)`` applied to its file."""
    shutil.copytree(fp8_dirs[family][0], dest)
    if edit is not None:
        tensors = load_file(str(dest / "model.safetensors"))
        edit(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / "model.safetensors"),
                  metadata={"format": "pt"})
    return dest


def _poison(key: str, value: str) -> Callable[[dict], None]:
    def edit(t: dict) -> None:
        s = t[key]
        if s.dtype == torch.uint8:  # ue8m0 bytes: 255 is NaN; 2**(254-127) is finite, nothing negative
            s.view(-1)[0] = 255
        else:
            s.view(-1)[0] = {"nan": float("nan"), "inf": float("inf"), "negative": -0.5}[value]

    return edit


BAD_SCALES = [  # ue8m0 bytes cannot encode infinities or negatives: byte 255 is their only bad value
    (family, value) for family in FP8_WRITERS for value in ("nan", "inf", "negative")
    if family != "block-ue8m0-u8" or value == "nan"
]


@pytest.mark.parametrize("strategy", ["fp32", "fp8"])
@pytest.mark.parametrize("family,value", BAD_SCALES)
def test_bad_scale_values_fail_load(fp8_dirs, tmp_path, family, value, strategy) -> None:
    """fp32 dequantizes (the scheme checks the scale); fp8 keeps the stored bytes (the stream
    checks the scale it installs as a buffer). Both refuse, naming the scale."""
    _, key = FP8_WRITERS[family]
    path = fp8_copy(fp8_dirs, family, tmp_path / "ckpt", _poison(key, value))
    err = CorruptCheckpointError
    target = W.TinyNet()
    before = snapshot(target)
    result = None
    with pytest.raises(err) as exc:
        result = loaderkit.load(path, strategy, model=target)
    assert result is None and exc.value.tensor == key and key in str(exc.value)
    assert_snapshot_equal(target, before)


@pytest.mark.parametrize("family", ["tensor", "channel", "block", "block-ue8m0-u8"])
def test_zero_scale_over_a_zero_block_is_legal(fp8_dirs, tmp_path, family) -> None:
    _, key = FP8_WRITERS[family]

    def zero_first_block(t: dict) -> None:
        w = t["a.weight"].float()
        region = {"tensor": (slice(None), slice(None)), "channel": (slice(0, 1), slice(None))}.get(
            family, (slice(0, 128), slice(0, 128)))
        w[region] = 0.0
        t["a.weight"] = w.to(W.E4M3)
        t[key].view(-1)[0] = 0  # float 0.0, or ue8m0 byte 0 (2**-127: the smallest scale)

    path = fp8_copy(fp8_dirs, family, tmp_path / "ckpt", zero_first_block)
    full = loaderkit.load(path, "fp32", model=W.TinyNet())
    rows, cols = {"tensor": (320, 200), "channel": (1, 200)}.get(family, (128, 128))
    assert torch.equal(full.a.weight[:rows, :cols], torch.zeros(rows, cols))
    fp8 = loaderkit.load(path, "fp8", model=W.TinyNet())
    assert fp8.a.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        out = fp8(torch.randn(2, 200, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    assert bool(torch.isfinite(out.float()).all())


def _wrong_grid(t: dict) -> None:
    t["a.weight_scale_inv"] = torch.ones(2, 2)  # floor division grid; [3, 2] is right


def _orphan_scale(t: dict) -> None:
    t["c.weight_scale"] = torch.tensor(1.0)


def _drop_scale(t: dict) -> None:
    del t["a.weight_scale_inv"]


FP8_STRUCTURE = {
    # case: (family, edit, tensor named, phrase)
    "wrong-scale-shape": ("block", _wrong_grid, "a.weight_scale_inv", "[3, 2]"),
    "wrong-channel-scale-shape": ("channel", lambda t: t.__setitem__("a.weight_scale", torch.ones(1, 320)),
                                  "a.weight_scale", "[1, 320]"),
    "scale-without-weight": ("tensor", _orphan_scale, "c.weight_scale", "no weight"),
    "weight-without-scale": ("block", _drop_scale, "a.weight", "no scale"),
}


@pytest.mark.parametrize("strategy", ["fp32", "fp8"])
@pytest.mark.parametrize("case", sorted(FP8_STRUCTURE))
def test_inconsistent_fp8_tensors_fail_load(fp8_dirs, tmp_path, case, strategy) -> None:
    family, edit, tensor, phrase = FP8_STRUCTURE[case]
    path = fp8_copy(fp8_dirs, family, tmp_path / "ckpt", edit)
    target = W.TinyNet()
    before = snapshot(target)
    with watch_opens() as log, pytest.raises(CorruptCheckpointError) as exc:
        loaderkit.load(path, strategy, model=target)
    assert exc.value.tensor == tensor and tensor in str(exc.value) and phrase in str(exc.value)
    assert not log.safe_opens, "refused from headers, before any tensor data is opened"
    assert_snapshot_equal(target, before)


def test_fp8_header_errors_name_the_checkpoint(fp8_dirs, tmp_path) -> None:
    path = fp8_copy(fp8_dirs, "tensor", tmp_path / "ckpt", _orphan_scale)
    with pytest.raises(CorruptCheckpointError) as exc:
        loaderkit.load(path, "fp32", model=W.TinyNet())
    assert exc.value.path is not None and names_file(exc.value, path)


def test_fp8_decode_errors_name_the_checkpoint(fp8_dirs, tmp_path) -> None:
    path = fp8_copy(fp8_dirs, "tensor", tmp_path / "ckpt", _poison("a.weight_scale", "nan"))
    with pytest.raises(CorruptCheckpointError) as exc:
        loaderkit.load(path, "fp32", model=W.TinyNet())
    assert exc.value.path is not None and names_file(exc.value, path)


def test_fp8_kept_path_names_the_checkpoint(fp8_dirs, tmp_path) -> None:
    path = fp8_copy(fp8_dirs, "block", tmp_path / "ckpt", _poison("a.weight_scale_inv", "inf"))
    err = load_fails(path, CorruptCheckpointError, strategy="fp8", model=W.TinyNet, tensor="a.weight_scale_inv")
    assert "NaN, Inf or negative" in str(err)


# -------------------------------------------------------------------------------------------
# torch zip checkpoints with pickled code
# -------------------------------------------------------------------------------------------


class CreatesFile:
    """Unpickling this (unsafely) creates ``marker``: the proof that checkpoint code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def evil_state_dict(marker: Path) -> dict:
    sd = dict(seeded(TinyNet).state_dict())
    sd["head.bias"] = CreatesFile(marker)  # in place of a tensor the model needs
    return sd


@pytest.mark.parametrize("layout", ["file", "directory", "sharded"])
@pytest.mark.parametrize("env", [{}, {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}], ids=["default", "force-unsafe-env"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch, layout, env) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    marker = tmp_path / "code-ran"
    sd = evil_state_dict(marker)
    if layout == "sharded":
        keys = list(sd)
        torch.save({k: sd[k] for k in keys[:3]}, tmp_path / "pytorch_model-00001-of-00002.bin")
        torch.save({k: sd[k] for k in keys[3:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
        weight_map = {k: f"pytorch_model-0000{1 + (i >= 3)}-of-00002.bin" for i, k in enumerate(keys)}
        (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        path, file = tmp_path, tmp_path / "pytorch_model-00002-of-00002.bin"
    else:
        file = tmp_path / ("pytorch_model.bin" if layout == "directory" else "evil.pt")
        torch.save(sd, file)
        path = tmp_path if layout == "directory" else file
    with watch_opens() as log:
        err = load_fails(path, UnsafeCheckpointError, file=file,
                         needles=("weights_only", "io.open", "code", "never falls back"))
    assert not marker.exists(), "the pickled payload ran"
    assert "weights_only` set to `False" not in str(err), "torch's advice to load unsafely is not passed on"
    assert log.torch_loads and all(kw.get("weights_only") is True for _, kw in log.torch_loads), log.torch_loads
    assert not log.unpickles, f"an unsafe unpickler was used: {log.unpickles}"


def oversized_tensor_file(path: Path) -> Path:
    """A torch zip whose pickle declares a tensor of 255 elements on a 2-element storage."""
    torch.save({"w": torch.arange(2, dtype=torch.float32)}, path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        pkl = zf.read(name)
    patched = pkl.replace(b"K\x00K\x02\x85", b"K\x00K\xff\x85", 1)  # offset 0, size (2,) -> (255,)
    assert patched != pkl
    start = raw.find(pkl)
    raw[start : start + len(pkl)] = patched
    raw = raw.replace(struct.pack("<I", zlib.crc32(pkl)), struct.pack("<I", zlib.crc32(patched)))
    path.write_bytes(bytes(raw))
    return path


def test_torch_tensor_larger_than_its_storage_is_refused(tmp_path) -> None:
    path = oversized_tensor_file(tmp_path / "oob.pt")
    with pytest.raises(CorruptCheckpointError) as exc:
        loaderkit.inspect(path)
    assert names_file(exc.value, path)


# -------------------------------------------------------------------------------------------
# plugins that raise, return the wrong type, or claim and then fail
# -------------------------------------------------------------------------------------------


class HostileFormat(SafetensorsFormat):
    """Reads ``.hostile`` safetensors files; ``mode`` picks how it misbehaves."""

    name = "hostile-format"
    priority = 1000
    mode = "ok"

    def claim(self, path: Path) -> bool:
        if self.mode == "claim-raises":
            raise RuntimeError("claim exploded")
        return path.suffix == ".hostile"

    def describe(self, path: Path):
        if self.mode == "describe-raises":
            raise KeyError("header field absent")
        if self.mode == "describe-wrong-type":
            return {"tensors": {}}
        return super().describe(path).model_copy(update={"format": self.name})

    def open(self, checkpoint):
        if self.mode == "open-raises":
            raise OSError("cannot map the file")
        if self.mode == "open-wrong-type":
            return None
        reader = super().open(checkpoint)
        mode = self.mode

        class Reader:
            def get(self, name):
                if mode == "get-raises" and name == "norm.weight":
                    raise ValueError("read error in norm.weight")
                if mode == "get-wrong-type":
                    return reader.get(name).tolist()
                return reader.get(name)

            def close(self):
                reader.close()

        return Reader()


class HostileScheme(fp8_formats.PerTensorFp8):
    """Claims per-tensor fp8 checkpoints ahead of the built-in; misbehaves when decoding."""

    name = "hostile-scheme"
    priority = 1000
    mode = "ok"

    def detect(self, checkpoint):
        if self.mode == "detect-raises":
            raise IndexError("detect exploded")
        if self.mode == "detect-wrong-type":
            return {"scheme": "fp8"}
        return super().detect(checkpoint)

    def dequantize(self, q, weight, tensors, dtype):
        if self.mode == "dequantize-raises":
            raise ZeroDivisionError("dequantize exploded")
        if self.mode == "dequantize-wrong-type":
            return weight.float().tolist()
        return super().dequantize(q, weight, tensors, dtype)


def _hostile_plugin(mode: str, fmt: bool) -> types.ModuleType:
    obj = (HostileFormat if fmt else HostileScheme)()
    obj.mode = mode
    hook = "loaderkit_register_formats" if fmt else "loaderkit_register_schemes"
    return plugin_module("hostile", **{hook: lambda register: register(obj)})


PLUGIN_FAILURES = [
    pytest.param("claim-raises", True, id="format-claim-raises"),
    pytest.param("describe-raises", True, id="format-claims-then-describe-raises"),
    pytest.param("describe-wrong-type", True, id="format-describe-wrong-type"),
    pytest.param("open-raises", True, id="format-open-raises"),
    pytest.param("open-wrong-type", True, id="format-open-wrong-type"),
    pytest.param("get-raises", True, id="reader-get-raises"),
    pytest.param("get-wrong-type", True, id="reader-get-wrong-type"),
    pytest.param("detect-raises", False, id="scheme-detect-raises"),
    pytest.param("detect-wrong-type", False, id="scheme-detect-wrong-type"),
    pytest.param("dequantize-raises", False, id="scheme-dequantize-raises"),
    pytest.param("dequantize-wrong-type", False, id="scheme-dequantize-wrong-type"),
]


@pytest.mark.parametrize("mode,fmt", PLUGIN_FAILURES)
def test_misbehaving_plugin_fails_the_load_whole_and_is_named(fresh_manager, fp8_dirs, tmp_path, mode, fmt) -> None:
    if fmt:
        path, model = tiny_file(tmp_path / "tiny.hostile"), TinyNet
    else:
        path, model = fp8_copy(fp8_dirs, "tensor", tmp_path / "ckpt"), W.TinyNet
    with registered(_hostile_plugin(mode, fmt), "hostile"):
        err = load_fails(path, LoaderKitError, model=model, strategy="fp32", check_file=False)
    assert err.plugin == "hostile" and "'hostile'" in str(err), f"plugin not named: {err!r}"


class ScaleReaderFails(SafetensorsFormat):
    """Claims fp8 checkpoint directories; its reader fails on scale tensors only."""

    name = "scale-reader-fails"
    priority = 1000

    def claim(self, path: Path) -> bool:
        return path.is_dir() and (path / "model.safetensors").is_file()

    def describe(self, path: Path):
        return super().describe(path).model_copy(update={"format": self.name})

    def open(self, checkpoint):
        inner = super().open(checkpoint)

        class Reader:
            def get(self, name):
                if name.endswith("_scale"):
                    raise ValueError(f"cannot read {name}")
                return inner.get(name)

            def close(self):
                inner.close()

        return Reader()


@pytest.mark.parametrize("strategy", ["fp32", "fp8"])
def test_reader_failing_on_a_scale_is_named(fresh_manager, fp8_dirs, tmp_path, strategy) -> None:
    path = fp8_copy(fp8_dirs, "tensor", tmp_path / "ckpt")
    plugin = plugin_module("scale-reader", loaderkit_register_formats=lambda register: register(ScaleReaderFails()))
    with registered(plugin, "scale-reader"):
        err = load_fails(path, LoaderKitError, model=W.TinyNet, strategy=strategy, check_file=False)
    assert err.plugin == "scale-reader"


# -------------------------------------------------------------------------------------------
# the command line: one line on stderr, exit 1, no traceback
# -------------------------------------------------------------------------------------------


def _cli_not_json(tmp_path: Path) -> tuple[Path, Path]:
    path, _, _ = damaged(tmp_path, "not-json")
    return path, path


def _cli_truncated(tmp_path: Path) -> tuple[Path, Path]:
    path, _, _ = damaged(tmp_path, "truncated")
    return path, path


def _cli_escaping_shard(tmp_path: Path) -> tuple[Path, Path]:
    ckpt, index, _ = escaping_index(tmp_path, "dotdot")
    return ckpt, index


def _cli_missing_shard(tmp_path: Path) -> tuple[Path, Path]:
    index, _ = sharded_tiny(tmp_path)
    (tmp_path / "model-00001-of-00002.safetensors").unlink()
    return index, index


def _cli_pickled_code(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "evil.bin"
    torch.save(evil_state_dict(tmp_path / "code-ran"), path)
    return path, path


def _cli_truncated_zip(tmp_path: Path) -> tuple[Path, Path]:
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:1500])
    return path, path


CLI_CASES = {
    "not-json": _cli_not_json,
    "truncated": _cli_truncated,
    "escaping-shard": _cli_escaping_shard,
    "missing-shard": _cli_missing_shard,
    "pickled-code": _cli_pickled_code,
    "truncated-zip": _cli_truncated_zip,
}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["inspect", "plan"])
@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_reports_broken_inputs_in_one_line(capsys, tmp_path, case, command) -> None:
    path, named = CLI_CASES[case](tmp_path)
    code, out, err = run_cli(capsys, command, str(path))
    assert code == 1 and out == ""
    assert err.startswith("loaderkit: error: ") and err.endswith("\n")
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert names_file(Exception(err), named), f"{named} not named in: {err}"
    assert not (tmp_path / "code-ran").exists()


def test_cli_error_stays_one_line_for_a_file_name_with_a_newline(capsys, tmp_path) -> None:
    path, _, _ = damaged(tmp_path, "not-json")
    odd = path.rename(tmp_path / "two\nlines.safetensors")
    code, _, err = run_cli(capsys, "inspect", str(odd))
    assert code == 1 and len(err.splitlines()) == 1, err


# -------------------------------------------------------------------------------------------
# docs/security.md names real tests
# -------------------------------------------------------------------------------------------


def test_security_page_cites_tests_that_exist() -> None:
    """Every ``tests/<file>.py::<test>`` and every ``test_<name>`` the page cites is defined (a
    bare name refers to the file cited last before it)."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / "security.md").read_text(encoding="utf-8")
    missing, current = [], None
    for m in re.finditer(r"`(?:tests/(test_\w+)\.py)?(?:::)?(test_\w+)?`", text):
        file, name = m.group(1), m.group(2)
        if file:
            current = root / "tests" / f"{file}.py"
            assert current.is_file(), f"docs/security.md cites missing {current.name}"
        if name:
            assert current is not None, f"{name} cited before any test file"
            if not re.search(rf"^def {name}\(", current.read_text(encoding="utf-8"), re.MULTILINE):
                missing.append(f"{current.name}::{name}")
    assert not missing, f"docs/security.md cites tests that do not exist: {missing}"
