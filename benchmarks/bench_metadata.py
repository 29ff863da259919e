"""Metadata at scale: inspect and plan a DeepSeek-V3-sized checkpoint from its headers alone.

    python benchmarks/bench_metadata.py [--repeats 5] [--skip-plan]

Writes once, under ``.bench/ds3-headers/``, a header-only checkpoint with DeepSeek-V3's hub
layout: 163 safetensors files and an index, 90,427 tensors (61 layers, 58 of them MoE with 256
experts; every Linear weight in fp8 with a 128x128 block ``weight_scale_inv``), and the model's
real ``config.json`` (``quantization_config`` fp8, block 128x128). Each file is sparse: its header
is real, its 627 GB of data are holes (21 MB on disk), which the timed calls never read.

Times (medians, one process, libraries imported first): ``loaderkit.inspect`` of the index; a
pickle round trip of its ``CheckpointInfo`` (what sending it to other ranks costs); and, unless
``--skip-plan``, ``loaderkit.plan(strategy="fp8")`` (skeleton on the meta device, transformers'
key conversions, negotiation), once with its first-call imports and then warm.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import struct
import sys
import time
from pathlib import Path

import common

H, I, MI, L, E, V = 7168, 18432, 2048, 61, 256, 129280
FILES = 163
SIZE = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
CONFIG = dict(
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=V, hidden_size=H,
    intermediate_size=I, moe_intermediate_size=MI, num_hidden_layers=L, num_attention_heads=128,
    num_key_value_heads=128, n_routed_experts=E, n_shared_experts=1, num_experts_per_tok=8,
    first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, max_position_embeddings=4096, n_group=8, topk_group=4, torch_dtype="bfloat16",
    tie_word_embeddings=False,
    quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                         "weight_block_size": [128, 128]},
)


def _tensors() -> list[tuple[str, str, list[int]]]:
    out = [("model.embed_tokens.weight", "BF16", [V, H])]

    def linear(name: str, rows: int, cols: int) -> None:
        out.append((f"{name}.weight", "F8_E4M3", [rows, cols]))
        out.append((f"{name}.weight_scale_inv", "F32", [-(-rows // 128), -(-cols // 128)]))

    for layer in range(L):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", "BF16", [H]), (p + "post_attention_layernorm.weight", "BF16", [H])]
        a = p + "self_attn."
        linear(a + "q_a_proj", 1536, H)
        out.append((a + "q_a_layernorm.weight", "BF16", [1536]))
        linear(a + "q_b_proj", 128 * 192, 1536)
        linear(a + "kv_a_proj_with_mqa", 576, H)
        out.append((a + "kv_a_layernorm.weight", "BF16", [512]))
        linear(a + "kv_b_proj", 128 * 256, 512)
        linear(a + "o_proj", H, 128 * 128)
        m = p + "mlp."
        if layer < 3:
            linear(m + "gate_proj", I, H), linear(m + "up_proj", I, H), linear(m + "down_proj", H, I)
            continue
        out += [(m + "gate.weight", "BF16", [E, H]), (m + "gate.e_score_correction_bias", "F32", [E])]
        for e in [*(f"experts.{j}." for j in range(E)), "shared_experts."]:
            linear(m + e + "gate_proj", MI, H), linear(m + e + "up_proj", MI, H), linear(m + e + "down_proj", H, MI)
    return out + [("model.norm.weight", "BF16", [H]), ("lm_head.weight", "BF16", [V, H])]


def write_sparse(path: Path, header: dict, data_bytes: int) -> None:
    """A safetensors file with a real header and ``data_bytes`` of data that are a hole."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(8 + len(raw) + data_bytes)


def ensure_index() -> Path:
    out = common.BENCH_DIR / "ds3-headers"
    if (out / "model.safetensors.index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tensors = _tensors()
    per = -(-len(tensors) // FILES)
    weight_map = {}
    for f in range(FILES):
        name = f"model-{f + 1:05d}-of-{FILES:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, dt, shape in tensors[f * per:(f + 1) * per]:
            n = SIZE[dt]
            for d in shape:
                n *= d
            header[key] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[key] = name
        write_sparse(out / name, header, offset)
    (out / "config.json").write_text(json.dumps(CONFIG))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def _median(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-plan", action="store_true")
    args = ap.parse_args()
    path = ensure_index()
    import loaderkit

    rows = []
    t, info = _median(lambda: loaderkit.inspect(path), args.repeats)
    rows.append(["loaderkit.inspect(index)", f"{t:.2f}", f"{len(info.tensors):,} tensors, {len(info.files)} files"])
    blob = pickle.dumps(info)
    t, _ = _median(lambda: pickle.dumps(info), args.repeats)
    rows.append(["pickle.dumps(CheckpointInfo)", f"{t:.2f}", f"{len(blob) / 2**20:.1f} MiB"])
    t, _ = _median(lambda: pickle.loads(blob), args.repeats)
    rows.append(["pickle.loads(CheckpointInfo)", f"{t:.2f}", ""])
    if not args.skip_plan:
        t0 = time.perf_counter()
        plan = loaderkit.plan(path, "fp8")
        rows.append(['loaderkit.plan(index, "fp8"), first call', f"{time.perf_counter() - t0:.2f}",
                     "includes importing the model's modeling code"])
        t, plan = _median(lambda: loaderkit.plan(path, "fp8"), max(1, args.repeats // 2))
        rows.append(['loaderkit.plan(index, "fp8"), warm', f"{t:.2f}", f"{len(plan.tensors):,} model tensors"])
    print(f"\n{common.environment()}\n")
    print(common.table(["call", "seconds (median)", "notes"], rows))


if __name__ == "__main__":
    sys.exit(main())
