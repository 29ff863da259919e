"""Unit tests of the transformers and diffusers builder plugins: can_build, build, model facts."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from loaderkit.plugin import BuildError, BuildRequest, CheckpointInfo, ModelFacts
from loaderkit.pipeline.build import build_skeleton
from loaderkit.pipeline.discover import PluginManager
from loaderkit.plugins import diffusers_builder as db
from loaderkit.plugins import transformers_builder as tb

from tiny_configs import TINY_LLAMA

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", **TINY_LLAMA, tie_word_embeddings=True)
BERT = dict(
    architectures=["BertModel"],
    model_type="bert",
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=64,
    max_position_embeddings=64,
)
T5 = dict(
    architectures=["T5ForConditionalGeneration"],
    model_type="t5",
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    vocab_size=64,
)
SD3 = dict(
    _class_name="SD3Transformer2DModel",
    sample_size=16,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    caption_projection_dim=16,
    pooled_projection_dim=16,
    out_channels=4,
    pos_embed_max_size=16,
)


def request(config: dict | None, dtype: str = "bfloat16", root: str = "/nonexistent") -> BuildRequest:
    info = CheckpointInfo(
        path=f"{root}/model.safetensors", root=root, format="safetensors", files=(), tensors={}, config=config
    )
    return BuildRequest(checkpoint=info, dtype=dtype)


def params_on_meta(model: torch.nn.Module) -> bool:
    return all(p.device.type == "meta" for p in model.parameters())


# -------------------------------------------------------------------------------------------
# Both plugins
# -------------------------------------------------------------------------------------------


def test_plugins_import_neither_library():
    """Importing the plugins, registering them and asking facts of a torch model imports nothing heavy."""
    code = (
        "import sys, torch, importlib.util\n"
        "from loaderkit.pipeline.discover import PluginManager\n"
        "mgr = PluginManager(autoload=False)\n"
        "names = [e.name for e in mgr.builders()]\n"
        "assert mgr.hook.loaderkit_model_facts(model=torch.nn.Linear(2, 2)) == []\n"
        "heavy = [m for m in ('transformers', 'diffusers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "for lib in ('transformers', 'diffusers'):\n"
        "    assert (lib in names) == (importlib.util.find_spec(lib) is not None), (lib, names)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("plugin", [tb, db])
def test_nothing_registered_without_library(plugin, monkeypatch):
    monkeypatch.setattr(plugin, "available", lambda: False)
    got = []
    plugin.loaderkit_register_builders(got.append)
    assert got == []
    builder = tb.TransformersBuilder() if plugin is tb else db.DiffusersBuilder()
    assert not builder.can_build(request(LLAMA if plugin is tb else SD3))


def test_can_build_decides_by_config_keys(monkeypatch):
    monkeypatch.setattr(tb, "available", lambda: True)
    monkeypatch.setattr(db, "available", lambda: True)
    t, d = tb.TransformersBuilder(), db.DiffusersBuilder()
    assert t.can_build(request(LLAMA)) and not d.can_build(request(LLAMA))
    assert t.can_build(request({"model_type": "llama"}))
    assert d.can_build(request(SD3)) and not t.can_build(request(SD3))
    # a diffusers config that happens to carry model_type stays with diffusers
    assert not t.can_build(request({**SD3, "model_type": "x"}))
    for cfg in (None, {}, {"hidden_size": 3}, {"architectures": [], "model_type": None}):
        assert not t.can_build(request(cfg)) and not d.can_build(request(cfg))


def test_facts_hooks_ignore_plain_modules():
    assert tb.loaderkit_model_facts(torch.nn.Linear(2, 2)) is None
    assert db.loaderkit_model_facts(torch.nn.Linear(2, 2)) is None


# -------------------------------------------------------------------------------------------
# transformers
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def build_tf(config: dict, dtype: str = "bfloat16", root: str = "/nonexistent") -> torch.nn.Module:
    return tb.TransformersBuilder().build(request(config, dtype, root))


def test_llama_skeleton_matches_from_pretrained_construction(transformers):
    model = build_tf(LLAMA)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert params_on_meta(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.dtype == torch.bfloat16
    # weights are tied after loading, not in the skeleton
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    # non-persistent rotary buffers are real and equal to an ordinary construction's
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(LLAMA))
    for name, buf in model.named_buffers():
        assert buf.device.type == "cpu", name
        assert buf.dtype == dict(ref.named_buffers())[name].dtype
        assert torch.equal(buf, dict(ref.named_buffers())[name]), name
    assert model.config._attn_implementation == ref.config._attn_implementation


def test_llama_facts_tied_and_finalize(transformers):
    model = build_tf(LLAMA, "float32")
    facts = tb.loaderkit_model_facts(model)
    assert facts.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert facts.source == ("transformers",)
    assert "LlamaDecoderLayer" in facts.no_split
    assert any(re.search(p, "model.layers.0.self_attn.rotary_emb.inv_freq") for p in facts.ignore_unexpected)
    model.to_empty(device="cpu")
    for fn in facts.finalize:
        fn(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_untied_config_has_no_tied_facts(transformers):
    model = build_tf({**LLAMA, "tie_word_embeddings": False})
    assert tb.loaderkit_model_facts(model).tied == {}


def test_model_type_without_architectures_builds_base_model(transformers):
    cfg = {k: v for k, v in LLAMA.items() if k != "architectures"}
    model = build_tf(cfg)
    assert type(model).__name__ == "LlamaModel"
    assert params_on_meta(model)


def test_bert_position_ids_buffer_is_real(transformers):
    model = build_tf(BERT, "float16")
    pos = model.embeddings.position_ids
    assert pos.device.type == "cpu" and pos.dtype == torch.int64
    assert torch.equal(pos, torch.arange(64).expand((1, -1)))
    facts = tb.loaderkit_model_facts(model)
    assert any(re.search(p, "embeddings.position_ids") for p in facts.ignore_unexpected)
    assert not any(re.search(p, "embeddings.word_embeddings.weight") for p in facts.ignore_unexpected)
    assert {"BertLayer", "BertEmbeddings"} <= set(facts.no_split)


def test_t5_keep_fp32_ignore_and_tied(transformers):
    model = build_tf(T5, "float16")
    facts = tb.loaderkit_model_facts(model)
    fp16_only = getattr(facts, "keep_fp32_fp16", ())
    wo = {n for n, _ in model.named_modules() if n.endswith(".wo")}
    assert len(wo) == 4 and set((*facts.keep_fp32, *fp16_only)) == wo
    assert set(facts.tied) == {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"}
    assert set(facts.tied.values()) == {"shared.weight"}
    key = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    assert any(re.search(p, key) for p in facts.ignore_unexpected)


def test_keep_fp32_strict_and_fp16_only_are_told_apart(transformers, monkeypatch):
    model = build_tf(T5, "float16")
    monkeypatch.setattr(model, "_keep_in_fp32_modules_strict", {"lm_*ad.weight"}, raising=False)
    facts = tb.loaderkit_model_facts(model)
    assert "lm_head" in facts.keep_fp32
    wo = "encoder.block.0.layer.1.DenseReluDense.wo"
    if "keep_fp32_fp16" in ModelFacts.model_fields:
        assert wo in facts.keep_fp32_fp16 and wo not in facts.keep_fp32
    else:
        assert wo in facts.keep_fp32


def test_tensors_the_model_creates_in_fp32_stay_fp32(transformers):
    """from_pretrained keeps MoE router weights in the float32 the model creates them in."""
    cfg = dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=32,
        intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, first_k_dense_replace=1,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=64, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    )
    model = build_tf(cfg, "bfloat16")
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    facts = tb.loaderkit_model_facts(model)
    assert facts.keeps_fp32("model.layers.1.mlp.gate")
    assert not facts.keeps_fp32("model.layers.1.mlp.shared_experts.gate_proj")
    assert not facts.keeps_fp32("model.layers.0.mlp.gate_proj")
    # DeepseekV3 also lists parameter names ("gate.weight") in _keep_in_fp32_modules_strict
    fp32_built = tb.loaderkit_model_facts(build_tf(cfg, "float32"))
    assert fp32_built.keep_fp32 == ("model.layers.1.mlp.gate",)


def test_quantization_config_is_dropped(transformers):
    cfg = {**LLAMA, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    model = build_tf(cfg)
    assert getattr(model.config, "quantization_config", None) is None


def test_generation_config_beside_weights_is_used(transformers, tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7, "do_sample": False}))
    model = build_tf(LLAMA, root=str(tmp_path))
    assert model.generation_config.max_new_tokens == 7


@pytest.mark.parametrize(
    "cfg, needle",
    [
        ({**LLAMA, "architectures": ["NoSuchModelForCausalLM"]}, "NoSuchModelForCausalLM"),
        ({"model_type": "no-such-type"}, "no-such-type"),
        ({**LLAMA, "num_attention_heads": 5}, "as LlamaConfig"),
    ],
)
def test_build_errors_name_the_problem(transformers, cfg, needle):
    with pytest.raises(BuildError, match=re.escape(needle)):
        build_tf(cfg)


def test_manager_picks_transformers_builder(transformers):
    mgr = PluginManager(autoload=False)
    model, name = build_skeleton(mgr, request(LLAMA).checkpoint, torch.bfloat16)
    assert name == "transformers" and type(model).__name__ == "LlamaForCausalLM"
    results = dict(mgr.hook.loaderkit_model_facts(model=model))
    assert set(results) == {"transformers"}


# -------------------------------------------------------------------------------------------
# diffusers
# -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


def test_sd3_skeleton_and_facts(diffusers):
    model = db.DiffusersBuilder().build(request(SD3, "bfloat16"))
    assert type(model).__name__ == "SD3Transformer2DModel"
    assert params_on_meta(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    buf = model.pos_embed.pos_embed
    assert buf.device.type == "cpu"
    ref = diffusers.SD3Transformer2DModel.from_config(SD3)
    assert torch.equal(buf, ref.pos_embed.pos_embed)
    facts = db.loaderkit_model_facts(model)
    assert facts.source == ("diffusers",)
    assert facts.no_split == ("JointTransformerBlock",)
    assert facts.skips_low_precision("transformer_blocks.0.norm1.linear")
    assert facts.skips_low_precision("pos_embed.proj")
    assert not facts.skips_low_precision("transformer_blocks.0.attn.to_q")
    assert facts.keep_fp32 == () and facts.tied == {}
    assert tb.loaderkit_model_facts(model) is None


def test_diffusers_keep_fp32_and_ignore_facts(diffusers, monkeypatch):
    model = db.DiffusersBuilder().build(request(SD3, "float16"))
    monkeypatch.setattr(type(model), "_keep_in_fp32_modules", ["time_text_embed"])
    monkeypatch.setattr(type(model), "_keys_to_ignore_on_load_unexpected", [r"\.old_bias$"])
    facts = db.loaderkit_model_facts(model)
    assert facts.keep_fp32 == ("time_text_embed",)
    assert facts.keeps_fp32("time_text_embed.timestep_embedder.linear_1")
    assert facts.skips_low_precision("time_text_embed.timestep_embedder.linear_1")
    assert facts.ignore_unexpected == (r"\.old_bias$",)


def test_subtree_regex_keeps_anchored_patterns_on_descendants():
    rx = db.subtree_regex("^proj_out$")
    assert re.search(rx, "proj_out") and re.search(rx, "proj_out.conv")
    assert not re.search(rx, "proj_out2") and not re.search(rx, "blocks.0.proj_out")
    assert db.subtree_regex("norm") == "norm"
    assert db.subtree_regex(r"cost\$") == r"cost\$"


def test_unknown_diffusers_class_is_a_build_error(diffusers):
    with pytest.raises(BuildError, match="NoSuchTransformer"):
        db.DiffusersBuilder().build(request({**SD3, "_class_name": "NoSuchTransformer"}))


def test_manager_picks_diffusers_builder(diffusers):
    model, name = build_skeleton(PluginManager(autoload=False), request(SD3).checkpoint, torch.float32)
    assert name == "diffusers" and params_on_meta(model)
