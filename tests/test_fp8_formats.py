"""The ``fp8-formats`` schemes: recognition of every fp8 family from headers, exact decoding, and
refusal of checkpoints whose config and tensors disagree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loaderkit
import loaderkit.plugin
from loaderkit.plugin import CorruptCheckpointError, QuantizedWeight, UnsupportedCheckpointError
from loaderkit.plugins import fp8_formats

import fp8_writers as W

MD = "model.diffusion_model."


# -- helpers ------------------------------------------------------------------------------------


def read_tensors(info: loaderkit.plugin.CheckpointInfo) -> dict[str, torch.Tensor]:
    """Every stored tensor, read from the file the description names (shards included)."""
    out = {}
    for key, t in info.tensors.items():
        with safe_open(str(Path(info.root) / t.file), framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


def scheme_of(info: loaderkit.plugin.CheckpointInfo) -> loaderkit.plugin.Scheme:
    entry = loaderkit.plugin.get_manager().get("schemes", info.quantization.scheme)
    assert entry is not None and entry.plugin == "fp8-formats"
    return entry.obj


def decode_all(info: loaderkit.plugin.CheckpointInfo, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every model tensor decoded through the scheme (companions and markers dropped)."""
    q, tensors = info.quantization, read_tensors(info)
    scheme, companions = scheme_of(info), q.companion_keys()
    out = {}
    for key, value in tensors.items():
        if key in companions:
            continue
        out[key] = scheme.dequantize(q.weights[key], value, tensors, dtype) if key in q.weights else value.to(dtype)
    return out


def assert_decodes_to(info: loaderkit.plugin.CheckpointInfo, ref: dict[str, torch.Tensor]) -> None:
    got = decode_all(info)
    assert sorted(got) == sorted(ref)
    for key in ref:
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], ref[key]), key


