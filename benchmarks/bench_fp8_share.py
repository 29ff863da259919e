"""Share of a model's bytes loaderkit's ``fp8`` strategy stores in fp8, for real-size models.

Each model is built on the meta device from its published configuration (typed here; nothing is
downloaded), its state dict is written as a *header-only* safetensors file (a sparse file: the
header is real, the data is zeros the plan never reads) in bf16 beside its ``config.json``, and
``loaderkit.plan`` negotiates the ``fp8`` and ``bf16`` plans from the headers — exactly what it
does for the real checkpoint. Printed per model: the bf16 size, the fp8 plan's size, the share
of bytes in fp8, the largest reasons weights stay in the compute dtype, and a peer's share:
diffusers' ``enable_layerwise_casting`` (its default skip patterns plus the model's own) for
diffusers models, llm-compressor's FP8 presets (every Linear but ``lm_head``) for transformers
models (the per-expert Linears of the hub layout included). Also printed: what ComfyUI stores in
fp8, by the rules of its own loader (see ``comfyui_bytes``), for a ``scaled_fp8`` file and for a
model loaded with ``weight_dtype="fp8_e4m3fn"``. The share is of bytes in memory, scales included.

    python benchmarks/bench_fp8_share.py [--models llama-3-8b flux.1-dev ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

GiB = 1 << 30

TRANSFORMERS = {
    "llama-3-8b": ("LlamaForCausalLM", "llama", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False)),
    "mixtral-8x7b": ("MixtralForCausalLM", "mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768)),
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", "qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, max_position_embeddings=40960)),
    "deepseek-v3": ("DeepseekV3ForCausalLM", "deepseek_v3", dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, q_lora_rank=1536,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        max_position_embeddings=4096)),
}
DIFFUSERS = {
    "flux.1-dev": ("FluxTransformer2DModel", dict(guidance_embeds=True)),
    "wan2.1-14b": ("WanTransformer3DModel", dict()),
    "hunyuanvideo": ("HunyuanVideoTransformer3DModel", dict()),
    "sd3.5-large": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")),
}


def _meta_model(name: str):
    if name in TRANSFORMERS:
        import transformers

        arch, model_type, cfg = TRANSFORMERS[name]
        config = transformers.AutoConfig.for_model(model_type, **cfg)
        config.architectures = [arch]
        with torch.device("meta"):
            model = getattr(transformers, arch)(config)
        return model, config.to_dict()
    import diffusers

    cls_name, cfg = DIFFUSERS[name]
    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        model = cls(**cfg)
    return model, {**dict(model.config), "_class_name": cls_name}


def write_header_only(directory: Path, model: torch.nn.Module, config: dict) -> Path:
    """``model.safetensors`` (header real, data sparse zeros) + ``config.json``, in bf16."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, t in model.state_dict().items():
        dtype = "BF16" if t.is_floating_point() else {torch.int64: "I64", torch.bool: "BOOL"}.get(t.dtype, "I32")
        size = math.prod(t.shape) * (2 if dtype == "BF16" else torch.empty((), dtype=t.dtype).element_size())
        header[key] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    name = "diffusion_pytorch_model.safetensors" if "_class_name" in config else "model.safetensors"
    with open(directory / name, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    (directory / "config.json").write_text(json.dumps(config, default=str))
    return directory


def peer_share(name: str, model: torch.nn.Module) -> float:
    """Share of bytes a peer stores in fp8 (see the module docstring)."""
    total = fp8 = 0
    if name in DIFFUSERS:
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

        # the layers diffusers' layerwise casting stores in its storage dtype (Linear, Conv*)
        layers = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)

        patterns = tuple(DEFAULT_SKIP_MODULES_PATTERN) + tuple(getattr(model, "_skip_layerwise_casting_patterns", None) or ())
        for mname, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False)]
            n = sum(p.numel() for p in own)
            skip = any(re.search(p, mname) for p in patterns)
            if isinstance(module, layers) and not skip:
                fp8 += n
                total += n
            else:
                total += 2 * n
        return fp8 / total
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            # llm-compressor quantizes every Linear weight of the hub layout but lm_head, the
            # per-expert ones included: in transformers 5 those are the fused 3-D expert tensors
            linear = isinstance(module, torch.nn.Linear) and pname == "weight" and mname != "lm_head"
            if linear or (p.dim() == 3 and hasattr(module, "has_gate")):
                fp8 += p.numel()
                total += p.numel()
            else:
                total += 2 * p.numel()
    return fp8 / total


# ComfyUI's own loader (Comfy-Org/ComfyUI a125cd84, 2025-10-12) decides which tensors are fp8 by
# the dtype and the operations each layer of its model classes is built with:
# - a ``scaled_fp8`` file (comfy/model_detection.py model_config_from_unet reads the ``scaled_fp8``
#   marker; comfy/ops.py pick_operations -> scaled_fp8_ops): the model is built in its inference
#   dtype (16-bit) and only ``Linear`` is built in fp8 (scaled_fp8_op.Linear.__init__ overrides the
#   dtype, so weight and bias), with one float32 ``scale_weight`` per Linear; everything else
#   (Conv*, norms, embeddings, modulation tables, positional buffers) stays 16-bit;
# - ``weight_dtype="fp8_e4m3fn"`` (nodes.py UNETLoader, or ``--fp8_e4m3fn-unet``: comfy/sd.py
#   load_diffusion_model_state_dict -> model_config.set_inference_dtype): every layer is built with
#   ``dtype=fp8`` (comfy/model_base.py BaseModel.__init__, the ``manual_cast`` ops casting at run
#   time), so every tensor is fp8 but the ones a model class builds in a fixed dtype.
# The same two rules hold for text encoders (comfy/sd1_clip.py SDClipModel,
# ``--fp8_e4m3fn-text-enc``).
# Fixed dtypes in ComfyUI's classes for these models: Wan's patch embedding is a float32 Conv3d
# (comfy/ldm/wan/model.py WanModel.__init__), same name in diffusers.
COMFYUI_FLOAT32 = {"wan2.1-14b": ("patch_embedding",)}
# ComfyUI runs Llama-3-8B only as a text encoder (comfy/text_encoders/llama.py Llama2_,
# HunyuanVideo's llava-llama-3-8b), which builds no lm_head; it has no MoE language model.
COMFYUI_TEXT_ENCODERS = {"llama-3-8b": ("lm_head",)}


