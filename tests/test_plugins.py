"""The plugin system: runtime registration, entry points, blocking, and errors that name the plugin."""

from __future__ import annotations

import json
import math
import sys
import types
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

import loaderkit
import loaderkit.plugin
from loaderkit import PluginError, StrategyError
from loaderkit.plugin import CheckpointInfo, Format, ModuleDecision, PluginManager, QuantizationInfo, QuantizedWeight, Scheme, Strategy, TensorInfo
from loaderkit.pipeline import discover as lk_manager
from loaderkit.plugin import dtype_name

from conftest import TinyNet, assert_snapshot_equal, run_python, save_st, seeded, snapshot


def make_plugin(name: str, version: str | None = None, **hooks) -> types.ModuleType:
    """A module-like plugin object whose functions are marked as ``loaderkit`` hook implementations.

    A hook already decorated (``@loaderkit.hookimpl(tryfirst=True)``) keeps its options.
    """
    mod = types.ModuleType(name)
    if version is not None:
        mod.__version__ = version
    for hook, fn in hooks.items():
        if not hasattr(fn, "loaderkit_impl"):
            fn = loaderkit.hookimpl(fn)
        setattr(mod, hook, fn)
    return mod


def strategies_listed(exc: Exception) -> str:
    """The part of an unknown-strategy message that lists the registered strategies."""
    text = str(exc)
    assert "registered strategies:" in text, text
    return text.split("registered strategies:", 1)[1]


# -------------------------------------------------------------------------------------------
# a real format (numpy .npz, described from the zip members' .npy headers) and a strategy
# -------------------------------------------------------------------------------------------


class NpzReader:
    def __init__(self, checkpoint: CheckpointInfo) -> None:
        self.npz = np.load(Path(checkpoint.root) / checkpoint.files[0])

    def get(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.npz[name])

    def close(self) -> None:
        self.npz.close()