def rewrite(path: Path, edit) -> None:
    """Apply ``edit(tensors)`` to a safetensors file in place, keeping its metadata."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def file_of(path: Path) -> Path:
    return path / "model.safetensors" if path.is_dir() else path


# -- every family: inspect + exact decoding -----------------------------------------------------

FAMILIES = {
    # name: (writer, scheme, granularity, quantized weight keys)
    "plain-e4m3": (W.write_plain_fp8, "fp8-plain", "none", {"a.weight", "b.weight", "lm_head.weight"}),
    "plain-e5m2": (lambda d: W.write_plain_fp8(d, dtype=W.E5M2), "fp8-plain", "none",
                   {"a.weight", "b.weight", "lm_head.weight"}),
    "per-tensor": (W.write_per_tensor_fp8, "fp8-tensor", "tensor", {"a.weight", "b.weight"}),
    "block": (W.write_block_fp8, "fp8-block", "block", {"a.weight", "b.weight"}),
    "block-ue8m0-e8m0": (lambda d: W.write_block_fp8(d, scale_fmt="ue8m0", scale_dtype=torch.float8_e8m0fnu),
                         "fp8-block", "block", {"a.weight", "b.weight"}),
    "block-ue8m0-u8": (lambda d: W.write_block_fp8(d, scale_fmt="ue8m0", scale_dtype=torch.uint8),
                       "fp8-block", "block", {"a.weight", "b.weight"}),
    "block-ue8m0-f32": (lambda d: W.write_block_fp8(d, scale_fmt="ue8m0"), "fp8-block", "block",
                        {"a.weight", "b.weight"}),
    "block-text-config": (lambda d: W.write_block_fp8(d, text_config=True), "fp8-block", "block",
                          {"a.weight", "b.weight"}),
    "fbgemm": (W.write_fbgemm_fp8, "fp8-fbgemm", "channel", {"a.weight", "b.weight"}),
    "modelopt": (W.write_modelopt_fp8, "modelopt-fp8", "tensor", {"a.weight", "b.weight"}),
    "modelopt-channel": (lambda d: W.write_modelopt_fp8(d, "FP8_PER_CHANNEL_PER_TOKEN"), "modelopt-fp8", "channel",
                         {"a.weight", "b.weight"}),
    "ct-fp8": (lambda d: W.write_compressed_tensors(d, "FP8"), "compressed-tensors-fp8", "tensor",
               {"a.weight", "b.weight"}),
    "ct-fp8-dynamic": (lambda d: W.write_compressed_tensors(d, "FP8_DYNAMIC"), "compressed-tensors-fp8",
                       "channel", {"a.weight", "b.weight"}),
    "ct-fp8-block": (lambda d: W.write_compressed_tensors(d, "FP8_BLOCK"), "compressed-tensors-fp8", "block",
                     {"a.weight", "b.weight"}),
    "comfy-scaled": (W.write_comfy_scaled_fp8, "comfy-scaled-fp8", "tensor", {MD + "a.weight", MD + "b.weight"}),
    "comfy-mixed": (W.write_comfy_mixed, "comfy-mixed", "tensor", {MD + "a.weight", MD + "b.weight"}),
    "comfy-mixed-metadata": (lambda d: W.write_comfy_mixed(d, layout="metadata"), "comfy-mixed", "tensor",
                             {MD + "a.weight", MD + "b.weight"}),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    cache: dict[str, tuple[Path, dict]] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = FAMILIES[name][0](tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_is_recognised_and_decodes_exactly(name, written):
    _, scheme, granularity, quantized = FAMILIES[name]
    path, ref = written(name)
    info = loaderkit.inspect(path)
    q = info.quantization
    assert q is not None and q.scheme == scheme
    assert q.granularity == granularity
    assert set(q.weights) == quantized
    assert q.details["quantized_layers"] == len(quantized)
    assert q.details["layers"] == sorted(k.rpartition(".")[0] for k in quantized)
    json.dumps(info.summary())  # inspect output is JSON
    assert_decodes_to(info, ref)


def test_block_details_and_partial_blocks(written):
    info = loaderkit.inspect(written("block")[0])
    q = info.quantization
    assert q.weights["a.weight"] == QuantizedWeight(
        weight="a.weight", scale="a.weight_scale_inv", granularity="block", block=(128, 128)
    )
    assert info.tensors["a.weight_scale_inv"].shape == (3, 2)  # ceil(320/128), ceil(200/128)
    assert q.details["partial_blocks"] == ["a.weight", "b.weight"]
    assert q.details["weight_block_size"] == [128, 128]
    assert q.details["activation_scheme"] == "dynamic"


@pytest.mark.parametrize("name,encoding", [
    ("block-ue8m0-e8m0", "ue8m0"), ("block-ue8m0-u8", "ue8m0"), ("block-ue8m0-f32", "float"), ("block", "float"),
])
def test_block_scale_encoding(name, encoding, written):
    q = loaderkit.inspect(written(name)[0]).quantization
    assert {w.scale_encoding for w in q.weights.values()} == {encoding}
    if name != "block":
        assert q.details["scale_fmt"] == "ue8m0"


@pytest.mark.parametrize("name", ["block", "block-ue8m0-e8m0", "block-ue8m0-u8"])
def test_block_matches_transformers_and_compressed_tensors_readers(name, written):
    from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    info = loaderkit.inspect(written(name)[0])
    tensors, ours = read_tensors(info), decode_all(info)
    ct = FP8BlockDequantizer(weight_block_size=(128, 128), dtype=torch.float32)
    for key, q in info.quantization.weights.items():
        scale = tensors[q.scale]
        scale = scale.view(torch.float8_e8m0fnu) if scale.dtype == torch.uint8 else scale
        hf = _dequantize_fp8_weight(tensors[key].clone(), scale, [128, 128], torch.float32)
        assert torch.equal(ours[key], hf), key
        assert torch.equal(ours[key], ct._create_dequantized_weight(tensors[key], scale)), key


@pytest.mark.parametrize("preset", ["FP8", "FP8_DYNAMIC", "FP8_BLOCK"])
def test_compressed_tensors_matches_its_own_reader(preset, written):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    path, _ = written({"FP8": "ct-fp8", "FP8_DYNAMIC": "ct-fp8-dynamic", "FP8_BLOCK": "ct-fp8-block"}[preset])
    info = loaderkit.inspect(path)
    theirs = CompressedTensorsDequantizer(str(path), dtype=torch.bfloat16).process(read_tensors(info))
    ours = decode_all(info, torch.bfloat16)
    for key in info.quantization.weights:
        assert theirs[key].dtype == torch.bfloat16
        assert torch.equal(ours[key], theirs[key]), key  # one rounding to bf16 either way


def test_compressed_tensors_details(written):
    info = loaderkit.inspect(written("ct-fp8")[0])
    q = info.quantization
    assert info.tensors["a.weight_scale"].dtype == "bfloat16"
    assert q.weights["a.weight"].input_scale == "a.input_scale"
    assert q.details["ignore"] == ["lm_head"]
    assert q.details["config_groups"]["group_0"]["input_activations"] == "tensor, static"
    block = loaderkit.inspect(written("ct-fp8-block")[0]).quantization
    assert block.weights["a.weight"].block == (128, 128)
    assert block.details["config_groups"]["group_0"]["weights"] == "block 128x128"


def test_per_tensor_details(written):
    q = loaderkit.inspect(written("per-tensor")[0]).quantization
    assert q.weights["a.weight"].input_scale == "a.input_scale"
    assert q.details["ignored_layers"] == ["lm_head"]
    assert q.details["activation_scheme"] == "static"
    assert "lm_head.weight" not in q.weights


@pytest.mark.parametrize("kwargs", [
    {"scale_shape": (1,)}, {"scale_key": "weight_scale_inv", "input_scale": False},
])
def test_per_tensor_variants(tmp_path, kwargs):
    path, ref = W.write_per_tensor_fp8(tmp_path, **kwargs)
    info = loaderkit.inspect(path)
    assert info.quantization.scheme == "fp8-tensor"
    assert_decodes_to(info, ref)


@pytest.mark.parametrize("writer", [W.write_per_tensor_fp8, W.write_block_fp8])
def test_scales_in_another_shard(tmp_path, writer):
    path, ref = writer(tmp_path, shard_bytes=40_000)
    info = loaderkit.inspect(path)
    assert info.format == "sharded" and len(info.files) > 1
    q = info.quantization
    assert any(info.tensors[w].file != info.tensors[x.scale].file for w, x in q.weights.items())
    assert_decodes_to(info, ref)


@pytest.mark.parametrize("marker,weights,storage", [
    (torch.float8_e4m3fn, None, "float8_e4m3fn"),
    (torch.float8_e5m2, None, "float8_e5m2"),
    (torch.float32, None, "float8_e4m3fn"),
])
def test_comfy_scaled_marker_dtypes(tmp_path, marker, weights, storage):
    path, ref = W.write_comfy_scaled_fp8(tmp_path, marker_dtype=marker, weight_dtype=weights)
    info = loaderkit.inspect(path)
    q = info.quantization
    assert q.scheme == "comfy-scaled-fp8"
    assert q.auxiliary == (MD + "scaled_fp8",)
    assert q.details["storage_dtype"] == [storage]
    assert q.details["prefixes"] == [MD]
    assert q.weights[MD + "a.weight"].scale == MD + "a.scale_weight"
    assert q.weights[MD + "a.weight"].input_scale == MD + "a.scale_input"
    assert "dtype_differs_from_marker" not in q.details
    assert_decodes_to(info, ref)


def test_comfy_scaled_without_prefix_and_full_precision_flag(tmp_path):
    path, ref = W.write_comfy_scaled_fp8(tmp_path, prefix="", full_precision_mm=True, scale_input=False)
    q = loaderkit.inspect(path).quantization
    assert q.auxiliary == ("scaled_fp8",) and q.details["full_precision_matrix_mult"] is True
    assert_decodes_to(loaderkit.inspect(path), ref)


def test_comfy_scaled_applies_scale_of_high_precision_weight(tmp_path):
    path, ref = W.write_comfy_scaled_fp8(tmp_path, dummy_scale_on_high_precision=True)
    rewrite(path, lambda t: t.__setitem__(MD + "lm_head.scale_weight", torch.tensor(0.5)))
    info = loaderkit.inspect(path)
    assert info.quantization.details["scaled_high_precision"] == [MD + "lm_head.weight"]
    ref[MD + "lm_head.weight"] = ref[MD + "lm_head.weight"] * 0.5  # ComfyUI multiplies it too
    assert_decodes_to(info, ref)


def test_comfy_scaled_marker_dtype_mismatch_is_recorded(tmp_path):
    path, ref = W.write_comfy_scaled_fp8(tmp_path, marker_dtype=torch.float8_e5m2, weight_dtype=W.E4M3)
    info = loaderkit.inspect(path)
    assert info.quantization.details["dtype_differs_from_marker"] == [MD + "a.weight", MD + "b.weight"]
    assert_decodes_to(info, ref)  # stored values decode as stored


@pytest.mark.parametrize("kwargs", [
    {"layout": "metadata", "metadata_prefix": False},
    {"fmt": "float8_e5m2"},
    {"layout": "metadata", "fmt": "float8_e5m2", "input_scale": False},
])
def test_comfy_mixed_variants(tmp_path, kwargs):
    path, ref = W.write_comfy_mixed(tmp_path, **kwargs)
    info = loaderkit.inspect(path)
    q = info.quantization
    assert q.scheme == "comfy-mixed" and set(q.weights) == {MD + "a.weight", MD + "b.weight"}
    if kwargs.get("layout") == "metadata":
        assert q.details["formats"] == {kwargs.get("fmt", "float8_e4m3fn"): 2}
        assert q.details["format_version"] == "1.0"
    assert_decodes_to(info, ref)


def test_comfy_mixed_markers_are_auxiliary(written):
    q = loaderkit.inspect(written("comfy-mixed")[0]).quantization
    assert q.auxiliary == (MD + "a.comfy_quant", MD + "b.comfy_quant")
    assert q.weights[MD + "a.weight"].input_scale == MD + "a.input_scale"


def test_scaled_fp8_without_config_is_read_from_keys(tmp_path):
    path, ref = W.write_per_tensor_fp8(tmp_path)
    (path / "config.json").unlink()
    info = loaderkit.inspect(path)
    assert info.quantization.scheme == "fp8-keys"
    assert info.quantization.granularity == "tensor"
    assert_decodes_to(info, ref)


def test_plain_fp8_details(written):
    q = loaderkit.inspect(written("plain-e5m2")[0]).quantization
    assert q.family == "plain fp8 (unscaled)"
    assert q.details["weight_dtypes"] == {"float8_e5m2": 3}
    assert all(w.scale is None for w in q.weights.values())


def test_dequantized_copy_that_kept_its_config_is_not_quantized(tmp_path):
    sd = W.tiny_state_dict()
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    qc = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    assert loaderkit.inspect(tmp_path).quantization is None


def test_high_precision_checkpoint_is_not_claimed(tmp_path):
    save_file(W.tiny_state_dict(), str(tmp_path / "model.safetensors"))
    assert loaderkit.inspect(tmp_path / "model.safetensors").quantization is None


# -- config and tensors disagree: refused at inspect, naming the tensor ---------------------------


def _expect_corrupt(path, tensor, match=None, error=CorruptCheckpointError):
    with pytest.raises(error, match=match) as exc:
        loaderkit.inspect(path)
    assert exc.value.tensor == tensor
    assert tensor in str(exc.value)
    return exc.value


def test_block_scale_grid_of_wrong_shape(tmp_path):
    path, _ = W.write_block_fp8(tmp_path)
    rewrite(file_of(path), lambda t: t.__setitem__("a.weight_scale_inv", torch.ones(2, 2)))  # floor, not ceil
    err = _expect_corrupt(path, "a.weight_scale_inv", match=r"\[3, 2\]")
    assert err.plugin == "fp8-formats"


def test_block_config_with_per_tensor_scales(tmp_path):
    path, _ = W.write_block_fp8(tmp_path)
    rewrite(file_of(path), lambda t: t.__setitem__("b.weight_scale_inv", torch.tensor(1.0)))
    _expect_corrupt(path, "b.weight_scale_inv")


def test_block_size_that_does_not_fit_the_grids(tmp_path):
    path, _ = W.write_block_fp8(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [64, 64]
    (path / "config.json").write_text(json.dumps(cfg))
    _expect_corrupt(path, "a.weight_scale_inv")


def test_quantized_weight_without_its_scale(tmp_path):
    path, _ = W.write_block_fp8(tmp_path)
    rewrite(file_of(path), lambda t: t.pop("a.weight_scale_inv"))
    _expect_corrupt(path, "a.weight", match="no scale")


def test_scale_without_its_weight(tmp_path):
    path, _ = W.write_per_tensor_fp8(tmp_path)
    rewrite(file_of(path), lambda t: t.__setitem__("c.weight_scale", torch.tensor(1.0)))
    _expect_corrupt(path, "c.weight_scale", match="no weight")


def test_input_scale_without_quantized_weight(tmp_path):
    path, _ = W.write_per_tensor_fp8(tmp_path)
    rewrite(file_of(path), lambda t: t.__setitem__("lm_head.input_scale", torch.tensor(1.0)))
    _expect_corrupt(path, "lm_head.input_scale")


def test_scale_of_high_precision_weight_in_a_config_family(tmp_path):
    path, _ = W.write_fbgemm_fp8(tmp_path)
    rewrite(file_of(path), lambda t: t.__setitem__("lm_head.weight_scale", torch.ones(10, 1)))
    _expect_corrupt(path, "lm_head.weight_scale", match="not fp8")


def test_fbgemm_scale_of_wrong_shape(tmp_path):
    path, _ = W.write_fbgemm_fp8(tmp_path)
    rewrite(file_of(path), lambda t: t.__setitem__("a.weight_scale", torch.ones(1, 320)))
    _expect_corrupt(path, "a.weight_scale")


def test_compressed_tensors_scale_of_wrong_shape(tmp_path):
    path, _ = W.write_compressed_tensors(tmp_path, "FP8_DYNAMIC")
    rewrite(file_of(path), lambda t: t.__setitem__("b.weight_scale", torch.ones(64, 2, dtype=torch.bfloat16)))
    _expect_corrupt(path, "b.weight_scale")


def test_uint8_scales_need_scale_fmt(tmp_path):
    path, _ = W.write_block_fp8(tmp_path, scale_fmt="ue8m0", scale_dtype=torch.uint8)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]["scale_fmt"]
    (path / "config.json").write_text(json.dumps(cfg))
    _expect_corrupt(path, "a.weight_scale_inv", match="uint8")


def test_comfy_mixed_listed_layer_without_scale(tmp_path):
    path, _ = W.write_comfy_mixed(tmp_path)
    rewrite(path, lambda t: t.pop(MD + "b.weight_scale"))
    _expect_corrupt(path, MD + "b.weight")


def test_comfy_mixed_non_fp8_layer_is_unsupported(tmp_path):
    path, _ = W.write_comfy_mixed(tmp_path)

    def to_nvfp4_like(t):
        t[MD + "a.weight"] = torch.zeros(320, 100, dtype=torch.uint8)

    rewrite(path, to_nvfp4_like)
    _expect_corrupt(path, MD + "a.weight", error=UnsupportedCheckpointError)


def test_comfy_mixed_unsupported_format_in_metadata(tmp_path):
    path, _ = W.write_comfy_mixed(tmp_path, layout="metadata")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])
    meta["layers"][MD + "a"] = {"format": "int8_blockwise", "group_size": 128}
    save_file(load_file(str(path)), str(path), metadata={"_quantization_metadata": json.dumps(meta)})
    _expect_corrupt(path, MD + "a.weight", match="int8_blockwise", error=UnsupportedCheckpointError)


def test_comfy_mixed_metadata_naming_a_missing_layer(tmp_path):
    path, _ = W.write_comfy_mixed(tmp_path, layout="metadata")
    meta = {"layers": {"nowhere.proj": {"format": "float8_e4m3fn"}}}
    save_file(load_file(str(path)), str(path), metadata={"_quantization_metadata": json.dumps(meta)})
    _expect_corrupt(path, "nowhere.proj.weight")


def test_plain_fp8_with_an_unclaimed_companion(tmp_path):
    path, _ = W.write_plain_fp8(tmp_path)
    rewrite(path, lambda t: t.__setitem__("a.comfy_quant_old", torch.zeros(1)))  # unrelated key: fine
    assert loaderkit.inspect(path).quantization.scheme == "fp8-plain"
    rewrite(path, lambda t: t.__setitem__("a.scale_input", torch.tensor(1.0)))
    _expect_corrupt(path, "a.scale_input")


# -- decoding: validation of scale values and shapes ---------------------------------------------


def _q(**kw) -> QuantizedWeight:
    return QuantizedWeight(weight="m.weight", scale="m.weight_scale", **kw)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_nan_inf_negative_scales_are_refused(bad):
    w = torch.ones(4, 4).to(W.E4M3)
    for q, s in [(_q(granularity="tensor"), torch.tensor(bad)),
                 (_q(granularity="channel"), torch.tensor([[1.0], [1.0], [bad], [1.0]])),
                 (_q(granularity="block", block=(2, 2)), torch.tensor([[1.0, bad], [1.0, 1.0]]))]:
        with pytest.raises(CorruptCheckpointError, match="m.weight_scale") as exc:
            fp8_formats.dequantize(q, w, s, torch.float32)
        assert exc.value.tensor == "m.weight_scale" and "m.weight" in str(exc.value)


def test_nan_scale_in_a_file_is_refused_at_decode(tmp_path):
    path, _ = W.write_per_tensor_fp8(tmp_path)
    rewrite(file_of(path), lambda t: t.__setitem__("a.weight_scale", torch.tensor(float("nan"))))
    info = loaderkit.inspect(path)  # headers cannot tell
    with pytest.raises(CorruptCheckpointError) as exc:
        decode_all(info)
    assert exc.value.tensor == "a.weight_scale"


def test_zero_scale_is_legal():
    w = torch.full((3, 5), 2.0).to(W.E4M3)
    out = fp8_formats.dequantize(_q(granularity="channel"), w, torch.tensor([[0.0], [1.0], [0.5]]), torch.float32)
    assert torch.equal(out, torch.tensor([[0.0] * 5, [2.0] * 5, [1.0] * 5]))


@pytest.mark.parametrize("q,scale", [
    (_q(granularity="tensor"), torch.ones(2)),
    (_q(granularity="channel"), torch.ones(1, 6)),
    (_q(granularity="block", block=(4, 4)), torch.ones(1, 2)),  # 6x6 needs [2, 2]
    (_q(granularity="block", block=(4, 4)), torch.ones(2, 2, 1)),
])
def test_wrong_scale_shape_is_refused_at_decode(q, scale):
    with pytest.raises(CorruptCheckpointError, match="needs") as exc:
        fp8_formats.dequantize(q, torch.ones(6, 6).to(W.E4M3), scale, torch.float32)
    assert exc.value.tensor == "m.weight_scale"


def test_missing_scale_at_decode():
    scheme = fp8_formats.BlockFp8()
    with pytest.raises(CorruptCheckpointError) as exc:
        scheme.dequantize(_q(granularity="tensor"), torch.ones(2, 2).to(W.E4M3), {}, torch.float32)
    assert exc.value.tensor == "m.weight_scale"


def test_ue8m0_bytes_decode_to_powers_of_two():
    bytes_ = torch.arange(255, dtype=torch.uint8).reshape(255, 1)
    q = QuantizedWeight(weight="w", scale="s", granularity="channel", scale_encoding="ue8m0")
    out = fp8_formats.dequantize(q, torch.ones(255, 1).to(W.E4M3), bytes_, torch.float32)
    want = torch.tensor([2.0 ** (b - 127) for b in range(255)], dtype=torch.float64).float().reshape(255, 1)
    assert torch.equal(out, want)
    as_e8m0 = fp8_formats.dequantize(q, torch.ones(255, 1).to(W.E4M3), bytes_.view(torch.float8_e8m0fnu), torch.float32)
    assert torch.equal(as_e8m0, want)
    with pytest.raises(CorruptCheckpointError, match="NaN"):  # byte 255 is NaN
        fp8_formats.dequantize(q, torch.ones(1, 1).to(W.E4M3), torch.tensor([[255]], dtype=torch.uint8), torch.float32)


@pytest.mark.parametrize("shape,block", [
    ((1, 1), (128, 128)), ((127, 129), (128, 128)), ((320, 200), (128, 128)), ((256, 256), (128, 128)),
    ((64, 96), (1, 32)), ((33, 17), (16, 8)),
])
def test_block_expansion_matches_blockwise_reference(shape, block):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(shape, generator=g) * 100).to(W.E4M3)
    s = torch.rand((-(-shape[0] // block[0]), -(-shape[1] // block[1])), generator=g)
    q = _q(granularity="block", block=block)
    assert torch.equal(fp8_formats.dequantize(q, w, s, torch.float32), W.ref_block(w, s, block))


def test_block_scales_of_stacked_experts():
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(3, 200, 130, generator=g) * 50).to(W.E4M3)
    s = torch.rand(3, 2, 2, generator=g)
    out = fp8_formats.dequantize(_q(granularity="block", block=(128, 128)), w, s, torch.bfloat16)
    for e in range(3):
        assert torch.equal(out[e], W.ref_block(w[e], s[e], (128, 128)).to(torch.bfloat16))


def test_module_function_and_scheme_method_agree(written):
    info = loaderkit.inspect(written("ct-fp8-dynamic")[0])
    tensors, q = read_tensors(info), info.quantization.weights["a.weight"]
    a = fp8_formats.dequantize(q, tensors["a.weight"], tensors["a.weight_scale"], torch.bfloat16)
    b = scheme_of(info).dequantize(q, tensors["a.weight"], tensors, torch.bfloat16)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_unscaled_fp8_flushes_small_weights_that_scaled_recipes_keep(written):
    plain = decode_all(loaderkit.inspect(written("plain-e4m3")[0]))
    scaled = decode_all(loaderkit.inspect(written("per-tensor")[0]))
    original = W.tiny_state_dict()["b.weight"].float()
    assert (plain["b.weight"] == 0).float().mean() > (scaled["b.weight"] == 0).float().mean()
    assert (scaled["b.weight"] - original).abs().max() < 0.07 * original.abs().max()


def test_schemes_are_registered_by_the_builtin_plugin():
    entries = [e for e in loaderkit.plugin.get_manager().schemes() if e.plugin == "fp8-formats"]
    names = [e.name for e in entries]
    assert set(names) == {
        "comfy-mixed", "comfy-scaled-fp8", "compressed-tensors-fp8", "fp8-block", "fp8-fbgemm",
        "fp8-tensor", "modelopt-fp8", "fp8-keys", "fp8-plain", "refused-layouts",
    }
    assert names.index("comfy-scaled-fp8") < names.index("fp8-plain")
    # layouts are refused after every scheme that decodes by config, before the key-driven ones
    assert names.index("fp8-tensor") < names.index("refused-layouts") < names.index("fp8-keys")
    assert all(isinstance(e.obj, loaderkit.plugin.Scheme) and e.obj.description for e in entries)


# -- end to end: loaderkit.load decodes every family ------------------------------------------------


def _prefix(name: str) -> str:
    return MD if name.startswith("comfy") else ""


def _inner(model: torch.nn.Module, prefix: str) -> torch.nn.Module:
    for part in filter(None, prefix.split(".")):
        model = getattr(model, part)
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_load_fp32_holds_the_exact_decoded_weights(name, written):
    path, ref = written(name)
    model = loaderkit.load(path, strategy="fp32", model=W.tiny_model(_prefix(name)))
    sd = model.state_dict()
    assert sorted(sd) == sorted(ref)
    for key in ref:
        assert sd[key].dtype == torch.float32 and torch.equal(sd[key], ref[key]), key


@pytest.mark.parametrize("name", ["block", "ct-fp8-block", "block-ue8m0-u8", "comfy-scaled", "fbgemm"])
def test_load_bf16_is_one_rounding_of_the_decoded_weights(name, written):
    path, ref = written(name)
    sd = loaderkit.load(path, strategy="bf16", model=W.tiny_model(_prefix(name))).state_dict()
    for key in ref:
        assert torch.equal(sd[key], ref[key].to(torch.bfloat16)), key


@pytest.mark.parametrize("name", ["per-tensor", "block", "ct-fp8-dynamic", "comfy-mixed"])
def test_load_fp8_keeps_storage_and_computes_like_the_decoded_model(name, written):
    path, _ = written(name)
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    full = _inner(loaderkit.load(path, strategy="fp32", model=W.tiny_model(_prefix(name))), _prefix(name))
    fp8 = _inner(loaderkit.load(path, strategy="fp8", model=W.tiny_model(_prefix(name))), _prefix(name))
    assert fp8.a.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        want, got = full(x), fp8(x.to(torch.bfloat16)).float()
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_load_sharded_with_scales_in_other_shards(tmp_path):
    path, ref = W.write_block_fp8(tmp_path, shard_bytes=40_000)
    sd = loaderkit.load(path, strategy="fp32", model=W.TinyNet()).state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_load_refuses_a_nan_scale_naming_it(tmp_path):
    path, _ = W.write_block_fp8(tmp_path)
    rewrite(file_of(path), lambda t: t["b.weight_scale_inv"].__setitem__((0, 1), float("nan")))
    with pytest.raises(CorruptCheckpointError) as exc:
        loaderkit.load(path, strategy="fp32", model=W.TinyNet())
    assert exc.value.tensor == "b.weight_scale_inv"


def test_kv_cache_scales_are_auxiliary_and_dropped_on_load(tmp_path):
    path, ref = W.write_per_tensor_fp8(tmp_path)
    rewrite(file_of(path), lambda t: t.update({"attn.k_scale": torch.tensor(0.5), "attn.v_scale": torch.tensor(0.25)}))
    q = loaderkit.inspect(path).quantization
    assert set(q.auxiliary) == {"attn.k_scale", "attn.v_scale"}
    assert q.details["kv_cache_scales"] == ["attn.k_scale", "attn.v_scale"]
    sd = loaderkit.load(path, strategy="fp32", model=W.TinyNet()).state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_comfy_mixed_file_that_kept_its_legacy_marker(tmp_path):
    path, ref = W.write_comfy_mixed(tmp_path, layout="metadata")
    rewrite(path, lambda t: t.__setitem__(MD + "scaled_fp8", torch.empty(0, dtype=W.E4M3)))
    info = loaderkit.inspect(path)
    assert info.quantization.scheme == "comfy-mixed"
    assert info.quantization.auxiliary == (MD + "scaled_fp8",)
    assert_decodes_to(info, ref)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("preset", ["FP8", "FP8_DYNAMIC", "FP8_BLOCK"])
def test_llm_compressor_llama_loads_like_transformers_dequantizing(preset, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = W.write_compressed_tensors_llama(tmp_path, preset)
    assert loaderkit.inspect(path).quantization.scheme == "compressed-tensors-fp8"
    theirs = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    ours = loaderkit.load(path, strategy="bf16")
    want, got = theirs.state_dict(), ours.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    tokens = torch.tensor([[1, 5, 9, 3, 7, 11, 2, 60]])
    with torch.no_grad():
        assert torch.equal(ours(tokens).logits, theirs(tokens).logits)


def test_loaderkit_register_schemes_hook_contributes_every_family():
    got: list[loaderkit.plugin.Scheme] = []
    fp8_formats.loaderkit_register_schemes(got.append)
    assert [type(s) for s in got] == list(fp8_formats.SCHEMES)
    assert len({s.name for s in got}) == len(got)


def test_a_runtime_scheme_of_higher_priority_is_asked_first(fresh_manager, written):
    """A third-party scheme registered through loaderkit_register_schemes outranks the built-ins;
    unregistering it gives the checkpoint back to fp8-formats."""

    class Claims(fp8_formats.Fp8Scheme):
        name, family, priority = "test-claims-all", "test", 1000

        def detect(self, checkpoint):
            return loaderkit.plugin.QuantizationInfo(scheme=self.name, family=self.family, granularity="none", weights={})

    class Plugin:
        @loaderkit.hookimpl
        def loaderkit_register_schemes(self, register):
            register(Claims())

    path = written("block")[0]
    manager = fresh_manager()
    manager.register(Plugin(), name="test-claims")
    assert loaderkit.inspect(path, manager=manager).quantization.scheme == "test-claims-all"
    manager.unregister("test-claims")
    assert loaderkit.inspect(path, manager=manager).quantization.scheme == "fp8-block"


def test_integer_weight_with_a_scale_is_unsupported_not_misread(tmp_path):
    path, _ = W.write_per_tensor_fp8(tmp_path)
    (path / "config.json").unlink()
    rewrite(file_of(path), lambda t: t.__setitem__("a.weight", torch.zeros(320, 100, dtype=torch.uint8)))
    _expect_corrupt(path, "a.weight", match="packed or integer", error=UnsupportedCheckpointError)