def comfyui_bytes(name: str, model: torch.nn.Module, scaled: bool) -> tuple[int, int] | None:
    """(bytes in fp8, bytes) ComfyUI holds for ``model``; ``None`` where ComfyUI does not run it.

    ComfyUI's module-type rule (above) applied to the diffusers/transformers-built modules: its
    ``operations.Linear`` is ``nn.Linear`` here, and every other tensor of the state dict (parameters
    and persistent buffers, such as SD3's ``pos_embed``) is a non-Linear tensor in the model's dtype.
    """
    if name in TRANSFORMERS and name not in COMFYUI_TEXT_ENCODERS:
        return None
    not_built, float32 = COMFYUI_TEXT_ENCODERS.get(name, ()), COMFYUI_FLOAT32.get(name, ())
    fp8 = total = 0
    for mname, module in model.named_modules():
        if mname in not_built:
            continue
        buffers = [b for k, b in module._buffers.items()
                   if b is not None and k not in module._non_persistent_buffers_set]
        n = sum(t.numel() for t in [*module.parameters(recurse=False), *buffers] if t.is_floating_point())
        if n == 0:
            continue
        if mname in float32:
            total += 4 * n
        elif not scaled or isinstance(module, torch.nn.Linear):
            in_fp8 = n + (4 if scaled else 0)  # scaled: scale_weight, a float32 scalar per Linear
            fp8 += in_fp8
            total += in_fp8
        else:
            total += 2 * n
    return fp8, total


def measure(name: str) -> dict:
    import loaderkit

    t0 = time.perf_counter()
    model, config = _meta_model(name)
    with tempfile.TemporaryDirectory() as d:
        path = write_header_only(Path(d), model, config)
        bf16 = loaderkit.plan(path, "bf16")
        fp8 = loaderkit.plan(path, "fp8")
        override = loaderkit.plan(path, loaderkit.strategy("fp8", library_skips=False)) if name in DIFFUSERS else None
    total = sum(fp8.bytes_per_device().values())
    # TensorPlan.nbytes of an fp8 tensor includes its float32 scales: they count as fp8 bytes
    in_fp8 = sum(v for k, v in fp8.bytes_per_dtype().items() if k.startswith("float8"))
    kept = [d for d in fp8.decisions if d.subject == "kept in compute dtype"][:3]

    def share(plan) -> float:
        return sum(v for k, v in plan.bytes_per_dtype().items() if k.startswith("float8")) / sum(
            plan.bytes_per_device().values())

    return {
        "model": name,
        "bf16_gib": sum(bf16.bytes_per_device().values()) / GiB,
        "fp8_plan_gib": total / GiB,
        "fp8_share": in_fp8 / total,
        "peer_share": peer_share(name, model),
        "comfyui": {mode: None if b is None else {"gib": b[1] / GiB, "share": b[0] / b[1]}
                    for mode, b in (("scaled_fp8", comfyui_bytes(name, model, scaled=True)),
                                    ("fp8_e4m3fn", comfyui_bytes(name, model, scaled=False)))},
        "override_share": None if override is None else share(override),
        "override_gib": None if override is None else sum(override.bytes_per_device().values()) / GiB,
        "kept": [f"{d.choice}: {d.reason}" for d in kept],
        "seconds": time.perf_counter() - t0,
    }


def machine() -> str:
    """The environment line plus the CPU's SIMD flags and the load average (for every table)."""
    from loaderkit.plugins.devices import cpu_flags

    simd = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    return f"{environment()}\nCPU flags: {' '.join(simd)}; load average {' '.join(load)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=[*TRANSFORMERS, *DIFFUSERS])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = [measure(m) for m in args.models]
    if args.json:
        print(json.dumps({"environment": machine(), "rows": rows}, indent=2))
        return 0
    print(machine())
    print(f"{'model':<16} {'bf16 GiB':>9} {'fp8 plan GiB':>13} {'fp8 share':>10} {'peer share':>11} "
          f"{'library_skips=False':>22} {'ComfyUI scaled_fp8 / fp8_e4m3fn':>38}")
    for r in rows:
        over = "-" if r["override_share"] is None else f"{r['override_gib']:.2f} GiB, {r['override_share']:.1%}"
        comfy = " / ".join("n/a" if c is None else f"{c['gib']:.2f} GiB, {c['share']:.2%}"
                           for c in r["comfyui"].values())
        print(f"{r['model']:<16} {r['bf16_gib']:>9.2f} {r['fp8_plan_gib']:>13.2f} {r['fp8_share']:>10.1%} "
              f"{r['peer_share']:>11.1%} {over:>22} {comfy:>38}")
        for k in r["kept"]:
            print(f"    kept: {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
