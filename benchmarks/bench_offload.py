"""Offloading benchmark: the ~1.1 GB bf16 checkpoint with a 256 MB CPU budget and disk offload.

    python benchmarks/bench_offload.py [--repeats 3] [--budgets 256MB 600MB]

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

With 256 MB the whole model goes to disk (the 131 MB embedding plus the largest layer do not fit
beside each other), a map accelerate's own loader cannot load; the second budget is one it can.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
from common import mib, table

BUDGET = {"cpu": os.environ.get("BENCH_CPU_BUDGET", "256MB")}
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


def _runs(script: Path, names: list[str], path: Path, repeats: int) -> dict[str, list[dict]]:
    """Like ``common.run_rounds``, but a case that fails is reported rather than fatal."""
    out: dict[str, list[dict] | str] = {}
    for name in names:
        try:
            common.run_child(script, name, path)  # warm-up
            out[name] = []
        except RuntimeError as exc:
            out[name] = str(exc).strip().splitlines()[-1]
    for _ in range(repeats):
        for name in names:
            if isinstance(out[name], list):
                out[name].append(common.run_child(script, name, path))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budgets", nargs="+", default=["256MB", "600MB"])
    args = ap.parse_args()
    path = common.ensure_checkpoint()
    script = Path(__file__).resolve()
    print(f"{common.environment()}\ncheckpoint {path} "
          f"({common.checkpoint_facts(path)['file_bytes'] / 1e9:.2f} GB), {TOKENS} tokens, "
          f"median of {args.repeats} runs")
    for budget in args.budgets:
        os.environ["BENCH_CPU_BUDGET"] = budget
        runs = _runs(script, list(CASES), path, args.repeats)
        print(f"\nmax_memory={{'cpu': '{budget}'}}\n")
        print(_table(runs))


def _table(runs: dict) -> str:
    def med(name: str, key: str) -> float | None:
        rs = runs.get(name)
        return statistics.median(r[key] for r in rs) if isinstance(rs, list) and rs else None

    ref_fwd, acc_fwd, acc_anon = med("mem-bf16", "forward_s"), med("acc-off-bf16", "forward_s"), med(
        "acc-off-bf16", "anon_growth")
    rows = []
    for name, rs in runs.items():
        if not isinstance(rs, list):
            rows.append([name, f"failed: {rs[:120]}", "", "", "", "", "", "", ""])
            continue
        fwd, anon = med(name, "forward_s"), med(name, "anon_growth")
        rows.append([
            name,
            f"{med(name, 'load_s'):.2f}",
            f"{fwd:.2f}",
            f"{fwd / ref_fwd:.2f}x" if ref_fwd else "-",
            f"{fwd / acc_fwd:.2f}x" if acc_fwd else "-",
            mib(anon),
            f"{anon / acc_anon:.2f}x" if acc_anon else "-",
            mib(med(name, "rss_growth")),
            mib(med(name, "offload_bytes")),
        ])
    return table(
        ["case", "load s", "forward s", "fwd vs in-memory", "fwd vs accelerate", "peak anon +MiB",
         "anon vs accelerate", "peak RSS +MiB", "offload folder MiB"],
        rows,
    )


if __name__ == "__main__":
    if "--child" in sys.argv:
        child(sys.argv[1:])
    else:
        main()
