"""Never silently wrong: layouts loaderkit does not decode are named and refused, what a plan
drops is recorded, inputs follow the model's dtype, and the model is checked against the plan.

Checkpoints are written by the real tools where they install here (compressed-tensors,
optimum-quanto); the others are written in the exact key layout their writers produce."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import loaderkit
import loaderkit.plugin as lkp
from loaderkit.errors import UnsupportedCheckpointError

import fp8_writers as W
from conftest import TinyNet, save_st, seeded

E4M3 = torch.float8_e4m3fn


# -- 1. compressed-tensors MXFP8 (llm-compressor's preset, written by compressed-tensors) ----------


@pytest.fixture(scope="module")
def mxfp8(tmp_path_factory):
    pytest.importorskip("compressed_tensors")
    return W.write_compressed_tensors_llama(tmp_path_factory.mktemp("mxfp8"), "MXFP8")


def test_mxfp8_is_recognised_and_decodes_like_compressed_tensors(mxfp8):
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    qc = json.loads((mxfp8 / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mxfp8-quantized"
    args = QuantizationArgs.model_validate(qc["config_groups"]["group_0"]["weights"])
    info = loaderkit.inspect(mxfp8)
    assert info.quantization.scheme == "compressed-tensors-fp8" and "MXFP8" in info.quantization.family
    ref = {}
    with safe_open(str(mxfp8 / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if k.endswith(".weight_scale"):
                w = k[: -len("_scale")]
                assert f.get_tensor(k).dtype == torch.uint8
                ref[w] = dequantize(f.get_tensor(w), decompress_mx_scale(f.get_tensor(k)), args=args, dtype=torch.bfloat16)
    loaded = loaderkit.load(mxfp8, "fp32").state_dict()
    assert len(ref) == 14 and all(torch.equal(loaded[k], ref[k].float()) for k in ref)
    kept = loaderkit.load(mxfp8, "fp8")
    up = kept.model.layers[0].mlp.up_proj
    assert up.weight.dtype == E4M3 and up.weight_scale.dtype == torch.float32
    assert loaderkit.plan(mxfp8, "fp8").tensors["model.layers.0.mlp.up_proj.weight"].block == (1, 32)


def test_scales_of_an_unread_layout_are_never_dropped_on_advice(tmp_path):
    """Weights with scales no scheme reads: an error that says why — not 'pass strict=False'."""
    sd = {k: v for k, v in seeded(TinyNet).state_dict().items()}
    sd["proj.weight"] = sd["proj.weight"].to(E4M3)
    sd["proj.weight_mx"] = torch.ones(16, 1, dtype=torch.uint8)  # a scale under an unknown name ...
    sd["proj.weight_scale_2"] = torch.ones(1)  # ... and one named like a scale
    path = save_st(tmp_path / "odd.safetensors", sd)
    for strict in (True, False):
        with pytest.raises(UnsupportedCheckpointError, match="named like quantization data") as info:
            loaderkit.load(path, "fp32", model=TinyNet, strict=strict)
        assert "strict=False" not in str(info.value).replace("strict=False does not", "")
        assert info.value.tensor in ("proj.weight_scale_2", "proj.weight_mx")
        assert "proj.weight_scale_2" in str(info.value)


# -- 2. optimum-quanto (written by optimum-quanto) ------------------------------------------------


@pytest.fixture(scope="module")
def quanto_file(tmp_path_factory):
    quanto = pytest.importorskip("optimum.quanto")
    model = seeded(TinyNet)
    quanto.quantize(model, weights=quanto.qfloat8)
    quanto.freeze(model)
    path = tmp_path_factory.mktemp("quanto") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))  # quanto's README
    return path


def test_quanto_qfloat8_is_named_and_refused(quanto_file, tmp_path):
    with safe_open(str(quanto_file), "pt") as f:
        assert "proj.weight._data" in f.keys() and f.get_tensor("proj.weight._data").dtype == E4M3
    q = loaderkit.inspect(quanto_file).quantization
    assert q is not None and q.scheme == "refused-layouts" and "optimum-quanto" in q.family and q.refused
    for call in (lambda: loaderkit.plan(quanto_file, "fp8", model=TinyNet),
                 lambda: loaderkit.load(quanto_file, "bf16", model=TinyNet)):
        with pytest.raises(UnsupportedCheckpointError, match="optimum-quanto.*does not decode"):
            call()
    for strategy in ("bf16", "fp8"):
        dst = tmp_path / f"{strategy}.safetensors"
        with pytest.raises(UnsupportedCheckpointError, match="optimum-quanto"):
            loaderkit.convert(quanto_file, dst, strategy, model=TinyNet, progress=False)
        assert not dst.exists()
    assert list(tmp_path.iterdir()) == []


def test_quanto_save_pretrained_layout_is_refused(tmp_path):
    quanto = pytest.importorskip("optimum.quanto")
    transformers = pytest.importorskip("transformers")
    from tiny_configs import TINY_LLAMA

    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA))
    qmodel = quanto.QuantizedModelForCausalLM.quantize(llama, weights=quanto.qfloat8)
    qmodel.save_pretrained(str(tmp_path / "q"))
    assert (tmp_path / "q" / "quanto_qmap.json").is_file()
    with pytest.raises(UnsupportedCheckpointError, match="optimum-quanto"):
        loaderkit.plan(tmp_path / "q", "bf16")


@pytest.mark.parametrize(
    "extra, family",
    [
        ({"proj.SCB": torch.ones(16), "proj.weight_format": torch.zeros(1, dtype=torch.uint8)}, "bitsandbytes"),
        ({"proj.qweight": torch.zeros(1, 16, dtype=torch.int32), "proj.qzeros": torch.zeros(1, 2, dtype=torch.int32),
          "proj.scales": torch.ones(1, 16)}, "GPTQ/AWQ"),
    ],
    ids=["bitsandbytes", "gptq"],
)
def test_other_libraries_layouts_are_named(tmp_path, extra, family):
    path = save_st(tmp_path / "q.safetensors", seeded(TinyNet), extra=extra)
    q = loaderkit.inspect(path).quantization
    assert q.scheme == "refused-layouts" and family in q.family
    with pytest.raises(UnsupportedCheckpointError, match=family):
        loaderkit.load(path, "fp32", model=TinyNet)


# -- 3. tensor subclasses in torch files ----------------------------------------------------------


class QuantizedTensor(torch.Tensor):
    """Stands for another library's tensor subclass (torchao's Float8Tensor and the like)."""


def test_tensor_subclasses_in_torch_files_are_refused_by_name(tmp_path):
    sd = seeded(TinyNet).state_dict()
    sd["proj.weight"] = sd["proj.weight"].as_subclass(QuantizedTensor)
    torch.save(sd, tmp_path / "model.pt")
    with torch.serialization.safe_globals([QuantizedTensor]):  # what torchao does when importable
        for call in (lambda: loaderkit.inspect(tmp_path / "model.pt"),
                     lambda: loaderkit.load(tmp_path / "model.pt", "fp8", model=TinyNet)):
            with pytest.raises(UnsupportedCheckpointError, match="QuantizedTensor.*tensor subclass") as info:
                call()
            assert info.value.tensor == "proj.weight"


# -- 4. quantization configs no scheme understands --------------------------------------------------


def _with_config(tmp_path, qc, weights_dtype=E4M3):
    sd = seeded(TinyNet).state_dict()
    sd["proj.weight"] = sd["proj.weight"].to(weights_dtype)
    d = tmp_path / "ckpt"
    d.mkdir()
    save_st(d / "model.safetensors", sd)
    (d / "config.json").write_text(json.dumps({"architectures": ["TinyNet"], "quantization_config": qc}))
    return d


@pytest.mark.parametrize(
    "qc, named",
    [
        ({"quant_method": "awesome-q", "bits": 8}, "awesome-q"),
        ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {}},
         "nvfp4-pack-quantized"),
    ],
    ids=["unknown-method", "unknown-ct-format"],
)
def test_unknown_quantization_configs_are_named_and_refused(tmp_path, qc, named):
    d = _with_config(tmp_path, qc)
    q = loaderkit.inspect(d).quantization
    assert q is not None and named in q.family and "no installed scheme decodes" in q.refused
    assert "refused" in loaderkit.inspect(d).summary()["quantization"]
    with pytest.raises(UnsupportedCheckpointError, match=named):
        loaderkit.plan(d, "fp32", model=TinyNet)


def test_a_dequantized_copy_that_kept_its_config_still_loads(tmp_path):
    d = _with_config(tmp_path, {"quant_method": "awesome-q"}, weights_dtype=torch.float32)
    assert loaderkit.inspect(d).quantization is None
    assert loaderkit.load(d, "fp32", model=TinyNet).proj.weight.dtype == torch.float32


# -- 5. what a plan drops is recorded --------------------------------------------------------------


def test_static_activation_scales_are_recorded_as_not_applied(tmp_path):
    path, _ = W.write_per_tensor_fp8(tmp_path / "static", input_scale=True)
    plan = loaderkit.plan(path, "fp8", model=W.TinyNet)
    assert "static activation scale of a.weight" in plan.ignored["a.input_scale"]
    assert any(d.subject == "static activation scales" and d.choice == "2 not applied" for d in plan.decisions)


# -- 7. the input cast follows the model's dtype ----------------------------------------------------


def test_input_cast_follows_a_model_recast_after_loading(tiny_ckpt):
    path, ref = tiny_ckpt
    model = loaderkit.load(path, "fp32", model=TinyNet)
    model.to(torch.bfloat16)
    x = torch.randn(3, 8)
    for given in (x.to(torch.bfloat16), x):
        out = model(given)
        assert out.dtype == torch.bfloat16
        assert torch.equal(out, ref.to(torch.bfloat16)(x.to(torch.bfloat16)))
    report = loaderkit.verify(model, x.to(torch.bfloat16))
    assert report.ok and "re-cast as a whole" in report.notes[0]
    model.norm.float()  # a partial re-cast is still a problem
    assert not loaderkit.verify(model).ok


# -- 8. the model is checked against the plan after assignment --------------------------------------


class UpcastingStore(dict):
    """A parameter store that keeps its own copy in float32 (as an offload cache might)."""

    def __setitem__(self, key, value):
        if value is not None:
            value = nn.Parameter(value.detach().float(), requires_grad=False)
        super().__setitem__(key, value)


def test_a_managed_parameter_store_is_caught_after_assignment(tiny_ckpt):
    model = TinyNet()
    model.proj._parameters = UpcastingStore(model.proj._parameters)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lkp.BuildError, match=r"after assignment, 'proj\.(weight|bias)' is float32, but the plan "
                                             r"stores it as (float8_e4m3fn|bfloat16)") as info:
        loaderkit.load(tiny_ckpt[0], "fp8", model=model)
    assert info.value.tensor in ("proj.weight", "proj.bias") and info.value.module == "proj"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's model is given back


# -- 9. skip rules match module roles by component --------------------------------------------------


class Vace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv3d(4, 32, (1, 2, 2), stride=(1, 2, 2))
        self.vace_patch_embedding = nn.Conv3d(4, 32, (1, 2, 2), stride=(1, 2, 2))
        self.proj = nn.Linear(32, 32)


def test_the_vace_patch_embedding_is_skipped_like_the_patch_embedding(tmp_path):
    path = save_st(tmp_path / "vace.safetensors", seeded(Vace))
    plan = loaderkit.plan(path, "fp8", model=Vace)
    for name in ("patch_embedding", "vace_patch_embedding"):
        assert plan.modules[name].storage["weight"] == "bfloat16", name
        assert "skip pattern" in plan.modules[name].reason
    assert plan.modules["proj"].storage["weight"] == "float8_e4m3fn"


# -- 6. verify observes what kernels receive, and names what it does not cover -----------------------


class WrappedLinear(nn.Linear):
    """Another library's VRAM-managed layer (DiffSynth's AutoWrappedLinear does this): fp8
    storage, and a forward that casts the weight to the activations' dtype itself."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class Managed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = WrappedLinear(8, 16)
        self.fc2 = WrappedLinear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_verify_reports_another_librarys_working_wrapper_as_not_covered():
    model = Managed().to(torch.bfloat16)
    for m in (model.fc1, model.fc2):
        m.weight.data = m.weight.data.to(E4M3)
    static = loaderkit.verify(model)
    assert not static.ok and {p.module for p in static.problems} == {"fc1", "fc2"}
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    report = loaderkit.verify(model, x)
    assert report.ok, str(report)
    assert len(report.notes) == 2 and all("not covered by loaderkit" in n for n in report.notes)
    assert report.observed["fc1"] == ["linear: input bfloat16, weight bfloat16"]


def test_verify_keeps_the_problem_when_the_kernel_really_sees_fp8(tiny_ckpt):
    model = TinyNet().to(torch.bfloat16)
    model.proj.weight.data = model.proj.weight.data.to(E4M3)
    report = loaderkit.verify(model, torch.randn(2, 8, dtype=torch.bfloat16))
    assert not report.ok
    assert {p.kind for p in report.problems} >= {"storage", "forward"}
    assert not report.notes


def test_verify_observes_every_kernel_of_a_loaded_model(tiny_ckpt):
    model = loaderkit.load(tiny_ckpt[0], "fp8", model=TinyNet)
    report = loaderkit.verify(model, torch.randn(2, 8))
    assert report.ok
    assert report.observed["proj"] == ["linear: input bfloat16, weight bfloat16"]  # decoded by the cast rule
    assert report.observed["norm"] == ["layer_norm: input bfloat16, weight bfloat16"]
