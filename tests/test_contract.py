"""Regression tests for the contract: the plan is the whole truth, records are immutable,
decisions are validated at plan time, strategies are found through the registry."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import loaderkit
import loaderkit.plugin as lkp
from loaderkit import runtime
from loaderkit.kernels.quant import expand_block_scale, upcast
from loaderkit.pipeline import discover

from conftest import TinyNet, save_st, seeded


class Wide(nn.Module):
    """Linears of shapes that do and do not suit the native fp8 kernel (multiples of 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = nn.Linear(32, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Fixed(lkp.Strategy):
    """Stores every Linear weight as the decision given; bf16 elsewhere."""

    name = "fixed-decision"

    def __init__(self, **decision) -> None:
        super().__init__()
        self.decision = decision

    def decide(self, module, state):
        if module.kind == "linear":
            return lkp.ModuleDecision(compute="bfloat16", storage={"weight": "float8_e4m3fn"}, **self.decision)
        return lkp.ModuleDecision(compute="bfloat16")


@pytest.fixture
def wide(tmp_path):
    ref = seeded(Wide)
    return save_st(tmp_path / "wide.safetensors", ref), ref


def _fp8_file(tmp_path):
    """A plain fp8 checkpoint (Linear weights stored float8_e4m3fn, no scales)."""
    ref = seeded(TinyNet)
    sd = {k: (v.to(torch.float8_e4m3fn) if k.endswith("weight") and v.dim() == 2 else v) for k, v in ref.state_dict().items()}
    return save_st(tmp_path / "fp8.safetensors", sd)


# -- 1. auto finds fp8 through the registry -------------------------------------------------------


def test_blocking_fp8_stops_auto_from_planning_fp8(tmp_path):
    path = _fp8_file(tmp_path)
    normal = loaderkit.plan(path, "auto", model=TinyNet, manager=lkp.PluginManager(autoload=False))
    assert normal.modules["proj"].storage["weight"] == "float8_e4m3fn"
    blocked = loaderkit.plan(path, "auto", model=TinyNet, manager=lkp.PluginManager(autoload=False, block=["fp8"]))
    assert all(not lkp.is_fp8(d) for m in blocked.modules.values() for d in m.storage.values())
    choice = [d for d in blocked.decisions if d.subject == "strategy"]
    assert choice and "not registered" in choice[0].reason


def test_blocking_fp8_by_environment_stops_auto_too(tmp_path, monkeypatch):
    monkeypatch.setenv("LOADERKIT_BLOCK_PLUGINS", "fp8")
    plan = loaderkit.plan(_fp8_file(tmp_path), "auto", model=TinyNet, manager=lkp.PluginManager(autoload=False))
    assert plan.modules["proj"].storage["weight"] in ("float32", "bfloat16")
    model = loaderkit.load(_fp8_file(tmp_path), "auto", model=TinyNet, manager=lkp.PluginManager(autoload=False))
    assert model.proj.weight.dtype == torch.float32 or model.proj.weight.dtype == torch.bfloat16


def test_auto_without_the_uniform_strategies_is_a_plan_error(tiny_ckpt):
    mgr = lkp.PluginManager(autoload=False, block=["uniform"])
    with pytest.raises(loaderkit.PlanError, match="no plugin registers it"):
        loaderkit.plan(tiny_ckpt[0], "auto", model=TinyNet, manager=mgr)


# -- 2. block granularity is recorded in the plan and runs ------------------------------------------


def test_block_decision_records_its_block_and_loads(wide):
    path, ref = wide
    strategy = Fixed(granularity="block", block=(8, 16))
    plan = loaderkit.plan(path, strategy, model=Wide)
    tp = plan.tensors["b.weight"]
    assert (tp.conversion, tp.granularity, tp.block, tp.scale) == ("quantize", "block", (8, 16), "weight_scale")
    assert tp.nbytes == 24 * 32 + 3 * 2 * 4  # fp8 bytes + a [3, 2] float32 grid
    model = loaderkit.load(path, strategy, model=Wide)
    rule = runtime.cast_rule_of(model.b)
    assert rule.tensors["weight"].block == (8, 16) and rule.tensors["weight"].granularity == "block"
    scale = model.b.weight_scale
    assert scale.shape == (3, 2)
    decoded = upcast(model.b.weight.detach(), torch.float32, scale, (8, 16))
    assert torch.equal(decoded, model.b.weight.detach().float() * expand_block_scale(scale, (24, 32), (8, 16)))
    assert (decoded - ref.b.weight).abs().max() <= 0.07 * ref.b.weight.abs().max()
    x = torch.randn(3, 32)
    assert loaderkit.verify(model, x).ok
    assert torch.nn.functional.cosine_similarity(model(x).float().flatten(), ref(x).flatten(), dim=0) > 0.99


def test_block_decision_without_a_block_uses_the_default(wide):
    plan = loaderkit.plan(wide[0], Fixed(granularity="block"), model=Wide)
    assert plan.tensors["a.weight"].block == lkp.DEFAULT_BLOCK


def test_block_decision_on_a_conv_fails_at_plan_time_naming_it(tmp_path):
    conv = nn.Sequential(nn.Conv2d(4, 8, 3))
    path = save_st(tmp_path / "conv.safetensors", conv)

    class ConvBlock(lkp.Strategy):
        name = "conv-block"

        def decide(self, module, state):
            if module.kind == "conv":
                return lkp.ModuleDecision(compute="bfloat16", storage={"weight": "float8_e4m3fn"}, granularity="block")
            return lkp.ModuleDecision(compute="bfloat16")

    with pytest.raises(loaderkit.PlanError, match="block scales need a 2-D weight") as info:
        loaderkit.plan(path, ConvBlock(), model=lambda: nn.Sequential(nn.Conv2d(4, 8, 3)))
    assert info.value.module == "0" and "'0.weight'" in str(info.value)


# -- 3. typos in decisions fail at plan time, naming module and plugin -----------------------------


@pytest.mark.parametrize("field", [{"granularity": "per-channel"}, {"kernel": "natve"}, {"compute": "bf17"}])
def test_typos_in_a_decision_fail_at_plan_time(tiny_ckpt, field):
    class Typo(lkp.Strategy):
        name = "typo"

        def decide(self, module, state):
            return lkp.ModuleDecision(**{"compute": "bfloat16", "storage": {"weight": "float8_e4m3fn"}, **field})

    mgr = lkp.PluginManager(autoload=False)

    class Plugin:
        @lkp.hookimpl
        def loaderkit_register_strategies(self, register):
            register(Typo)

    mgr.register(Plugin(), name="typo-plugin")
    with pytest.raises(loaderkit.PluginError) as info:
        loaderkit.plan(tiny_ckpt[0], "typo", model=TinyNet, manager=mgr)
    exc = info.value
    assert exc.plugin == "typo-plugin" and exc.module in ("proj", "head")
    assert "typo-plugin" in str(exc) and f"'{exc.module}'" in str(exc)
    assert next(iter(field.values())) in str(exc)


# -- 4. the plan cannot be rewritten by a hook ----------------------------------------------------


class Rewriter:
    def __init__(self, how):
        self.how = how

    @lkp.hookimpl
    def loaderkit_plan_ready(self, plan):
        self.how(plan)


@pytest.mark.parametrize(
    "how",
    [
        lambda p: p.modules.__setitem__("proj", p.modules["proj"].replace(compute_dtype="float16")),
        lambda p: p.tensors.pop("proj.weight"),
        lambda p: setattr(p.tensors["proj.weight"], "target_dtype", "float16"),
        lambda p: p.modules["proj"].storage.update(weight="float16"),
        lambda p: setattr(p, "strategy", "other"),
        lambda p: p.checkpoint.tensors.clear(),
        lambda p: p.ignored.update(x="y"),
    ],
    ids=["modules[...]=", "tensors.pop", "tensor field", "storage.update", "plan field", "checkpoint", "ignored"],
)
def test_a_plan_ready_hook_cannot_rewrite_the_plan(tiny_ckpt, how):
    mgr = lkp.PluginManager(autoload=False)
    mgr.register(Rewriter(how), name="rewriter")
    with pytest.raises(loaderkit.PluginError, match="rewriter") as info:
        loaderkit.load(tiny_ckpt[0], "bf16", model=TinyNet, manager=mgr)
    assert info.value.plugin == "rewriter"


def test_records_are_read_only_all_the_way_down(tiny_ckpt):
    plan = loaderkit.plan(tiny_ckpt[0], "bf16", model=TinyNet)
    for mapping in (plan.tensors, plan.modules, plan.checkpoint.tensors, plan.modules["proj"].storage, plan.options):
        with pytest.raises(TypeError, match="read-only"):
            mapping["x"] = 1
    changed = plan.modules["proj"].replace(compute_dtype="float16")
    assert changed.compute_dtype == "float16" and plan.modules["proj"].compute_dtype == "bfloat16"
    again = pickle.loads(pickle.dumps(plan))
    assert again == plan and type(again.tensors) is lkp.FrozenDict


def test_frozen_config_is_deeply_read_only_and_thaws(tmp_path):
    info = lkp.CheckpointInfo(path="p", root="r", format="f", files=(), tensors={},
                              config={"a": [1, {"b": 2}], "c": {"d": [3]}})
    with pytest.raises(TypeError):
        info.config["a"].append(4)
    with pytest.raises(TypeError):
        info.config["a"][1]["b"] = 5
    with pytest.raises(TypeError):
        info.config["c"]["d"].extend([1])
    assert info.config == {"a": [1, {"b": 2}], "c": {"d": [3]}}
    plain = lkp.thaw(info.config)
    plain["a"].append(4)
    assert type(plain["c"]) is dict and plain["a"] == [1, {"b": 2}, 4]


# -- 5. one reader of boolean environment variables -----------------------------------------------


@pytest.mark.parametrize("raw,value", [("1", True), ("on", True), ("YES", True), ("true", True),
                                       ("0", False), ("off", False), ("No", False), ("false", False),
                                       ("", None), (" ", None)])
def test_env_flag_reads_every_spelling_the_same_way(monkeypatch, raw, value):
    monkeypatch.setenv("LOADERKIT_TEST_FLAG", raw)
    assert lkp.env_flag("LOADERKIT_TEST_FLAG", None) is value


def test_env_flag_refuses_what_is_not_a_boolean(monkeypatch):
    monkeypatch.setenv("LOADERKIT_TEST_FLAG", "sometimes")
    with pytest.raises(lkp.UsageError, match="LOADERKIT_TEST_FLAG='sometimes'"):
        lkp.env_flag("LOADERKIT_TEST_FLAG")


class _FakeEntryPoint:
    name, value, dist = "fake-ep", "fake:plugin", None

    def load(self):
        class Plugin:
            @lkp.hookimpl
            def loaderkit_plan_ready(self, plan):
                return None

        return Plugin()


@pytest.mark.parametrize("raw,autoloaded", [("off", True), ("0", True), ("", True), ("on", False), ("1", False)])
def test_disable_autoload_off_means_autoload_stays_on(monkeypatch, raw, autoloaded):
    monkeypatch.setattr(discover.metadata, "entry_points", lambda group: [_FakeEntryPoint()])
    monkeypatch.setenv(discover.DISABLE_AUTOLOAD_ENV, raw)
    mgr = lkp.PluginManager(builtins=False)
    assert ("fake-ep" in mgr.records) is autoloaded


def test_progress_off_and_probe_off_use_the_same_reader(monkeypatch):
    from loaderkit import progress

    monkeypatch.setenv("LOADERKIT_PROGRESS", "off")
    assert progress.enabled(None) is False
    monkeypatch.setenv("LOADERKIT_PROGRESS", "on")
    assert progress.enabled(None) is True


# -- 6. submodules are not shadowed ------------------------------------------------------------------


def test_record_modules_are_reachable_by_their_path():
    import importlib.util

    import loaderkit.contract.plan as plan_module

    assert plan_module.Plan is loaderkit.Plan and callable(loaderkit.plan)
    for name in ("plan", "strategy", "verify", "inspect"):
        assert importlib.util.find_spec(f"loaderkit.{name}") is None, name


# -- 7. native fp8 is negotiated in the plan, from the hook's DeviceCaps ------------------------------


class Fp8Device:
    """Describes the CPU as a device with native fp8 matmul (capability 9.0)."""

    @lkp.hookimpl(tryfirst=True)
    def loaderkit_device_capabilities(self, device):
        if device == "cpu":
            return lkp.DeviceCaps(device="cpu", kind="cpu", name="pretend sm90", fp8_matmul=True,
                                  capability=(9, 0), fast_dtypes=("float32", "bfloat16"))
        return None


def test_native_feasibility_is_decided_in_the_plan(wide):
    path, ref = wide
    mgr = lkp.PluginManager(autoload=False)
    mgr.register(Fp8Device(), name="fp8-device")
    strategy = loaderkit.strategy("fp8", native="auto", manager=mgr)
    plan = loaderkit.plan(path, strategy, model=Wide, manager=mgr)
    assert (plan.modules["a"].kernel, plan.modules["a"].kernel_reason) == ("native", "native fp8 matmul (torch._scaled_mm)")
    assert plan.modules["b"].kernel == "cast" and "multiple of 16" in plan.modules["b"].kernel_reason
    summary = [d for d in plan.decisions if d.subject == "native fp8 kernels"]
    assert summary and summary[0].choice == "1 modules native, 1 cast"
    # the runtime binds what the plan says, from the plan's device (this CPU has no fp8 matmul
    # of its own, so a runtime that re-derived capabilities would decode instead)
    model = loaderkit.load(path, strategy, model=Wide, manager=mgr)
    assert runtime.cast_rule_of(model.a).native and not runtime.cast_rule_of(model.b).native
    x = torch.randn(4, 32)
    out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.float().flatten(), ref(x).flatten(), dim=0) > 0.98


def test_native_block_scales_fall_back_with_the_reason(wide):
    mgr = lkp.PluginManager(autoload=False)
    mgr.register(Fp8Device(), name="fp8-device")
    plan = loaderkit.plan(wide[0], Fixed(granularity="block", kernel="native"), model=Wide, manager=mgr)
    assert plan.modules["a"].kernel == "cast" and "block scales" in plan.modules["a"].kernel_reason


def test_native_is_not_planned_where_the_device_has_none(wide):
    plan = loaderkit.plan(wide[0], Fixed(kernel="native"), model=Wide)
    assert all(m.kernel == "cast" for m in plan.modules.values())
    assert "no native fp8 matmul" in plan.modules["a"].kernel_reason


# -- strategies keep no per-load state on the instance ------------------------------------------------


def test_one_strategy_object_plans_interleaved_loads(wide, tiny_ckpt):
    """A strategy's per-load state comes back from ``prepare``: the object itself never changes,
    so one object serves several loads, each decided with its own state."""
    fp8 = loaderkit.strategy("fp8", skip=(r"^a$",))
    before = dict(vars(fp8))
    first = loaderkit.plan(wide[0], fp8, model=Wide)
    other = loaderkit.plan(tiny_ckpt[0], fp8, model=TinyNet)
    again = loaderkit.plan(wide[0], fp8, model=Wide)
    assert vars(fp8) == before
    assert first == again and other != first
    assert first.modules["a"].storage["weight"] == "bfloat16"  # skipped by this object's option
    mgr = lkp.get_manager()
    state_wide = fp8.prepare(lkp.ModelContext(checkpoint=first.checkpoint, device=first.device, facts=lkp.ModelFacts()))
    fp8.prepare(lkp.ModelContext(checkpoint=other.checkpoint, device=other.device, facts=lkp.ModelFacts()))
    module = lkp.ModuleContext(name="a", type="Linear", kind="linear", tensors={"weight": first.checkpoint.tensors["a.weight"]})
    assert fp8.decide(module, state_wide).storage == {}  # the first load's skips still apply
    assert mgr is lkp.get_manager()


# -- errors compose their context in one place ---------------------------------------------------------


def test_errors_compose_context_without_rewriting_their_message():
    exc = lkp.CorruptCheckpointError("scale is NaN", tensor="a.weight_scale")
    exc.with_context(path="/ckpt", plugin="fp8-formats", module="a")
    assert exc.message == "scale is NaN" and exc.args == ("scale is NaN",)
    assert str(exc) == "plugin 'fp8-formats': /ckpt: module 'a': scale is NaN"
    exc.with_context(path="/other", plugin="x")
    assert (exc.path, exc.plugin) == ("/ckpt", "fp8-formats")  # what is known is kept
    again = pickle.loads(pickle.dumps(exc))
    assert str(again) == str(exc) and again.tensor == "a.weight_scale"


def test_a_misspelt_hook_fails_at_once():
    mgr = lkp.PluginManager(autoload=False)
    with pytest.raises(AttributeError, match="loaderkit_plan_redy"):
        mgr.hook.loaderkit_plan_redy(plan=None)


def test_call_checks_the_returned_type():
    mgr = lkp.PluginManager(autoload=False)
    entry = mgr.get("formats", "safetensors")
    with pytest.raises(loaderkit.PluginError, match="format 'safetensors' of plugin 'safetensors' returned str"):
        mgr.call(entry, lambda: "no", returns=lkp.CheckpointInfo)


@pytest.mark.parametrize("record, values", [
    (lkp.TensorInfo, dict(name="a.weight", shape=(3, 0, 5), dtype="float8_e4m3fn", file="x.safetensors", nbytes=0)),
    (lkp.QuantizedWeight, dict(weight="a.weight", scale="a.weight_scale_inv", granularity="block", block=(128, 64))),
    (lkp.QuantizedWeight, dict(weight="a.weight")),
])
def test_records_from_checked_values_equal_validated_ones(record, values):
    fast, slow = record.from_checked(**values), record(**values)
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    assert fast.model_dump() == slow.model_dump() and fast.model_fields_set == slow.model_fields_set
    assert pickle.loads(pickle.dumps(fast)) == slow
    with pytest.raises(Exception):
        fast.name = "b"  # still frozen
    with pytest.raises(TypeError, match="no field"):
        record.from_checked(**values, nmae="typo")


def _keeps_by_components(patterns, name):
    parts = name.split(".")
    return any(parts[i:i + len(p.split("."))] == p.split(".") for p in patterns
               for i in range(len(parts) - len(p.split(".")) + 1))


def test_keep_fp32_matches_runs_of_whole_components():
    facts = lkp.ModelFacts(keep_fp32=("wo", "mlp.gate", "a+b", ""), keep_fp32_fp16=("norm",))
    names = ["wo", "x.wo", "x.wo.y", "xwo", "wox", "mlp.gate", "layers.3.mlp.gate.proj", "mlp.gates",
             "x.mlp.gate_proj", "a+b.c", "aab", "norm", "final_norm", "m.norm.w", "a..b", "", "q"]
    for name in names:
        assert facts.keeps_fp32(name) == _keeps_by_components(facts.keep_fp32, name), name
        assert facts.keeps_fp32(name, fp16=True) == _keeps_by_components(
            (*facts.keep_fp32, *facts.keep_fp32_fp16), name), name
    assert not lkp.ModelFacts().keeps_fp32("anything")
