"""The built-in container formats: ``safetensors``, ``sharded`` and ``torchzip``.

Checkpoints are written by the real writers (safetensors, huggingface_hub, transformers,
diffusers, torch.save); malformed ones are crafted byte by byte. Every error case checks the
error class and that the message names the file (and the tensor where there is one).
"""

from __future__ import annotations

import builtins
import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loaderkit
import loaderkit.plugin
from loaderkit import CheckpointError
from loaderkit.plugin import CorruptCheckpointError, UnsafeCheckpointError, UnsupportedCheckpointError
from loaderkit.plugins import _st_header, torchzip
from loaderkit.plugins._st_header import parse_file_bytes
from loaderkit.plugins.directory import pick_in_directory
from loaderkit.plugins.safetensors_format import SafetensorsFormat
from loaderkit.plugins.sharded import ShardedFormat
from loaderkit.plugins.torchzip import TorchZipFormat

from tiny_configs import TINY_LLAMA


# --- helpers ------------------------------------------------------------------------------------


def st_bytes(header: dict | str | bytes, data: bytes | int = 0) -> bytes:
    """A safetensors file image: length prefix, header (dict, text or raw bytes), data buffer."""
    if isinstance(header, dict):
        header = json.dumps(header)
    raw = header.encode() if isinstance(header, str) else header
    body = bytes(data) if isinstance(data, int) else data
    return struct.pack("<Q", len(raw)) + raw + body


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def inspect_error(path: Path, cls: type[Exception], *needles: str) -> Exception:
    """``loaderkit.inspect(path)`` must raise ``cls`` whose message names each needle."""
    with pytest.raises(cls) as exc:
        loaderkit.inspect(path)
    msg = str(exc.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} missing from: {msg}"
    return exc.value


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality for any dtype (fp8/fp4 compared as bytes)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


