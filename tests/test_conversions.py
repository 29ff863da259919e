"""transformers 5 converts checkpoints on load (renames, per-expert tensors fused into one):
loaderkit applies the library's own conversions, lazily, and loads exactly what
``from_pretrained`` loads."""

from __future__ import annotations

import pytest
import torch

import loaderkit

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)
MOE = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", dict(intermediate_size=48, num_local_experts=4,
                                                            num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", dict(intermediate_size=48, moe_intermediate_size=24,
                                                                shared_expert_intermediate_size=48, num_experts=4,
                                                                num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig", dict(intermediate_size=48, moe_intermediate_size=24,
                                                                num_experts=4, num_experts_per_tok=2, head_dim=8)),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig", dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2)),
}
IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


@pytest.fixture(scope="module", params=sorted(MOE))
def moe(request, tmp_path_factory):
    arch, config_name, extra = MOE[request.param]
    if not hasattr(transformers, arch):
        pytest.skip(f"transformers {transformers.__version__} has no {arch}")
    torch.manual_seed(0)
    model_cls = getattr(transformers, arch)
    path = tmp_path_factory.mktemp(request.param)
    model_cls(getattr(transformers, config_name)(**COMMON, **extra)).save_pretrained(path)
    return path, model_cls


def test_the_plan_lists_the_sources_of_fused_tensors(moe):
    path, _ = moe
    plan = loaderkit.plan(path, "bf16")
    fused = [t for t in plan.tensors.values() if t.sources]
    assert fused, "the library fuses per-expert tensors on load"
    assert all(len(t.sources) > 1 and t.transform and t.source == t.key for t in fused)
    assert any(d.subject == "library conversions" and "built from" in d.choice for d in plan.decisions)
    assert all(s in plan.checkpoint.tensors for t in fused for s in t.sources)
    assert "sources" in plan.to_dict()["tensors"][fused[0].key]


@pytest.mark.parametrize("strategy, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_moe_loads_exactly_as_from_pretrained(moe, strategy, dtype):
    path, model_cls = moe
    ours = loaderkit.load(path, strategy)
    ref = model_cls.from_pretrained(path, dtype=dtype)
    theirs = ref.state_dict()
    got = ours.state_dict()
    assert sorted(got) == sorted(theirs)
    for k, v in theirs.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, ref(IDS).logits)


def test_moe_under_fp8_runs_verifies_and_agrees(moe):
    path, model_cls = moe
    plan = loaderkit.plan(path, "fp8")
    experts = [m for n, m in plan.modules.items() if n.endswith("mlp.experts")]
    assert experts and all(set(m.storage.values()) == {"float8_e4m3fn"} and m.granularity == "row" for m in experts)
    fused = next(t for t in plan.tensors.values() if t.sources and t.key.endswith("gate_up_proj"))
    assert fused.conversion == "quantize" and fused.scale == "gate_up_proj_scale"
    model = loaderkit.load(path, "fp8")
    owner = model.get_submodule(fused.key.rpartition(".")[0])
    assert owner.gate_up_proj.dtype == torch.float8_e4m3fn
    assert owner.gate_up_proj_scale.shape == owner.gate_up_proj.shape[:-1] + (1,)  # per expert and row
    assert loaderkit.verify(model, IDS).ok
    ref = model_cls.from_pretrained(path)
    with torch.no_grad():
        assert cosine(model(IDS).logits, ref(IDS).logits) > 0.99


def test_converting_a_fused_checkpoint_is_refused_cleanly(moe, tmp_path):
    path, _ = moe
    with pytest.raises(loaderkit.ConvertError, match="builds .* tensors from several checkpoint tensors"):
        loaderkit.convert(path, tmp_path / "out", "bf16", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_fused_tensor_that_does_not_fit_is_named(moe, tmp_path):
    """A checkpoint with an expert missing: the library's fused result has the wrong shape."""
    import shutil

    from safetensors.torch import load_file, save_file

    path, _ = moe
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    drop = next(k for k in sorted(tensors) if ".experts.3." in k)
    tensors.pop(drop)
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(loaderkit.LoaderKitError):
        loaderkit.load(broken, "fp32")


def test_vision_language_renames_load_exactly(tmp_path):
    """Llava checkpoints keep the hub prefixes (``language_model.model.*``); transformers 5 renames
    them on load (``model.language_model.*``), and so does loaderkit, through its mapping."""
    v = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=16, patch_size=8)
    t = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(vision_config=v, text_config=t, image_token_index=63)).save_pretrained(tmp_path)
    assert any(k.startswith("language_model.model.") for k in loaderkit.inspect(tmp_path).tensors)
    ref = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path)
    for strategy, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours = loaderkit.load(tmp_path, strategy).state_dict()
        theirs = ref.to(dtype).state_dict()
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    plan = loaderkit.plan(tmp_path, "bf16")
    renamed = [t for t in plan.tensors.values() if t.source != t.key and not t.sources]
    assert renamed and renamed[0].source.startswith("language_model.")


# -- fp8 MoE checkpoints in the per-expert hub layout ------------------------------------------------


