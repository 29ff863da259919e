"""LoRA: peft/diffusers and kohya files, merged at load or added at cast time, on fp8-stored,
fp32-kept and plain modules, against peft's own merge; plan-time errors; removal; offload."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import loaderkit
from loaderkit import runtime
from loaderkit.errors import LoraError
from loaderkit.demo import TinyVideoDiT, save_sample
from loaderkit.kernels.quant import quantize
from loaderkit.plugin import LoraFormat, LoraLayout, LoraPair, ModelFacts

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402

TARGETS = ["fc1", "fc2", "qkv", "patch_embed", "head"]
VIDEO = torch.randn(1, 4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
T = torch.tensor([0.5])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _run(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    with torch.no_grad():
        if dtype is None:
            return model(VIDEO, T)
        return model(VIDEO.to(dtype), T.to(dtype))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A sample checkpoint, a peft LoRA of it (saved by peft) and peft's merged bf16 reference."""
    d = tmp_path_factory.mktemp("lora")
    path = save_sample(d)
    base = TinyVideoDiT()
    base.load_state_dict(load_file(str(path)))
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(d / "style")
    sd = {k: v.contiguous() for k, v in get_peft_model_state_dict(pm).items()}
    merged = pm.merge_and_unload().to(torch.bfloat16).eval()
    plain = base.to(torch.bfloat16).eval()
    return {"path": path, "lora": d / "style" / "adapter_model.safetensors", "sd": sd, "dir": d,
            "want": _run(merged, torch.bfloat16).float(), "plain": _run(plain, torch.bfloat16).float(),
            "merged_sd": {k: v.float() for k, v in merged.state_dict().items()}}


@pytest.mark.parametrize("mode", ["cast", "merge"])
def test_bf16_lora_matches_peft_merge(ckpt, mode):
    """Plain bf16 modules (no cast rule without the LoRA): the output equals peft's merged bf16
    model within bf16 rounding of the product."""
    model = loaderkit.load(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[ckpt["lora"]], lora_mode=mode)
    got = _run(model).float()
    err = (got - ckpt["want"]).abs().max().item()
    assert _cos(got, ckpt["want"]) > 0.99995
    assert err < 0.02 * ckpt["want"].abs().max().item(), err
    assert (got - ckpt["plain"]).abs().max().item() > 20 * err  # the LoRA has an effect the bound sees


@pytest.mark.parametrize("mode", ["cast", "merge"])
def test_fp8_lora_matches_peft_merge_within_fp8_error(ckpt, mode):
    """fp8 storage: off peft's bf16 merge by no more than the fp8 model without the LoRA is off
    the bf16 model without it (plus a small margin)."""
    model = loaderkit.load(ckpt["path"], "fp8", model=TinyVideoDiT, lora=[ckpt["lora"]], lora_mode=mode)
    got = _run(model).float()
    fp8_err = (_run(loaderkit.load(ckpt["path"], "fp8", model=TinyVideoDiT)).float() - ckpt["plain"]).abs().max().item()
    err = (got - ckpt["want"]).abs().max().item()
    assert _cos(got, ckpt["want"]) > 0.9995
    assert err < 1.5 * fp8_err + 0.01, (err, fp8_err)