class ReadSpy:
    """Wraps ``open`` in a module to record the paths opened and the bytes read through them."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.bytes_read = 0

    def __call__(self, path, mode="r", *args, **kwargs):
        self.paths.append(str(path))
        return _CountingFile(builtins.open(path, mode, *args, **kwargs), self)


class _CountingFile:
    def __init__(self, f, spy: ReadSpy) -> None:
        self._f, self._spy = f, spy

    def read(self, n: int = -1) -> bytes:
        out = self._f.read(n)
        self._spy.bytes_read += len(out)
        return out

    def fileno(self) -> int:
        return self._f.fileno()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(5, 7, generator=g)
    return {
        "w.f32": f32,
        "w.bf16": f32.to(torch.bfloat16),
        "w.f16": f32[:3].to(torch.float16),
        "w.e4m3": f32.to(torch.float8_e4m3fn),
        "w.e5m2": f32.to(torch.float8_e5m2),
        "s.e8m0": torch.randint(100, 140, (2, 3), dtype=torch.uint8, generator=g).view(torch.float8_e8m0fnu),
        "w.fp4": torch.randint(0, 255, (4, 3), dtype=torch.uint8, generator=g).view(torch.float4_e2m1fn_x2),
        "ids.i64": torch.arange(6, dtype=torch.int64),
        "mask.bool": torch.tensor([True, False, True]),
        "bytes.u8": torch.arange(9, dtype=torch.uint8),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


# --- safetensors: single files ------------------------------------------------------------------


def test_builtin_formats_are_registered_with_priorities() -> None:
    manager = loaderkit.plugin.PluginManager(autoload=False)
    prio = {e.name: e.obj.priority for e in manager.formats()}
    assert prio["sharded"] == 20 and prio["safetensors"] == 10 and prio["torchzip"] == 0
    names = [e.name for e in manager.formats()]
    assert names.index("sharded") < names.index("safetensors") < names.index("torchzip")


def test_single_file_describe_and_read(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    path = tmp_path / "weights.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    info = loaderkit.inspect(path)
    assert info.format == "safetensors"
    assert info.root == str(tmp_path.resolve()) and info.files == ("weights.safetensors",)
    assert info.metadata == {"format": "pt", "note": "x"}
    assert set(info.tensors) == set(tensors)
    for name, t in tensors.items():
        ti = info.tensors[name]
        assert (ti.shape, ti.torch_dtype, ti.file) == (tuple(t.shape), t.dtype, "weights.safetensors"), name
        assert ti.nbytes == t.numel() * t.element_size(), name
    assert info.tensors["w.fp4"].shape == (4, 3)  # stored as F4 [4, 6]; torch halves the last dim
    header = _st_header.read_header(path)
    assert list(info.tensors) == [e.name for e in header.entries]  # data-offset order
    assert [e.begin for e in header.entries] == sorted(e.begin for e in header.entries)
    with SafetensorsFormat().open(info) as reader:
        for name, t in tensors.items():
            assert same(reader.get(name), t), name


def test_missing_format_metadata_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "comfy.safetensors"
    save_file({"a": torch.ones(2)}, str(path))  # no __metadata__ at all, as ComfyUI files
    info = loaderkit.inspect(path)
    assert info.metadata == {} and info.tensors["a"].shape == (2,)


def test_describe_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    save_file({f"t{i}": torch.randn(64, 64) for i in range(8)}, str(path))
    spy = ReadSpy()
    monkeypatch.setattr(_st_header, "open", spy, raising=False)
    info = loaderkit.inspect(tmp_path)
    assert len(info.tensors) == 8
    assert spy.paths == [str(path.resolve())]
    assert spy.bytes_read == 8 + header_len(path)


def test_describe_a_sparse_terabyte_file(tmp_path: Path) -> None:
    """The data region is never read: a 1 TiB sparse file describes instantly."""
    big = 1 << 40
    header = {"huge": {"dtype": "U8", "shape": [big], "data_offsets": [0, big]}}
    path = write(tmp_path / "sparse.safetensors", st_bytes(header))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + big)
    start = time.perf_counter()
    info = loaderkit.inspect(path)
    assert time.perf_counter() - start < 1.0
    assert info.tensors["huge"].nbytes == big


def test_reader_errors_name_the_tensor_and_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(2)}, str(path))
    info = loaderkit.inspect(path)
    reader = SafetensorsFormat().open(info)
    with pytest.raises(CheckpointError, match="'nope'") as exc:
        reader.get("nope")
    assert str(path.resolve()) in str(exc.value) and exc.value.tensor == "nope"
    reader.close()
    save_file({"a": torch.ones(3)}, str(path))  # replaced after describe
    with SafetensorsFormat().open(info) as reader, pytest.raises(CorruptCheckpointError, match="changed"):
        reader.get("a")


def test_tensors_stay_valid_after_close(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.arange(4.0)}, str(path))
    fmt = SafetensorsFormat()
    with fmt.open(fmt.describe(path)) as reader:
        t = reader.get("a")
    assert torch.equal(t, torch.arange(4.0))


# --- the strict parser --------------------------------------------------------------------------

GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def _two(b1: list[int], b2: list[int], shape2: tuple = (1,), dtype2: str = "F32") -> dict:
    return {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": b1},
        "b": {"dtype": dtype2, "shape": list(shape2), "data_offsets": b2},
    }


BAD_FILES = {
    # name: (file bytes, error class, tensor named in the message or None, phrase)
    "too-short": (b"\x01\x00", CorruptCheckpointError, None, "too short"),
    "header-past-end": (struct.pack("<Q", 500) + b'{"a": 1}', CorruptCheckpointError, None, "500-byte header"),
    "header-over-limit": (struct.pack("<Q", 10**9) + b"{}", CorruptCheckpointError, None, "limit"),
    "truncated-data": (st_bytes(GOOD, 5), CorruptCheckpointError, "a", "truncated"),
    "not-json": (st_bytes("{not json}"), CorruptCheckpointError, None, "not valid JSON"),
    "not-utf8": (st_bytes(b'{"\xff\xfe": 1}'), CorruptCheckpointError, None, "not UTF-8"),
    "not-object": (st_bytes("[1, 2]"), CorruptCheckpointError, None, "not a JSON object"),
    "leading-space": (st_bytes(' {"a": 1}'), CorruptCheckpointError, None, "not a JSON object"),
    "nan": (st_bytes('{"__metadata__": {"x": NaN}}'), CorruptCheckpointError, None, "NaN"),
    "overlap": (st_bytes(_two([0, 8], [4, 8]), 8), CorruptCheckpointError, "b", "overlap"),
    "gap": (st_bytes(_two([0, 8], [12, 16]), 16), CorruptCheckpointError, "b", "gap"),
    "gap-at-start": (st_bytes({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8),
                     CorruptCheckpointError, "a", "gap"),
    "trailing": (st_bytes(GOOD, 12), CorruptCheckpointError, None, "4 trailing bytes"),
    "size-mismatch": (st_bytes({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8),
                      CorruptCheckpointError, "a", "needs 12 bytes"),
    "f6": (st_bytes(_two([0, 8], [8, 9], dtype2="F6_E2M3"), 9), CorruptCheckpointError, "b", "F6_E2M3"),
    "unknown-dtype": (st_bytes(_two([0, 8], [8, 9], dtype2="Q4"), 9), CorruptCheckpointError, "b", "'Q4'"),
    "f4-odd": (st_bytes(_two([0, 8], [8, 9], shape2=(3,), dtype2="F4"), 9), CorruptCheckpointError, "b", "even"),
    "duplicate": (st_bytes('{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                           '"a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}', 2),
                  CorruptCheckpointError, "a", "twice"),
    "negative-dim": (st_bytes({"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}),
                     CorruptCheckpointError, "a", "shape"),
    "bool-dim": (st_bytes({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, 1),
                 CorruptCheckpointError, "a", "shape"),
    "reversed-offsets": (st_bytes({"a": {"dtype": "U8", "shape": [0], "data_offsets": [1, 0]}}, 1),
                         CorruptCheckpointError, "a", "end before"),
    "missing-shape": (st_bytes({"a": {"dtype": "U8", "data_offsets": [0, 1]}}, 1), CorruptCheckpointError, "a", "'shape'"),
    "metadata-not-str": (st_bytes({"__metadata__": {"total": 5}, **GOOD}, 8), CorruptCheckpointError, None, "'total'"),
    "entry-not-object": (st_bytes({"a": [1, 2]}), CorruptCheckpointError, "a", "not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_safetensors_are_refused(tmp_path: Path, case: str) -> None:
    content, cls, tensor, phrase = BAD_FILES[case]
    path = write(tmp_path / f"{case}.safetensors", content)
    err = inspect_error(path, cls, str(path.resolve()), phrase)
    if tensor is not None:
        assert f"'{tensor}'" in str(err) and err.tensor == tensor
    with pytest.raises(cls):  # the parser alone agrees
        parse_file_bytes(content, path)


def test_parser_accepts_space_padding_zero_size_and_orders_by_offset() -> None:
    header = {
        "late": {"dtype": "BF16", "shape": [2], "data_offsets": [4, 8]},
        "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
        "early": {"dtype": "I16", "shape": [2], "data_offsets": [0, 4]},
        "__metadata__": {"format": "pt"},
    }
    raw = json.dumps(header) + " " * 5
    h = parse_file_bytes(st_bytes(raw, 8))
    assert [e.name for e in h.entries] == ["early", "empty", "late"]
    assert h.metadata == {"format": "pt"} and h.header_len == len(raw) and h.data_start == 8 + len(raw)
    assert h.entries[1].shape == (0, 3) and h.entries[0].dtype == "int16"


def test_parser_maps_every_safetensors_dtype() -> None:
    for st, name in loaderkit.plugin.SAFETENSORS_DTYPES.items():
        item = 1 if st == "F4" else getattr(torch, name).itemsize
        shape = [2, 4] if st == "F4" else [2]
        nbytes = 4 if st == "F4" else 2 * item
        h = parse_file_bytes(st_bytes({"t": {"dtype": st, "shape": shape, "data_offsets": [0, nbytes]}}, nbytes))
        assert h.entries[0].dtype == name, st


def test_f4_shape_matches_safe_open(tmp_path: Path) -> None:
    t = torch.randint(0, 255, (3, 5), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    path = tmp_path / "fp4.safetensors"
    save_file({"q": t}, str(path))
    info = loaderkit.inspect(path)
    with safe_open(str(path), "pt") as f:
        assert f.get_slice("q").get_shape() == [3, 10]
        assert info.tensors["q"].shape == tuple(f.get_tensor("q").shape) == (3, 5)
    assert info.tensors["q"].nbytes == 15


def test_describe_10k_tensor_header_is_fast(tmp_path: Path) -> None:
    path = tmp_path / "many.safetensors"
    save_file({f"layers.{i}.weight": torch.zeros(2, dtype=torch.bfloat16) for i in range(10_000)}, str(path))
    fmt = SafetensorsFormat()
    fmt.describe(path)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        info = fmt.describe(path)
        times.append(time.perf_counter() - start)
    assert len(info.tensors) == 10_000
    print(f"describe of a 10,000-tensor header: {min(times) * 1e3:.1f} ms")
    assert min(times) < 1.0


# --- directory naming ---------------------------------------------------------------------------

PICKS = [
    (["model.safetensors"], ("safetensors", "model.safetensors")),
    (["model.fp16.safetensors", "model.safetensors"], ("safetensors", "model.safetensors")),
    (["diffusion_pytorch_model.fp16.safetensors"], ("safetensors", "diffusion_pytorch_model.fp16.safetensors")),
    (["model.safetensors", "model.safetensors.index.json", "model-00001-of-00002.safetensors"],
     ("sharded", "model.safetensors.index.json")),
    (["model.safetensors.index.fp16.json", "model.safetensors.index.json"], ("sharded", "model.safetensors.index.json")),
    (["model.safetensors.index.fp16.json", "model.safetensors"], ("safetensors", "model.safetensors")),
    (["model.safetensors.index.fp16.json", "model.fp16-00001-of-00002.safetensors"],
     ("sharded", "model.safetensors.index.fp16.json")),
    (["model.fp16-00001-of-00002.safetensors"], None),
    (["pytorch_model.bin", "model.safetensors"], ("safetensors", "model.safetensors")),
    (["pytorch_model.bin"], ("torchzip", "pytorch_model.bin")),
    (["pytorch_model.bin.index.json", "pytorch_model.bin"], ("sharded", "pytorch_model.bin.index.json")),
    (["other.safetensors", "config.json"], None),
]


@pytest.mark.parametrize("names,want", PICKS)
def test_directory_choice_is_deterministic(tmp_path: Path, names: list[str], want) -> None:
    for n in names:
        (tmp_path / n).write_bytes(b"")
    picked = pick_in_directory(tmp_path)
    assert (picked and (picked[0], picked[1].name)) == want or (picked is None and want is None)


def test_directory_with_only_unrelated_files_is_unsupported(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, str(tmp_path / "other.safetensors"))
    inspect_error(tmp_path, UnsupportedCheckpointError, str(tmp_path.resolve()))


def test_diffusers_variant_single_file(tmp_path: Path) -> None:
    from diffusers import UNet2DModel

    unet = _tiny_unet()
    unet.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    info = loaderkit.inspect(tmp_path)
    assert info.format == "safetensors" and info.files == ("diffusion_pytorch_model.fp16.safetensors",)
    assert info.config and info.config["_class_name"] == UNet2DModel.__name__
    sd = unet.state_dict()
    assert set(info.tensors) == set(sd)
    with SafetensorsFormat().open(info) as reader:
        for k, v in sd.items():
            assert torch.equal(reader.get(k), v), k


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


# --- sharded ------------------------------------------------------------------------------------


def write_sharded(
    directory: Path, sd: dict[str, torch.Tensor], max_shard_size: int = 400, pattern: str = "model{suffix}.safetensors"
) -> Path:
    """Shard with huggingface_hub's splitter, write shards and index as transformers does."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(sd, filename_pattern=pattern, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        part = {n: sd[n].contiguous() for n in names}
        if filename.endswith(".safetensors"):
            save_file(part, str(directory / filename), metadata={"format": "pt"})
        else:
            torch.save(part, directory / filename)
    index = directory / (pattern.format(suffix="") + ".index.json")
    index.write_text(json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename}))
    return index


