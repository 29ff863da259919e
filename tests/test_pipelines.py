"""Whole pipelines: diffusers pipeline directories written by ``save_pretrained``, loaded by
``loaderkit.load_pipeline`` and compared with ``DiffusionPipeline.from_pretrained``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import loaderkit  # noqa: E402
from loaderkit.plugin import Assembler, Component, PipelinePlan  # noqa: E402
from loaderkit.errors import (  # noqa: E402
    CheckpointError,
    PlanError,
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
    UsageError,
)

from loaderkit import demo_pipeline as tp  # noqa: E402

KINDS = ("flux", "wan")
#: fp8 storage against the bf16 pipeline: images in [0, 1] after two steps. Measured: at most
#: 0.010 (flux) and 0.020 (wan).
FP8_BOUND = 0.06


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {k: tp.save_pipeline(k, root / k) for k in KINDS}


@pytest.fixture(scope="module")
def reference(saved):
    from diffusers import DiffusionPipeline

    return {k: tp.run(DiffusionPipeline.from_pretrained(saved[k], dtype=torch.bfloat16), k) for k in KINDS}


def _fp8_params(model: torch.nn.Module) -> int:
    return sum(p.dtype == torch.float8_e4m3fn for p in model.parameters())


# -- the plan --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_plan_covers_every_component(saved, kind):
    p = loaderkit.plan_pipeline(saved[kind], "fp8")
    index = json.loads((saved[kind] / "model_index.json").read_text())
    named = {k for k, v in index.items() if isinstance(v, list) and v[0] is not None}
    assert {n for n, c in p.components.items() if c.component.class_name} == named
    models = p.models()
    assert {"transformer", "vae", "text_encoder"} <= set(models)
    assert p.components["scheduler"].plan is None  # the library loads it
    assert models["transformer"].bytes_per_dtype().get("float8_e4m3fn", 0) > 0
    # the VAE is kept in its compute dtype under fp8, and its plan says why
    assert set(models["vae"].bytes_per_dtype()) == {"bfloat16"}
    assert any("VAE" in d.reason for d in models["vae"].decisions)
    flows = {(f.producer, f.consumer): f for f in p.flows}
    assert ("transformer", "vae") in flows and ("text_encoder", "transformer") in flows
    assert all(f.action == "none" and f.produced == "bfloat16" for f in p.flows)
    text = str(p)
    assert "boundaries" in text and "== transformer ==" in text and "loaded by their libraries" in text
    json.dumps(p.to_dict())  # JSON-friendly


def test_per_component_strategies_and_a_recorded_boundary_cast(saved):
    p = loaderkit.plan_pipeline(saved["wan"], {"transformer": "fp8", "text_encoder": "fp32"})
    assert p.components["text_encoder"].strategy == "fp32"
    assert p.components["transformer"].strategy == "fp8"
    assert p.components["vae"].strategy not in ("fp8", "fp32")  # not named: auto
    flow = next(f for f in p.flows if f.producer == "text_encoder")
    assert (flow.produced, flow.expected, flow.action) == ("float32", "bfloat16", "cast")
    with pytest.raises(PlanError, match=r"'text_encoder' computes in float32 .*'transformer'"):
        loaderkit.plan_pipeline(saved["wan"], {"transformer": "fp8", "text_encoder": "fp32"}, cast_inputs=False)


def test_unknown_component_in_the_strategy_mapping(saved):
    with pytest.raises(UsageError, match=r"'unet'.*its models are: text_encoder, transformer, vae"):
        loaderkit.plan_pipeline(saved["wan"], {"unet": "fp8"})


def test_not_a_pipeline_directory(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(UnsupportedCheckpointError, match="model_index.json"):
        loaderkit.plan_pipeline(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        loaderkit.plan_pipeline(tmp_path / "missing")


def test_missing_component_directory(saved, tmp_path):
    broken = shutil.copytree(saved["wan"], tmp_path / "wan")
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match=r"component 'vae'.*incomplete"):
        loaderkit.plan_pipeline(broken)


def test_component_linked_outside_is_refused(saved, tmp_path):
    broken = shutil.copytree(saved["wan"], tmp_path / "wan")
    outside = shutil.copytree(broken / "vae", tmp_path / "elsewhere")
    shutil.rmtree(broken / "vae")
    (broken / "vae").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeCheckpointError, match="outside"):
        loaderkit.plan_pipeline(broken)


def test_a_broken_component_is_named(saved, tmp_path):
    broken = shutil.copytree(saved["wan"], tmp_path / "wan")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match=r"pipeline component 'transformer' \(WanTransformer3DModel\)"):
        loaderkit.load_pipeline(broken, "bf16")


# -- loading and running ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_pipeline_equals_diffusers_bitwise(saved, reference, kind):
    pipe = loaderkit.load_pipeline(saved[kind], "bf16")
    assert type(pipe).__name__ == json.loads((saved[kind] / "model_index.json").read_text())["_class_name"]
    assert torch.equal(tp.run(pipe, kind), reference[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_fp8_pipeline_runs_verified_and_close_to_bf16(saved, reference, kind):
    pipe = loaderkit.load_pipeline(saved[kind], "fp8")
    pplan = loaderkit.plan_of(pipe)
    assert isinstance(pplan, PipelinePlan)
    for name in pplan.models():
        model = getattr(pipe, name)
        assert loaderkit.verify(model).ok, name
        assert model.dtype == torch.bfloat16, name  # what the pipeline casts activations to
    assert _fp8_params(pipe.transformer) > 0 and _fp8_params(pipe.text_encoder) > 0
    assert _fp8_params(pipe.vae) == 0
    out = tp.run(pipe, kind)
    err = (out - reference[kind]).abs().max().item()
    assert 0 < err <= FP8_BOUND, err  # not bitwise (fp8 is lossy), but close


def test_mixed_compute_dtypes_run(saved, reference):
    pipe = loaderkit.load_pipeline(saved["wan"], {"transformer": "bf16", "text_encoder": "fp32", "vae": "bf16"})
    assert pipe.text_encoder.dtype == torch.float32
    out = tp.run(pipe, "wan")
    assert (out - reference["wan"]).abs().max().item() <= FP8_BOUND


# -- placement -------------------------------------------------------------------------------------


def _sizes(saved, kind="wan", strategy="bf16"):
    return {n: c.nbytes for n, c in loaderkit.plan_pipeline(saved[kind], strategy).components.items() if c.plan}


def test_budget_decides_resident_or_model_offload(saved):
    sizes = _sizes(saved)
    total, largest = sum(sizes.values()), max(sizes.values())
    assert loaderkit.plan_pipeline(saved["wan"], "bf16", max_memory={"cpu": total}).offload == "none"
    p = loaderkit.plan_pipeline(saved["wan"], "bf16", max_memory={"cpu": largest})
    assert p.offload == "model" and "each fits alone" in p.reason
    assert p.order == ("text_encoder", "transformer", "vae")  # WanPipeline.model_cpu_offload_seq
    assert set(p.bytes_per_device()) == {"cpu"} and sum(p.bytes_per_device().values()) == total
    with pytest.raises(PlanError, match=r"model 'transformer' alone needs"):
        loaderkit.plan_pipeline(saved["wan"], "bf16", max_memory={"cpu": largest - 1})
    with pytest.raises(PlanError, match=r"over the budget.*offload='model'"):
        loaderkit.plan_pipeline(saved["wan"], "bf16", max_memory={"cpu": largest}, offload="none")
    with pytest.raises(UsageError, match="offload="):
        loaderkit.plan_pipeline(saved["wan"], offload="sequential")
    with pytest.raises(UsageError, match="not a size"):
        loaderkit.plan_pipeline(saved["wan"], max_memory={"cpu": "lots"})


def test_fp8_sizes_let_more_fit(saved):
    bf16, fp8 = sum(_sizes(saved, "flux").values()), sum(_sizes(saved, "flux", "fp8").values())
    assert fp8 < bf16
    assert loaderkit.plan_pipeline(saved["flux"], "fp8", max_memory={"cpu": fp8}).offload == "none"
    assert loaderkit.plan_pipeline(saved["flux"], "bf16", max_memory={"cpu": fp8}).offload == "model"


def _offload_hook(model):
    from accelerate.hooks import CpuOffload, SequentialHook

    hook = getattr(model, "_hf_hook", None)
    return next((h for h in (hook.hooks if isinstance(hook, SequentialHook) else (hook,)) if isinstance(h, CpuOffload)),
                None)


def test_model_offload_keeps_cast_rules_and_output(saved):
    resident = tp.run(loaderkit.load_pipeline(saved["wan"], "fp8"), "wan")
    pipe = loaderkit.load_pipeline(saved["wan"], "fp8", offload="model")
    assert loaderkit.plan_of(pipe).offload == "model"
    # diffusers' own model offload, in WanPipeline.model_cpu_offload_seq
    assert [h.model for h in pipe._all_hooks] == [pipe.text_encoder, pipe.transformer, pipe.vae]
    for _ in range(2):  # after each call diffusers removes every hook and offloads again
        assert torch.equal(tp.run(pipe, "wan"), resident)
        assert all(_offload_hook(getattr(pipe, n)) is not None for n in ("text_encoder", "transformer", "vae"))
        assert all(loaderkit.verify(getattr(pipe, n)).ok for n in ("text_encoder", "transformer", "vae"))


def test_the_librarys_own_offload_switches_keep_cast_rules(saved):
    """diffusers' enable_model_cpu_offload removes every accelerate hook of every component
    (recursively) before adding its own: on a loaderkit pipeline it leaves the cast rules."""
    resident = tp.run(loaderkit.load_pipeline(saved["wan"], "fp8"), "wan")
    pipe = loaderkit.load_pipeline(saved["wan"], "fp8")
    pipe.enable_model_cpu_offload(device="cpu")
    for _ in range(2):
        assert torch.equal(tp.run(pipe, "wan"), resident)
    pipe.remove_all_hooks()
    assert _offload_hook(pipe.transformer) is None and loaderkit.verify(pipe.transformer).ok
    assert torch.equal(tp.run(pipe, "wan"), resident)
    # accelerate's per-module offload would replace the cast rules: refused, with what to do
    with pytest.raises(UsageError, match=r"cast rules in text_encoder, transformer.*offload='model'"):
        pipe.enable_sequential_cpu_offload(device="cpu")
    assert torch.equal(tp.run(pipe, "wan"), resident)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_offload_onto_a_gpu(saved):
    pipe = loaderkit.load_pipeline(saved["flux"], "fp8", device="cuda:0", offload="model")
    assert pipe.transformer.device.type == "cpu"
    out = tp.run(pipe, "flux")
    resident = tp.run(loaderkit.load_pipeline(saved["flux"], "fp8", device="cuda:0"), "flux")
    assert (out - resident).abs().max().item() == 0


# -- the assembler hook ----------------------------------------------------------------------------


class _Pair(torch.nn.Module):
    pass


class _MiniAssembler(Assembler):
    """A third-party assembler: a directory with ``pair.json`` naming one diffusers model."""

    name = "mini"

    def can_assemble(self, path):
        return (path / "pair.json").is_file()

    def components(self, path):
        return (Component(name="model", library="diffusers", class_name="WanTransformer3DModel",
                          directory=str(path / "transformer"), weights=True, role="denoiser"),)

    def load_component(self, path, component):  # pragma: no cover - no such components here
        raise AssertionError

    def assemble(self, path, parts):
        pair = _Pair()
        pair.model = parts["model"]
        return pair


def test_loaderkit_register_assemblers_hook(saved, tmp_path):
    root = tmp_path / "mini"
    shutil.copytree(saved["wan"] / "transformer", root / "transformer")
    (root / "pair.json").write_text("{}")

    class Plugin:
        @loaderkit.hookimpl
        def loaderkit_register_assemblers(self, register):
            register(_MiniAssembler())

    mgr = loaderkit.plugin.PluginManager(autoload=False)
    mgr.register(Plugin(), name="mini-plugin")
    p = loaderkit.plan_pipeline(root, "bf16", manager=mgr)
    assert p.assembler == "mini" and list(p.models()) == ["model"]
    pair = loaderkit.load_pipeline(root, "bf16", manager=mgr)
    assert isinstance(pair, _Pair) and loaderkit.verify(pair.model).ok
    assert loaderkit.plan_of(pair) is not None
    # an assembler without a library offload: loaderkit chains accelerate's cpu_offload_with_hook
    pair = loaderkit.load_pipeline(root, "fp8", manager=mgr, offload="model")
    assert _offload_hook(pair.model) is not None and loaderkit.verify(pair.model).ok

    class Bad:
        @loaderkit.hookimpl
        def loaderkit_register_assemblers(self, register):
            register(object())

    mgr = loaderkit.plugin.PluginManager(autoload=False)
    with pytest.raises(loaderkit.PluginError, match=r"bad-plugin.*loaderkit.plugin.Assembler"):
        mgr.register(Bad(), name="bad-plugin")


# -- the command line ------------------------------------------------------------------------------


def test_cli_plan_and_inspect_a_pipeline(saved, capsys):
    from loaderkit.cli import main

    assert main(["plan", str(saved["wan"]), "-s", "fp8", "--component", "text_encoder=fp32"]) == 0
    out = capsys.readouterr().out
    assert "WanPipeline" in out and "cast to bfloat16 by transformer's input cast" in out
    assert main(["plan", str(saved["wan"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data["components"]) >= {"transformer", "vae", "scheduler"}
    assert main(["inspect", str(saved["flux"])]) == 0
    out = capsys.readouterr().out
    assert "FluxTransformer2DModel" in out and "loaded by its library" in out
    assert main(["plan", str(saved["wan"]), "--component", "nope"]) == 1
    assert "NAME=VALUE" in capsys.readouterr().err


def test_input_cast_leaves_timesteps_in_float32(saved):
    """``load``'s root input cast casts latents and embeddings, not 0-d/1-d tensors: diffusers
    pipelines pass float32 timesteps on purpose (999 in bf16 is 1000)."""
    from diffusers import WanTransformer3DModel

    path = saved["wan"] / "transformer"
    ours = loaderkit.load(path, "bf16")  # cast_inputs=True
    theirs = WanTransformer3DModel.from_pretrained(path, dtype=torch.bfloat16)
    torch.manual_seed(0)
    latents, text = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 6, 32)
    t = torch.tensor([999.0])
    with torch.no_grad():
        a = ours(latents, t, text).sample  # float32 activations, cast at the entry
        b = theirs(latents.bfloat16(), t, text.bfloat16()).sample
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_components_loaded_by_hand_join_the_plan(saved):
    from diffusers import AutoencoderKLWan

    resident = tp.run(loaderkit.load_pipeline(saved["wan"], "fp8"), "wan")
    transformer = loaderkit.load(saved["wan"] / "transformer", "fp8")
    p = loaderkit.plan_pipeline(saved["wan"], "fp8", components={"transformer": transformer})
    c = p.components["transformer"]
    assert c.given and c.strategy == "given" and c.plan is loaderkit.plan_of(transformer)
    assert c.nbytes == sum(t.nbytes for t in c.plan.tensors.values())
    pipe = loaderkit.load_pipeline(saved["wan"], "fp8", components={"transformer": transformer})
    assert pipe.transformer is transformer
    assert torch.equal(tp.run(pipe, "wan"), resident)
    # a model loaderkit did not load: used as it is, sized by its tensors, no plan
    vae = AutoencoderKLWan.from_pretrained(saved["wan"] / "vae", dtype=torch.bfloat16)
    p = loaderkit.plan_pipeline(saved["wan"], "fp8", components={"vae": vae})
    assert p.components["vae"].plan is None and p.components["vae"].nbytes == sum(
        t.numel() * t.element_size() for t in (*vae.parameters(), *vae.buffers()))
    assert not any(f.consumer == "vae" for f in p.flows)
    with pytest.raises(UsageError, match=r"'unet'.*its components are"):
        loaderkit.plan_pipeline(saved["wan"], components={"unet": vae})


def test_a_given_component_must_cast_a_mismatched_boundary(saved):
    transformer = loaderkit.load(saved["wan"] / "transformer", "bf16", cast_inputs=False)
    with pytest.raises(PlanError, match=r"'transformer' was given without an input cast"):
        loaderkit.plan_pipeline(saved["wan"], {"text_encoder": "fp32"}, components={"transformer": transformer})
    transformer = loaderkit.load(saved["wan"] / "transformer", "bf16")  # cast_inputs=True
    p = loaderkit.plan_pipeline(saved["wan"], {"text_encoder": "fp32"}, components={"transformer": transformer})
    assert next(f for f in p.flows if f.consumer == "transformer").action == "cast"


def test_a_comfy_fp8_single_file_transformer_in_a_pipeline(saved, reference, tmp_path):
    """The DiffSynth / ComfyUI way: the transformer from a ComfyUI scaled-fp8 file in the
    original layout (``model.diffusion_model.`` keys), the rest from the pipeline directory."""
    from safetensors.torch import load_file, save_file

    import single_file_writers as writers
    from diffusers import WanTransformer3DModel
    from loaderkit.plugins import diffusers_single_file as single_file

    tdir = saved["wan"] / "transformer"
    state = load_file(str(tdir / "diffusion_pytorch_model.safetensors"))
    path = tmp_path / "wan_t2v_fp8_scaled.safetensors"
    save_file({k: v.contiguous() for k, v in writers.comfy_scaled_fp8(writers.wan_original(state)).items()}, str(path))
    transformer = loaderkit.load(path, "fp8", model=single_file.model(WanTransformer3DModel, tdir))
    assert sum(p.dtype == torch.float8_e4m3fn for p in transformer.parameters()) > 0
    pipe = loaderkit.load_pipeline(saved["wan"], "fp8", components={"transformer": transformer})
    pplan = loaderkit.plan_of(pipe)
    assert pplan.components["transformer"].given and pplan.components["transformer"].plan.key_conversions()
    assert all(loaderkit.verify(getattr(pipe, n)).ok for n in ("text_encoder", "transformer", "vae"))
    err = (tp.run(pipe, "wan") - reference["wan"]).abs().max().item()
    assert err <= FP8_BOUND, err


def test_a_lora_on_an_fp8_pipeline_transformer_swaps_without_reloading(saved, tmp_path):
    """A peft LoRA of the transformer (written by peft's save_pretrained), added at cast time to
    the fp8 transformer of a loaded pipeline: the generation matches diffusers' bf16 pipeline with
    the LoRA merged by peft, and removing it restores the pipeline's own output bitwise."""
    import copy

    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model

    pipe = loaderkit.load_pipeline(saved["wan"], "fp8")
    before = tp.run(pipe, "wan")
    ref = DiffusionPipeline.from_pretrained(saved["wan"], dtype=torch.bfloat16)
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(ref.transformer.float()),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "ffn.net.2"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "style")
    ref.transformer = peft_model.merge_and_unload().to(torch.bfloat16)
    want = tp.run(ref, "wan")
    lora = loaderkit.add_lora(pipe.transformer, tmp_path / "style" / "adapter_model.safetensors", name="style")
    assert lora.targets and all(t.module.endswith(("to_q", "to_v", "ffn.net.2")) for t in lora.targets.values())
    with_lora = tp.run(pipe, "wan")
    assert (with_lora - before).abs().max().item() > 2 * FP8_BOUND / 3  # the LoRA does something
    assert (with_lora - want).abs().max().item() <= FP8_BOUND
    loaderkit.remove_lora(pipe.transformer, "style")
    assert torch.equal(tp.run(pipe, "wan"), before)