class NpzFormat(Format):
    """numpy ``.npz`` archives of arrays named by state-dict key."""

    name = "test-npz"
    description = "numpy .npz archives (test plugin)"
    priority = 50

    def claim(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".npz"

    def describe(self, path: Path) -> CheckpointInfo:
        tensors = {}
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                with zf.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                key = member.removesuffix(".npy")
                tdtype = dtype_name(torch.from_numpy(np.empty(0, dtype=dtype)).dtype)
                tensors[key] = TensorInfo(
                    name=key, shape=tuple(shape), dtype=tdtype, file=path.name,
                    nbytes=math.prod(shape) * dtype.itemsize,
                )
        return CheckpointInfo(
            path=str(path), root=str(path.parent), format=self.name, files=(path.name,), tensors=tensors
        )

    def open(self, checkpoint: CheckpointInfo) -> NpzReader:
        return NpzReader(checkpoint)


class LinearsBF16(Strategy):
    """Linear layers in bfloat16, everything else float32."""

    name = "test-linears-bf16"

    def decide(self, module, state):
        if module.kind == "linear":
            return ModuleDecision(compute="bfloat16", reason="linear layers in bf16")
        return ModuleDecision(compute="float32", reason="not a linear layer")


def npz_plugin() -> types.ModuleType:
    return make_plugin(
        "npz_plugin",
        version="1.2.3",
        loaderkit_register_formats=lambda register: register(NpzFormat()),
        loaderkit_register_strategies=lambda register: register(LinearsBF16),
    )


def test_runtime_plugin_format_and_strategy_take_part_in_a_load(fresh_manager, tmp_path):
    ref = seeded(TinyNet)
    path = tmp_path / "tiny.npz"
    np.savez(path, **{k: v.numpy() for k, v in ref.state_dict().items()})
    plugin = npz_plugin()
    name = loaderkit.register(plugin)
    try:
        assert name == "npz_plugin"
        record = fresh_manager().records[name]
        assert (record.source, record.version) == ("runtime", "1.2.3")
        assert record.provides == {"formats": ["test-npz"], "strategies": ["test-linears-bf16"]}
        info = loaderkit.inspect(path)
        assert info.format == "test-npz"
        assert info.tensors["proj.weight"].shape == (16, 8)
        model = loaderkit.load(path, "test-linears-bf16", model=TinyNet)
        sd, want = model.state_dict(), ref.state_dict()
        for key in ("proj.weight", "proj.bias", "head.weight", "head.bias"):
            assert sd[key].dtype == torch.bfloat16, key
            assert torch.equal(sd[key], want[key].to(torch.bfloat16)), key
        for key in ("norm.weight", "norm.bias"):
            assert sd[key].dtype == torch.float32 and torch.equal(sd[key], want[key]), key
        assert loaderkit.verify(model).ok
    finally:
        loaderkit.unregister(name)
    assert name not in fresh_manager().records
    with pytest.raises(StrategyError, match="test-linears-bf16"):
        loaderkit.load(path, "test-linears-bf16", model=TinyNet)


class RowScaledFP8(Scheme):
    """A made-up fp8 family: ``<m>.weight`` fp8 with a float32 ``<m>.weight_rowscale`` [N]."""

    name = "test-rowscaled-fp8"
    priority = 1000
    fail_shape = False

    def detect(self, checkpoint):
        weights = {}
        for key in checkpoint.tensors:
            if key.endswith(".weight_rowscale"):
                w = key.removesuffix("_rowscale")
                weights[w] = QuantizedWeight(weight=w, scale=key, granularity="channel")
        if not weights:
            return None
        return QuantizationInfo(scheme=self.name, family="row-scaled fp8 (test)", granularity="channel",
                                weights=weights)

    def dequantize(self, q, weight, tensors, dtype):
        out = weight.to(torch.float32) * tensors[q.scale][:, None]
        return (out[:, :-1] if self.fail_shape else out).to(dtype)


def test_runtime_scheme_decodes_weights(fresh_manager, tmp_path):
    ref = seeded(TinyNet)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    q = (sd["proj.weight"] * 8).to(torch.float8_e4m3fn)
    scale = torch.linspace(0.1, 0.2, 16)
    sd["proj.weight"], sd["proj.weight_rowscale"] = q, scale
    path = save_st(tmp_path / "rows.safetensors", sd)
    scheme = RowScaledFP8()
    name = loaderkit.register(make_plugin("rowscale", loaderkit_register_schemes=lambda register: register(scheme)))
    try:
        assert fresh_manager().records[name].provides["schemes"] == ["test-rowscaled-fp8"]
        info = loaderkit.inspect(path)
        assert info.quantization.scheme == "test-rowscaled-fp8"
        plan = loaderkit.plan(path, "bf16", model=TinyNet)
        tp = plan.tensors["proj.weight"]
        assert (tp.conversion, tp.companions) == ("dequantize", ("proj.weight_rowscale",))
        assert "proj.weight_rowscale" not in plan.tensors
        model = loaderkit.load(path, "bf16", model=TinyNet)
        want = (q.to(torch.float32) * scale[:, None]).to(torch.bfloat16)
        assert model.proj.weight.dtype == torch.bfloat16 and torch.equal(model.proj.weight, want)
        scheme.fail_shape = True
        with pytest.raises(loaderkit.LoaderKitError, match="test-rowscaled-fp8") as err:
            loaderkit.load(path, "bf16", model=TinyNet)
        assert err.value.plugin == "rowscale"
    finally:
        loaderkit.unregister(name)


def test_scheme_detect_returning_a_dict(fresh_manager, tiny_ckpt):
    class DictScheme(Scheme):
        name = "dict-scheme"
        priority = 1000

        def detect(self, checkpoint):
            return {"scheme": "x"}

        def dequantize(self, q, weight, tensors, dtype):  # pragma: no cover - detect fails first
            raise AssertionError("never decoded")

    name = loaderkit.register(make_plugin("dictscheme", loaderkit_register_schemes=lambda register: register(DictScheme())))
    try:
        with pytest.raises(PluginError, match=r"dict-scheme.*'dictscheme'.*QuantizationInfo"):
            loaderkit.inspect(tiny_ckpt[0])
    finally:
        loaderkit.unregister(name)


def test_incomplete_plugin_class_is_reported_with_the_plugin(fresh_manager):
    class NoOpen(Format):  # claim and describe, but no open(): abstract, cannot be instantiated
        name = "no-open"

        def claim(self, path):
            return False

        def describe(self, path):
            raise AssertionError("never described")

    with pytest.raises(PluginError, match=r"'halfformat'.*abstract.*open"):
        loaderkit.register(make_plugin("halfformat", loaderkit_register_formats=lambda register: register(NoOpen())))


def test_unregister_unknown_plugin_is_an_error(fresh_manager):
    with pytest.raises(PluginError, match="no-such-plugin"):
        loaderkit.unregister("no-such-plugin")


def test_same_plugin_name_twice_is_an_error(fresh_manager):
    name = loaderkit.register(npz_plugin())
    try:
        with pytest.raises(PluginError, match="already registered"):
            loaderkit.register(npz_plugin())
    finally:
        loaderkit.unregister(name)


# -------------------------------------------------------------------------------------------
# duplicates and invalid contributions
# -------------------------------------------------------------------------------------------


class ShadowBF16(Strategy):
    name = "bf16"

    def decide(self, module, state):
        return ModuleDecision(compute="float32")


class ShadowSafetensors(NpzFormat):
    name = "safetensors"


@pytest.mark.parametrize(
    "hook, obj, owner",
    [
        ("loaderkit_register_strategies", ShadowBF16, "uniform"),
        ("loaderkit_register_formats", ShadowSafetensors(), "safetensors"),
    ],
)
def test_duplicate_name_names_both_plugins(fresh_manager, hook, obj, owner):
    plugin = make_plugin("shadowing", **{hook: lambda register: register(obj)})
    with pytest.raises(PluginError) as err:
        loaderkit.register(plugin)
    text = str(err.value)
    assert "duplicate" in text and repr(obj.name) in text
    assert repr(owner) in text and "'shadowing'" in text
    mgr = fresh_manager()
    assert "shadowing" not in mgr.records, "a rejected plugin must not stay registered"
    kind = "strategies" if hook.endswith("strategies") else "formats"
    assert mgr.get(kind, obj.name).plugin == owner


def test_registering_a_non_format_is_an_error(fresh_manager):
    plugin = make_plugin("notaformat", loaderkit_register_formats=lambda register: register({"name": "x"}))
    with pytest.raises(PluginError, match="notaformat.*must be an instance of loaderkit.plugin.Format"):
        loaderkit.register(plugin)


def test_unknown_hook_fails_check_pending(fresh_manager):
    def loaderkit_nonexistent():
        return None

    plugin = make_plugin("typo_plugin", loaderkit_nonexistent=loaderkit_nonexistent)
    with pytest.raises(PluginError, match="typo_plugin") as err:
        loaderkit.register(plugin)
    assert "loaderkit_nonexistent" in str(err.value)
    assert err.value.plugin == "typo_plugin"
    assert fresh_manager().pm.get_plugin("typo_plugin") is None


def test_manager_check_pending_names_the_plugin():
    mgr = PluginManager(builtins=False, autoload=False)
    mgr.pm.register(make_plugin("raw", loaderkit_nonexistent=lambda: None), name="raw")
    with pytest.raises(PluginError, match="'raw'"):
        mgr.check_pending()


# -------------------------------------------------------------------------------------------
# plugin code that raises or returns the wrong type
# -------------------------------------------------------------------------------------------


def test_raising_hook_fails_the_load_and_names_the_plugin(fresh_manager, tiny_ckpt):
    path, _ = tiny_ckpt

    def loaderkit_plan_ready(plan):
        raise RuntimeError("boom from the plan hook")

    name = loaderkit.register(make_plugin("exploding", loaderkit_plan_ready=loaderkit_plan_ready))
    target = TinyNet()
    before = snapshot(target)
    result = None
    try:
        with pytest.raises(PluginError) as err:
            result = loaderkit.load(path, "bf16", model=target)
    finally:
        loaderkit.unregister(name)
    assert result is None
    assert err.value.plugin == "exploding"
    assert "'exploding'" in str(err.value) and "boom from the plan hook" in str(err.value)
    assert_snapshot_equal(target, before)


def test_model_loaded_hook_that_raises_fails_the_load(fresh_manager, tiny_ckpt):
    path, _ = tiny_ckpt

    def loaderkit_model_loaded(model, plan):
        raise ValueError("refused after loading")

    name = loaderkit.register(make_plugin("late_refuser", loaderkit_model_loaded=loaderkit_model_loaded))
    try:
        with pytest.raises(PluginError, match="late_refuser.*refused after loading"):
            loaderkit.load(path, "fp32", model=TinyNet)
    finally:
        loaderkit.unregister(name)


def test_plugin_raising_loaderkit_error_keeps_it_and_is_tagged(fresh_manager, tiny_ckpt):
    path, _ = tiny_ckpt

    def loaderkit_plan_ready(plan):
        raise loaderkit.PlanError("too big for this machine")

    name = loaderkit.register(make_plugin("budget", loaderkit_plan_ready=loaderkit_plan_ready))
    try:
        with pytest.raises(loaderkit.PlanError, match="too big") as err:
            loaderkit.plan(path, "fp32", model=TinyNet)
    finally:
        loaderkit.unregister(name)
    assert err.value.plugin == "budget"


class DictDescribe(NpzFormat):
    name = "dict-describe"

    def describe(self, path):
        return {"tensors": {}}


class StringDecide(Strategy):
    name = "string-decide"

    def decide(self, module, state):
        return "bfloat16"


def test_format_describe_returning_a_dict(fresh_manager, tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, w=np.zeros(2, dtype=np.float32))
    name = loaderkit.register(
        make_plugin("dictfmt", loaderkit_register_formats=lambda register: register(DictDescribe()))
    )
    try:
        with pytest.raises(PluginError, match=r"dict-describe.*'dictfmt'.*dict.*CheckpointInfo") as err:
            loaderkit.inspect(path)
    finally:
        loaderkit.unregister(name)
    assert err.value.plugin == "dictfmt"


def test_strategy_decide_returning_a_string(fresh_manager, tiny_ckpt):
    path, _ = tiny_ckpt
    name = loaderkit.register(
        make_plugin("strdecide", loaderkit_register_strategies=lambda register: register(StringDecide))
    )
    try:
        with pytest.raises(PluginError, match=r"string-decide.*'strdecide'.*str.*ModuleDecision") as err:
            loaderkit.plan(path, "string-decide", model=TinyNet)
    finally:
        loaderkit.unregister(name)
    assert err.value.plugin == "strdecide"
    assert err.value.module in {"proj", "norm", "head"}


def test_model_facts_returning_a_dict(fresh_manager, tiny_ckpt):
    path, _ = tiny_ckpt
    name = loaderkit.register(
        make_plugin("dictfacts", loaderkit_model_facts=lambda model: {"keep_fp32": ["norm"]})
    )
    try:
        with pytest.raises(PluginError, match=r"dictfacts.*dict.*ModelFacts") as err:
            loaderkit.load(path, "bf16", model=TinyNet)
    finally:
        loaderkit.unregister(name)
    assert err.value.plugin == "dictfacts"


def test_device_capabilities_returning_a_dict(fresh_manager, tiny_ckpt):
    path, _ = tiny_ckpt

    @loaderkit.hookimpl(tryfirst=True)
    def loaderkit_device_capabilities(device):
        return {"device": device, "fast": ["bfloat16"]}

    name = loaderkit.register(make_plugin("dictcaps", loaderkit_device_capabilities=loaderkit_device_capabilities))
    try:
        with pytest.raises(PluginError, match=r"dictcaps.*DeviceCaps"):
            loaderkit.plan(path, "fp32", model=TinyNet)
    finally:
        loaderkit.unregister(name)


class BrokenDescribe(Format):
    name = "broken-describe"
    priority = 1000

    def claim(self, path):
        return path.suffix == ".safetensors"

    def describe(self, path):
        raise KeyError("header field 'tensors' absent")

    def open(self, checkpoint):  # pragma: no cover - describe fails first
        raise AssertionError("never opened")


def test_format_that_claims_then_fails_is_named(fresh_manager, tiny_ckpt):
    path, _ = tiny_ckpt
    name = loaderkit.register(
        make_plugin("brokenfmt", loaderkit_register_formats=lambda register: register(BrokenDescribe()))
    )
    try:
        with pytest.raises(PluginError) as err:
            loaderkit.load(path, "fp32", model=TinyNet)
    finally:
        loaderkit.unregister(name)
    assert err.value.plugin == "brokenfmt"
    assert "'brokenfmt'" in str(err.value) and "header field" in str(err.value)
    # once it is gone, the built-in safetensors format claims the file again
    assert loaderkit.inspect(path).format == "safetensors"


# -------------------------------------------------------------------------------------------
# discovery switches: entry points, autoload off, blocking
# -------------------------------------------------------------------------------------------


class FP16Everything(Strategy):
    name = "ep-fp16"

    def decide(self, module, state):
        return ModuleDecision(compute="float16")


@pytest.fixture
def fake_entry_point(monkeypatch):
    """An entry point ``fakeep`` in group ``loaderkit`` pointing at an importable module; returns
    the list of groups ``entry_points`` was asked for."""
    mod = make_plugin("lk_fake_ep_plugin", loaderkit_register_strategies=lambda register: register(FP16Everything))
    monkeypatch.setitem(sys.modules, "lk_fake_ep_plugin", mod)
    asked: list[str] = []

    def entry_points(*, group):
        asked.append(group)
        if group != "loaderkit":
            return []
        return [metadata.EntryPoint(name="fakeep", value="lk_fake_ep_plugin", group="loaderkit")]

    monkeypatch.setattr(lk_manager.metadata, "entry_points", entry_points)
    monkeypatch.delenv("LOADERKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("LOADERKIT_BLOCK_PLUGINS", raising=False)
    return asked


def test_entry_point_plugins_are_loaded(fake_entry_point, fresh_manager, tiny_ckpt):
    mgr = fresh_manager()
    assert fake_entry_point == ["loaderkit"]
    assert mgr.records["fakeep"].source == "entry point"
    assert mgr.get("strategies", "ep-fp16").plugin == "fakeep"
    model = loaderkit.load(tiny_ckpt[0], "ep-fp16", model=TinyNet)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


def test_disable_autoload_env_skips_entry_points(fake_entry_point, fresh_manager, monkeypatch, tiny_ckpt):
    monkeypatch.setenv("LOADERKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    mgr = fresh_manager()
    assert fake_entry_point == [], "entry points must not even be listed"
    assert "fakeep" not in mgr.records
    assert mgr.records["uniform"].source == "built-in"
    with pytest.raises(StrategyError):
        loaderkit.load(tiny_ckpt[0], "ep-fp16", model=TinyNet)
    assert "fakeep" in PluginManager(autoload=True).records, "an explicit autoload=True wins"


def test_autoload_false_argument(fake_entry_point):
    assert "fakeep" not in PluginManager(autoload=False).records
    assert fake_entry_point == []


def test_entry_point_that_fails_to_import_is_named(monkeypatch, fresh_manager):
    def entry_points(*, group):
        return [metadata.EntryPoint(name="brokenep", value="lk_no_such_module_xyz", group=group)]

    monkeypatch.setattr(lk_manager.metadata, "entry_points", entry_points)
    monkeypatch.delenv("LOADERKIT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    with pytest.raises(PluginError, match="brokenep.*LOADERKIT_BLOCK_PLUGINS") as err:
        PluginManager()
    assert err.value.plugin == "brokenep"
    assert "brokenep" not in PluginManager(block=["brokenep"]).records


def test_block_env_blocks_a_builtin(monkeypatch, fresh_manager, tiny_ckpt):
    monkeypatch.setenv("LOADERKIT_BLOCK_PLUGINS", " uniform , nonexistent ")
    mgr = fresh_manager()
    assert "uniform" not in mgr.records
    assert "safetensors" in mgr.records
    with pytest.raises(StrategyError, match="unknown strategy 'bf16'") as err:
        loaderkit.load(tiny_ckpt[0], "bf16", model=TinyNet)
    listed = strategies_listed(err.value)
    assert "auto" in listed
    for gone in ("fp32", "bf16", "fp16"):
        assert gone not in listed.replace(" ", "").split(","), listed


def test_manager_block_argument(tiny_ckpt, monkeypatch):
    monkeypatch.delenv("LOADERKIT_BLOCK_PLUGINS", raising=False)
    mgr = PluginManager(block=["uniform"], autoload=False)
    assert "uniform" not in mgr.records and mgr.get("strategies", "fp32") is None
    with pytest.raises(StrategyError, match="unknown strategy 'fp32'"):
        loaderkit.plan(tiny_ckpt[0], "fp32", model=TinyNet, manager=mgr)
    # a manager passed explicitly is used: the process-wide one still has uniform
    assert loaderkit.plan(tiny_ckpt[0], "fp32", model=TinyNet).strategy == "fp32"


def test_manager_without_builtins_claims_nothing(tiny_ckpt):
    mgr = PluginManager(builtins=False, autoload=False)
    assert mgr.records == {} and mgr.formats() == []
    with pytest.raises(loaderkit.plugin.UnsupportedCheckpointError, match="formats tried: none"):
        loaderkit.inspect(tiny_ckpt[0], manager=mgr)


def test_reset_manager_rereads_the_environment(monkeypatch, fresh_manager):
    first = fresh_manager()
    assert "uniform" in first.records
    monkeypatch.setenv("LOADERKIT_BLOCK_PLUGINS", "uniform")
    assert fresh_manager() is first, "the process-wide manager is made once"
    lk_manager.reset_manager()
    assert "uniform" not in fresh_manager().records


# -------------------------------------------------------------------------------------------
# import lightness and the installed example plugin (fresh interpreters)
# -------------------------------------------------------------------------------------------


def test_import_loaderkit_is_light():
    proc = run_python(
        "import json, sys, loaderkit\n"
        "heavy = ('transformers', 'diffusers', 'accelerate', 'compressed_tensors')\n"
        "print(json.dumps(sorted(m for m in sys.modules\n"
        "    if m.split('.')[0] in heavy or m.startswith('loaderkit.plugins'))))\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


@pytest.mark.slow
def test_installed_example_plugin_is_discovered(example_plugin_site, tmp_path):
    env = {"PYTHONPATH": str(example_plugin_site), "LOADERKIT_DISABLE_PLUGIN_AUTOLOAD": "", "LOADERKIT_BLOCK_PLUGINS": ""}
    proc = run_python("from loaderkit.cli import main; raise SystemExit(main(['plugins', '--json']))", env=env)
    assert proc.returncode == 0, proc.stderr
    records = {r["name"]: r for r in json.loads(proc.stdout)}
    ex = records["example"]
    assert (ex["source"], ex["version"], ex["module"]) == ("entry point", "0.1.0", "loaderkit_example_plugin")
    assert ex["provides"]["strategies"] == ["example-fp32-norms"]
    assert {"loaderkit_plan_ready", "loaderkit_model_loaded"} <= set(ex["provides"]["hooks"])
    assert records["uniform"]["source"] == "built-in"

    script = f"""
import json, os, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import loaderkit
from conftest import TinyNet, save_st, seeded
path = save_st({str(tmp_path / 'tiny.safetensors')!r}, seeded(TinyNet))
model = loaderkit.load(path, "example-fp32-norms", model=TinyNet)
out = model(torch.randn(2, 8))
report = loaderkit.verify(model, torch.randn(2, 8))
os.environ["LOADERKIT_EXAMPLE_MAX_BYTES"] = "100"
try:
    loaderkit.plan(path, "example-fp32-norms", model=TinyNet)
    refused = None
except loaderkit.PlanError as exc:
    refused = [exc.plugin, str(exc)]
blocked = loaderkit.plugin.PluginManager(block=["example"]).get("strategies", "example-fp32-norms") is None
os.environ["LOADERKIT_BLOCK_PLUGINS"] = "example"
blocked_env = "example" not in loaderkit.plugin.PluginManager().records
del os.environ["LOADERKIT_BLOCK_PLUGINS"]
os.environ["LOADERKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
no_autoload = "example" not in loaderkit.plugin.PluginManager().records
print(json.dumps({{
    "dtypes": {{k: str(v.dtype) for k, v in model.state_dict().items()}},
    "out": str(out.dtype), "verify": report.ok, "refused": refused,
    "switches": [blocked, blocked_env, no_autoload],
}}))
"""
    proc = run_python(script, env=env)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["dtypes"] == {
        "proj.weight": "torch.bfloat16", "proj.bias": "torch.bfloat16",
        "norm.weight": "torch.float32", "norm.bias": "torch.float32",
        "head.weight": "torch.bfloat16", "head.bias": "torch.bfloat16",
    }
    assert res["out"] == "torch.bfloat16" and res["verify"] is True
    assert res["refused"][0] == "example" and "LOADERKIT_EXAMPLE_MAX_BYTES=100" in res["refused"][1]
    assert res["switches"] == [True, True, True]
