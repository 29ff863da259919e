"""Conformance over real architectures: tiny random models saved by their own library's
``save_pretrained`` and loaded back by loaderkit from config.json alone.

For every architecture in ``SPECS``:

- ``fp32`` and ``bf16`` give exactly what the library's own ``from_pretrained`` gives (same keys,
  dtypes and values in the state dict, and bit-identical outputs on a fixed input);
- ``fp8`` loads, ``loaderkit.verify`` with example inputs is ok, the forward runs, its output is
  close (cosine) to the fp32 ``from_pretrained`` output, and the plan stores some bytes in fp8.

Architectures that do not pass yet are not in ``SPECS``; they are listed in ``NOT_YET`` with the
error they fail with (documentation for the library developers, not a test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import loaderkit

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

#: architectures that fail under loaderkit today: name -> the error (see the module docstring).
NOT_YET: dict[str, str] = {}


# -- inputs -----------------------------------------------------------------------------------------

IDS = torch.tensor([[1, 5, 9, 2, 33, 17, 7, 4]])
DEC_IDS = torch.tensor([[2, 11, 6, 40]])


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def lm_inputs() -> dict:
    return dict(input_ids=IDS)


def seq2seq_inputs() -> dict:
    return dict(input_ids=IDS, decoder_input_ids=DEC_IDS)


def image_inputs(size: int = 32) -> Callable[[], dict]:
    return lambda: dict(pixel_values=_randn(1, 3, size, size))


# -- specs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    lib: str  # "transformers" or "diffusers"
    cls: str  # the class saved (its name goes into config.json)
    make: Callable[[], Any]  # transformers: a config; diffusers: the constructor's kwargs
    inputs: Callable[[], dict]
    cos: float = 0.99  # fp8 cosine bound against the fp32 output
    fp8_stored: bool = True  # whether the fp8 plan stores any bytes in fp8


def tf(cls: str, config: str, inputs: Callable[[], dict] = lm_inputs, cos: float = 0.99, **kw: Any) -> Spec:
    def make() -> Any:
        return getattr(transformers, config)(**kw)

    return Spec("transformers", cls, make, inputs, cos)


def df(cls: str, inputs: Callable[[], dict], cos: float = 0.99, fp8_stored: bool = True, **kw: Any) -> Spec:
    return Spec("diffusers", cls, lambda: kw, inputs, cos, fp8_stored)


LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          vocab_size=96, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
ENC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
           max_position_embeddings=64, pad_token_id=0)
SEQ2SEQ = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=96, max_position_embeddings=64, pad_token_id=0,
               bos_token_id=1, eos_token_id=2, decoder_start_token_id=2)


def whisper_inputs() -> dict:
    return dict(input_features=_randn(1, 16, 32), decoder_input_ids=DEC_IDS)


def wav2vec2_inputs() -> dict:
    return dict(input_values=_randn(1, 400))


def llava_inputs() -> dict:
    ids = torch.tensor([[1, 95, 95, 95, 95, 9, 33, 7]])  # 4 image tokens: (16 / 8) ** 2 patches
    return dict(input_ids=ids, pixel_values=_randn(1, 3, 16, 16))


def llava_config() -> Any:
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=16, patch_size=8, projection_dim=32)
    text = transformers.LlamaConfig(**LM)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=95,
                                    projector_hidden_act="gelu", vision_feature_layer=-1)


SPECS: dict[str, Spec] = {
    # decoder LMs, dense
    "llama": tf("LlamaForCausalLM", "LlamaConfig", **LM),
    "mistral": tf("MistralForCausalLM", "MistralConfig", **LM),
    "qwen2": tf("Qwen2ForCausalLM", "Qwen2Config", **LM),
    "qwen3": tf("Qwen3ForCausalLM", "Qwen3Config", head_dim=8, **LM),
    "gemma": tf("GemmaForCausalLM", "GemmaConfig", head_dim=8, **LM),
    "gemma2": tf("Gemma2ForCausalLM", "Gemma2Config", head_dim=8, **LM),
    "phi": tf("PhiForCausalLM", "PhiConfig", **LM),
    "phi3": tf("Phi3ForCausalLM", "Phi3Config", **LM),
    "olmo2": tf("Olmo2ForCausalLM", "Olmo2Config", **LM),
    "starcoder2": tf("Starcoder2ForCausalLM", "Starcoder2Config", **LM),
    "stablelm": tf("StableLmForCausalLM", "StableLmConfig", **LM),
    "gemma3_text": tf("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=8, sliding_window=4, **LM),
    "cohere": tf("CohereForCausalLM", "CohereConfig", **LM),
    "granite": tf("GraniteForCausalLM", "GraniteConfig", **LM),
    "gptj": tf("GPTJForCausalLM", "GPTJConfig", n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4,
               vocab_size=96, bos_token_id=1, eos_token_id=2),
    "bloom": tf("BloomForCausalLM", "BloomConfig", hidden_size=32, n_layer=2, n_head=4, vocab_size=96,
                pad_token_id=0),
    "gpt2": tf("GPT2LMHeadModel", "GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=96,
               bos_token_id=1, eos_token_id=2),
    "gpt_neox": tf("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, vocab_size=96, max_position_embeddings=64),
    "opt": tf("OPTForCausalLM", "OPTConfig", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
              word_embed_proj_dim=32, vocab_size=96, max_position_embeddings=64, pad_token_id=0),
    "falcon": tf("FalconForCausalLM", "FalconConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=96),
    # decoder LMs, MoE
    "mixtral": tf("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2, **LM),
    "qwen2_moe": tf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", shared_expert_intermediate_size=32, **MOE, **LM),
    "qwen3_moe": tf("Qwen3MoeForCausalLM", "Qwen3MoeConfig", head_dim=8, **MOE, **LM),
    "olmoe": tf("OlmoeForCausalLM", "OlmoeConfig", num_experts=4, num_experts_per_tok=2, **LM),
    "deepseek_v3": tf("DeepseekV3ForCausalLM", "DeepseekV3Config", n_routed_experts=4, n_shared_experts=1,
                      num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
                      topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                      v_head_dim=8, **{**LM, "num_key_value_heads": 4}),
    "gpt_oss": tf("GptOssForCausalLM", "GptOssConfig", num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                  sliding_window=4, **LM),
    # encoders
    "bert": tf("BertModel", "BertConfig", **ENC),
    "roberta": tf("RobertaModel", "RobertaConfig", **{**ENC, "pad_token_id": 3, "max_position_embeddings": 72}),
    "distilbert": tf("DistilBertModel", "DistilBertConfig", dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                     vocab_size=96, max_position_embeddings=64, pad_token_id=0),
    "deberta_v2": tf("DebertaV2Model", "DebertaV2Config", **ENC),
    "electra": tf("ElectraModel", "ElectraConfig", embedding_size=16, **ENC),
    "albert": tf("AlbertModel", "AlbertConfig", embedding_size=16, **ENC),
    "modernbert": tf("ModernBertModel", "ModernBertConfig", **{**ENC, "global_attn_every_n_layers": 2,
                                                                 "local_attention": 4}),
    # encoder-decoders
    "t5": tf("T5ForConditionalGeneration", "T5Config", seq2seq_inputs, d_model=32, d_kv=8, d_ff=64, num_layers=1,
             num_heads=4, vocab_size=96, pad_token_id=0, decoder_start_token_id=0),
    "bart": tf("BartForConditionalGeneration", "BartConfig", seq2seq_inputs, **SEQ2SEQ),
    "pegasus": tf("PegasusForConditionalGeneration", "PegasusConfig", seq2seq_inputs, **SEQ2SEQ),
    # Marian's sinusoidal position tables are left out by save_pretrained; the library initializes them
    "marian": tf("MarianMTModel", "MarianConfig", seq2seq_inputs, **SEQ2SEQ),
    # vision
    "vit": tf("ViTModel", "ViTConfig", image_inputs(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=32, patch_size=8),
    "deit": tf("DeiTModel", "DeiTConfig", image_inputs(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, image_size=32, patch_size=8),
    "swin": tf("SwinModel", "SwinConfig", image_inputs(), image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
               num_heads=[2, 2], window_size=4),
    "convnext": tf("ConvNextModel", "ConvNextConfig", image_inputs(), hidden_sizes=[16, 32], depths=[1, 1],
                     num_stages=2),
    "resnet": tf("ResNetModel", "ResNetConfig", image_inputs(), embedding_size=16, hidden_sizes=[16, 32],
                 depths=[1, 1]),
    # audio
    "whisper": tf("WhisperForConditionalGeneration", "WhisperConfig", whisper_inputs, d_model=32, encoder_layers=1,
                  decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                  vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2),
    "wav2vec2": tf("Wav2Vec2Model", "Wav2Vec2Config", wav2vec2_inputs, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, conv_dim=(16, 16), conv_stride=(5, 2),
                   conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
    # vision-language
    "llava": Spec("transformers", "LlavaForConditionalGeneration", llava_config, llava_inputs),
    # state-space
    "mamba": tf("MambaForCausalLM", "MambaConfig", hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=96,
                expand=2, conv_kernel=4, pad_token_id=0),
    "mamba2": tf("Mamba2ForCausalLM", "Mamba2Config", hidden_size=32, state_size=8, num_hidden_layers=2,
                 vocab_size=96, expand=2, conv_kernel=4, head_dim=8, num_heads=8, n_groups=1, chunk_size=8,
                 pad_token_id=0),
    "jamba": tf("JambaForCausalLM", "JambaConfig", num_experts=2, num_experts_per_tok=1, attn_layer_period=2,
                attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_d_conv=4,
                mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False, **LM),
}


def _unet_inputs() -> dict:
    return dict(sample=_randn(1, 4, 8, 8), timestep=torch.tensor([10]), encoder_hidden_states=_randn(1, 5, 16, seed=2))


def _flux_inputs() -> dict:
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return dict(hidden_states=_randn(1, 16, 4), encoder_hidden_states=_randn(1, 8, 32, seed=2),
                pooled_projections=_randn(1, 32, seed=3), timestep=torch.tensor([0.5]),
                img_ids=img_ids.reshape(16, 3), txt_ids=torch.zeros(8, 3))


def _wan_inputs() -> dict:
    return dict(hidden_states=_randn(1, 4, 2, 8, 8), timestep=torch.tensor([10]),
                encoder_hidden_states=_randn(1, 5, 16, seed=2))


def _wan_vace_inputs() -> dict:
    return dict(_wan_inputs(), control_hidden_states=_randn(1, 8, 2, 8, 8, seed=3))


def _hunyuan_inputs() -> dict:
    return dict(hidden_states=_randn(1, 4, 1, 8, 8), timestep=torch.tensor([10]),
                encoder_hidden_states=_randn(1, 6, 16, seed=2), encoder_attention_mask=torch.ones(1, 6),
                pooled_projections=_randn(1, 8, seed=3), guidance=torch.tensor([3.0]))


def _cogvideox_inputs() -> dict:
    return dict(hidden_states=_randn(1, 2, 4, 8, 8), encoder_hidden_states=_randn(1, 8, 8, seed=2),
                timestep=torch.tensor([10]))


def _ltx_inputs() -> dict:
    return dict(hidden_states=_randn(1, 32, 4), encoder_hidden_states=_randn(1, 6, 16, seed=2),
                timestep=torch.tensor([10]), encoder_attention_mask=torch.ones(1, 6), num_frames=2, height=4,
                width=4)


def _qwen_image_inputs() -> dict:
    return dict(hidden_states=_randn(1, 16, 16), encoder_hidden_states=_randn(1, 7, 16, seed=2),
                encoder_hidden_states_mask=torch.ones(1, 7), timestep=torch.tensor([0.5]), img_shapes=[(1, 4, 4)])


def _pixart_inputs() -> dict:
    return dict(hidden_states=_randn(1, 4, 8, 8), encoder_hidden_states=_randn(1, 8, 32, seed=2),
                timestep=torch.tensor([10]), added_cond_kwargs={"aspect_ratio": None, "resolution": None})


def _sana_inputs() -> dict:
    return dict(hidden_states=_randn(1, 4, 8, 8), encoder_hidden_states=_randn(1, 6, 32, seed=2),
                timestep=torch.tensor([10]))


def _dit_inputs() -> dict:
    return dict(hidden_states=_randn(1, 4, 8, 8), timestep=torch.tensor([10]), class_labels=torch.tensor([3]))


def _sd3_inputs() -> dict:
    return dict(hidden_states=_randn(1, 4, 8, 8), encoder_hidden_states=_randn(1, 7, 32, seed=2),
                pooled_projections=_randn(1, 64, seed=3), timestep=torch.tensor([10]))


DIFFUSERS_SPECS: dict[str, Spec] = {
    "UNet2DConditionModel": df(
        "UNet2DConditionModel", _unet_inputs, block_out_channels=(16, 32), layers_per_block=1, sample_size=8,
        in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=8),
    "UNet2DModel": df(
        "UNet2DModel", lambda: dict(sample=_randn(1, 3, 16, 16), timestep=torch.tensor([10])), sample_size=16,
        in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    # VAEs: the fp8 strategy deliberately keeps a VAE in bf16 ("fp8 storage costs visible decode
    # quality for little memory"; opt in with quantize_sensitive=True), so its plan has no fp8 bytes.
    "AutoencoderKL": df(
        "AutoencoderKL", lambda: dict(sample=_randn(1, 3, 16, 16)), fp8_stored=False, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
        norm_num_groups=8, sample_size=16),
    "AutoencoderKLWan": df(
        "AutoencoderKLWan", lambda: dict(sample=_randn(1, 3, 5, 16, 16)), fp8_stored=False, base_dim=8, z_dim=4, dim_mult=[1, 1],
        num_res_blocks=1, temperal_downsample=[True]),
    "AutoencoderKLCogVideoX": df(
        "AutoencoderKLCogVideoX", lambda: dict(sample=_randn(1, 3, 5, 16, 16)), fp8_stored=False,
        block_out_channels=(16, 32), latent_channels=4, layers_per_block=1, norm_num_groups=8, temporal_compression_ratio=4,
        down_block_types=("CogVideoXDownBlock3D",) * 2, up_block_types=("CogVideoXUpBlock3D",) * 2),
    "AutoencoderKLLTXVideo": df(
        "AutoencoderKLLTXVideo", lambda: dict(sample=_randn(1, 3, 9, 16, 16)), fp8_stored=False, in_channels=3,
        out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False),
    "FluxTransformer2DModel": df(
        "FluxTransformer2DModel", _flux_inputs, patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8]),
    "SD3Transformer2DModel": df(
        "SD3Transformer2DModel", _sd3_inputs, sample_size=8, patch_size=2, in_channels=4, num_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4),
    "WanTransformer3DModel": df(
        "WanTransformer3DModel", _wan_inputs, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32),
    "WanVACETransformer3DModel": df(
        "WanVACETransformer3DModel", _wan_vace_inputs, patch_size=(1, 2, 2), num_attention_heads=2,
        attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
        rope_max_seq_len=32, vace_layers=[0], vace_in_channels=8),
    "HunyuanVideoTransformer3DModel": df(
        "HunyuanVideoTransformer3DModel", _hunyuan_inputs, in_channels=4, out_channels=4, num_attention_heads=2,
        attention_head_dim=10, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
        patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)),
    "CogVideoXTransformer3DModel": df(
        "CogVideoXTransformer3DModel", _cogvideox_inputs, num_attention_heads=4, attention_head_dim=8,
        in_channels=4, out_channels=4, time_embed_dim=2, text_embed_dim=8, num_layers=1, sample_width=8,
        sample_height=8, sample_frames=5, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=8),
    "LTXVideoTransformer3DModel": df(
        "LTXVideoTransformer3DModel", _ltx_inputs, in_channels=4, out_channels=4, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=1, caption_channels=16),
    "QwenImageTransformer2DModel": df(
        "QwenImageTransformer2DModel", _qwen_image_inputs, patch_size=2, in_channels=16, out_channels=4,
        num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
        axes_dims_rope=(8, 4, 4)),
    "PixArtTransformer2DModel": df(
        "PixArtTransformer2DModel", _pixart_inputs, sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
        num_attention_heads=3, caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6),
    "SanaTransformer2DModel": df(
        "SanaTransformer2DModel", _sana_inputs, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
        num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2, cross_attention_head_dim=8,
        cross_attention_dim=16, caption_channels=32, sample_size=8),
    "DiTTransformer2DModel": df(
        "DiTTransformer2DModel", _dit_inputs, num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=8, num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8),
}

SPECS.update(DIFFUSERS_SPECS)


# -- building, once per architecture -----------------------------------------------------------------


def _library_class(spec: Spec) -> type | None:
    return getattr(transformers if spec.lib == "transformers" else diffusers, spec.cls, None)


def _from_pretrained(spec: Spec, path, dtype: torch.dtype) -> torch.nn.Module:
    cls = _library_class(spec)
    if spec.lib == "diffusers":
        return cls.from_pretrained(path, torch_dtype=dtype).eval()
    return cls.from_pretrained(path, dtype=dtype).eval()


def main_output(out: Any) -> torch.Tensor:
    """The model's main output tensor: ``.sample`` for diffusers, the first field for transformers."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def cast_floats(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}


