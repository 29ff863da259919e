"""The orchestrator: what load() accepts, what it returns, and how it fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import loaderkit
from loaderkit import LoaderKitError, PlanError, StrategyError
from loaderkit.plugin import BuildError, CheckpointNotFoundError, ModelFacts
from loaderkit.plugins.safetensors_format import SafetensorsFormat

from conftest import BufferNet, TinyNet, assert_snapshot_equal, run_python, save_st, seeded, snapshot


def facts_plugin(facts: ModelFacts, model_type: type = TinyNet):
    """A plugin object answering ``loaderkit_model_facts`` for ``model_type``."""

    class FactsPlugin:
        @loaderkit.hookimpl
        def loaderkit_model_facts(self, model):
            return facts if isinstance(model, model_type) else None

    return FactsPlugin()


# -------------------------------------------------------------------------------------------
# what comes back
# -------------------------------------------------------------------------------------------


def test_load_returns_the_given_module_loaded_and_in_eval_mode(tiny_ckpt):
    path, ref = tiny_ckpt
    target = TinyNet().train()
    model = loaderkit.load(path, "fp32", model=target)
    assert model is target
    assert not any(m.training for m in model.modules())
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_load_from_a_directory(tmp_path):
    ref = seeded(TinyNet)
    save_st(tmp_path / "model.safetensors", ref)
    model = loaderkit.load(tmp_path, "bf16", model=TinyNet)
    assert torch.equal(model.proj.weight, ref.proj.weight.to(torch.bfloat16))


def test_meta_instance_is_filled(tiny_ckpt):
    path, ref = tiny_ckpt
    with torch.device("meta"):
        target = TinyNet()
    model = loaderkit.load(path, "fp32", model=target)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(model.head.bias, ref.head.bias)


def test_keep_fp32_facts_keep_a_module_in_float32(fresh_manager, tiny_ckpt):
    path, ref = tiny_ckpt
    name = loaderkit.register(facts_plugin(ModelFacts(keep_fp32=("norm",), source=("t",))), name="keep")
    try:
        model = loaderkit.load(path, "bf16", model=TinyNet)
        plan = loaderkit.plan(path, "bf16", model=TinyNet)
        plain = loaderkit.load(path, loaderkit.strategy("bf16", keep_fp32_modules=False), model=TinyNet)
    finally:
        loaderkit.unregister(name)
    assert model.norm.weight.dtype == torch.float32 and model.norm.bias.dtype == torch.float32
    assert torch.equal(model.norm.weight, ref.norm.weight)
    assert model.proj.weight.dtype == torch.bfloat16 and model.head.weight.dtype == torch.bfloat16
    assert plan.modules["norm"].compute_dtype == "float32"
    assert "library" in plan.modules["norm"].reason
    assert plain.norm.weight.dtype == torch.bfloat16
    assert loaderkit.verify(model).ok


def test_keep_fp32_module_receives_float32_activations(fresh_manager, tiny_ckpt):
    path, _ = tiny_ckpt
    name = loaderkit.register(facts_plugin(ModelFacts(keep_fp32=("head",))), name="keep-head")
    try:
        model = loaderkit.load(path, "bf16", model=TinyNet)
    finally:
        loaderkit.unregister(name)
    assert model.head.weight.dtype == torch.float32
    report = loaderkit.verify(model, torch.randn(2, 8))
    assert report.ok, str(report)


# -------------------------------------------------------------------------------------------
# failing loads change nothing and return nothing
# -------------------------------------------------------------------------------------------


class FlakyReader:
    """Serves tensors from a safetensors reader, failing on the ``fail_at``-th read."""

    def __init__(self, inner, fail_at: int) -> None:
        self.inner, self.fail_at, self.reads, self.closed = inner, fail_at, 0, False

    def get(self, name):
        self.reads += 1
        if self.reads == self.fail_at:
            raise OSError(f"disk went away while reading {name}")
        return self.inner.get(name)

    def close(self):
        self.closed = True
        self.inner.close()


class FlakyFormat(SafetensorsFormat):
    name = "flaky"
    priority = 100
    readers: list = []

    def claim(self, path):
        return path.suffix == ".flaky"

    def describe(self, path):
        return super().describe(path).model_copy(update={"format": self.name})

    def open(self, checkpoint):
        reader = FlakyReader(super().open(checkpoint), fail_at=3)
        self.readers.append(reader)
        return reader


@pytest.fixture
def flaky(fresh_manager, tmp_path):
    """A ``.flaky`` safetensors file and a registered format whose reader fails on the 3rd tensor."""

    class Plugin:
        @loaderkit.hookimpl
        def loaderkit_register_formats(self, register):
            register(FlakyFormat())

    path = save_st(tmp_path / "tiny.flaky", seeded(TinyNet))
    FlakyFormat.readers = []
    name = loaderkit.register(Plugin(), name="flaky-plugin")
    try:
        yield path
    finally:
        loaderkit.unregister(name)


def test_failure_midway_leaves_a_real_module_unchanged(flaky):
    target = TinyNet().train()
    before = snapshot(target)
    params = {k: id(p) for k, p in target.named_parameters()}
    result = None
    with pytest.raises(LoaderKitError) as err:
        result = loaderkit.load(flaky, "bf16", model=target)
    assert result is None
    assert "disk went away" in str(err.value) and err.value.tensor is not None
    assert err.value.tensor in str(err.value)
    reader = FlakyFormat.readers[-1]
    assert reader.reads == 3 and reader.closed, "the reader is closed after a failure"
    assert_snapshot_equal(target, before)
    assert {k: id(p) for k, p in target.named_parameters()} == params
    assert target.training, "a failed load does not switch the module to eval mode"


def test_failure_in_model_loaded_hook_leaves_no_half_loaded_module(fresh_manager, tiny_ckpt):
    path, _ = tiny_ckpt

    class Refuse:
        @loaderkit.hookimpl
        def loaderkit_model_loaded(self, model, plan):
            raise RuntimeError("refused")

    name = loaderkit.register(Refuse(), name="refuse")
    target = TinyNet()
    before = snapshot(target)
    try:
        with pytest.raises(loaderkit.PluginError, match="refused"):
            loaderkit.load(path, "bf16", model=target)
    finally:
        loaderkit.unregister(name)
    assert_snapshot_equal(target, before)


# -------------------------------------------------------------------------------------------
# argument errors
# -------------------------------------------------------------------------------------------


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(CheckpointNotFoundError) as err:
        loaderkit.load(missing, "fp32", model=TinyNet)
    assert str(missing) in str(err.value) and err.value.path == str(missing)
    assert isinstance(err.value, FileNotFoundError)


def test_unknown_strategy_lists_registered_ones(tiny_ckpt):
    with pytest.raises(StrategyError, match="unknown strategy 'bf17'") as err:
        loaderkit.load(tiny_ckpt[0], "bf17", model=TinyNet)
    for name in ("auto", "fp32", "bf16", "fp16"):
        assert name in str(err.value).split("registered strategies:")[1]
    with pytest.raises(StrategyError, match="bf17"):
        loaderkit.strategy("bf17")
    with pytest.raises(StrategyError, match="int"):
        loaderkit.load(tiny_ckpt[0], 16, model=TinyNet)


def test_unknown_or_invalid_strategy_option(tiny_ckpt):
    with pytest.raises(StrategyError) as err:
        loaderkit.strategy("bf16", keep_fp32=True)
    assert "keep_fp32" in str(err.value) and "keep_fp32_modules" in str(err.value)
    with pytest.raises(StrategyError, match="prefer"):
        loaderkit.strategy("auto", prefer="quality")


def test_model_factory_is_built_on_meta_in_the_build_dtype(tiny_ckpt):
    seen = {}

    def factory():
        net = TinyNet()
        seen["device"] = net.proj.weight.device.type
        seen["dtype"] = torch.get_default_dtype()
        return net

    model = loaderkit.load(tiny_ckpt[0], "bf16", model=factory)
    assert seen == {"device": "meta", "dtype": torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32, "the default dtype is restored"
    assert model.proj.weight.device.type == "cpu" and model.proj.weight.dtype == torch.bfloat16


def test_model_class_is_built_without_allocating(tiny_ckpt, monkeypatch):
    calls = []
    real_init = torch.nn.Linear.reset_parameters

    def spy(self):
        calls.append(self.weight.device.type)
        return real_init(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", spy)
    model = loaderkit.load(tiny_ckpt[0], "fp32", model=TinyNet)
    assert calls and set(calls) == {"meta"}
    assert torch.equal(model.proj.weight, tiny_ckpt[1].proj.weight)


class NeedsArgs(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, width)


def _raises():
    raise RuntimeError("factory exploded")


@pytest.mark.parametrize(
    "bad, needle",
    [
        (42, "not int"),
        ("TinyNet", "not str"),
        (lambda: {"proj.weight": None}, "returned dict"),
        (_raises, "factory exploded"),
        (NeedsArgs, "zero-argument"),
    ],
)
def test_bad_model_argument_is_a_build_error(tiny_ckpt, bad, needle):
    with pytest.raises(BuildError, match=needle) as err:
        loaderkit.load(tiny_ckpt[0], "fp32", model=bad)
    assert "model=" in str(err.value)


def test_no_config_and_no_model_says_how_to_pass_model(tiny_ckpt):
    with pytest.raises(BuildError) as err:
        loaderkit.load(tiny_ckpt[0], "fp32")
    text = str(err.value)
    assert "no config.json" in text and "model=" in text and str(tiny_ckpt[0]) in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_map_without_cuda_is_a_plan_error(tiny_ckpt):
    with pytest.raises(PlanError, match="cuda") as err:
        loaderkit.plan(tiny_ckpt[0], "bf16", model=TinyNet, device_map="cuda")
    assert "cpu" in str(err.value)
    with pytest.raises(PlanError):
        loaderkit.load(tiny_ckpt[0], "bf16", model=TinyNet, device_map="cuda:0")


def test_bad_device_map_values(tiny_ckpt):
    with pytest.raises(PlanError, match="invalid device"):
        loaderkit.plan(tiny_ckpt[0], "fp32", model=TinyNet, device_map="gpu-please")
    with pytest.raises(PlanError, match="device_map"):
        loaderkit.load(tiny_ckpt[0], "fp32", model=TinyNet, device_map=["cpu"])


def test_every_error_is_a_loaderkit_error(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(LoaderKitError) as err:
        loaderkit.load(bad, "fp32", model=TinyNet)
    assert str(bad) in str(err.value)
    path = Path(tmp_path / "buffers.safetensors")
    save_st(path, seeded(BufferNet))
    assert loaderkit.load(path, "fp32", model=BufferNet).position_ids.dtype == torch.int64


def test_a_skeleton_whose_init_first_imports_torch_dynamo_builds(tmp_path):
    """``nn.init.normal_`` (an Embedding's init) imports torch._dynamo on first use; that import
    checks ``Tensor.__new__``, which the skeleton build replaces while it runs, and must accept it.
    In a fresh process, where nothing imported torch._dynamo before."""
    code = f"""
import sys, torch, loaderkit
from torch import nn
from safetensors.torch import save_file
assert "torch._dynamo" not in sys.modules
class E(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
save_file({{"embed.weight": torch.randn(10, 4)}}, {str(tmp_path / "e.safetensors")!r})
m = loaderkit.load({str(tmp_path / "e.safetensors")!r}, "bf16", model=E)
print(m.embed.weight.dtype, torch.Tensor.__new__ is torch._C.TensorBase.__new__ or torch.Tensor.__new__)
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("torch.bfloat16")


def test_a_skeleton_with_parameters_larger_than_memory_is_built_on_meta():
    """``nn.Parameter(torch.empty(E, 2 * I, H))`` in a model's ``__init__`` (fused MoE experts:
    DeepSeek-V3's ask for 15-30 GB at once) is made on the meta device, never allocated; small
    tensors (buffers with computed values) are made on the CPU as before."""
    from torch import nn

    from loaderkit.pipeline.build import meta_init

    class Huge(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.Parameter(torch.empty(256, 4096, 1 << 20))  # 4 TiB in float32
            self.table = nn.Parameter(torch.zeros((1 << 18, 1 << 14)))
            self.filled = nn.Parameter(torch.full((1 << 16, 1 << 15), 0.5))
            self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 64, 2) / 64), persistent=False)

    with meta_init(torch.bfloat16):
        model = Huge()
    for p in model.parameters():
        assert p.device.type == "meta" and p.dtype == torch.bfloat16
    assert model.experts.shape == (256, 4096, 1 << 20)
    assert model.inv_freq.device.type == "cpu" and model.inv_freq[1].item() > 0
