"""fp8 where the bytes are, and a model that tells the truth about its dtype: ``model.dtype``
reports the compute dtype, entry points other than ``forward`` get their inputs cast, heads are
skipped only outside the repeated blocks, GPT-2's Conv1D is a linear layer, VAEs stay in the
compute dtype unless asked, library skips can be overridden, and the plan says what each skip
rule keeps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loaderkit

from conftest import save_st, seeded

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

BF16 = torch.bfloat16
E4M3 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    cfg = transformers.WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     num_mel_bins=16, max_source_positions=8, max_target_positions=16, vocab_size=64,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("whisper")
    transformers.WhisperForConditionalGeneration(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae")
    diffusers.AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=4).save_pretrained(path)
    return path


def test_model_dtype_reports_the_compute_dtype_after_an_fp8_load(whisper):
    model = loaderkit.load(whisper, "fp8")
    assert model.dtype == BF16
    first = next(n for n, p in model.named_parameters() if p.is_floating_point()).rpartition(".")[0]
    plan = loaderkit.plan_of(model)
    assert plan.modules[first].storage["weight"] == "bfloat16" and "model.dtype" in plan.modules[first].reason
    assert any(lkp_fp8(m) for m in plan.modules.values())


def lkp_fp8(m) -> bool:
    return m.storage.get("weight") == "float8_e4m3fn"


def test_whisper_encoder_called_directly_gets_its_inputs_cast(whisper):
    model = loaderkit.load(whisper, "fp8")
    features = torch.randn(1, 16, 16)  # float32, as a feature extractor returns them
    encoder = model.get_encoder()
    with torch.no_grad():
        out = encoder(features).last_hidden_state  # what generate() does, bypassing model.forward
        also = encoder(features.to(model.dtype)).last_hidden_state
    assert out.dtype == BF16 and torch.equal(out, also)


def test_vae_decode_and_encode_take_float32_and_the_vae_stays_bf16(vae):
    model = loaderkit.load(vae, "fp8")
    plan = loaderkit.plan_of(model)
    assert not any(lkp_fp8(m) for m in plan.modules.values())
    whole = [d for d in plan.decisions if d.subject == "whole model"]
    assert whole and "is a VAE" in whole[0].reason and "quantize_sensitive=True" in whole[0].reason
    assert model.dtype == BF16
    latents = torch.randn(1, 4, 8, 8)  # float32
    with torch.no_grad():
        image = model.decode(latents).sample
        posterior = model.encode(torch.randn(1, 3, 16, 16)).latent_dist.mean
    assert image.dtype == BF16 and posterior.dtype == BF16
    ref = diffusers.AutoencoderKL.from_pretrained(vae, torch_dtype=BF16)
    with torch.no_grad():
        assert torch.equal(image, ref.decode(latents.to(BF16)).sample)


def test_a_vae_is_quantized_when_asked(vae):
    plan = loaderkit.plan(vae, loaderkit.strategy("fp8", quantize_sensitive=True))
    assert any(lkp_fp8(m) for m in plan.modules.values())


class FluxLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.single_transformer_blocks = nn.ModuleList(nn.ModuleDict({"proj_out": nn.Linear(32, 32)}) for _ in range(2))
        self.proj_out = nn.Linear(32, 8)


def test_heads_are_skipped_only_outside_the_repeated_blocks(tmp_path):
    path = save_st(tmp_path / "flux.safetensors", seeded(FluxLike))
    plan = loaderkit.plan(path, "fp8", model=FluxLike)
    assert plan.modules["proj_out"].storage["weight"] == "bfloat16"
    assert plan.modules["single_transformer_blocks.0.proj_out"].storage["weight"] == "float8_e4m3fn"


def test_gpt2_conv1d_is_stored_in_fp8_and_runs(tmp_path):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    plan = loaderkit.plan(tmp_path / "gpt2", "fp8")
    c_attn = plan.modules["transformer.h.0.attn.c_attn"]
    assert c_attn.type == "Conv1D" and c_attn.storage["weight"] == "float8_e4m3fn" and c_attn.cast
    model = loaderkit.load(tmp_path / "gpt2", "fp8")
    ids = torch.tensor([[1, 5, 9, 3]])
    assert loaderkit.verify(model, ids).ok
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    with torch.no_grad():
        a, b = model(ids).logits.float().flatten(), ref(ids).logits.flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("flux")
    diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                     pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).save_pretrained(path)
    return path


def test_library_skips_are_reported_with_their_bytes_and_can_be_overridden(flux):
    plan = loaderkit.plan(flux, "fp8")
    norm = plan.modules["transformer_blocks.0.norm1.linear"]
    assert norm.storage["weight"] == "bfloat16" and "library_skips=False" in norm.reason
    kept = [d for d in plan.decisions if d.subject == "kept in compute dtype"]
    assert any("never stores it in low precision" in d.reason and "bytes" in d.choice for d in kept)
    override = loaderkit.plan(flux, loaderkit.strategy("fp8", library_skips=False))
    assert override.modules["transformer_blocks.0.norm1.linear"].storage["weight"] == "float8_e4m3fn"
    fp8_bytes = lambda p: p.bytes_per_dtype().get("float8_e4m3fn", 0)  # noqa: E731
    assert fp8_bytes(override) > fp8_bytes(plan)
    assert any(d.subject == "library skips" for d in override.decisions)
