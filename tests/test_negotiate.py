"""Negotiation: matching checkpoint keys to the model, ties, non-float tensors, and the plan itself."""

from __future__ import annotations

import json

import pytest
import torch

import loaderkit
import loaderkit.plugin
from loaderkit import StateDictMismatchError
from loaderkit.pipeline.match import model_slots
from loaderkit.plugin import module_kind

from conftest import BufferNet, TiedNet, TinyNet, assert_snapshot_equal, save_st, seeded, snapshot


# -------------------------------------------------------------------------------------------
# missing / unexpected / mismatched keys
# -------------------------------------------------------------------------------------------


def test_missing_key_is_listed(tmp_path):
    path = save_st(tmp_path / "m.safetensors", seeded(TinyNet), drop=("head.weight", "norm.bias"))
    with pytest.raises(StateDictMismatchError) as err:
        loaderkit.load(path, "fp32", model=TinyNet)
    assert sorted(err.value.missing) == ["head.weight", "norm.bias"]
    assert err.value.unexpected == [] and err.value.mismatched == []
    text = str(err.value)
    assert "head.weight" in text and "norm.bias" in text and "2 missing" in text
    assert str(path) in text


def test_unexpected_key_is_listed_and_strict_false_ignores_it(tmp_path):
    extra = {"extra.weight": torch.ones(3), "proj.lora_A": torch.zeros(2, 2)}
    ref = seeded(TinyNet)
    path = save_st(tmp_path / "u.safetensors", ref, extra=extra)
    with pytest.raises(StateDictMismatchError) as err:
        loaderkit.load(path, "fp32", model=TinyNet)
    assert sorted(err.value.unexpected) == ["extra.weight", "proj.lora_A"]
    assert "extra.weight" in str(err.value) and "strict=False" in str(err.value)

    plan = loaderkit.plan(path, "fp32", model=TinyNet, strict=False)
    assert set(plan.ignored) == {"extra.weight", "proj.lora_A"}
    assert any(d.subject == "unexpected keys" for d in plan.decisions)
    model = loaderkit.load(path, "fp32", model=TinyNet, strict=False)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_strict_false_does_not_excuse_missing_keys(tmp_path):
    path = save_st(tmp_path / "m.safetensors", seeded(TinyNet), drop=("proj.bias",))
    with pytest.raises(StateDictMismatchError, match="proj.bias"):
        loaderkit.load(path, "fp32", model=TinyNet, strict=False)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    bad = seeded(TinyNet).state_dict()
    bad["proj.weight"] = torch.zeros(16, 5)
    path = save_st(tmp_path / "s.safetensors", bad)
    with pytest.raises(StateDictMismatchError) as err:
        loaderkit.plan(path, "fp32", model=TinyNet)
    assert err.value.mismatched == [("proj.weight", (16, 5), (16, 8))]
    assert err.value.tensor == "proj.weight"
    text = str(err.value)
    assert "proj.weight" in text and "[16, 5]" in text and "[16, 8]" in text


def test_missing_parameter_is_an_error_even_for_a_real_module(tmp_path):
    path = save_st(tmp_path / "m.safetensors", seeded(TinyNet), drop=("norm.weight",))
    target = TinyNet()  # real, randomly initialised parameters
    before = snapshot(target)
    with pytest.raises(StateDictMismatchError) as err:
        loaderkit.load(path, "bf16", model=target)
    assert err.value.missing == ["norm.weight"]
    assert_snapshot_equal(target, before)


def test_buffers_computed_by_init_are_kept(tmp_path):
    ref = seeded(BufferNet)
    path = save_st(tmp_path / "b.safetensors", ref, drop=("table",))
    plan = loaderkit.plan(path, "fp32", model=BufferNet)
    assert plan.kept == ("table",)
    assert any("kept" in d.choice for d in plan.decisions)
    model = loaderkit.load(path, "fp32", model=BufferNet)
    assert torch.equal(model.table, torch.linspace(0.5, 1.5, 8))
    assert torch.equal(model.inv_freq, BufferNet().inv_freq)  # non-persistent: never in a checkpoint
    assert torch.equal(model.embed.weight, ref.embed.weight)


