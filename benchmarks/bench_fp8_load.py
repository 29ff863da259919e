"""fp8 benchmark: quantize a ~1.1 GB bf16 Llama-like checkpoint to fp8 on load, then time forwards.

    python benchmarks/bench_fp8_load.py [--repeats 5] [--rounds 7] [--warmup 2] [--tokens 128]

Load cases (fresh process each; wall time = load + one read of every parameter byte; memory =
growth over the pre-load level, see ``common.py``):

* ``lk-fp8``   ``loaderkit.load(dir, strategy="fp8")``: each Linear weight quantized to
               ``float8_e4m3fn`` as it streams, one scale per output channel, bf16 compute;
* ``peer``     ``from_pretrained(dir, dtype=bfloat16)`` then accelerate's
               ``attach_layerwise_casting_hooks(storage_dtype=float8_e4m3fn,
               compute_dtype=bfloat16, skip_modules_pattern=("lm_head",))`` — unscaled fp8, the
               same modules as loaderkit's default (``lm_head`` is kept in bf16 by both);
* ``lk-fp8-1thread``  ``lk-fp8`` after ``torch.set_num_threads(1)`` (diagnostic: quantizing runs
               many small ops, and on a busy 2-core machine every 2-thread op waits for the
               thread the scheduler has preempted).

Targets: ``lk-fp8`` anonymous growth <= 0.9x peer, peak RSS <= 0.95x peer, time <= 1.2x peer.

Forwards: every model is loaded into one process — loaderkit fp8 (bf16 compute), fp8 with
``compute_dtype=torch.float32``, fp8 with ``resident=True``, plain bf16 and plain fp32
(``from_pretrained``), and the peer — and after ``--warmup`` forwards each, ``--rounds`` rounds
each run one forward of every model on a fixed 1 x ``--tokens`` batch, so that load from other
processes hits every model alike. Ratios are medians of per-round ratios. Targets: loaderkit fp8
no slower than the peer; fp8 with fp32 compute vs plain bf16 is reported as measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import common
from common import median, mib, table, verdict


def _lk(path: Path, **options):
    import loaderkit

    if not options:
        return loaderkit.load(path, strategy="fp8")
    return loaderkit.load(path, strategy=loaderkit.strategy("fp8", **options))


def _hf(path: Path, dtype_name: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype_name)).eval()


def case_peer(path: Path):
    import torch
    from accelerate.big_modeling import attach_layerwise_casting_hooks

    model = _hf(path, "bfloat16")
    attach_layerwise_casting_hooks(
        model,
        storage_dtype=torch.float8_e4m3fn,
        compute_dtype=torch.bfloat16,
        skip_modules_pattern=("lm_head",),
    )
    return model


def case_lk_fp8_fp32(path: Path):
    import torch

    return _lk(path, compute_dtype=torch.float32)


def case_lk_fp8_bf16(path: Path):
    import torch

    return _lk(path, compute_dtype=torch.bfloat16)


def case_lk_fp8_one_thread(path: Path):
    import torch

    torch.set_num_threads(1)
    return _lk(path)


CASES = {
    "lk-fp8": _lk,
    "peer": case_peer,
    "lk-fp8-fp32": case_lk_fp8_fp32,
    "lk-fp8-bf16": case_lk_fp8_bf16,
    "lk-fp8-resident": lambda path: _lk(path, resident=True),
    "lk-fp8-1thread": case_lk_fp8_one_thread,
    "bf16": lambda path: _hf(path, "bfloat16"),
    "fp32": lambda path: _hf(path, "float32"),
}
LOAD_CASES = ["lk-fp8", "lk-fp8-bf16", "peer", "lk-fp8-1thread"]
FORWARD_CASES = ["lk-fp8", "lk-fp8-fp32", "lk-fp8-resident", "bf16", "fp32", "peer"]

LABELS = {
    "lk-fp8": '(e) loaderkit.load(strategy="fp8")',
    "peer": "(f) peer: from_pretrained(bf16) + accelerate layerwise casting (fp8 storage)",
    "lk-fp8-fp32": 'loaderkit fp8, compute_dtype=float32',
    "lk-fp8-bf16": "(e'') same as (e) with compute_dtype=bfloat16, as the peer computes",
    "lk-fp8-resident": "loaderkit fp8, resident=True (bf16 copies kept)",
    "lk-fp8-1thread": "(e') same as (e) after torch.set_num_threads(1)",
    "bf16": "plain bf16 (from_pretrained)",
    "fp32": "plain fp32 (from_pretrained)",
}


def load_report(runs: dict[str, list[dict]]) -> str:
    peer_t = median(runs["peer"], "total_s")
    rows = []
    for case, rs in runs.items():
        t = median(rs, "total_s")
        dt = rs[0]["dtype_bytes"]
        rows.append([
            LABELS[case],
            f"{t:.2f}",
            common.spread(rs, "total_s"),
            f"{t / peer_t:.2f}x",
            f"{median(rs, 'cpu_s'):.2f}",
            mib(median(rs, "anon_growth")),
            mib(median(rs, "rss_growth")),
            mib(median(rs, "peak_rss")),
            ", ".join(f"{k} {mib(v)}" for k, v in sorted(dt.items())),
        ])
    header = ["case", "load+touch s (median)", "min-max", "vs peer", "CPU s", "peak anon +MiB",
              "peak RSS +MiB", "peak RSS MiB", "model MiB by dtype"]
    return table(header, rows) + "\n\n" + load_targets(runs)


def load_targets(runs: dict[str, list[dict]]) -> str:
    e, f = runs["lk-fp8"], runs["peer"]
    rows = []
    for label, key, limit in (
        ("anon <= 0.9x peer", "anon_growth", 0.9),
        ("peak RSS <= 0.95x peer", "peak_rss", 0.95),
        ("time <= 1.2x peer", "total_s", 1.2),
    ):
        a, b = median(e, key), median(f, key)
        fmt = (lambda v: f"{v:.2f} s") if key == "total_s" else (lambda v: f"{mib(v)} MiB")
        rows.append([f"(e) {label}", f"{fmt(a)} vs {fmt(b)} = {a / b:.2f}x", verdict(a <= limit * b)])
    return table(["target", "measured", "result"], rows)


def _ratio(times: dict[str, list[float]], case: str, ref: str) -> float:
    """Median over rounds of ``case``'s time / ``ref``'s time in the same round."""
    return statistics.median(a / b for a, b in zip(times[case], times[ref]))


def forward_report(res: dict) -> str:
    times, mem = res["times"], res["memory"]
    rows = []
    for case, ts in times.items():
        rows.append([
            LABELS[case],
            f"{statistics.median(ts):.2f}",
            f"{min(ts):.2f}-{max(ts):.2f}",
            f"{_ratio(times, case, 'peer'):.2f}x",
            f"{_ratio(times, case, 'bf16'):.2f}x",
            mib(mem[case]["load_anon"]),
            mib(mem[case]["warmup_anon"]),
        ])
    header = ["model", "forward s (median)", "min-max", "vs peer (per-round median)", "vs plain bf16",
              "anon +MiB at load", "anon +MiB over warm-up"]
    r_peer, r_bf16 = _ratio(times, "lk-fp8", "peer"), _ratio(times, "lk-fp8-fp32", "bf16")
    checks = [
        ["loaderkit fp8 no slower than the peer", f"{r_peer:.2f}x the peer", verdict(r_peer <= 1.0)],
        ["fp8 + fp32 compute faster than plain bf16", f"{r_bf16:.2f}x plain bf16", verdict(r_bf16 < 1.0)],
    ]
    return table(header, rows) + "\n\n" + table(["target", "measured", "result"], checks)


def main() -> None:
    if "--child" in sys.argv:
        common.child_main(CASES, sys.argv[1:])
        return
    if "--forward-child" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--forward-child", nargs=4, metavar=("PATH", "ROUNDS", "WARMUP", "TOKENS"))
        p, rounds, warmup, tokens = ap.parse_args().forward_child
        res = common.interleaved_forwards(
            CASES, FORWARD_CASES, Path(p), int(rounds), int(warmup), int(tokens)
        )
        print("@@result " + json.dumps(res), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="load rounds after the warm-up")
    ap.add_argument("--rounds", type=int, default=7, help="timed forward rounds (every model once)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed forwards per model first")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-forward", action="store_true")
    args = ap.parse_args()
    path = common.ensure_checkpoint()
    script = Path(__file__).resolve()
    print(f"checkpoint {path}; {common.environment()}", flush=True)
    if not args.skip_load:
        runs = common.run_rounds(script, LOAD_CASES, path, args.repeats)
        print(load_report(runs), flush=True)
    if not args.skip_forward:
        cmd = [sys.executable, str(script), "--forward-child", str(path), str(args.rounds),
               str(args.warmup), str(args.tokens)]
        print("\n" + forward_report(common.run_json(cmd)))


if __name__ == "__main__":
    main()
