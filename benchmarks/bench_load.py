"""Loading benchmark: a ~1.1 GB bf16 Llama-like checkpoint, five ways, each in a fresh process.

    python benchmarks/bench_load.py [--repeats 5]

Cases (wall time = load + one read of every parameter byte; memory = growth over the pre-load
level, see ``common.py``):

* ``floor``        accelerate ``init_empty_weights`` skeleton + ``load_state_dict(assign=True)`` of
                   ``safe_open(...).get_tensor`` views (zero-copy mmap): the least work possible;
* ``lk-bf16``      ``loaderkit.load(dir, strategy="bf16")`` (no conversion);
* ``lk-bf16-noprobe``  the same with ``LOADERKIT_DEVICE_PROBE=0`` (no timing of CPU dtypes), to
                   show what the device probe costs;
* ``hf-bf16``      ``AutoModelForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)``;
* ``lk-fp32``      ``loaderkit.load(dir, strategy="fp32")`` (every tensor converted).

Targets: ``lk-bf16`` time <= 1.10x floor and anonymous growth <= 0.1 x parameter bytes + 100 MiB;
``lk-fp32`` anonymous growth <= 1.1 x final bytes + largest tensor (in fp32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import common
from common import MiB, median, mib, table, verdict


def case_floor(path: Path):
    import torch
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with safe_open(str(path / "model.safetensors"), framework="pt", device="cpu") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval()


def case_lk_bf16(path: Path):
    import loaderkit

    return loaderkit.load(path, strategy="bf16")


def case_lk_bf16_noprobe(path: Path):
    import os

    import loaderkit

    os.environ["LOADERKIT_DEVICE_PROBE"] = "0"
    return loaderkit.load(path, strategy="bf16")


def case_hf_bf16(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()


def case_lk_fp32(path: Path):
    import loaderkit

    return loaderkit.load(path, strategy="fp32")


CASES = {
    "floor": case_floor,
    "lk-bf16": case_lk_bf16,
    "lk-bf16-noprobe": case_lk_bf16_noprobe,
    "hf-bf16": case_hf_bf16,
    "lk-fp32": case_lk_fp32,
}

LABELS = {
    "floor": "(a) floor: meta skeleton + load_state_dict(assign=True) of mmap views",
    "lk-bf16": '(b) loaderkit.load(strategy="bf16")',
    "lk-bf16-noprobe": '(b\') same, LOADERKIT_DEVICE_PROBE=0 (no CPU dtype probe)',
    "hf-bf16": "(c) transformers from_pretrained(dtype=bfloat16)",
    "lk-fp32": '(d) loaderkit.load(strategy="fp32") (converts)',
}


def report(runs: dict[str, list[dict]], facts: dict[str, int]) -> str:
    floor_t = median(runs["floor"], "total_s")
    rows = []
    for case, rs in runs.items():
        t = median(rs, "total_s")
        rows.append([
            LABELS[case],
            f"{t:.2f}",
            common.spread(rs, "total_s"),
            f"{t / floor_t:.2f}x",
            f"{median(rs, 'cpu_s'):.2f}",
            mib(median(rs, "anon_growth")),
            mib(median(rs, "rss_growth")),
            mib(median(rs, "peak_rss")),
            mib(median(rs, "model_bytes")),
        ])
    header = ["case", "load+touch s (median)", "min-max", "vs floor", "CPU s",
              "peak anon +MiB",
              "peak RSS +MiB", "peak RSS MiB", "model MiB"]
    return table(header, rows) + "\n\n" + targets(runs, facts)


def targets(runs: dict[str, list[dict]], facts: dict[str, int]) -> str:
    floor_t = median(runs["floor"], "total_s")
    b, d = runs["lk-bf16"], runs["lk-fp32"]
    tb = median(b, "total_s")
    param = median(b, "model_bytes")
    anon_b, lim_b = median(b, "anon_growth"), param * 0.1 + 100 * MiB
    final_d, largest = median(d, "model_bytes"), facts["largest_elems"] * 4
    anon_d, lim_d = median(d, "anon_growth"), 1.1 * final_d + largest
    rows = [
        ["(b) time <= 1.10x floor", f"{tb:.2f} s = {tb / floor_t:.2f}x floor ({floor_t:.2f} s)",
         verdict(tb <= 1.10 * floor_t)],
        ["(b) anon <= 0.1 x param bytes + 100 MiB", f"{mib(anon_b)} MiB <= {mib(lim_b)} MiB",
         verdict(anon_b <= lim_b)],
        ["(d) anon <= 1.1 x final bytes + largest tensor",
         f"{mib(anon_d)} MiB <= {mib(lim_d)} MiB (final {mib(final_d)}, largest {mib(largest)})",
         verdict(anon_d <= lim_d)],
    ]
    return table(["target", "measured", "result"], rows)


def main() -> None:
    if "--child" in sys.argv:
        common.child_main(CASES, sys.argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = ap.parse_args()
    path = common.ensure_checkpoint()
    facts = common.checkpoint_facts(path)
    print(f"checkpoint {path}: {facts['file_bytes'] / 1e9:.2f} GB; {common.environment()}", flush=True)
    runs = common.run_rounds(Path(__file__).resolve(), args.cases, path, args.repeats)
    if set(args.cases) == set(CASES):
        print(report(runs, facts))
    else:
        for case, rs in runs.items():
            print(case, f"{median(rs, 'total_s'):.2f} s", mib(median(rs, "anon_growth")), "MiB anon")


if __name__ == "__main__":
    main()
