"""Strategies: auto's recorded choices on described devices, the uniform ones, and the example plugin."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import loaderkit
import loaderkit.plugin
from loaderkit import PlanError
from loaderkit.plugin import DeviceCaps

from conftest import EXAMPLE_PLUGIN, TinyNet, save_st, seeded


def device_plugin(*fast: str, speeds: dict[str, float] | None = None):
    """A plugin describing the CPU (ahead of the built-in probe) as fast in ``fast`` dtypes only,
    with ``speeds`` as its measured ratios."""

    class FakeDevice:
        @loaderkit.hookimpl(tryfirst=True)
        def loaderkit_device_capabilities(self, device):
            if torch.device(device).type != "cpu":
                return None
            return DeviceCaps(device=device, kind="cpu", name="described cpu", fast_dtypes=("float32", *fast),
                              speeds=speeds or {})

    return FakeDevice()


@pytest.fixture
def cpu_without_fast_bf16(fresh_manager):
    name = loaderkit.register(device_plugin(), name="slow-bf16-cpu")
    try:
        yield
    finally:
        loaderkit.unregister(name)


@pytest.fixture
def cpu_with_fast_bf16(fresh_manager):
    name = loaderkit.register(device_plugin("bfloat16"), name="fast-bf16-cpu")
    try:
        yield
    finally:
        loaderkit.unregister(name)


@pytest.fixture
def bf16_ckpt(tmp_path):
    ref = seeded(TinyNet)
    return save_st(tmp_path / "bf16.safetensors", ref, torch.bfloat16), ref


def decision(plan, subject: str):
    found = [d for d in plan.decisions if d.subject == subject]
    assert found, f"no decision about {subject!r} in {plan.decisions}"
    return found[-1]


# -------------------------------------------------------------------------------------------
# auto
# -------------------------------------------------------------------------------------------


def test_auto_computes_bf16_checkpoint_in_fp32_without_fast_bf16(cpu_without_fast_bf16, bf16_ckpt):
    path, ref = bf16_ckpt
    plan = loaderkit.plan(path, "auto", model=TinyNet)
    assert plan.device.name == "described cpu"
    assert decision(plan, "checkpoint dtype").choice == "bfloat16"
    chosen = decision(plan, "strategy")
    assert chosen.choice == "fp32" and chosen.by == "strategy auto"
    assert "bfloat16 slow" in chosen.reason and "prefer='memory'" in chosen.reason
    assert {m.compute_dtype for m in plan.modules.values()} == {"float32"}
    assert "bfloat16 slow" in str(plan)
    model = loaderkit.load(path, "auto", model=TinyNet)
    assert model.proj.weight.dtype == torch.float32
    assert torch.equal(model.proj.weight, ref.proj.weight.to(torch.bfloat16).float())


def test_auto_prefer_memory_keeps_bf16(cpu_without_fast_bf16, bf16_ckpt):
    path, _ = bf16_ckpt
    plan = loaderkit.plan(path, loaderkit.strategy("auto", prefer="memory"), model=TinyNet)
    chosen = decision(plan, "strategy")
    assert chosen.choice == "bf16" and "prefer='memory'" in chosen.reason
    assert {m.compute_dtype for m in plan.modules.values()} == {"bfloat16"}
    assert plan.options == {"prefer": "memory"}
    assert set(plan.bytes_per_dtype()) == {"bfloat16"}


def test_auto_keeps_bf16_where_it_is_fast(cpu_with_fast_bf16, bf16_ckpt):
    path, _ = bf16_ckpt
    plan = loaderkit.plan(path, "auto", model=TinyNet)
    chosen = decision(plan, "strategy")
    assert chosen.choice == "bf16" and "bfloat16 fast" in chosen.reason
    model = loaderkit.load(path, "auto", model=TinyNet)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_auto_never_lowers_fp32(cpu_with_fast_bf16, tiny_ckpt):
    path, _ = tiny_ckpt
    plan = loaderkit.plan(path, "auto", model=TinyNet)
    chosen = decision(plan, "strategy")
    assert chosen.choice == "fp32" and "never lowers precision" in chosen.reason
    assert {m.compute_dtype for m in plan.modules.values()} == {"float32"}


def test_auto_fp16_checkpoint_without_fast_fp16(cpu_with_fast_bf16, tmp_path):
    path = save_st(tmp_path / "h.safetensors", seeded(TinyNet), torch.float16)
    plan = loaderkit.plan(path, "auto", model=TinyNet)
    assert decision(plan, "checkpoint dtype").choice == "float16"
    assert decision(plan, "strategy").choice == "fp32"


def test_auto_keeps_fp8_storage(cpu_without_fast_bf16, tmp_path):
    if loaderkit.plugin.get_manager().get("strategies", "fp8") is None:
        pytest.skip("no fp8 strategy registered")
    ref = seeded(TinyNet)
    sd = ref.state_dict()
    sd = {k: (v.to(torch.float8_e4m3fn) if k.endswith(".weight") and v.ndim == 2 else v.to(torch.bfloat16))
          for k, v in sd.items()}
    path = save_st(tmp_path / "fp8.safetensors", sd)
    plan = loaderkit.plan(path, "auto", model=TinyNet)
    assert decision(plan, "checkpoint dtype").choice == "float8_e4m3fn"
    assert decision(plan, "strategy").choice == "fp8 (compute float32)"
    assert plan.modules["proj"].storage["weight"] == "float8_e4m3fn"
    assert plan.modules["proj"].compute_dtype == "float32"


# -------------------------------------------------------------------------------------------
# uniform
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_uniform_strategies_cast_every_float_tensor(bf16_ckpt, strategy, dtype):
    path, ref = bf16_ckpt
    plan = loaderkit.plan(path, strategy, model=TinyNet)
    want = "none" if dtype == torch.bfloat16 else "cast"
    assert set(plan.conversions()) == {want}
    model = loaderkit.load(path, strategy, model=TinyNet)
    for k, v in ref.state_dict().items():
        got = model.state_dict()[k]
        assert got.dtype == dtype and torch.equal(got, v.to(torch.bfloat16).to(dtype)), k


# -------------------------------------------------------------------------------------------
# the example plugin, registered at runtime (its installed form is tested in test_plugins)
# -------------------------------------------------------------------------------------------


@pytest.fixture
def example(fresh_manager, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE_PLUGIN))
    monkeypatch.delenv("LOADERKIT_EXAMPLE_MAX_BYTES", raising=False)
    module = importlib.import_module("loaderkit_example_plugin")
    name = loaderkit.register(module, name="example-runtime")
    try:
        yield module
    finally:
        loaderkit.unregister(name)


def test_example_strategy_keeps_norms_fp32(example, tiny_ckpt):
    path, ref = tiny_ckpt
    plan = loaderkit.plan(path, "example-fp32-norms", model=TinyNet)
    assert {n: m.compute_dtype for n, m in plan.modules.items()} == {
        "proj": "bfloat16", "norm": "float32", "head": "bfloat16"
    }
    assert decision(plan, "normalisation layers").choice == "float32"
    model = loaderkit.load(path, "example-fp32-norms", model=TinyNet)
    assert model.norm.weight.dtype == torch.float32 and model.proj.weight.dtype == torch.bfloat16
    x = torch.randn(3, 8)
    report = loaderkit.verify(model, x)
    assert report.ok, str(report)
    with torch.no_grad():
        out = model(x)
        b = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
        h = F.linear(x.to(torch.bfloat16), b["proj.weight"], b["proj.bias"])
        n = F.layer_norm(h.float(), (16,), ref.norm.weight, ref.norm.bias).to(torch.bfloat16)
        want = F.linear(torch.relu(n), b["head.weight"], b["head.bias"])
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


def test_example_strategy_float16_option(example, tiny_ckpt):
    model = loaderkit.load(tiny_ckpt[0], loaderkit.strategy("example-fp32-norms", dtype="float16"), model=TinyNet)
    assert model.head.weight.dtype == torch.float16 and model.norm.bias.dtype == torch.float32
    assert model(torch.randn(1, 8)).dtype == torch.float16
    with pytest.raises(loaderkit.StrategyError, match="dtype"):
        loaderkit.strategy("example-fp32-norms", dtype="float8_e4m3fn")


def test_example_hooks_leave_other_strategies_alone(example, tiny_ckpt):
    model = loaderkit.load(tiny_ckpt[0], "bf16", model=TinyNet)
    assert not model.norm._forward_pre_hooks and not model.norm._forward_hooks


def test_example_memory_budget_refuses_big_plans(example, tiny_ckpt, monkeypatch):
    monkeypatch.setenv(example.BUDGET_ENV, "600")  # fp32 TinyNet needs 976 bytes, bf16 488
    with pytest.raises(PlanError, match="over the budget") as err:
        loaderkit.load(tiny_ckpt[0], "fp32", model=TinyNet)
    assert err.value.plugin == "example-runtime"
    assert loaderkit.plan(tiny_ckpt[0], "bf16", model=TinyNet).bytes_per_device() == {"cpu": 488}


def _probe_per_thread_count(monkeypatch, tmp_path):
    """The probe with its measurement replaced by one that records its runs and answers by the
    thread count; the in-process memo cleared."""
    from loaderkit.plugins import devices

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    runs = []

    def measure():
        runs.append(torch.get_num_threads())
        return {**dict.fromkeys(devices.PROBED, 3.0), "bfloat16": float(torch.get_num_threads())}

    monkeypatch.setattr(devices, "measure_ratios", measure)
    devices._ratios_for.cache_clear()
    return devices, runs


@pytest.mark.parametrize("fresh_process", [True, False])
def test_the_cpu_probe_runs_once_per_thread_count(tmp_path, monkeypatch, fresh_process):
    """Alternating thread counts must not re-run the probe: the cache file merges keys (a fresh
    process reads them back), and one process that changes its thread count gets that count's
    ratios."""
    devices, runs = _probe_per_thread_count(monkeypatch, tmp_path)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            if fresh_process:
                devices._ratios_for.cache_clear()  # only the file remembers
            assert devices.probe_ratios() == {**dict.fromkeys(devices.PROBED, 3.0), "bfloat16": float(n)}
    finally:
        torch.set_num_threads(threads)
        devices._ratios_for.cache_clear()
    assert runs == [1, 2]  # one measurement per thread count, then read back
    import json

    assert len(json.loads((tmp_path / "loaderkit" / "cpu-probe.json").read_text())) == 2


def test_the_cpu_probe_is_kept_per_fp8_decode_route(monkeypatch):
    """The probe times the fp8 cast path, whose speed depends on the decode in use: ratios
    measured with the torch tables are not reused once the compiled kernel is in use, nor back."""
    from loaderkit.kernels import compiled
    from loaderkit.plugins import devices

    available, now = compiled.library("decode") is not None, devices._probe_key()
    monkeypatch.setattr(compiled, "_STATE", {"tried": True, "lib": None, "reason": "turned off by the test"})
    assert devices.decode_route() == "tables"
    assert devices._probe_key() == devices._probe_key(route="tables")
    assert (devices._probe_key() != now) == available  # with the kernel in use, another entry
    assert devices._probe_key(route="compiled-x.so") != devices._probe_key(route="tables")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"k": 3}', ""])
def test_a_corrupt_cpu_probe_cache_is_measured_over_and_rewritten(tmp_path, monkeypatch, content):
    devices, runs = _probe_per_thread_count(monkeypatch, tmp_path)
    cache = tmp_path / "loaderkit" / "cpu-probe.json"
    cache.parent.mkdir()
    key = devices._probe_key()
    cache.write_text(content.replace('"k"', f'"{key}"'))  # {key: 3}: an entry that is not ratios
    try:
        first = devices.probe_ratios()
        devices._ratios_for.cache_clear()
        assert devices.probe_ratios() == first and len(runs) == 1  # measured once, then read back
    finally:
        devices._ratios_for.cache_clear()
    import json

    data = json.loads(cache.read_text())
    assert data[key] == first
    if content.startswith('{"k"'):
        assert len(data) == 1  # the unusable entry for this key was replaced


#: a CPU without native bf16 as the probe measures one: an fp8 Linear is 3.2x slower in bf16
#: than in float32 at 128 rows, a little faster at one row (the decode dominates)
EMULATED_BF16 = {"bfloat16": 4.9, "float16": 5.5, "fp8-bfloat16-rows1": 0.9, "fp8-bfloat16-rows128": 3.2}


@pytest.mark.parametrize("tokens, fast, speeds, expected, measured", [
    (None, (), EMULATED_BF16, "float32", "3.20x"),
    (1, (), EMULATED_BF16, "bfloat16", "0.90x"),
    (64, (), EMULATED_BF16, "float32", "3.20x"),
    (None, ("bfloat16",), {**EMULATED_BF16, "fp8-bfloat16-rows128": 0.45}, "bfloat16", "0.45x"),
    (None, ("bfloat16",), None, "bfloat16", "natively"),  # nothing measured: from the capabilities
    (None, (), None, "float32", "slowly"),
])
def test_fp8_computes_in_what_the_device_measured_faster(fresh_manager, bf16_ckpt, tokens, fast, speeds,
                                                         expected, measured):
    name = loaderkit.register(device_plugin(*fast, speeds=speeds), name="described-cpu")
    try:
        plan = loaderkit.plan(bf16_ckpt[0], loaderkit.strategy("fp8", tokens=tokens), model=TinyNet)
        fixed = loaderkit.plan(bf16_ckpt[0], loaderkit.strategy("fp8", compute_dtype="float16"), model=TinyNet)
        auto = loaderkit.plan(bf16_ckpt[0], "auto", model=TinyNet)
    finally:
        loaderkit.unregister(name)
    assert {m.compute_dtype for m in plan.modules.values()} == {expected}
    assert "weight" in plan.modules["proj"].storage and plan.modules["proj"].storage["weight"] == "float8_e4m3fn"
    reason = decision(plan, "compute").reason
    assert measured in reason and "compute_dtype='auto'" in reason, reason
    assert {m.compute_dtype for m in fixed.modules.values()} == {"float16"}  # a given dtype is kept
    assert "compute_dtype given" in decision(fixed, "compute").reason
    assert auto.modules["proj"].compute_dtype in ("float32", "bfloat16")  # a bf16 checkpoint: auto's own rules


def test_auto_computes_an_fp8_checkpoint_in_what_the_device_measured_faster(fresh_manager, tmp_path):
    ref = seeded(TinyNet)
    path = save_st(tmp_path / "fp8.safetensors", {k: v.to(torch.float8_e4m3fn) if v.dim() == 2 else v
                                                  for k, v in ref.state_dict().items()})
    for speeds, expected in ((EMULATED_BF16, "float32"), ({**EMULATED_BF16, "fp8-bfloat16-rows128": 0.5}, "bfloat16")):
        name = loaderkit.register(device_plugin(speeds=speeds), name="described-cpu")
        try:
            plan = loaderkit.plan(path, "auto", model=TinyNet)
        finally:
            loaderkit.unregister(name)
        strategy = decision(plan, "strategy")
        assert strategy.choice == f"fp8 (compute {expected})" and "measured" in strategy.reason
        assert plan.modules["proj"].compute_dtype == expected and plan.modules["proj"].storage["weight"] == "float8_e4m3fn"


def test_the_cpu_probe_measures_the_fp8_cast_path_and_hands_it_to_the_plan(tmp_path, monkeypatch):
    from loaderkit.plugins import devices

    ratios = devices.measure_ratios()  # the real measurement, on this machine
    assert set(ratios) == set(devices.PROBED) and all(0 < r < 1000 for r in ratios.values()), ratios
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(devices, "measure_ratios", lambda: ratios)
    devices._ratios_for.cache_clear()
    try:
        caps = devices.cpu_caps()
    finally:
        devices._ratios_for.cache_clear()
    assert dict(caps.speeds) == ratios