def test_merge_requantizes_with_fresh_channel_scales(ckpt):
    """Merged fp8 weights are exactly quantize(W + s * B @ A) with per-channel scales, W read in
    float32 (a high-precision checkpoint is not quantized twice)."""
    merged = loaderkit.load(ckpt["path"], "fp8", model=TinyVideoDiT, lora=[ckpt["lora"]], lora_mode="merge")
    plan = loaderkit.plan_of(merged)
    tp = plan.tensors["blocks.1.fc1.weight"]
    assert (tp.conversion, tp.granularity, tp.scale) == ("quantize", "channel", "weight_scale")
    w = load_file(str(ckpt["path"]))["blocks.1.fc1.weight"].float()
    sd = ckpt["sd"]
    a, b = (sd[f"base_model.model.blocks.1.fc1.lora_{x}.weight"].float() for x in "AB")
    q, scale = quantize(w + 2.0 * (b @ a), torch.float8_e4m3fn, granularity="channel")
    m = merged.blocks[1].fc1
    assert torch.equal(m.weight.data.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(m.weight_scale, scale)
    assert plan.loras[0].mode == "merge" and "blocks.1.fc1" in plan.loras[0].targets


def test_int8_merge_requantizes_and_cast_mode_is_refused(ckpt):
    """int8 weights run a kernel that never decodes them: a LoRA merges before quantization
    (exactly quantize_int8(W + s * B @ A)), and cast mode is refused at plan time."""
    pytest.importorskip("loaderkit.kernels.int8")
    from loaderkit.kernels.int8 import kernel_available, quantize_int8

    if not kernel_available():
        pytest.skip("torch has no CPU _weight_int8pack_mm")
    merged = loaderkit.load(ckpt["path"], "int8", model=TinyVideoDiT, lora=[ckpt["lora"]], lora_mode="merge")
    tp = loaderkit.plan_of(merged).tensors["blocks.1.fc1.weight"]
    assert (tp.target_dtype, tp.conversion, tp.granularity) == ("int8", "quantize", "channel")
    w = load_file(str(ckpt["path"]))["blocks.1.fc1.weight"].float()
    sd = ckpt["sd"]
    a, b = (sd[f"base_model.model.blocks.1.fc1.lora_{x}.weight"].float() for x in "AB")
    q, scale = quantize_int8(w + 2.0 * (b @ a))
    assert torch.equal(merged.blocks[1].fc1.weight, q) and torch.equal(merged.blocks[1].fc1.weight_scale, scale)
    with pytest.raises(LoraError, match="int8 weight-only"):
        loaderkit.plan(ckpt["path"], "int8", model=TinyVideoDiT, lora=[ckpt["lora"]], lora_mode="cast")


def test_cast_mode_keeps_fp8_bytes_and_remove_restores_bitwise(ckpt):
    plain = loaderkit.load(ckpt["path"], "fp8", model=TinyVideoDiT)
    before = _run(plain)
    model = loaderkit.load(ckpt["path"], "fp8", model=TinyVideoDiT, lora=[(ckpt["lora"], 1.0, "style")])
    assert torch.equal(model.blocks[0].fc1.weight.view(torch.uint8), plain.blocks[0].fc1.weight.view(torch.uint8))
    styled = _run(model)
    assert not torch.equal(styled, before)
    loaderkit.remove_lora(model, "style")
    assert torch.equal(_run(model), before)
    assert loaderkit.plan_of(model).loras == ()
    lp = loaderkit.add_lora(model, ckpt["lora"], 1.0, name="style")
    assert torch.equal(_run(model), styled)
    assert loaderkit.plan_of(model).loras == (lp,)
    assert loaderkit.verify(model).ok


def test_remove_from_plain_module_drops_the_hook(ckpt):
    """Under bf16 a LoRA'd Linear gets a rule that only adds the product; removing the LoRA
    takes it away and the output is bitwise the original."""
    model = loaderkit.load(ckpt["path"], "bf16", model=TinyVideoDiT)
    before = _run(model)
    assert runtime.cast_rule_of(model.blocks[0].fc1) is None
    loaderkit.add_lora(model, ckpt["lora"], 0.5, name="a")
    rule = runtime.cast_rule_of(model.blocks[0].fc1)
    assert rule.for_deltas and [d.name for d in rule.deltas] == ["a"]
    assert not torch.equal(_run(model), before)
    loaderkit.remove_lora(model, "a")
    assert runtime.cast_rule_of(model.blocks[0].fc1) is None
    assert torch.equal(_run(model), before)


def test_two_loras_stack_and_strength_scales(ckpt):
    model = loaderkit.load(ckpt["path"], "bf16", model=TinyVideoDiT,
                           lora=[(ckpt["lora"], 0.5, "a"), (ckpt["lora"], 0.5, "b")])
    one = loaderkit.load(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[ckpt["lora"]], lora_mode="merge")
    half = loaderkit.load(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[(ckpt["lora"], 0.5)])
    assert _cos(_run(model), _run(one)) > 0.9999 > _cos(_run(half), _run(one))
    assert [lp.name for lp in loaderkit.plan_of(model).loras] == ["a", "b"]


def test_kohya_file_from_diffusers_converter_matches_peft(ckpt, tmp_path):
    """A kohya file made by diffusers' own peft -> kohya converter (alpha = rank, so strength 2
    gives peft's alpha / r = 2)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    sd = {"unet." + k.removeprefix("base_model.model."): v for k, v in ckpt["sd"].items()}
    kohya = convert_state_dict_to_kohya(sd)
    assert any(k.startswith("lora_unet_blocks_0_fc1.lora_down") for k in kohya)
    f = tmp_path / "kohya.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(f))
    plan = loaderkit.plan(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[(f, 2.0)])
    assert plan.loras[0].format == "kohya" and plan.loras[0].targets["blocks.0.fc1"].scale == 2.0
    got = _run(loaderkit.load(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[(f, 2.0)])).float()
    assert _cos(got, ckpt["want"]) > 0.99995


def test_diffusers_prefix_and_network_alpha(ckpt, tmp_path):
    """diffusers-style keys (``transformer.`` prefix, ``.alpha`` tensors, no adapter_config)."""
    sd = {"transformer." + k.removeprefix("base_model.model."): v for k, v in ckpt["sd"].items()}
    for k in list(sd):
        if k.endswith("lora_A.weight"):
            sd[k.replace("lora_A.weight", "alpha")] = torch.tensor(8.0)
    f = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(f))
    got = _run(loaderkit.load(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[f])).float()
    assert _cos(got, ckpt["want"]) > 0.99995


def test_rank_and_alpha_patterns_follow_peft(ckpt, tmp_path):
    """adapter_config.json's alpha_pattern is resolved as peft resolves it."""
    d = tmp_path / "pat"
    d.mkdir()
    save_file(ckpt["sd"], str(d / "adapter_model.safetensors"))
    cfg = json.loads((ckpt["dir"] / "style" / "adapter_config.json").read_text())
    cfg.update(alpha_pattern={"fc1": 2}, use_rslora=True)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    targets = loaderkit.plan(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[d / "adapter_model.safetensors"]).loras[0].targets
    assert targets["blocks.0.fc1"].scale == pytest.approx(2 / 2)  # alpha 2 / sqrt(4)
    assert targets["blocks.0.fc2"].scale == pytest.approx(8 / 2)


class _KeepHeadFp32:
    @loaderkit.hookimpl
    def loaderkit_model_facts(self, model):
        return ModelFacts(keep_fp32=("head",)) if isinstance(model, TinyVideoDiT) else None


@pytest.mark.parametrize("mode", ["cast", "merge"])
def test_fp32_kept_module(ckpt, mode):
    name = loaderkit.register(_KeepHeadFp32(), name="keep-head")
    try:
        model = loaderkit.load(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[ckpt["lora"]], lora_mode=mode)
    finally:
        loaderkit.unregister(name)
    assert model.head.weight.dtype == torch.float32
    assert loaderkit.plan_of(model).modules["head"].compute_dtype == "float32"
    assert _cos(_run(model), ckpt["want"]) > 0.9999
    if mode == "cast":
        assert runtime.cast_rule_of(model.head).compute_dtype == torch.float32


@pytest.mark.parametrize("mode", ["cast", "merge"])
def test_disk_offload(ckpt, mode, tmp_path):
    where = {"patch_embed": "cpu", "pos_embed": "cpu", "time_embed": "cpu", "blocks.0": "disk", "blocks.1": "disk",
             "blocks.2": "cpu", "blocks.3": "cpu", "norm_out": "cpu", "head": "cpu"}
    ref = _run(loaderkit.load(ckpt["path"], "fp8", model=TinyVideoDiT, lora=[ckpt["lora"]], lora_mode=mode))
    model = loaderkit.load(ckpt["path"], "fp8", model=TinyVideoDiT, lora=[ckpt["lora"]], lora_mode=mode,
                           device_map=where, offload_folder=tmp_path / "off")
    assert loaderkit.plan_of(model).modules["blocks.0.fc1"].offload == "disk"
    assert torch.equal(_run(model), ref)


# -- errors: all at plan time, listing everything, leaving the model as it was ------------------


def _write(tmp_path, name, tensors):
    f = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(f))
    return f


