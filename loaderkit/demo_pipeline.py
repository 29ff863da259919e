"""Tiny diffusers pipelines for the demo, the docs and the tests (needs diffusers and transformers).

Each is built from configs and saved by the libraries' own ``save_pretrained``: the directory is
what ``DiffusionPipeline.save_pretrained`` writes for a real Flux or Wan pipeline, only smaller
(kilobytes). The tokenizers are made offline from a small vocabulary.

::

    from loaderkit.demo_pipeline import save_pipeline, run
    path = save_pipeline("wan", "tiny-wan")
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "cat", "dog", "photo", "of", "the", "on", "moon", "red", "blue"]


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", *("\u2581" + w for w in WORDS)]
    return T5Tokenizer(vocab=[(p, -float(i)) for i, p in enumerate(pieces)], extra_ids=0)


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["<|startoftext|>", "<|endoftext|>", *(c + "</w>" for c in letters), *letters]
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=[], model_max_length=16)


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(1)
    cfg = T5Config(vocab_size=32, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(cfg)


def _clip(with_projection: bool = False, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, hidden_size=32, intermediate_size=37,
                         layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, pad_token_id=1,
                         vocab_size=64, hidden_act="gelu", projection_dim=32)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def flux_pipeline():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(3)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_clip(), tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5(), tokenizer_2=_t5_tokenizer(), transformer=transformer,
    )


def wan_pipeline():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    torch.manual_seed(1)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                               relative_attention_num_buckets=8, decoder_start_token_id=0))
    return WanPipeline(tokenizer=_t5_tokenizer(), text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


PIPELINES = {"flux": flux_pipeline, "wan": wan_pipeline}

#: Arguments for a two-step generation of each pipeline (small images, fixed seed given separately).
CALL = {
    "flux": dict(prompt="a photo of a cat", num_inference_steps=2, guidance_scale=3.5, height=16, width=16,
                 max_sequence_length=16, output_type="pt"),
    "wan": dict(prompt="a dog on the moon", negative_prompt="blue", num_inference_steps=2, guidance_scale=5.0,
                height=16, width=16, num_frames=5, max_sequence_length=16, output_type="pt"),
}


def save_pipeline(kind: str, directory: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Build the tiny ``kind`` pipeline, cast its models to ``dtype`` and ``save_pretrained`` it."""
    pipe = PIPELINES[kind]()
    pipe.to(dtype=dtype)
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory


def run(pipe, kind: str, seed: int = 0) -> torch.Tensor:
    """A two-step generation; returns the images (or video frames) as a float tensor."""
    generator = torch.Generator("cpu").manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**CALL[kind], generator=generator)
    frames = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(frames).float()


#: fp8 storage against the bf16 pipeline, two steps, images in [0, 1]: what the demo accepts.
FP8_BOUND = 0.06


def available() -> bool:
    """True when diffusers and transformers are installed (checked without importing them)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("diffusers", "transformers"))


def pipeline_demo(directory: str | Path, kind: str = "wan") -> dict:
    """Save the tiny ``kind`` pipeline in bf16 and generate two steps with it three ways:
    diffusers' own ``from_pretrained`` (the reference), ``loaderkit.load_pipeline`` in bf16 (must be
    bit-identical) and in fp8 (must stay within :data:`FP8_BOUND`), every model verified."""
    import time

    from diffusers import DiffusionPipeline

    import loaderkit

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # a demo's output is its table, not the libraries' notices
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = save_pipeline(kind, Path(directory) / kind)
    t0 = time.perf_counter()
    reference = run(DiffusionPipeline.from_pretrained(path, dtype=torch.bfloat16), kind)
    t_ref = time.perf_counter() - t0
    rows = []
    for strategy in ("bf16", "fp8"):
        t0 = time.perf_counter()
        pipe = loaderkit.load_pipeline(path, strategy)
        load_s = time.perf_counter() - t0
        pplan = loaderkit.plan_of(pipe)
        out = run(pipe, kind)
        rows.append({
            "strategy": strategy,
            "bytes": sum(pplan.bytes_per_device().values()),
            "dtypes": pplan.bytes_per_dtype(),
            "components": {n: c.plan.entry_dtype() for n, c in pplan.components.items() if c.plan},
            "verify": all(loaderkit.verify(getattr(pipe, n)).ok for n in pplan.models()),
            "max_abs_vs_diffusers": float((out - reference).abs().max()),
            "seconds": load_s,
        })
    ok = (all(r["verify"] for r in rows) and rows[0]["max_abs_vs_diffusers"] == 0.0
          and rows[1]["max_abs_vs_diffusers"] <= FP8_BOUND)
    return {"pipeline": type(pipe).__name__, "ok": ok, "reference_seconds": t_ref, "results": rows}
