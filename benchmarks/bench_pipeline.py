"""Pipeline benchmark: load a whole diffusers pipeline in fp8 vs diffusers' own bf16 load.

    python benchmarks/bench_pipeline.py [--repeats 5]

The pipeline is a Flux-style ``FluxPipeline`` built from configs with real layer widths and few
layers (transformer: 4 double + 8 single blocks of width 1536; T5 encoder: width 1024, 6 layers;
CLIP text encoder: width 768, 4 layers; Flux VAE layout, narrow), random weights, saved in bf16 by
``save_pretrained`` (~1.2 GB) once under ``.bench/flux-pipeline/``.

Cases (fresh process each; wall time = load + one read of every parameter byte of every model;
memory = growth over the pre-load level, see ``common.py``):

* ``lk-fp8``     ``loaderkit.load_pipeline(dir, "fp8")``: transformer and text encoders quantized
                 to fp8 as they stream (one scale per output channel), the VAE kept in bf16;
* ``peer``       ``DiffusionPipeline.from_pretrained(dir, dtype=bfloat16)`` then
                 ``pipe.transformer.enable_layerwise_casting(storage_dtype=float8_e4m3fn,
                 compute_dtype=bfloat16)`` (diffusers' own fp8 storage, transformer only);
* ``lk-bf16``    ``loaderkit.load_pipeline(dir, "bf16")``;
* ``diffusers``  ``DiffusionPipeline.from_pretrained(dir, dtype=bfloat16)``.

After the table, one process loads ``lk-fp8`` and ``peer`` and times a 2-step 256x256 generation
of each, alternating, and reports the agreement of their images with the bf16 pipeline's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
from common import median, mib, table

common.PRELOAD = (*common.PRELOAD, "diffusers", "diffusers.models.transformers.transformer_flux",
                  "transformers.models.t5.modeling_t5", "transformers.models.clip.modeling_clip")
NAME = "flux-pipeline"

_BUILD = r"""
import sys, torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
from loaderkit.demo_pipeline import _clip_tokenizer, _t5_tokenizer
torch.manual_seed(0)
transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8,
    attention_head_dim=128, num_attention_heads=12, joint_attention_dim=1024, pooled_projection_dim=768,
    axes_dims_rope=[16, 56, 56])
t5 = T5EncoderModel(T5Config(vocab_size=32, d_model=1024, d_kv=64, d_ff=2816, num_layers=6, num_heads=16,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32))
clip = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=768, intermediate_size=3072, num_hidden_layers=4,
    num_attention_heads=12, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=768))
vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64, 128, 128),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
    norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
    tokenizer=_clip_tokenizer(), text_encoder_2=t5, tokenizer_2=_t5_tokenizer(), transformer=transformer)
pipe.to(dtype=torch.bfloat16)
pipe.save_pretrained(sys.argv[1])
"""


def ensure_pipeline() -> Path:
    path = common.BENCH_DIR / NAME
    if (path / "model_index.json").is_file():
        return path
    common.BENCH_DIR.mkdir(exist_ok=True)
    print(f"building {path} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-c", _BUILD, str(path)], check=True)
    return path


def _models(pipe):
    import torch

    return torch.nn.ModuleDict({n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)})


def _quiet():
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def lk(path: Path, strategy: str):
    import loaderkit

    _quiet()
    return loaderkit.load_pipeline(path, strategy)


def diffusers_pipe(path: Path, layerwise: bool):
    import torch
    from diffusers import DiffusionPipeline

    _quiet()
    pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.bfloat16)
    if layerwise:
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    return pipe


CASES = {
    "lk-fp8": lambda p: _models(lk(p, "fp8")),
    "peer": lambda p: _models(diffusers_pipe(p, True)),
    "lk-bf16": lambda p: _models(lk(p, "bf16")),
    "diffusers": lambda p: _models(diffusers_pipe(p, False)),
}
LABELS = {
    "lk-fp8": 'loaderkit.load_pipeline(dir, "fp8")',
    "peer": "peer: from_pretrained(bf16) + transformer.enable_layerwise_casting(fp8)",
    "lk-bf16": 'loaderkit.load_pipeline(dir, "bf16")',
    "diffusers": "DiffusionPipeline.from_pretrained(bf16)",
}

CALL = dict(prompt="a photo of a cat", num_inference_steps=2, guidance_scale=3.5, height=256, width=256,
            max_sequence_length=32, output_type="pt")


def generate_child(path: Path, rounds: int) -> None:
    """Load fp8 (loaderkit), the peer and bf16 into one process; time generations alternately."""
    import torch

    pipes = {"lk-fp8": lk(path, "fp8"), "peer": diffusers_pipe(path, True), "bf16": diffusers_pipe(path, False)}
    images, times = {}, {n: [] for n in pipes}
    for r in range(rounds + 1):
        for name, pipe in pipes.items():
            pipe.set_progress_bar_config(disable=True)
            t0 = time.perf_counter()
            out = pipe(**CALL, generator=torch.Generator().manual_seed(0)).images
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
            images[name] = out.float()
    ref = images["bf16"]
    result = {n: {"seconds": statistics.median(t),
                  "max_abs_vs_bf16": float((images[n] - ref).abs().max()),
                  "mean_abs_vs_bf16": float((images[n] - ref).abs().mean())} for n, t in times.items()}
    common._emit("result", result)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("--path")
    args, rest = ap.parse_known_args()
    if args.child == "generate":
        generate_child(Path(args.path), args.rounds)
        return
    if args.child:
        common.child_main(CASES, sys.argv[1:])
        return
    path = ensure_pipeline()
    runs = common.run_rounds(Path(__file__), list(CASES), path, args.repeats)
    peer_t, peer_anon, peer_rss = (median(runs["peer"], k) for k in ("total_s", "anon_growth", "rss_growth"))
    rows = []
    for case, rs in runs.items():
        t = median(rs, "total_s")
        dt = rs[0]["dtype_bytes"]
        rows.append([
            LABELS[case], f"{t:.2f}", common.spread(rs, "total_s"), f"{t / peer_t:.2f}x",
            mib(median(rs, "anon_growth")), f"{median(rs, 'anon_growth') / peer_anon:.2f}x",
            mib(median(rs, "rss_growth")), f"{median(rs, 'rss_growth') / peer_rss:.2f}x",
            ", ".join(f"{k} {mib(v)}" for k, v in sorted(dt.items())),
        ])
    print(f"\n{common.environment()}")
    print(f"pipeline {path}: {sum(f.stat().st_size for f in path.rglob('*.safetensors')) / 2**20:.0f} MiB of "
          f"safetensors; medians of {args.repeats} fresh-process loads (+ touch)\n")
    print(table(["case", "load+touch s", "range", "vs peer", "anon growth MiB", "vs peer",
                 "peak RSS growth MiB", "vs peer", "resident MiB by dtype"], rows))
    gen = common.run_json([sys.executable, __file__, "--child", "generate", "--path", str(path),
                           "--rounds", str(args.rounds)])
    print(f"\n2-step 256x256 generation, median of {args.rounds} alternating rounds in one process\n")
    print(table(["pipeline", "seconds", "vs peer", "max |image - bf16|", "mean |image - bf16|"], [
        [n, f"{g['seconds']:.2f}", f"{g['seconds'] / gen['peer']['seconds']:.2f}x", f"{g['max_abs_vs_bf16']:.4f}",
         f"{g['mean_abs_vs_bf16']:.5f}"] for n, g in gen.items()]))


if __name__ == "__main__":
    main()
