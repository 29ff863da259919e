"""Offloading benchmark: the ~1.1 GB bf16 checkpoint with a 256 MB CPU budget and disk offload.

    python benchmarks/bench_offload.py [--repeats 3] [--forwards 3] [--tokens 32]

Each case runs in a fresh process: load, then ``--forwards`` timed forwards (after one warm-up
forward, which is the first time offloaded weights are read). Memory is measured from the start
of the load to the end of the last forward — offloading exists to bound the memory a forward
needs — as growth over the pre-load level (see ``common.py``).

Cases:

* ``mem-bf16``   ``loaderkit.load(dir, "bf16")``, everything in memory (the reference);
* ``lk-off-bf16``  ``loaderkit.load(dir, "bf16", device_map="auto", max_memory={"cpu": "256MB"},
                   offload_folder=...)``: offloaded tensors need no conversion, so the offload
                   index points at the checkpoint file (nothing is copied);
* ``lk-off-fp8``   the same with ``strategy="fp8"``: offloaded weights are written as fp8 while
                   streaming, and upcast on use;
* ``acc-off-bf16``  accelerate's own ``load_checkpoint_and_dispatch`` on the same checkpoint, with
                   the same budget and an offload folder.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
from common import MiB, mib, table

BUDGET = {"cpu": "256MB"}
TOKENS = 32
FORWARDS = 3


def case_mem_bf16(path: Path, folder: str):
    import loaderkit

    return loaderkit.load(path, "bf16", progress=False)


def case_lk_off_bf16(path: Path, folder: str):
    import loaderkit

    return loaderkit.load(path, "bf16", device_map="auto", max_memory=BUDGET, offload_folder=folder,
                          progress=False)


def case_lk_off_fp8(path: Path, folder: str):
    import loaderkit

    return loaderkit.load(path, "fp8", device_map="auto", max_memory=BUDGET, offload_folder=folder,
                          progress=False)


def case_acc_off_bf16(path: Path, folder: str):
    import torch
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = load_checkpoint_and_dispatch(
        model, str(path), device_map="auto", max_memory=BUDGET, offload_folder=folder,
        dtype=torch.bfloat16, no_split_module_classes=["LlamaDecoderLayer"],
    )
    return model.eval()


CASES = {
    "mem-bf16": case_mem_bf16,
    "lk-off-bf16": case_lk_off_bf16,
    "lk-off-fp8": case_lk_off_fp8,
    "acc-off-bf16": case_acc_off_bf16,
}


def child(argv: list[str]) -> None:
    """Load one case, run the forwards, print the measurements (``@@`` marker lines)."""
    import importlib

    ap = argparse.ArgumentParser()
    ap.add_argument("--child", required=True)
    ap.add_argument("--path", required=True)
    args = ap.parse_args(argv)
    for mod in common.PRELOAD:
        importlib.import_module(mod)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = common._status()
    with tempfile.TemporaryDirectory(prefix="bench-offload-") as folder:
        common._emit("start")
        t0 = time.perf_counter()
        model = CASES[args.child](Path(args.path), folder)
        load_s = time.perf_counter() - t0
        ids = common._batch(TOKENS)
        first = common._forward(model, ids)
        times = [common._forward(model, ids) for _ in range(FORWARDS)]
        after = common._status()
        common._emit("loaded")
        disk = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    common._emit("result", {
        "load_s": load_s,
        "total_s": load_s,
        "first_forward_s": first,
        "forward_s": statistics.median(times),
        "base_rss": before["VmRSS"],
        "base_anon": before["RssAnon"],
        "peak_rss": after["VmHWM"],
        "rss_growth": after["VmHWM"] - before["VmRSS"],
        "offload_bytes": disk,
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = common.ensure_checkpoint()
    script = Path(__file__).resolve()
    names = list(CASES)
    runs = common.run_rounds(script, names, path, repeats=args.repeats)
    print(f"\n{common.environment()}\ncheckpoint {path} ({common.checkpoint_facts(path)['file_bytes'] / 1e9:.2f} GB), "
          f"max_memory={BUDGET}, {TOKENS} tokens, median of {args.repeats} runs\n")
    ref_fwd = statistics.median(r["forward_s"] for r in runs["mem-bf16"])
    acc_fwd = statistics.median(r["forward_s"] for r in runs["acc-off-bf16"])
    acc_anon = statistics.median(r["anon_growth"] for r in runs["acc-off-bf16"])
    rows = []
    for name in names:
        rs = runs[name]
        fwd = statistics.median(r["forward_s"] for r in rs)
        anon = statistics.median(r["anon_growth"] for r in rs)
        rows.append([
            name,
            f"{statistics.median(r['load_s'] for r in rs):.2f}",
            f"{fwd:.2f}",
            f"{fwd / ref_fwd:.2f}x",
            f"{fwd / acc_fwd:.2f}x",
            mib(anon),
            f"{anon / acc_anon:.2f}x" if acc_anon > 0 else "-",
            mib(statistics.median(r["rss_growth"] for r in rs)),
            mib(statistics.median(r["offload_bytes"] for r in rs)),
        ])
    print(table(
        ["case", "load s", "forward s", "fwd vs in-memory", "fwd vs accelerate", "peak anon +MiB",
         "anon vs accelerate", "peak RSS +MiB", "offload folder MiB"],
        rows,
    ))


if __name__ == "__main__":
    if "--child" in sys.argv:
        child(sys.argv[1:])
    else:
        main()
