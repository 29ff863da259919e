"""Single files in their original layout (official releases, ComfyUI repackages) loaded into
diffusers classes, checked against diffusers' own ``from_single_file`` and converters.

The files are written from tiny diffusers models with diffusers' converters run backwards
(``single_file_writers``); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loaderkit
from loaderkit.errors import BuildError, StateDictMismatchError, UnsupportedCheckpointError

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders import single_file_utils as sfu  # noqa: E402

import single_file_writers as writers  # noqa: E402
from loaderkit.plugins import diffusers_single_file as single_file, op_capture  # noqa: E402

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)
SD3 = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
           num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
           pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
#: Stable Diffusion 1.5's UNet block structure (its default block types: four blocks of two layers,
#: attention in the first three), at widths of 4 and 8: 12 input and 12 output blocks, as in the release
SD15 = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(4, 8, 8, 8),
            cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
#: SDXL's: three blocks, no attention in the first, linear projections, the ``text_time`` embedding
SDXL = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(4, 8, 8),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=8 + 6 * 4)
KNOWN = frozenset(k for v in sfu.CHECKPOINT_KEY_NAMES.values() for k in ([v] if isinstance(v, str) else v))
COMFY = "model.diffusion_model."


class Family:
    """A tiny model of one family, saved as a diffusers directory, and its original layout.

    ``comfy`` is the prefix ComfyUI's files put in front of the original keys: ``""`` for the
    UNet, whose original keys have it already (``model.diffusion_model.input_blocks...``)."""

    def __init__(self, name: str, cls, kwargs: dict, root: Path, original, comfy: str = COMFY) -> None:
        torch.manual_seed(0)
        model = cls(**kwargs)
        for p in model.parameters():  # non-trivial values everywhere (norms included)
            p.data.normal_()
        self.cls, self.dir, self.comfy = cls, root / name, comfy
        model.save_pretrained(self.dir)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.original = original(self.state, dict(model.config))
        fn = diffusers.loaders.single_file_model.SINGLE_FILE_LOADABLE_CLASSES[cls.__name__]["checkpoint_mapping_fn"]
        self.convert = lambda ckpt: fn(config=dict(model.config), checkpoint=ckpt)
        back = self.convert(dict(self.original))
        assert set(back) == set(self.state) and all(torch.equal(back[k], self.state[k]) for k in back)

    def write(self, path: Path, tensors: dict[str, torch.Tensor]) -> Path:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return path

    def model(self):
        return single_file.model(self.cls, self.dir)


def _wan_original(state, config):
    return writers.wan_original(state)


def _sd3_original(state, config):
    convert = lambda c: sfu.convert_sd3_transformer_checkpoint_to_diffusers(c, config=config)
    keys = writers.discover_keys(convert, ["joint_blocks.0.seed"])
    return writers.original_state_dict(convert, keys, state)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("single_file")
    unet = diffusers.UNet2DConditionModel
    return {
        "wan": Family("wan", diffusers.WanTransformer3DModel, WAN, root, _wan_original),
        "sd3": Family("sd3", diffusers.SD3Transformer2DModel, SD3, root, _sd3_original),
        "sd15": Family("sd15", unet, SD15, root, writers.unet_original, comfy=""),
        "sdxl": Family("sdxl", unet, SDXL, root, writers.unet_original, comfy=""),
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype.itemsize == 1 else a[k], b[k].view(torch.uint8)
                           if b[k].dtype.itemsize == 1 else b[k]), k


# -- agreement with from_single_file ---------------------------------------------------------


#: each family as released and as ComfyUI repackages it (the UNet's release keys have the prefix already)
RELEASES = [("wan", ""), ("wan", COMFY), ("sd3", ""), ("sd3", COMFY), ("sd15", ""), ("sdxl", "")]


def test_unet_writer_matches_from_single_file(families, tmp_path):
    """The UNet's original layout is written by a test-only inverse; diffusers' own loader reads
    it back into the tiny model exactly."""
    for name in ("sd15", "sdxl"):
        fam = families[name]
        path = fam.write(tmp_path / f"{name}.safetensors", fam.original)
        lib = fam.cls.from_single_file(str(path), config=str(fam.dir), local_files_only=True).state_dict()
        _same(lib, fam.state)
    assert single_file.detect_layout(loaderkit.inspect(tmp_path / "sd15.safetensors").tensors) == "v1"


@pytest.mark.parametrize("name,prefix", RELEASES)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_matches_from_single_file(families, tmp_path, name, dtype, prefix):
    fam = families[name]
    path = fam.write(tmp_path / "model.safetensors", {prefix + k: v for k, v in fam.original.items()})
    got = loaderkit.load(path, dtype, model=fam.model()).state_dict()
    _same_as_library(fam, path, got, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])


def _same_as_library(fam: Family, path: Path, got: dict, dtype: torch.dtype) -> None:
    """``got`` equals ``from_single_file(..., torch_dtype=dtype)`` bitwise, except where loaderkit
    keeps the class's ``_keep_in_fp32_modules`` in float32 (as ``from_pretrained`` does, while
    ``from_single_file`` casts them too): there it equals diffusers' float32 load bitwise."""
    load = lambda d: fam.cls.from_single_file(str(path), config=str(fam.dir), local_files_only=True,
                                               torch_dtype=d).state_dict()
    keep = fam.cls._keep_in_fp32_modules or []
    kept = {k for k, v in got.items() if v.dtype == torch.float32 and dtype != torch.float32}
    assert all(any(m in k.split(".") for m in keep) for k in kept), sorted(kept)
    ref = load(dtype)
    _same({k: v for k, v in ref.items() if k not in kept}, {k: v for k, v in got.items() if k not in kept})
    if kept:
        ref32 = load(torch.float32)
        _same({k: ref32[k] for k in kept}, {k: got[k] for k in kept})


