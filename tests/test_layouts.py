"""fp8 layouts: ``convert`` executes the plan ``loaderkit.plan(..., layout=...)`` shows, each
layout is written by its scheme's encoder, and a third-party layout plugs in the same way."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import loaderkit
import loaderkit.plugin as lkp
from loaderkit.demo import TinyVideoDiT, sample_inputs, save_sample
from loaderkit.errors import ConvertError
from loaderkit.kernels.quant import quantize

E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return save_sample(tmp_path_factory.mktemp("src"))


def _written(path):
    with safe_open(str(path), "pt") as f:
        return {k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


def test_the_plan_for_a_layout_is_what_convert_writes(sample, tmp_path):
    strategy = loaderkit.strategy("fp8", default_skips=False)
    plan = loaderkit.plan(sample, strategy, model=TinyVideoDiT, layout="comfy-mixed")
    dst = loaderkit.convert(sample, tmp_path / "out.safetensors", strategy, model=TinyVideoDiT, progress=False)
    written = _written(dst)
    quantized = {tp.source for tp in plan.tensors.values() if tp.conversion == "quantize"}
    assert quantized == {k[: -len(".comfy_quant")] + ".weight" for k in written if k.endswith(".comfy_quant")}
    names = {"F8_E4M3": "float8_e4m3fn", "BF16": "bfloat16", "F32": "float32"}
    for tp in plan.tensors.values():
        assert names[written[tp.source][0]] == tp.target_dtype and written[tp.source][1] == tp.shape, tp.source
    # the Conv3d the strategy would quantize is kept by the layout, and the plan says so
    assert plan.modules["patch_embed"].storage["weight"] == "bfloat16"
    assert "comfy-mixed layout" in plan.modules["patch_embed"].reason
    assert any(d.subject == "layout comfy-mixed" and "patch_embed.weight" in d.reason for d in plan.decisions)
    assert all(tp.granularity == "tensor" for tp in plan.tensors.values() if tp.conversion == "quantize")


def test_a_granularity_the_layout_cannot_write_is_refused_and_nothing_is_written(sample, tmp_path):
    strategy = loaderkit.strategy("fp8", granularity="channel")
    with pytest.raises(loaderkit.PlanError, match="comfy-mixed layout writes tensor scales"):
        loaderkit.plan(sample, strategy, model=TinyVideoDiT, layout="comfy-mixed")
    with pytest.raises(loaderkit.PlanError, match="comfy-mixed layout writes tensor scales"):
        loaderkit.convert(sample, tmp_path / "x.safetensors", strategy, model=TinyVideoDiT, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_layout_names_the_registered_ones(sample, tmp_path):
    with pytest.raises(ConvertError, match="no fp8 layout named 'gguf'.*compressed-tensors.*comfy-mixed|"
                                           "no fp8 layout named 'gguf'.*comfy-mixed.*compressed-tensors"):
        loaderkit.convert(sample, tmp_path / "x.safetensors", "fp8", layout="gguf", progress=False)


def test_fp8_strategy_block_granularity_loads(sample):
    strategy = loaderkit.strategy("fp8", granularity="block", block=(32, 64))
    plan = loaderkit.plan(sample, strategy, model=TinyVideoDiT)
    fc1 = plan.tensors["blocks.0.fc1.weight"]
    assert (fc1.granularity, fc1.block, fc1.scale) == ("block", (32, 64), "weight_scale")
    model = loaderkit.load(sample, strategy, model=TinyVideoDiT)
    assert model.blocks[0].fc1.weight_scale.shape == (fc1.shape[0] // 32, fc1.shape[1] // 64)
    ref = loaderkit.load(sample, "fp32", model=TinyVideoDiT)
    inputs = sample_inputs()
    assert loaderkit.verify(model, inputs).ok
    out, want = model(*inputs).float().flatten(), ref(*inputs).flatten()
    assert torch.nn.functional.cosine_similarity(out, want, dim=0) > 0.99


# -- a third-party layout ------------------------------------------------------------------------


class RowScaleEncoder(lkp.Encoder):
    """Writes ``<m>.weight`` fp8 and ``<m>.row_scale`` float32 [N, 1]."""

    name = "row-scale"
    granularities = ("channel",)

    def accepts(self, checkpoint):
        return False  # chosen by name only

    def holds(self, module, tensor, dtype):
        return "" if module.kind == "linear" and tensor == "weight" else "row-scale holds Linear weights only"

    def outputs(self, tensor, module):
        return (
            lkp.EncodedTensor(name=tensor.source, dtype=tensor.target_dtype, shape=tensor.shape),
            lkp.EncodedTensor(name=tensor.source[: -len("weight")] + "row_scale", dtype="float32",
                              shape=(tensor.shape[0], 1)),
        )

    def encode(self, tensor, module, q, scale):
        weight, row = self.outputs(tensor, module)
        return {weight.name: q, row.name: scale.reshape(row.shape)}

    def edit_config(self, config, plan):
        return config


class RowScale(lkp.Scheme):
    name = "row-scale"
    priority = 100

    def detect(self, checkpoint):
        pairs = {k[: -len("row_scale")] + "weight": k for k in checkpoint.tensors if k.endswith(".row_scale")}
        if not pairs:
            return None
        weights = {w: lkp.QuantizedWeight(weight=w, scale=s, granularity="channel") for w, s in pairs.items()}
        return lkp.QuantizationInfo(scheme=self.name, family="row-scaled fp8 (example)", granularity="channel",
                                    weights=weights)

    def dequantize(self, q, weight, tensors, dtype):
        return (weight.float() * tensors[q.scale].float()).to(dtype)

    def encoder(self):
        return RowScaleEncoder()


class RowScalePlugin:
    @lkp.hookimpl
    def loaderkit_register_schemes(self, register):
        register(RowScale())


def test_a_plugin_layout_is_written_and_read_back(sample, tmp_path):
    mgr = lkp.PluginManager(autoload=False)
    mgr.register(RowScalePlugin(), name="row-scale-plugin")
    assert [lay.name for lay in mgr.layouts()][0] == "row-scale"
    dst = loaderkit.convert(sample, tmp_path / "rows.safetensors", "fp8", layout="row-scale",
                            model=TinyVideoDiT, progress=False, manager=mgr)
    written = _written(dst)
    assert written["blocks.0.fc1.row_scale"] == ("F32", (written["blocks.0.fc1.weight"][1][0], 1))
    info = loaderkit.inspect(dst, manager=mgr)
    assert info.quantization.scheme == "row-scale"
    with safe_open(str(sample), "pt") as f:
        q, scale = quantize(f.get_tensor("blocks.0.fc1.weight"), E4M3, granularity="channel")
    model = loaderkit.load(dst, "fp32", model=TinyVideoDiT, manager=mgr)
    assert torch.equal(model.blocks[0].fc1.weight.detach(), q.float() * scale)
    kept = loaderkit.load(dst, "fp8", model=TinyVideoDiT, manager=mgr)
    assert kept.blocks[0].fc1.weight.dtype == E4M3 and torch.equal(kept.blocks[0].fc1.weight_scale, scale)


def test_config_of_a_dequantized_copy_drops_every_schemes_entries(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tiny_configs import TINY_LLAMA as LLAMA

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(tmp_path / "llama")
    fp8 = loaderkit.convert(tmp_path / "llama", tmp_path / "fp8", "fp8", progress=False)
    plan = loaderkit.plan(tmp_path / "llama", "fp8", layout="compressed-tensors")
    qc = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == sorted(m.name for m in plan.modules.values()
                                  if m.kind == "linear" and m.storage.get("weight") != "float8_e4m3fn")
    dense = loaderkit.convert(fp8, tmp_path / "dense", "bf16", progress=False)
    config = json.loads((dense / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