def small_sd(n: int = 6) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {f"layer{i}.weight": torch.randn(8, 4) for i in range(n)} | {"norm.bias": torch.zeros(8)}


def test_sharded_huggingface_hub_writer(tmp_path: Path) -> None:
    sd = small_sd()
    index = write_sharded(tmp_path, sd)
    for target in (tmp_path, index):
        info = loaderkit.inspect(target)
        assert info.format == "sharded" and info.root == str(tmp_path.resolve())
        assert len(info.files) > 2 and list(info.files) == sorted(info.files)
        assert set(info.tensors) == set(sd)
        assert info.metadata["format"] == "pt" and int(info.metadata["total_size"]) == info.total_bytes
    order = [(info.files.index(t.file), _offset(tmp_path / t.file, n)) for n, t in info.tensors.items()]
    assert order == sorted(order)  # shard by shard, by offset
    with ShardedFormat().open(info) as reader:
        for k, v in sd.items():
            assert torch.equal(reader.get(k), v)
        with pytest.raises(CheckpointError, match="'missing.key'"):
            reader.get("missing.key")


def _offset(path: Path, name: str) -> int:
    return next(e.begin for e in _st_header.read_header(path).entries if e.name == name)


def test_sharded_describe_reads_only_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_sharded(tmp_path, small_sd())
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    spy = ReadSpy()
    monkeypatch.setattr(_st_header, "open", spy, raising=False)
    loaderkit.inspect(tmp_path)
    assert sorted(spy.paths) == [str(s.resolve()) for s in shards]
    assert spy.bytes_read == sum(8 + header_len(s) for s in shards)