def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**inputs))


@dataclass
class Built:
    path: Any
    ref32: torch.Tensor  # the fp32 from_pretrained output on spec.inputs()


_CACHE: dict[str, Built] = {}


@pytest.fixture(scope="session")
def _root(tmp_path_factory):
    return tmp_path_factory.mktemp("conformance")


@pytest.fixture
def built(request, _root) -> tuple[Spec, Built]:
    name = request.param
    spec = SPECS[name]
    cls = _library_class(spec)
    if cls is None:
        pytest.skip(f"{spec.lib} {getattr(transformers if spec.lib == 'transformers' else diffusers, '__version__')} "
                    f"has no {spec.cls}")
    if name not in _CACHE:
        torch.manual_seed(0)
        made = spec.make()
        model = cls(made) if spec.lib == "transformers" else cls(**made)
        path = _root / name
        model.save_pretrained(path)
        ref32 = run(_from_pretrained(spec, path, torch.float32), spec.inputs())
        _CACHE[name] = Built(path, ref32)
    return spec, _CACHE[name]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def fp8_share(plan: loaderkit.Plan) -> float:
    fp8 = sum(n for dtype, n in plan.bytes_per_dtype().items() if str(dtype).startswith("float8"))
    return fp8 / sum(plan.bytes_per_device().values())