def test_unmatched_keys_are_all_listed_at_plan_time(ckpt, tmp_path):
    sd = dict(ckpt["sd"])
    sd["base_model.model.nope.lora_A.weight"] = torch.zeros(4, 8)
    sd["base_model.model.nope.lora_B.weight"] = torch.zeros(8, 4)
    sd["base_model.model.blocks.0.fc1.lora_magnitude_vector"] = torch.ones(512)
    f = _write(tmp_path, "bad.safetensors", sd)
    with pytest.raises(LoraError) as exc:
        loaderkit.plan(ckpt["path"], "fp8", model=TinyVideoDiT, lora=[f])
    msg = str(exc.value)
    for key in ("nope.lora_A.weight", "nope.lora_B.weight", "lora_magnitude_vector"):
        assert key in msg
    assert str(f) in msg and "matches no module" in msg


def test_shape_mismatch_is_refused_and_model_untouched(ckpt, tmp_path):
    sd = dict(ckpt["sd"])
    sd["base_model.model.blocks.0.fc1.lora_A.weight"] = torch.zeros(4, 7)
    sd["base_model.model.blocks.0.fc2.lora_B.weight"] = torch.zeros(3, 4)
    f = _write(tmp_path, "shape.safetensors", sd)
    with pytest.raises(LoraError, match=r"blocks\.0\.fc1: down \[4, 7\][\s\S]*blocks\.0\.fc2"):
        loaderkit.plan(ckpt["path"], "fp8", model=TinyVideoDiT, lora=[f])
    model = loaderkit.load(ckpt["path"], "fp8", model=TinyVideoDiT)
    before = _run(model)
    with pytest.raises(LoraError):
        loaderkit.add_lora(model, f)
    assert not runtime.cast_rule_of(model.blocks[0].fc1).deltas
    assert torch.equal(_run(model), before) and loaderkit.plan_of(model).loras == ()


