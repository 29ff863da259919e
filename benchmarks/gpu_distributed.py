"""The distributed loading checks on GPUs with NCCL, and their numbers.

    python benchmarks/gpu_distributed.py            # every GPU (at least 1), NCCL
    python benchmarks/gpu_distributed.py --gloo 2   # the same on CPU with gloo, for a dry run

Builds the checkpoints of ``tests/test_distributed.py`` (tiny transformers Llama and Mixtral
models, compressed-tensors fp8 per channel and per block), loads each over one rank per GPU
with FSDP and with tensor parallelism, and prints per case and rank: errors, tensors that differ
from the single-process load (must be 0), ``verify``, the largest logit difference, and the
bytes read against the plan. ``pytest tests/test_distributed.py`` runs the same cases with
assertions (its NCCL half needs 2 and 4 GPUs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    import torch

    import fp8_writers
    import test_distributed as td

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gloo", type=int, metavar="N", help="run N ranks on CPU with gloo instead")
    args = ap.parse_args()
    if args.gloo:
        world, backend = args.gloo, "gloo"
    else:
        world, backend = torch.cuda.device_count(), "nccl"
        if world < 1:
            raise SystemExit("no GPU: run with --gloo N for a CPU dry run")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        llama = td._llama(root / "llama", num_key_value_heads=4 if world >= 4 else 2)  # heads divide up to 4 ranks
        ct = str(fp8_writers.write_compressed_tensors_llama(root / "ct", "FP8_DYNAMIC"))
        block = str(fp8_writers.write_compressed_tensors_llama(
            root / "block", "FP8_BLOCK", hidden_size=256 * max(1, world // 2), intermediate_size=512 * max(1, world // 2),
            num_attention_heads=2 * max(1, world // 2), num_key_value_heads=2 * max(1, world // 2), head_dim=128,
            vocab_size=256 * world, num_hidden_layers=1))
        moe = td._mixtral(root / "moe")
        cases = [td._case(f"llama-{p}-{s}", llama, s, p) for p in ("fsdp", "tp") for s in ("bf16", "fp8")]
        cases += [td._case(f"ct-{p}-{s}", ct, s, p) for p in ("fsdp", "tp") for s in ("fp8", "bf16")]
        cases += [td._case(f"block-{p}-{s}", block, s, p) for p in ("fsdp", "tp") for s in ("fp8", "bf16")]
        cases += [td._case(f"moe-fsdp-{s}", moe, s, "fsdp") for s in ("bf16", "fp8")]
        results = td._spawn(world, cases, root / "out", backend)
    print(f"{backend}, {world} ranks, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(0)}" if backend == "nccl" else ""))
    print("| case | rank | error | tensors differing | verify | max logit diff (of max) | read / planned bytes |")
    print("|---|---|---|---|---|---|---|")
    for name, ranks in results.items():
        for r in ranks:
            if "error" in r:
                print(f"| {name} | {r['rank']} | {r['error'][:80]} | | | | |")
                continue
            print(f"| {name} | {r['rank']} | - | {len(r['mismatches'])} | {r['verify']} | "
                  f"{r['logits_max_diff']:.3g} ({r['logits_scale']:.3g}) | {r['read']} / {r['planned']} |")


if __name__ == "__main__":
    main()