def _quantized_moe(tmp_path, granularity: str, block: tuple[int, int] = (16, 16)):
    """A Mixtral in the layout llm-compressor writes with its FP8 (per-tensor) and FP8_DYNAMIC
    (per-channel) presets on the per-expert hub layout (compressed-tensors ``float-quantized``):
    every Linear weight but lm_head in float8_e4m3fn, ``weight_scale`` in the model dtype."""
    import json

    from safetensors.torch import load_file, save_file

    from loaderkit.kernels.quant import expand_block_scale, quantize

    arch, config_name, extra = MOE["mixtral"]
    torch.manual_seed(0)
    getattr(transformers, arch)(getattr(transformers, config_name)(**COMMON, **extra)).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    ref = {}
    for k in [k for k in sd if k.endswith(".weight") and ("experts" in k or "self_attn" in k)]:
        q, s = quantize(sd[k].float(), torch.float8_e4m3fn, granularity, block=block)
        s = (s.reshape(-1, 1) if granularity == "channel" else s.reshape(1) if granularity == "tensor" else s)
        s = s.to(torch.bfloat16)
        sd[k], sd[k[: -len("weight")] + "weight_scale"] = q, s
        full = expand_block_scale(s.float(), tuple(q.shape), block) if granularity == "block" else s.float()
        ref[k] = q.float() * full  # the reference dequantization, in float32
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": granularity, "symmetric": True, "dynamic": False,
            **({"block_structure": list(block)} if granularity == "block" else {})}}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path, sd, ref


@pytest.mark.parametrize("granularity", ["channel", "tensor", "block"])
def test_fp8_moe_keeps_its_expert_bytes_and_stacks_their_scales(tmp_path, granularity):
    path, stored, ref = _quantized_moe(tmp_path, granularity)
    plan = loaderkit.plan(path, "fp8")
    fused = plan.tensors["model.layers.0.mlp.experts.gate_up_proj"]
    fused_gran = "block" if granularity == "block" else "row"
    assert (fused.conversion, fused.granularity, fused.scale) == ("none", fused_gran, "gate_up_proj_scale")
    assert len(fused.companions) == len(fused.sources) == 8
    model = loaderkit.load(path, "fp8")
    experts = model.model.layers[0].mlp.experts
    expert = "model.layers.0.block_sparse_moe.experts"
    want_bytes = torch.cat([torch.stack([stored[f"{expert}.{i}.{w}.weight"] for i in range(4)]) for w in ("w1", "w3")], 1)
    assert experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert torch.equal(experts.gate_up_proj.view(torch.uint8), want_bytes.view(torch.uint8))  # never requantized
    assert experts.gate_up_proj_scale.shape == ((4, 6, 2) if granularity == "block" else (4, 96, 1))
    assert loaderkit.verify(model, IDS).ok
    dense = loaderkit.load(path, "fp32")
    want = torch.cat([torch.stack([ref[f"{expert}.{i}.{w}.weight"] for i in range(4)]) for w in ("w1", "w3")], 1)
    assert torch.equal(dense.model.layers[0].mlp.experts.gate_up_proj, want)  # the reference dequantization
    with torch.no_grad():
        assert cosine(model(IDS).logits, dense(IDS).logits) > 0.99


def test_block_scales_that_would_straddle_two_experts_tensors_are_refused_by_name(tmp_path):
    """A block grid fuses only when no block straddles two sources: 48 rows in blocks of 32 do not."""
    path, _, _ = _quantized_moe(tmp_path, "block", block=(32, 32))
    with pytest.raises(loaderkit.PlanError, match="multiples of the block"):
        loaderkit.plan(path, "fp8")


def test_deepseek_v3_block_fp8_experts_load_kept_and_exact(tmp_path):
    """DeepSeek-V3's layout (``quant_method: fp8``, ``weight_block_size``, ``weight_scale_inv``
    per expert): the experts transformers fuses keep their bytes and block grids under fp8, and
    decode to the reference under fp32."""
    import json

    from safetensors.torch import load_file, save_file

    from loaderkit.kernels.quant import expand_block_scale, quantize

    if not hasattr(transformers, "DeepseekV3ForCausalLM"):
        pytest.skip("no DeepseekV3 in this transformers")
    cfg = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=8, n_group=1, topk_group=1)
    torch.manual_seed(0)
    transformers.DeepseekV3ForCausalLM(cfg).save_pretrained(tmp_path)
    sd, ref = load_file(str(tmp_path / "model.safetensors")), {}
    for k in [k for k in sd if k.endswith("proj.weight") and sd[k].dim() == 2]:
        q, s = quantize(sd[k].float(), torch.float8_e4m3fn, "block", block=(16, 16))
        sd[k], sd[k + "_scale_inv"] = q, s
        ref[k] = q.float() * expand_block_scale(s, tuple(q.shape), (16, 16))
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16], "activation_scheme": "dynamic"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    plan = loaderkit.plan(tmp_path, "fp8")
    down = plan.tensors["model.layers.1.mlp.experts.down_proj"]
    assert (down.conversion, down.granularity, down.block) == ("none", "block", (16, 16)) and len(down.sources) == 4
    model = loaderkit.load(tmp_path, "fp8")
    experts = model.model.layers[1].mlp.experts
    src = "model.layers.1.mlp.experts"
    assert torch.equal(experts.down_proj.view(torch.uint8),
                       torch.stack([sd[f"{src}.{i}.down_proj.weight"] for i in range(4)]).view(torch.uint8))
    assert experts.down_proj_scale.shape == (4, 2, 2)
    assert loaderkit.verify(model, IDS[:, :3]).ok
    dense = loaderkit.load(tmp_path, "fp32").model.layers[1].mlp.experts
    assert torch.equal(dense.down_proj, torch.stack([ref[f"{src}.{i}.down_proj.weight"] for i in range(4)]))