def test_plan_shows_the_conversions(families, tmp_path):
    fam = families["sd3"]
    path = fam.write(tmp_path / "sd3.safetensors", fam.original)
    plan = loaderkit.plan(path, "bf16", model=fam.model())
    conv = plan.key_conversions()
    q = conv["transformer_blocks.0.attn.to_q.weight"]
    assert "chunk(#0, 3, dim=0)[0]" in q and "joint_blocks.0.x_block.attn.qkv.weight" in q
    assert conv["proj_out.weight"] == "<- final_layer.linear.weight"
    assert "swap" not in conv["norm_out.linear.weight"] and "chunk(#0, 2, dim=0)[1]" in conv["norm_out.linear.weight"]
    tp = plan.tensors["transformer_blocks.0.attn.to_k.weight"]
    assert tp.sources == ("joint_blocks.0.x_block.attn.qkv.weight",) and tp.shape == (16, 16)
    text = str(plan)
    assert "key conversions" in text and "chunk(#0, 3, dim=0)[1]" in text


def test_unet_plan_shows_the_renames(families, tmp_path):
    fam = families["sd15"]
    path = fam.write(tmp_path / "v1-5-tiny.safetensors", fam.original)
    plan = loaderkit.plan(path, "fp8", model=fam.model())
    conv = plan.key_conversions()
    assert conv["down_blocks.0.resnets.0.norm1.weight"] == f"<- {COMFY}input_blocks.1.0.in_layers.0.weight"
    assert conv["down_blocks.0.downsamplers.0.conv.weight"] == f"<- {COMFY}input_blocks.3.0.op.weight"
    assert conv["mid_block.resnets.1.conv2.weight"] == f"<- {COMFY}middle_block.2.out_layers.3.weight"
    assert conv["up_blocks.0.upsamplers.0.conv.weight"] == f"<- {COMFY}output_blocks.2.1.conv.weight"
    assert conv["up_blocks.1.upsamplers.0.conv.weight"] == f"<- {COMFY}output_blocks.5.2.conv.weight"
    assert conv["up_blocks.3.resnets.2.conv_shortcut.weight"] == f"<- {COMFY}output_blocks.11.0.skip_connection.weight"
    assert all(not tp.sources for tp in plan.tensors.values())  # the UNet's converter only renames
    assert len(conv) == len(plan.tensors)