def test_bad_files(ckpt, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="cannot read LoRA file"):
        loaderkit.plan(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[junk])
    with pytest.raises(LoraError, match="no LoRA format reads"):
        loaderkit.plan(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[_write(tmp_path, "x.safetensors", {"w": torch.zeros(2)})])
    with pytest.raises(LoraError, match="cannot read LoRA file"):
        loaderkit.plan(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[tmp_path / "missing.safetensors"])
    with pytest.raises(LoraError, match="list of LoRAs"):
        loaderkit.plan(ckpt["path"], "bf16", model=TinyVideoDiT, lora=str(ckpt["lora"]))
    with pytest.raises(LoraError, match="finite number"):
        loaderkit.plan(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[(ckpt["lora"], float("nan"))])
    with pytest.raises(LoraError, match="two LoRAs are named"):
        loaderkit.plan(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[ckpt["lora"], ckpt["lora"]])
    with pytest.raises(LoraError, match="unknown LoRA mode"):
        loaderkit.plan(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[ckpt["lora"]], lora_mode="fuse")


def test_nan_factor_fails_the_load_and_leaves_model_as_it_was(ckpt, tmp_path):
    sd = dict(ckpt["sd"])
    sd["base_model.model.blocks.2.fc1.lora_B.weight"] = torch.full_like(sd["base_model.model.blocks.2.fc1.lora_B.weight"], float("nan"))
    f = _write(tmp_path, "nan.safetensors", sd)
    user = TinyVideoDiT()
    params = {n: p for n, p in user.named_parameters()}
    for mode in ("cast", "merge"):
        with pytest.raises(LoraError, match="NaN"):
            loaderkit.load(ckpt["path"], "fp8", model=user, lora=[f], lora_mode=mode)
        assert all(p is params[n] for n, p in user.named_parameters())
        assert runtime.cast_rules(user) == {}