def test_transformers_sharded_and_variant(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.save_pretrained(tmp_path / "plain", max_shard_size="20KB")
    model.save_pretrained(tmp_path / "variant", max_shard_size="20KB", variant="fp16")
    sd = model.state_dict()
    for sub, index_name in (("plain", "model.safetensors.index.json"), ("variant", "model.safetensors.index.fp16.json")):
        index = tmp_path / sub / index_name
        weight_map = json.loads(index.read_text())["weight_map"]
        info = loaderkit.inspect(tmp_path / sub)
        assert info.format == "sharded" and len(info.files) > 1, sub
        assert set(info.tensors) == set(weight_map) and info.config["model_type"] == "llama"
        assert all(info.tensors[k].file == f for k, f in weight_map.items())
        with ShardedFormat().open(info) as reader:
            for k in weight_map:
                assert torch.equal(reader.get(k), sd[k]), (sub, k)
    assert loaderkit.inspect(tmp_path / "variant" / "model.safetensors.index.fp16.json").format == "sharded"


def test_diffusers_sharded(tmp_path: Path) -> None:
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path, max_shard_size="10KB")
    info = loaderkit.inspect(tmp_path)
    assert info.format == "sharded" and (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert set(info.tensors) == set(unet.state_dict())
    with ShardedFormat().open(info) as reader:
        for k, v in unet.state_dict().items():
            assert torch.equal(reader.get(k), v), k


def test_legacy_bin_index_uses_torch_shards(tmp_path: Path) -> None:
    sd = small_sd()
    write_sharded(tmp_path, sd, pattern="pytorch_model{suffix}.bin")
    assert (tmp_path / "pytorch_model.bin.index.json").is_file()
    info = loaderkit.inspect(tmp_path)
    assert info.format == "sharded" and all(f.endswith(".bin") for f in info.files)
    with ShardedFormat().open(info) as reader:
        for k, v in sd.items():
            assert torch.equal(reader.get(k), v)


def test_hf_cache_layout_symlinks_into_blobs_are_allowed(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    index = write_sharded(snap, small_sd())
    for shard in snap.glob("model-*.safetensors"):
        blob = blobs / f"blob{shard.name[6:11]}"
        shard.rename(blob)
        shard.symlink_to(os.path.relpath(blob, snap))
    assert loaderkit.inspect(index).format == "sharded"


def _index(directory: Path, weight_map, metadata=None, name: str = "model.safetensors.index.json") -> Path:
    body = {"weight_map": weight_map} if metadata is None else {"metadata": metadata, "weight_map": weight_map}
    return write(directory / name, json.dumps(body).encode())


def test_index_without_metadata_is_accepted(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    info = loaderkit.inspect(_index(tmp_path, {"a": "s1.safetensors"}))
    assert info.files == ("s1.safetensors",) and info.metadata == {}


def test_extra_shard_tensors_are_skipped_and_metadata_stringified(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2), "extra": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    info = loaderkit.inspect(_index(tmp_path, {"a": "s1.safetensors"}, {"total_size": 8, "nested": {"k": 1}}))
    assert list(info.tensors) == ["a"]
    assert info.metadata == {"total_size": "8", "nested": '{"k": 1}'}


INDEX_ERRORS = {
    "malformed-json": (b'{"weight_map": ', CorruptCheckpointError, "not valid JSON"),
    "not-utf8": (b'{"weight_map": {"\xff": "a"}}', CorruptCheckpointError, "not UTF-8"),
    "not-a-dict": (b"[]", CorruptCheckpointError, "weight_map"),
    "missing-weight-map": (b'{"metadata": {}}', CorruptCheckpointError, "weight_map"),
    "empty-weight-map": (b'{"weight_map": {}}', CorruptCheckpointError, "empty"),
    "non-str-shard": (b'{"weight_map": {"a": 3}}', CorruptCheckpointError, "'a'"),
    "duplicate-key": (b'{"weight_map": {"a": "s1.safetensors", "a": "s1.safetensors"}}', CorruptCheckpointError, "twice"),
    "bad-metadata": (b'{"metadata": [], "weight_map": {"a": "s1.safetensors"}}', CorruptCheckpointError, "metadata"),
}


@pytest.mark.parametrize("case", sorted(INDEX_ERRORS))
def test_malformed_index_is_refused(tmp_path: Path, case: str) -> None:
    content, cls, phrase = INDEX_ERRORS[case]
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    index = write(tmp_path / "model.safetensors.index.json", content)
    inspect_error(index, cls, str(index.resolve()), phrase)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    index = _index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    err = inspect_error(index, CheckpointError, "'s2.safetensors'", "missing")
    assert not isinstance(err, UnsafeCheckpointError)


def test_tensor_mapped_to_a_shard_lacking_it(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2), "c": torch.ones(1)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "s2.safetensors"))
    index = _index(tmp_path, {"a": "s2.safetensors", "b": "s2.safetensors"})
    err = inspect_error(index, CorruptCheckpointError, str(index.resolve()), "'a'", "'s2.safetensors'", "not contain")
    assert err.tensor == "a"
    index = _index(tmp_path, {"a": "s2.safetensors", "b": "s2.safetensors", "c": "s1.safetensors"})
    inspect_error(index, CorruptCheckpointError, "'a'", "(it is in 's1.safetensors')")


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"a": torch.zeros(2), "b": torch.ones(1)}, str(tmp_path / "s2.safetensors"))
    index = _index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    err = inspect_error(index, CorruptCheckpointError, "'a'", "two shards", "'s1.safetensors'", "'s2.safetensors'")
    assert err.tensor == "a"