@pytest.mark.parametrize("name", ["sd3", "sd15"])
def test_plan_reads_headers_only(families, tmp_path, name):
    """The plan of a file whose data is garbage is the plan of the real file: no data is read."""
    fam = families[name]
    path = fam.write(tmp_path / "model.safetensors", fam.original)
    good = loaderkit.plan(path, "fp8", model=fam.model())
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header:] = b"\xff" * (len(raw) - header)
    path.write_bytes(bytes(raw))
    assert loaderkit.plan(path, "fp8", model=fam.model()) == good


# -- fp8 kept as stored ----------------------------------------------------------------------


def _reference(fam: Family, path: Path) -> dict[str, torch.Tensor]:
    """diffusers' converter on the file's tensors, scales and markers left out."""
    raw = load_file(str(path))
    return fam.convert({k: v for k, v in raw.items() if not k.endswith(("scale_weight", "scaled_fp8"))})


@pytest.mark.parametrize("name", ["wan", "sd3", "sd15", "sdxl"])
def test_comfy_scaled_fp8_keeps_bytes_and_scales(families, tmp_path, name):
    fam = families[name]
    path = fam.write(tmp_path / "scaled.safetensors", writers.comfy_scaled_fp8(fam.original, fam.comfy))
    raw = load_file(str(path))
    ref = _reference(fam, path)
    plan = loaderkit.plan(path, "fp8", model=fam.model())
    model = loaderkit.load(path, "fp8", model=fam.model())
    got = model.state_dict()
    source_of = lambda tp: (tp.sources or (tp.source,))[0]
    stored = [k for k, tp in plan.tensors.items() if raw[source_of(tp)].dtype == torch.float8_e4m3fn]
    kept = [k for k in stored if plan.tensors[k].target_dtype == "float8_e4m3fn"]
    assert len(kept) >= 8
    for key in kept:
        tp = plan.tensors[key]
        assert tp.conversion == "none"
        assert torch.equal(got[key].view(torch.uint8), ref[key].view(torch.uint8)), key
        source = source_of(tp)
        scale = raw[source[: -len("weight")] + "scale_weight"]
        module = model.get_submodule(key.rpartition(".")[0])
        buf = getattr(module, tp.scale)
        assert buf.dtype == torch.float32 and bool((buf == scale).all()), key
    if name == "sd3":  # split weights keep their bytes, their scale follows every part
        assert plan.tensors["transformer_blocks.0.attn.to_v.weight"].sources


@pytest.mark.parametrize("name,convs,fp8", [("sd3", False, torch.float8_e4m3fn), ("sd3", False, torch.float8_e5m2),
                                             ("sd15", True, torch.float8_e4m3fn)])
def test_plain_fp8_keeps_bytes(families, tmp_path, name, convs, fp8):
    """Every fp8 tensor the strategy keeps in fp8 keeps its bytes (for the UNet its convolutions
    are stored in fp8 too); those it keeps out of fp8 (time embeddings) are decoded exactly."""
    fam = families[name]
    path = fam.write(tmp_path / "plain.safetensors", writers.plain_fp8(fam.original, fp8, fam.comfy, convs))
    ref = _reference(fam, path)
    got = loaderkit.load(path, "fp8", model=fam.model()).state_dict()
    kept = 0
    for key, t in ((k, t) for k, t in ref.items() if t.dtype == fp8):
        if got[key].dtype == fp8:
            assert torch.equal(got[key].view(torch.uint8), t.view(torch.uint8)), key
            kept += 1
        else:
            assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], t.to(torch.bfloat16)), key
    assert kept >= 8
    # decoded to bf16, the same values as diffusers' own loader gives
    _same_as_library(fam, path, loaderkit.load(path, "bf16", model=fam.model()).state_dict(), torch.bfloat16)