def test_a_kohya_flux_lora_in_the_original_naming(saved, tmp_path):
    """A kohya/ComfyUI Flux LoRA in Black Forest Labs' naming (``lora_unet_double_blocks_0_...``,
    fused ``qkv`` factors, ``alpha``): converted by diffusers' own converter, it matches
    ``FluxPipeline.load_lora_weights`` on diffusers' bf16 pipeline."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    pipe = loaderkit.load_pipeline(saved["flux"], "fp8")
    attn = pipe.transformer.transformer_blocks[0].attn
    hidden, rank = attn.to_q.in_features, 4
    qkv = sum(m.out_features for m in (attn.to_q, attn.to_k, attn.to_v))
    gen = torch.Generator().manual_seed(0)
    factors = {"img_attn_qkv": (hidden, qkv), "img_attn_proj": (attn.to_out[0].in_features, attn.to_out[0].out_features)}
    lora = {}
    for stem, (d_in, d_out) in factors.items():
        key = f"lora_unet_double_blocks_0_{stem}"
        lora[f"{key}.lora_down.weight"] = torch.randn(rank, d_in, generator=gen) * 0.3
        lora[f"{key}.lora_up.weight"] = torch.randn(d_out, rank, generator=gen) * 0.3
        lora[f"{key}.alpha"] = torch.tensor(float(rank) * 2)
    path = tmp_path / "style.safetensors"
    save_file(lora, str(path))

    before = tp.run(pipe, "flux")
    planned = loaderkit.add_lora(pipe.transformer, path, name="style")
    assert planned.derived and planned.format == "kohya"
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
            "transformer_blocks.0.attn.to_out.0"} <= set(planned.targets)
    ours = tp.run(pipe, "flux")
    ref = DiffusionPipeline.from_pretrained(saved["flux"], dtype=torch.bfloat16)
    ref.load_lora_weights(str(path))
    want = tp.run(ref, "flux")
    assert (ours - before).abs().max().item() > 0.05  # the LoRA does something
    assert (ours - want).abs().max().item() <= FP8_BOUND
    loaderkit.remove_lora(pipe.transformer, "style")
    assert torch.equal(tp.run(pipe, "flux"), before)
    # merged at load instead: the converted factors are merged and re-quantized per channel
    merged = loaderkit.load(saved["flux"] / "transformer", "fp8", lora=[path], lora_mode="merge")
    assert loaderkit.plan_of(merged).loras[0].derived
    pipe = loaderkit.load_pipeline(saved["flux"], "fp8", components={"transformer": merged})
    assert (tp.run(pipe, "flux") - want).abs().max().item() <= FP8_BOUND
    # a kohya file neither in the model's names nor a layout diffusers converts: every key listed
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4), "lora_unet_nowhere.lora_up.weight": torch.zeros(4, 2)},
              str(tmp_path / "bad.safetensors"))
    with pytest.raises(loaderkit.errors.LoraError, match="lora_unet_nowhere"):
        loaderkit.add_lora(pipe.transformer, tmp_path / "bad.safetensors")