def test_corrupt_shard_header_names_the_shard(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    shard = write(tmp_path / "s2.safetensors", st_bytes(GOOD, 12))
    index = _index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    inspect_error(index, CorruptCheckpointError, str(shard.resolve()), "trailing")


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "dir-symlink"])
def test_shard_paths_escaping_the_directory_are_refused_unopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.safetensors"
    save_file({"b": torch.ones(2)}, str(secret))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({"a": torch.ones(2)}, str(ckpt / "s1.safetensors"))
    name = {
        "absolute": str(secret),
        "dotdot": "../outside/secret.safetensors",
        "symlink": "link.safetensors",
        "dir-symlink": "sub/secret.safetensors",
    }[kind]
    if kind == "symlink":
        (ckpt / "link.safetensors").symlink_to(secret)
    if kind == "dir-symlink":
        (ckpt / "sub").symlink_to(outside, target_is_directory=True)
    index = _index(ckpt, {"a": "s1.safetensors", "b": name})
    spy = ReadSpy()
    monkeypatch.setattr(_st_header, "open", spy, raising=False)
    err = inspect_error(index, UnsafeCheckpointError, str(index.resolve()), repr(name))
    assert not spy.paths, f"opened {spy.paths} before refusing"
    assert err.path == str(index.resolve())