def _unet_inputs(name: str, dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)
    inputs = dict(sample=rand(1, 4, 8, 8), timestep=torch.tensor([10]), encoder_hidden_states=rand(1, 3, 8))
    if name == "sdxl":  # SDXL's pooled text embedding and size / crop conditioning
        inputs["added_cond_kwargs"] = {"text_embeds": rand(1, 8), "time_ids": rand(1, 6)}
    return inputs


@pytest.fixture
def one_thread():
    """Tiny forward passes: one intra-op thread (more only wait on each other on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_unet_fp8_forward(families, tmp_path, one_thread, name):
    """Under fp8 the UNet runs on a float32 input: its fp8 convolutions and linears compute in
    bfloat16, giving exactly what the bfloat16 load of the same file gives."""
    fam = families[name]
    path = fam.write(tmp_path / "plain.safetensors", writers.plain_fp8(fam.original, torch.float8_e4m3fn, convs=True))
    fp8 = loaderkit.load(path, "fp8", model=fam.model())
    bf16 = loaderkit.load(path, "bf16", model=fam.model())
    resnet = fp8.down_blocks[1].resnets[0]
    assert resnet.conv1.weight.dtype == resnet.time_emb_proj.weight.dtype == torch.float8_e4m3fn
    with torch.no_grad():
        out = fp8(**_unet_inputs(name, torch.float32)).sample
        ref = bf16(**_unet_inputs(name, torch.bfloat16)).sample
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 8, 8) and bool(out.isfinite().all())
    assert torch.equal(out, ref)
    assert loaderkit.verify(fp8).ok


# -- the class and its config ----------------------------------------------------------------


def _fake_cache(root: Path, fam: Family, meta: dict) -> Path:
    """A Hugging Face cache holding only the config diffusers would fetch for this file."""
    path = sfu.fetch_diffusers_config(meta)
    repo = path["pretrained_model_name_or_path"]
    snap = root / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    component = diffusers.loaders.single_file_model.SINGLE_FILE_LOADABLE_CLASSES[fam.cls.__name__]["default_subfolder"]
    sub = snap / component
    sub.mkdir(parents=True)
    (sub / "config.json").write_text((fam.dir / "config.json").read_text())
    index = {"_class_name": "Pipeline", component: ["diffusers", fam.cls.__name__]}
    (snap / "model_index.json").write_text(json.dumps(index))
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    return root


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    root = tmp_path / "hf_cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    return root


@pytest.mark.parametrize("name", ["wan", "sd15"])
def test_class_and_config_found_in_the_local_cache(families, tmp_path, hf_cache, name):
    fam = families[name]
    path = fam.write(tmp_path / "model_fp8_scaled.safetensors", writers.comfy_scaled_fp8(fam.original, fam.comfy))
    _fake_cache(hf_cache, fam, single_file.meta_checkpoint(loaderkit.inspect(path).tensors))
    inferred = loaderkit.load(path, "fp8")
    given = loaderkit.load(path, "fp8", model=fam.cls)
    explicit = loaderkit.load(path, "fp8", model=fam.model())
    assert type(inferred) is type(given) is fam.cls
    _same(inferred.state_dict(), explicit.state_dict())
    _same(given.state_dict(), explicit.state_dict())
    assert "diffusers-single-file" in loaderkit.plan(path, "fp8").builder


@pytest.mark.parametrize("name", ["wan", "sd15"])
def test_no_cached_config_says_what_to_pass(families, tmp_path, hf_cache, name):
    fam = families[name]
    path = fam.write(tmp_path / "model.safetensors", fam.original)
    for model in (None, fam.cls):
        with pytest.raises(BuildError) as err:
            loaderkit.plan(path, model=model)
        msg = str(err.value)
        assert "local Hugging Face cache" in msg and "diffusers_single_file.model(" in msg and str(path) in msg


# -- errors at plan time ---------------------------------------------------------------------


def test_another_family_is_refused(families, tmp_path):
    wan, sd3 = families["wan"], families["sd3"]
    path = sd3.write(tmp_path / "sd3.safetensors", sd3.original)
    with pytest.raises(UnsupportedCheckpointError) as err:
        loaderkit.plan(path, model=wan.model())
    assert "WanTransformer3DModel" in str(err.value) and str(path) in str(err.value)
    path = wan.write(tmp_path / "wan.safetensors", wan.original)
    with pytest.raises(UnsupportedCheckpointError) as err:
        loaderkit.plan(path, model=sd3.model())
    assert "SD3Transformer2DModel" in str(err.value) and "converter" in str(err.value)
    unet = families["sd15"]
    for file_of, model_of in ((unet, sd3), (sd3, unet), (wan, unet)):
        path = file_of.write(tmp_path / "other.safetensors", file_of.original)
        with pytest.raises(UnsupportedCheckpointError) as err:
            loaderkit.plan(path, model=model_of.model())
        assert model_of.cls.__name__ in str(err.value) and str(path) in str(err.value)


def test_a_unet_file_needs_its_own_config(families, tmp_path):
    """The UNet's converter reads the model's config (the SDXL embedding only when the config has
    one, the blocks counted with its ``layers_per_block``): a config of another UNet is refused."""
    sd15, sdxl = families["sd15"], families["sdxl"]
    path = sd15.write(tmp_path / "sd15.safetensors", sd15.original)
    with pytest.raises(UnsupportedCheckpointError) as err:
        loaderkit.plan(path, model=sdxl.model())
    msg = str(err.value)
    assert "label_emb.0.0.weight" in msg and "convert_ldm_unet_checkpoint" in msg
    assert "the config given is not the file's" in msg
    path = sdxl.write(tmp_path / "sdxl.safetensors", sdxl.original)
    with pytest.raises(StateDictMismatchError) as err:  # same block counts: converted, but does not fit
        loaderkit.plan(path, model=sd15.model())
    assert "proj_in.weight: checkpoint [8, 8] vs model [8, 8, 1, 1]" in str(err.value)


def test_unet_tensors_the_file_lacks(families, tmp_path):
    fam = families["sd15"]
    lacking = {k: v for k, v in fam.original.items() if k != COMFY + "input_blocks.3.0.op.bias"}
    with pytest.raises(StateDictMismatchError) as err:  # the converter's .get() of it gives None
        loaderkit.plan(fam.write(tmp_path / "lacking.safetensors", lacking), model=fam.model())
    assert "down_blocks.0.downsamplers.0.conv.bias" in str(err.value)
    bare = {k.removeprefix(COMFY): v for k, v in fam.original.items()}
    with pytest.raises(UnsupportedCheckpointError) as err:  # diffusers converts model.diffusion_model.* only
        loaderkit.plan(fam.write(tmp_path / "bare.safetensors", bare), model=fam.model())
    assert "found none of the keys it converts" in str(err.value)


def test_a_class_without_a_converter_is_refused(families, tmp_path):
    path = families["wan"].write(tmp_path / "wan.safetensors", families["wan"].original)
    net = diffusers.UNet1DModel(block_out_channels=(8, 8), down_block_types=("DownBlock1D", "DownBlock1D"),
                                up_block_types=("UpBlock1D", "UpBlock1D"), mid_block_type="UNetMidBlock1D",
                                in_channels=2, out_channels=2, extra_in_channels=0, layers_per_block=1)
    with pytest.raises(UnsupportedCheckpointError) as err:
        loaderkit.plan(path, model=net)
    assert "no single-file converter for UNet1DModel" in str(err.value)


@pytest.mark.parametrize("name,key", [("sd3", "joint_blocks.0.x_block.attn.extra.weight"),
                                      ("sd15", COMFY + "extra.weight")])
def test_keys_the_converter_does_not_consume(families, tmp_path, name, key):
    fam = families[name]
    extra = dict(fam.original)
    extra[key] = torch.ones(2)
    path = fam.write(tmp_path / "extra.safetensors", extra)
    with pytest.raises(StateDictMismatchError) as err:
        loaderkit.plan(path, model=fam.model())
    assert key in str(err.value)
    plan = loaderkit.plan(path, model=fam.model(), strict=False)
    assert key in plan.ignored
    # other components of a whole-pipeline file are left out, and say so
    other = dict(fam.original)
    others = ("first_stage_model.decoder.conv_in.weight",
              "cond_stage_model.transformer.text_model.final_layer_norm.weight")
    other.update({k: torch.ones(2) for k in others})
    plan = loaderkit.plan(fam.write(tmp_path / "full.safetensors", other), model=fam.model())
    assert all("another component" in plan.ignored[k] for k in others)


def test_a_split_of_the_wrong_shape_fails_at_plan_time(families, tmp_path):
    fam = families["sd3"]
    bad = dict(fam.original)
    qkv = "joint_blocks.0.x_block.attn.qkv.weight"
    bad[qkv] = torch.cat([bad[qkv], bad[qkv][:3]])  # 51 rows: chunks of 17, not 16
    with pytest.raises(StateDictMismatchError) as err:
        loaderkit.plan(fam.write(tmp_path / "bad.safetensors", bad), model=fam.model())
    assert "transformer_blocks.0.attn.to_q.weight" in str(err.value) and "[17, 16]" in str(err.value)


# -- the capture itself ----------------------------------------------------------------------


def test_capture_replays_the_converter_exactly():
    def convert(ckpt):
        w = ckpt.pop("qkv")
        q, k, v = torch.chunk(w, 3, dim=0)
        return {"q": q, "k": k.t(), "v": torch.cat([v, ckpt["b"]]), "b": ckpt.pop("b")}

    real = {"qkv": torch.randn(6, 2), "b": torch.randn(2, 2)}
    cap = op_capture.capture(convert, op_capture.meta_tensors({k: (tuple(t.shape), t.dtype) for k, t in real.items()}))
    want = convert(dict(real))
    for key in want:
        assert torch.equal(cap.replay(key, real.__getitem__), want[key]), key
    assert cap.is_rename("b") and not cap.is_rename("q")
    assert cap.sources("v") == ("qkv", "b") and cap.shapes["k"] == (2, 2)


def test_capture_refuses_what_headers_cannot_tell():
    meta = op_capture.meta_tensors({"a": ((2,), torch.float32)})
    with pytest.raises(op_capture.CaptureError, match="in place"):
        op_capture.capture(lambda c: {"a": c["a"].mul_(2)}, meta)
    with pytest.raises(op_capture.CaptureError, match="values"):
        op_capture.capture(lambda c: {"a": c["a"] * float(c["a"].sum().item())}, meta)
    with pytest.raises(op_capture.CaptureError, match="not made from checkpoint tensors"):
        op_capture.capture(lambda c: {"a": 1.0}, meta)
    made_before = torch.zeros(2, device="meta")
    with pytest.raises(op_capture.CaptureError, match="not made from checkpoint tensors"):
        op_capture.capture(lambda c: {"a": made_before}, meta)


def test_capture_lists_outputs_the_checkpoint_lacks():
    """``checkpoint.get(key)`` of a key the file lacks gives ``None``: no output, listed as absent."""
    meta = op_capture.meta_tensors({"w": ((2,), torch.float32)})
    cap = op_capture.capture(lambda c: {"a.weight": c.get("w"), "a.bias": c.get("b")}, meta)
    assert list(cap.outputs) == ["a.weight"] and cap.absent == ("a.bias",) and "a.bias" not in cap.shapes


# -- Flux, at its real width -----------------------------------------------------------------

#: diffusers' Flux converter splits ``single_blocks.*.linear1`` into pieces of 3072 rows (the real
#: width), so the smallest Flux file it converts has the real width (one block of each kind).
FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False)


def test_flux_plan_from_headers(tmp_path):
    from loaderkit.plugin import meta_init

    with meta_init():
        flux = diffusers.FluxTransformer2DModel(**FLUX)
    shapes = {k: tuple(v.shape) for k, v in flux.state_dict().items()}
    convert = lambda c: sfu.convert_flux_transformer_checkpoint_to_diffusers(c)
    keys = writers.discover_keys(convert, ["double_blocks.0.seed", "single_blocks.0.seed"])
    original = writers.original_shapes(convert, keys, shapes)
    path = tmp_path / "flux1-schnell-fp8.safetensors"
    fp8 = lambda key, shape: "F8_E4M3" if len(shape) == 2 and key.endswith("weight") else "BF16"
    writers.header_only_file(path, {COMFY + k: s for k, s in original.items()}, fp8)
    plan = loaderkit.plan(path, "fp8", model=flux)
    conv = plan.key_conversions()
    linear1 = COMFY + "single_blocks.0.linear1.weight"
    for i, target in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
        tp = plan.tensors[f"single_transformer_blocks.0.{target}.weight"]
        assert tp.sources == (linear1,) and tp.target_dtype == "float8_e4m3fn" and tp.conversion == "none"
        assert f"split(#0, (3072, 3072, 3072, 12288), dim=0)[{i}]" in conv[tp.key]
    assert plan.tensors["transformer_blocks.0.attn.add_v_proj.weight"].shape == (3072, 3072)
    assert "chunk(#0, 3, dim=0)[2]" in conv["transformer_blocks.0.attn.add_v_proj.weight"]
    assert set(plan.tensors) == set(shapes)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LOADERKIT_REAL_WIDTH_TESTS") != "1",
                    reason="writes a 0.5 GB Flux file; set LOADERKIT_REAL_WIDTH_TESTS=1")
def test_flux_fp8_matches_the_library(tmp_path):
    """One block of each kind at the real width, random fp8 weights: loaderkit keeps the bytes
    diffusers' converter makes of the file, and decodes to bfloat16 exactly as from_single_file."""
    from loaderkit.plugin import meta_init

    with meta_init():
        flux = diffusers.FluxTransformer2DModel(**FLUX)
    shapes = {k: tuple(v.shape) for k, v in flux.state_dict().items()}
    convert = lambda c: sfu.convert_flux_transformer_checkpoint_to_diffusers(c)
    keys = writers.discover_keys(convert, ["double_blocks.0.seed", "single_blocks.0.seed"])
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for key, shape in writers.original_shapes(convert, keys, shapes).items():
        t = torch.randn(shape, generator=gen, dtype=torch.bfloat16) * 0.02
        tensors[COMFY + key] = t.to(torch.float8_e4m3fn) if len(shape) == 2 and key.endswith("weight") else t
    path = tmp_path / "flux1-fp8.safetensors"
    save_file(tensors, str(path))
    del tensors
    ref = convert(load_file(str(path)))
    cfg = tmp_path / "flux"
    cfg.mkdir()
    (cfg / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **FLUX}))
    got = loaderkit.load(path, "fp8", model=single_file.model(diffusers.FluxTransformer2DModel, cfg)).state_dict()
    kept = 0
    for key, t in ref.items():
        if got[key].dtype == torch.float8_e4m3fn:  # kept: the bytes diffusers' converter makes
            assert torch.equal(got[key].view(torch.uint8), t.view(torch.uint8)), key
            kept += 1
        else:  # what the strategy keeps out of fp8 (embedders, norms) is decoded exactly
            assert torch.equal(got[key], t.to(got[key].dtype)), key
    assert kept >= 20
    del got, ref
    lib = diffusers.FluxTransformer2DModel.from_single_file(str(path), config=str(cfg), local_files_only=True,
                                                           torch_dtype=torch.bfloat16).state_dict()
    mine = loaderkit.load(path, "bf16", model=single_file.model(diffusers.FluxTransformer2DModel, cfg)).state_dict()
    _same(lib, mine)