def test_remove_errors(ckpt):
    model = loaderkit.load(ckpt["path"], "fp8", model=TinyVideoDiT, lora=[(ckpt["lora"], 1.0, "m")], lora_mode="merge")
    with pytest.raises(LoraError, match="merged into the weights"):
        loaderkit.remove_lora(model, "m")
    with pytest.raises(LoraError, match="no LoRA named 'x'; it has: m"):
        loaderkit.remove_lora(model, "x")
    with pytest.raises(LoraError, match="already has a LoRA named 'm'"):
        loaderkit.add_lora(model, ckpt["lora"], name="m")


def test_add_lora_on_a_model_loaderkit_did_not_load(ckpt):
    model = TinyVideoDiT()
    model.load_state_dict(load_file(str(ckpt["path"])))
    model = model.to(torch.bfloat16).eval()
    before = _run(model, torch.bfloat16)
    loaderkit.add_lora(model, ckpt["lora"], name="s")
    assert _cos(_run(model, torch.bfloat16), ckpt["want"]) > 0.99995
    loaderkit.remove_lora(model, "s")
    assert torch.equal(_run(model, torch.bfloat16), before)


def test_tiny_llama_lora_from_peft_save_pretrained(tmp_path):
    """A transformers model built from config, its LoRA written by peft's save_pretrained."""
    transformers = pytest.importorskip("transformers")
    from tiny_configs import TINY_LLAMA

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).eval()
    base.save_pretrained(tmp_path / "llm")
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        want = pm.merge_and_unload().to(torch.bfloat16)(ids).logits.float()
    f = tmp_path / "adapter" / "adapter_model.safetensors"
    for strategy in ("bf16", "fp8"):
        model = loaderkit.load(tmp_path / "llm", strategy, lora=[f])
        assert len(loaderkit.plan_of(model).loras[0].targets) == 6
        with torch.no_grad():
            got = model(ids).logits.float()
        assert _cos(got, want) > (0.9999 if strategy == "bf16" else 0.999), strategy


# -- the hook --------------------------------------------------------------------------------------


class _Half(LoraFormat):
    name = "half-ab"
    priority = 100

    def claim(self, lora):
        return all(k.endswith((".A", ".B")) for k in lora.tensors)

    def read(self, lora, modules, scalar):
        pairs = tuple(LoraPair(module=k[:-2], down=k, up=k[:-2] + ".B", scale=0.5)
                      for k in lora.tensors if k.endswith(".A") and k[:-2] in modules)
        return LoraLayout(pairs=pairs)


class _HalfPlugin:
    @loaderkit.hookimpl
    def loaderkit_register_lora_formats(self, register):
        register(_Half())


def test_loaderkit_register_lora_formats_hook(ckpt, tmp_path):
    a, b = torch.randn(2, 512), torch.randn(128, 2) * 0.01
    f = _write(tmp_path, "ab.safetensors", {"blocks.0.fc2.A": a, "blocks.0.fc2.B": b})
    name = loaderkit.register(_HalfPlugin(), name="half-ab")
    try:
        plan = loaderkit.plan(ckpt["path"], "bf16", model=TinyVideoDiT, lora=[(f, 2.0)])
        lp = plan.loras[0]
        assert (lp.format, lp.plugin, lp.targets["blocks.0.fc2"].scale) == ("half-ab", "half-ab", 1.0)
        assert "lora ab" in plan.table() and "blocks.0.fc2: rank 2" in plan.table()
        merged = loaderkit.load(ckpt["path"], "fp32", model=TinyVideoDiT, lora=[(f, 2.0)], lora_mode="merge")
        w = load_file(str(ckpt["path"]))["blocks.0.fc2.weight"].float() + b @ a
        assert torch.allclose(merged.blocks[0].fc2.weight, w, atol=1e-6)
        with pytest.raises(loaderkit.PluginError, match="duplicate lora format name 'half-ab'"):
            loaderkit.register(_HalfPlugin(), name="half-ab-2")
    finally:
        loaderkit.unregister(name)