NAMES = sorted(SPECS)


def test_not_yet_is_disjoint_from_the_specs():
    assert not set(NOT_YET) & set(SPECS)


@pytest.mark.parametrize("built", NAMES, indirect=True)
@pytest.mark.parametrize("strategy, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_fp32_and_bf16_are_identical_to_from_pretrained(built, strategy, dtype):
    spec, b = built
    ours = loaderkit.load(b.path, strategy)
    ref = _from_pretrained(spec, b.path, dtype)
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys()
    assert {k: v.dtype for k, v in mine.items()} == {k: v.dtype for k, v in theirs.items()}
    unequal = [k for k in theirs if not torch.equal(mine[k], theirs[k])]
    assert not unequal, f"values differ from from_pretrained: {unequal[:5]}"
    inputs = cast_floats(spec.inputs(), dtype)
    a, want = run(ours, inputs), run(ref, inputs)
    assert a.dtype == want.dtype and torch.equal(a, want)


@pytest.mark.parametrize("built", NAMES, indirect=True)
def test_fp8_loads_verifies_and_stays_close(built):
    spec, b = built
    model = loaderkit.load(b.path, "fp8")
    stored_fp8 = [k for k, v in model.state_dict().items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
    assert bool(stored_fp8) == spec.fp8_stored
    report = loaderkit.verify(model, example_kwargs=spec.inputs())
    assert report.ok, str(report)
    out = run(model, spec.inputs())
    assert out.shape == b.ref32.shape
    assert torch.isfinite(out.float()).all()
    assert cosine(out, b.ref32) > spec.cos
    assert (fp8_share(loaderkit.plan(b.path, "fp8")) > 0) == spec.fp8_stored