def test_subdirectory_shards_inside_the_checkpoint_are_fine(tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    save_file({"a": torch.ones(2)}, str(tmp_path / "parts" / "s1.safetensors"))
    info = loaderkit.inspect(_index(tmp_path, {"a": "parts/s1.safetensors"}))
    assert info.tensors["a"].file == "parts/s1.safetensors"


# --- torch zip ----------------------------------------------------------------------------------


class Payload:
    """A pickle that runs a shell command when unpickled unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CustomThing:
    """An arbitrary class: unpickling it needs code."""

    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_torch_file_describe_and_read(tmp_path: Path, suffix: str) -> None:
    sd = {k: v for k, v in mixed_tensors().items() if k != "w.fp4"}
    path = tmp_path / f"weights{suffix}"
    torch.save(sd, path)
    info = loaderkit.inspect(path)
    assert info.format == "torchzip" and info.files == (path.name,) and list(info.tensors) == list(sd)
    for k, v in sd.items():
        assert (info.tensors[k].shape, info.tensors[k].torch_dtype) == (tuple(v.shape), v.dtype)
        assert info.tensors[k].nbytes == v.numel() * v.element_size()
    with TorchZipFormat().open(info) as reader:
        for k, v in sd.items():
            assert same(reader.get(k), v), k


def test_pytorch_model_bin_directory(tmp_path: Path) -> None:
    torch.save({"a": torch.ones(3)}, tmp_path / "pytorch_model.bin")
    info = loaderkit.inspect(tmp_path)
    assert info.format == "torchzip" and info.files == ("pytorch_model.bin",)


def test_describe_then_open_loads_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.pt"
    torch.save({"a": torch.arange(3.0)}, path)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    fmt = TorchZipFormat()
    info = fmt.describe(path)
    with fmt.open(info) as reader:
        assert torch.equal(reader.get("a"), torch.arange(3.0))
    assert calls == [dict(weights_only=True, mmap=True, map_location="cpu")]


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_nested_state_dict_is_unwrapped(tmp_path: Path, key: str) -> None:
    path = tmp_path / "train.pt"
    torch.save({key: {"w": torch.ones(2), "step": 5}, "epoch": 3}, path)
    info = loaderkit.inspect(path)
    assert list(info.tensors) == ["w"]
    assert info.metadata["torch.state_dict_key"] == key
    assert info.metadata["torch.ignored_entries"] == f"epoch, {key}.step"


def test_torch_file_without_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save(torch.ones(3), path)
    inspect_error(path, UnsupportedCheckpointError, str(path.resolve()), "not a dict")
    torch.save({"epoch": 1}, path)
    inspect_error(path, UnsupportedCheckpointError, "holds no tensors")


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "x": Payload(marker)}, path)
    err = inspect_error(path, UnsafeCheckpointError, str(path.resolve()), "weights_only", "never falls back", "safetensors")
    assert "posix.system" in str(err) or "nt.system" in str(err)
    assert "weights_only` set to `False" not in str(err)
    assert not marker.exists()


def test_pickled_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cls.pt"
    torch.save({"w": torch.ones(2), "obj": CustomThing()}, path)
    inspect_error(path, UnsafeCheckpointError, str(path.resolve()), "CustomThing")


def test_legacy_non_zip_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    inspect_error(path, CheckpointError, str(path.resolve()), "_use_new_zipfile_serialization=False", "safetensors")


def test_truncated_torch_zip(tmp_path: Path) -> None:
    path = tmp_path / "cut.bin"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:1500])
    inspect_error(path, CorruptCheckpointError, str(path.resolve()))


def test_safetensors_named_bin(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    save_file({"a": torch.ones(1)}, str(path))
    inspect_error(path, UnsupportedCheckpointError, "rename it")


def test_torch_reader_unknown_name(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save({"a": torch.ones(1)}, path)
    info = loaderkit.inspect(path)
    with TorchZipFormat().open(info) as reader, pytest.raises(CheckpointError, match="'b'") as exc:
        reader.get("b")
    assert str(path.resolve()) in str(exc.value)
    torchzip.load_file(path.resolve(), keep=False)  # leave the one-slot cache empty


def test_safetensors_read_places_each_tensor_at_its_file_page_offset(tmp_path):
    """``read`` serves tensors from one scratch buffer, each placed at the same offset within a
    page as its bytes in the file (``preadv`` between pages out of step runs slower), with the
    right values, growing the buffer for a larger tensor."""
    from safetensors.torch import save_file

    from loaderkit.plugins.safetensors_format import PAGE, SafetensorsFormat

    tensors = {f"t{i}": torch.arange(1000 * i + 37, dtype=torch.int16) for i in range(1, 6)}
    tensors["odd"] = torch.arange(5, dtype=torch.uint8)
    tensors["wide"] = torch.randn(3, 5000, dtype=torch.float32)
    file = tmp_path / "m.safetensors"
    save_file(tensors, str(file))
    info = loaderkit.inspect(file)
    reader = SafetensorsFormat().open(info)
    try:
        spans = reader._raw(info.tensors["t1"].file)[1]
        for name in sorted(tensors):
            t = reader.read(name)
            assert torch.equal(t, tensors[name])
            assert t.data_ptr() % PAGE == spans[name][0] % PAGE
    finally:
        reader.close()