# -------------------------------------------------------------------------------------------
# tied weights
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stored", ["embed.weight", "head.weight"])
def test_tied_weights_come_out_tied_from_an_instance(tmp_path, stored):
    ref = seeded(TiedNet)
    other = "head.weight" if stored == "embed.weight" else "embed.weight"
    path = save_st(tmp_path / "t.safetensors", ref, drop=(other,))
    plan = loaderkit.plan(path, "bf16", model=TiedNet())
    assert plan.tensors[stored].also == (other,)
    assert other not in plan.tensors
    model = loaderkit.load(path, "bf16", model=TiedNet())
    assert model.head.weight is model.embed.weight
    assert model.embed.weight.dtype == torch.bfloat16
    assert torch.equal(model.embed.weight, ref.embed.weight.to(torch.bfloat16))


def test_tied_weights_come_out_tied_from_a_class(tmp_path):
    ref = seeded(TiedNet)
    path = save_st(tmp_path / "t.safetensors", ref, drop=("head.weight",))
    model = loaderkit.load(path, "bf16", model=TiedNet)
    assert model.head.weight is model.embed.weight


def test_tied_weights_stored_twice_are_loaded_once(tmp_path):
    ref = seeded(TiedNet)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}  # save_file refuses shared storage
    path = save_st(tmp_path / "t.safetensors", sd)
    plan = loaderkit.plan(path, "fp32", model=TiedNet())
    assert "head.weight" in plan.ignored and "tied" in plan.ignored["head.weight"]
    model = loaderkit.load(path, "fp32", model=TiedNet())
    assert model.head.weight is model.embed.weight


def test_tied_by_facts_from_a_plugin(fresh_manager, tmp_path):
    """A model whose library declares a tie (as transformers' tie_word_embeddings does)."""

    class Untied(TiedNet):
        def __init__(self):
            super().__init__()
            self.head.weight = torch.nn.Parameter(torch.empty(12, 6))

    ref = seeded(TiedNet)
    path = save_st(tmp_path / "t.safetensors", ref, drop=("head.weight",))

    def loaderkit_model_facts(model):
        if isinstance(model, Untied):
            return loaderkit.plugin.ModelFacts(tied={"head.weight": "embed.weight"}, source=("test",))
        return None

    plugin = type("P", (), {"loaderkit_model_facts": staticmethod(loaderkit.hookimpl(loaderkit_model_facts))})()
    name = loaderkit.register(plugin, name="tie-facts")
    try:
        model = loaderkit.load(path, "fp32", model=Untied)
    finally:
        loaderkit.unregister(name)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.head.weight, ref.embed.weight)


# -------------------------------------------------------------------------------------------
# non-float tensors
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_non_float_tensors_are_never_cast(tmp_path, strategy, dtype):
    ref = seeded(BufferNet)
    path = save_st(tmp_path / "b.safetensors", ref)
    plan = loaderkit.plan(path, strategy, model=BufferNet)
    for key, stored in (("position_ids", "int64"), ("mask", "bool")):
        tp = plan.tensors[key]
        assert (tp.stored_dtype, tp.target_dtype, tp.conversion) == (stored, stored, "none"), tp
    model = loaderkit.load(path, strategy, model=BufferNet)
    assert model.position_ids.dtype == torch.int64
    assert torch.equal(model.position_ids, ref.position_ids)
    assert model.mask.dtype == torch.bool and torch.equal(model.mask, ref.mask)
    assert model.table.dtype == dtype and model.embed.weight.dtype == dtype
    out = model(torch.tensor([[1, 2, 3]]))
    assert out.dtype == dtype


def test_integer_tensor_for_a_float_parameter_is_refused_at_plan_time(tmp_path):
    ref = seeded(TinyNet)
    path = save_st(tmp_path / "i8.safetensors", ref, extra={"proj.weight": (ref.proj.weight * 100).to(torch.int8)})
    with pytest.raises(loaderkit.LoaderKitError, match="proj.weight") as err:
        loaderkit.plan(path, "bf16", model=TinyNet)
    assert "int8" in str(err.value)


def test_float_tensor_for_an_integer_buffer_keeps_the_model_dtype_or_is_refused(tmp_path):
    ref = seeded(BufferNet)
    path = save_st(tmp_path / "b.safetensors", ref, extra={"position_ids": ref.position_ids.float()})
    try:
        model = loaderkit.load(path, "bf16", model=BufferNet)
    except loaderkit.LoaderKitError as exc:  # refusing it, naming the tensor, is fine too
        assert "position_ids" in str(exc)
        return
    assert model.position_ids.dtype == torch.int64
    assert torch.equal(model.position_ids, ref.position_ids)


# -------------------------------------------------------------------------------------------
# the plan
# -------------------------------------------------------------------------------------------