def test_merge_into_a_tied_weight_is_refused(tmp_path):
    """Merging into embed_tokens would change the tied lm_head too: refused, cast mode works."""
    transformers = pytest.importorskip("transformers")
    from tiny_configs import TINY_LLAMA

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA, tie_word_embeddings=True))
    base.save_pretrained(tmp_path / "llm")
    f = _write(tmp_path, "emb.safetensors", {"base_model.model.model.embed_tokens.lora_A.weight": torch.randn(2, 32),
                                             "base_model.model.model.embed_tokens.lora_B.weight": torch.randn(64, 2)})
    with pytest.raises(LoraError, match=r"tied weights too: model\.embed_tokens \(tied to lm_head\.weight\)"):
        loaderkit.plan(tmp_path / "llm", "bf16", lora=[f], lora_mode="merge")
    plan = loaderkit.plan(tmp_path / "llm", "bf16", lora=[f])
    assert list(plan.loras[0].targets) == ["model.embed_tokens"]


@pytest.mark.parametrize(("strategy", "value", "strength"), [("fp16", 1e6, 1.0), ("fp8", 3e38, 1e3)])
def test_merge_that_overflows_is_refused(ckpt, tmp_path, strategy, value, strength):
    """fp16 cannot hold the merged weight; for fp8 (fresh scales) only a float32 overflow can fail."""
    sd = dict(ckpt["sd"])
    sd["base_model.model.blocks.3.fc2.lora_B.weight"] = torch.full_like(sd["base_model.model.blocks.3.fc2.lora_B.weight"], value)
    f = _write(tmp_path, "huge.safetensors", sd)
    user = TinyVideoDiT()
    with pytest.raises(LoraError, match=r"into 'blocks\.3\.fc2\.weight' gives values .* cannot hold"):
        loaderkit.load(ckpt["path"], strategy, model=user, lora=[(f, strength)], lora_mode="merge")
    assert user.blocks[3].fc2.weight.dtype == torch.float32 and runtime.cast_rules(user) == {}


def test_resident_decoded_copy_is_not_changed_by_the_lora(ckpt):
    """With resident decoded copies the LoRA is added to a new tensor: removing it gives the
    original output, and the cached copy still equals the plain decode."""
    strategy = loaderkit.strategy("fp8", resident=True)
    plain = _run(loaderkit.load(ckpt["path"], strategy, model=TinyVideoDiT))
    model = loaderkit.load(ckpt["path"], strategy, model=TinyVideoDiT, lora=[(ckpt["lora"], 1.0, "s")])
    styled = _run(model)
    assert torch.equal(_run(model), styled)  # twice: the cached copy was not updated in place
    loaderkit.remove_lora(model, "s")
    assert torch.equal(_run(model), plain)


def test_plan_table_and_json_show_the_loras(ckpt):
    plan = loaderkit.plan(ckpt["path"], "fp8", model=TinyVideoDiT, lora=[(ckpt["lora"], 0.5, "style")], lora_mode="merge")
    text = plan.table()
    assert "lora style" in text and "mode merge" in text and "blocks.0.fc1: rank 4, scale 1" in text
    assert plan.to_dict()["loras"][0]["targets"]["patch_embed"]["rank"] == 4
    assert plan.tensors["blocks.0.fc1.weight"].conversion == "quantize"  # fp8: re-quantized
    assert plan.tensors["patch_embed.weight"].conversion == "cast"  # kept in bf16 by the fp8 strategy


def test_low_rank_that_does_not_fit_is_refused():
    lin = torch.nn.Linear(8, 4)
    bad = runtime.LowRank("x", "weight", torch.zeros(4, 2), torch.zeros(2, 7), 1.0)
    with pytest.raises(loaderkit.errors.CastRuleError, match=r"up \[4, 2\] and down \[2, 7\] do not make its shape \[4, 8\]"):
        runtime.add_low_rank(lin, bad)
    assert runtime.cast_rule_of(lin) is None
    good = runtime.add_low_rank(lin, runtime.LowRank("y", "weight", torch.ones(4, 2), torch.ones(2, 8), 0.5))
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(lin(x), x @ (lin.weight + 1.0).T + lin.bias)
    assert good.for_deltas and runtime.remove_low_rank(lin, "y") and runtime.cast_rule_of(lin) is None
