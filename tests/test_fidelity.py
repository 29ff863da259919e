"""Fidelity to the model libraries: what a library decides about its own models (fp32-kept
modules and parameters, its config reader) is honoured, and fp8 never crashes at forward time
where a parent reads its child's weight dtype (the T5 family)."""

from __future__ import annotations

import json

import pytest
import torch

import loaderkit
import loaderkit.plugin as lkp

transformers = pytest.importorskip("transformers")

T5_FAMILY = {
    "t5": (transformers.T5EncoderModel, transformers.T5Config),
    "umt5": (transformers.UMT5EncoderModel, transformers.UMT5Config),
    "mt5": (transformers.MT5EncoderModel, transformers.MT5Config),
}
T5_CFG = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=64,
              feed_forward_proj="gated-gelu", dropout_rate=0.0)
IDS = torch.tensor([[5, 9, 2, 33, 1, 0, 7]])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.fixture(scope="module", params=sorted(T5_FAMILY))
def t5(request, tmp_path_factory):
    model_cls, config_cls = T5_FAMILY[request.param]
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    model_cls(config_cls(**T5_CFG)).save_pretrained(path)
    return path, model_cls


def test_t5_family_under_fp8_runs_and_verifies(t5):
    path, model_cls = t5
    plan = loaderkit.plan(path, "fp8")
    wo = [m for n, m in plan.modules.items() if n.endswith("DenseReluDense.wo")]
    assert wo and all(m.storage["weight"] == "bfloat16" for m in wo)
    assert "never stored in fp8" in wo[0].reason or "weight.dtype" in wo[0].reason
    assert any(m.storage.get("weight") == "float8_e4m3fn" for m in plan.modules.values())  # wi is fp8
    model = loaderkit.load(path, "fp8")
    report = loaderkit.verify(model, IDS)
    assert report.ok, str(report)
    ref = model_cls.from_pretrained(path)
    with torch.no_grad():
        out = model(input_ids=IDS).last_hidden_state
        want = ref(input_ids=IDS).last_hidden_state
    assert out.dtype == torch.bfloat16 and cosine(out, want) > 0.99


def test_t5_family_fp32_and_bf16_are_identical_to_from_pretrained(t5):
    path, model_cls = t5
    for strategy, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours = loaderkit.load(path, strategy)
        ref = model_cls.from_pretrained(path, dtype=dtype)
        theirs = ref.state_dict()
        assert {k: v.dtype for k, v in ours.state_dict().items()} == {k: v.dtype for k, v in theirs.items()}
        with torch.no_grad():
            assert torch.equal(ours(input_ids=IDS).last_hidden_state, ref(input_ids=IDS).last_hidden_state)


class EveryLinearFp8(lkp.Strategy):
    """Stores every Linear weight in fp8, ignoring the library and the parent checks."""

    name = "every-linear-fp8"

    def build_dtype(self, ctx):
        return "bfloat16"

    def decide(self, module, state):
        if module.kind == "linear":
            return lkp.ModuleDecision(compute="bfloat16", storage={"weight": "float8_e4m3fn"})
        return lkp.ModuleDecision(compute="bfloat16")


def test_verify_catches_the_parent_reading_its_childs_dtype(t5):
    """The crash class itself: a strategy that stores wo in fp8 anyway loads (its cast rules
    cover every module statically), and verify with example inputs reports the crash: T5's
    feed-forward casts its activations to self.wo.weight.dtype, i.e. to fp8."""
    path, _ = t5
    model = loaderkit.load(path, EveryLinearFp8())
    report = loaderkit.verify(model, IDS)
    assert not report.ok
    forward = [p for p in report.problems if p.kind in ("forward", "activation")]
    assert any(p.module.endswith("DenseReluDense.wo") and "fp8 is a storage dtype" in p.message for p in forward)


def test_the_parent_check_finds_t5s_feed_forward():
    named = dict(transformers.T5EncoderModel(transformers.T5Config(**T5_CFG)).named_modules())
    reason = lkp.read_by_parent("encoder.block.0.layer.1.DenseReluDense.wo", named)
    assert "reads self.wo.weight.dtype" in reason
    assert lkp.read_by_parent("encoder.block.0.layer.1.DenseReluDense.wi_0", named) == ""


# -- diffusers keeps parameters in fp32 ----------------------------------------------------------

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
           text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wan")
    diffusers.WanTransformer3DModel(**WAN).save_pretrained(path)
    return path


def _wan_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 5, 16, generator=g))


def test_wan_scale_shift_table_stays_float32_like_diffusers(wan):
    diffusers = pytest.importorskip("diffusers")
    ours = loaderkit.load(wan, "bf16")
    ref = diffusers.WanTransformer3DModel.from_pretrained(wan, torch_dtype=torch.bfloat16)
    want = {k: v.dtype for k, v in ref.state_dict().items()}
    assert want["scale_shift_table"] == torch.float32 and want["blocks.0.scale_shift_table"] == torch.float32
    assert {k: v.dtype for k, v in ours.state_dict().items()} == want
    inputs = _wan_inputs()
    with torch.no_grad():
        a = ours(**{k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}).sample
        b = ref(**{k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}).sample
    assert torch.equal(a, b)
    assert loaderkit.verify(ours).ok


def test_wan_under_fp8_keeps_its_fp32_parameters(wan):
    model = loaderkit.load(wan, "fp8")
    assert model.blocks[0].scale_shift_table.dtype == torch.float32
    inputs = _wan_inputs()
    report = loaderkit.verify(model, example_kwargs=inputs)
    assert report.ok, str(report)


# -- the library's own config reader ----------------------------------------------------------------


def test_config_values_the_library_encodes_specially_are_read_by_the_library(tmp_path):
    from tiny_configs import TINY_LLAMA

    config = transformers.LlamaConfig(**TINY_LLAMA)
    config.final_logit_softcapping = float("inf")  # written as {"__float__": "Infinity"}
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    raw = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert raw["final_logit_softcapping"] == {"__float__": "Infinity"}
    model = loaderkit.load(tmp_path / "llama", "fp32")
    assert model.config.final_logit_softcapping == float("inf")
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