def test_plan_reads_no_tensor_data(monkeypatch, tiny_ckpt):
    import safetensors

    from loaderkit.plugins import safetensors_format

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was opened during plan()")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(safetensors_format.SafetensorsFormat, "open", refuse)
    monkeypatch.setattr(safetensors_format.SafetensorsReader, "get", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    path, _ = tiny_ckpt
    plan = loaderkit.plan(path, "bf16", model=TinyNet)
    assert plan.tensors["proj.weight"].target_dtype == "bfloat16"
    with pytest.raises(loaderkit.PluginError, match="tensor data was opened"):
        loaderkit.load(path, "bf16", model=TinyNet)  # proves the patch is where data is read


def test_plan_leaves_a_user_module_untouched(tiny_ckpt):
    target = TinyNet()
    before = snapshot(target)
    loaderkit.plan(tiny_ckpt[0], "bf16", model=target)
    assert_snapshot_equal(target, before)


def test_plan_str_shows_modules_dtypes_and_decisions(fresh_manager, tiny_ckpt):
    path, _ = tiny_ckpt

    def loaderkit_model_facts(model):
        return loaderkit.plugin.ModelFacts(keep_fp32=("norm",)) if isinstance(model, TinyNet) else None

    plugin = type("P", (), {"loaderkit_model_facts": staticmethod(loaderkit.hookimpl(loaderkit_model_facts))})()
    name = loaderkit.register(plugin, name="keep-norm")
    try:
        bf16 = loaderkit.plan(path, "bf16", model=TinyNet)
        auto = loaderkit.plan(path, "auto", model=TinyNet)
    finally:
        loaderkit.unregister(name)
    text = str(bf16)
    lines = text.splitlines()
    assert lines[0].startswith("checkpoint") and str(path) in lines[0]
    assert "TinyNet" in text and "model=" in text and "bf16" in text
    header = next(i for i, ln in enumerate(lines) if ln.split()[:4] == ["module", "type", "storage", "compute"])
    rows = [ln.split() for ln in lines[header + 2 :] if ln.strip()]
    linear = next(r for r in rows if r[0] in ("proj", "head"))
    assert linear[1:6] == ["(+1", "alike)", "Linear", "bfloat16", "bfloat16"], linear
    norm = next(r for r in rows if r[0] == "norm")
    assert norm[1:4] == ["LayerNorm", "float32", "float32"], norm
    full = bf16.table(all_modules=True).splitlines()
    assert {ln.split()[0] for ln in full if ln.split() and ln.split()[1:2] == ["Linear"]} == {"proj", "head"}
    assert "decisions" in str(auto) and "strategy:" in str(auto)
    assert bf16.modules["norm"].reason == "kept in float32 by the model's library"


def test_plan_to_dict_is_json(tiny_ckpt):
    plan = loaderkit.plan(tiny_ckpt[0], "bf16", model=TinyNet)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["strategy"] == "bf16" and data["builder"] == "model=" and data["model_type"] == "TinyNet"
    assert data["modules"]["proj"]["compute_dtype"] == "bfloat16"
    assert data["tensors"]["proj.weight"]["conversion"] == "cast"
    assert data["checkpoint"]["format"] == "safetensors"
    assert data["bytes_per_dtype"] == {"bfloat16": (16 * 8 + 16 + 16 + 16 + 4 * 16 + 4) * 2}


def test_plan_with_strategy_object_and_options(tiny_ckpt):
    strat = loaderkit.strategy("bf16", keep_fp32_modules=False)
    plan = loaderkit.plan(tiny_ckpt[0], strat, model=TinyNet)
    assert plan.strategy == "bf16" and plan.options == {"keep_fp32_modules": False}


def test_slots_and_kinds():
    slots = model_slots(BufferNet())
    assert set(slots) == {"embed.weight", "proj.weight", "proj.bias", "position_ids", "mask", "table"}
    assert not slots["table"].is_param and slots["proj.bias"].is_param
    tied = model_slots(TiedNet())
    assert tied["head.weight"].tensor is tied["embed.weight"].tensor
    net = TinyNet()
    kinds = {n: module_kind(m) for n, m in net.named_modules() if n}
    assert kinds == {"proj": "linear", "norm": "norm", "head": "linear"}
    assert module_kind(torch.nn.Conv2d(1, 1, 1)) == "conv"
    assert module_kind(torch.nn.Embedding(2, 2)) == "embedding"
    assert module_kind(torch.nn.GroupNorm(1, 2)) == "norm"
