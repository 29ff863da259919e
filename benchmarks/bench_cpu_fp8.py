"""fp8 and int8 on the CPU, op by op: decode, single-token forward, quantize-on-load, ``pread`` into the scratch.

    python benchmarks/bench_cpu_fp8.py [decode|forward|linear|load|quantize|read|probe ...] [--rounds 15] [--repeats 5]

* ``decode``: ``quant.decode_stored`` (what cast rules run at forward time) of a 4096x4096
  ``float8_e4m3fn`` weight with per-tensor, per-channel and 128x128 block scales into a reused
  bf16 / fp16 / fp32 buffer, against a copy of the same number of output bytes into a reused
  buffer (``copy_``, the memcpy rate); rounds alternate the routes; each route's output is
  checked bit for bit against ``quant.dequantize_reference``.
* ``forward``: a 4-layer Llama (hidden 1024, intermediate 2816, vocab 32000, random weights,
  written once under ``.bench/llama-small-bf16``) loaded by ``loaderkit.load(strategy="fp8")``
  (bf16 and fp32 compute), by ``loaderkit.load(strategy="int8")`` and as plain bf16 / fp32
  (``from_pretrained``); forwards of 1 x 1 and 1 x 64 tokens timed round-robin in one process;
  medians of per-round times and of per-round ratios to plain bf16; agreement of the last
  position's logits with plain bf16 and plain fp32.
* ``linear``: one 2816x1024 Linear (random weights, std 0.02) at 1 and 64 tokens, round-robin:
  plain bf16 and fp32 ``F.linear``, the int8 kernel (``kernels.int8.int8_linear``) and the fp8
  cast path (a per-channel fp8 weight decoded into a reused buffer, then ``F.linear``); times,
  ratios to plain bf16, and each one's rel-L2 error against float32 math on the unquantized
  weight and the same bf16 input.
* ``load``: quantize-on-load of that Llama, the ``lk-fp8``, ``lk-fp8-bf16`` and ``peer`` cases of
  ``bench_fp8_load.py`` (``loaderkit.load(strategy="fp8")``, by default and with bfloat16 compute
  as the peer computes, vs ``from_pretrained`` + accelerate's layerwise casting; the goals compare
  the bfloat16-compute case, the same work as the peer's), ``--repeats`` fresh processes each after a warm-up, alternating, at the
  default thread count; wall and CPU time of load + touch, peak anonymous memory (``common.py``).
* ``quantize``: ``quant.quantize`` of bf16 weights per output channel (and per tensor, per 128x128
  block) and ``int8.quantize_int8``: median wall time and the peak resident memory added during
  the call (``VmHWM`` after resetting it), for each shape.
* ``read``: ``SafetensorsReader.read`` of every tensor of a file whose tensors start at odd page
  offsets, page cache warm: a fresh reader (first touch of its scratch) and the same reader again.
* ``probe``: whether a second thread count re-runs the CPU probe (cache in a temporary folder).

Prints one line of machine facts (``common.environment()``, load average) and markdown tables,
then the goals of the modes that ran (thresholds: the constants under "goals" below) and exits 1,
after printing everything, when one is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common

SMALL = dict(common.LLAMA_CONFIG, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4)

# -- goals -------------------------------------------------------------------------------------
# The project's performance targets for fp8 on the CPU. Each is judged on medians of one run, at
# one thread count; a missed goal is printed as missed and makes the script exit 1.

#: decode of every scaled fp8 route (per tensor, per channel, block) to bf16 / fp16 / fp32
#: writes its output at no less than this fraction of the memcpy rate of the same output bytes
DECODE_VS_MEMCPY_MIN = 0.5
#: an fp8-stored model's forward of 1 x FORWARD_GOAL_TOKENS tokens takes at most this multiple
#: of the plain model's forward in the same compute dtype
FORWARD_VS_PLAIN_MAX = 1.3
FORWARD_GOAL_TOKENS = 64
#: quantize-on-load takes at most this multiple of the peer's wall time, and of its CPU time
LOAD_VS_PEER_MAX = 1.2
#: quantize-on-load's peak anonymous memory is at most the final fp8 + scale bytes plus this
LOAD_ANON_SLACK = 32 * common.MiB


@dataclass
class Goal:
    name: str
    measured: str
    met: bool


GOALS: list[Goal] = []
#: the modes that evaluate goals
GOAL_MODES = ("decode", "forward", "load")


def _goal(name: str, measured: str, met: bool) -> None:
    GOALS.append(Goal(name, measured, bool(met)))


def _load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _machine() -> str:
    return f"{common.environment()}; {_load_average()}"


# -- decode ------------------------------------------------------------------------------------

DECODE_SHAPE = (4096, 4096)
DECODE_ROUTES = ("tensor", "channel", "block")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode(rounds: int) -> None:
    import torch

    from loaderkit.kernels import quant

    g = torch.Generator().manual_seed(0)
    w = (torch.randn(DECODE_SHAPE, generator=g) / 32).to(torch.bfloat16)
    block = (128, 128)
    stored = {gran: quant.quantize(w, granularity=gran, block=block) for gran in DECODE_ROUTES}
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    outs = {dt: torch.empty(DECODE_SHAPE, dtype=dt) for dt in dtypes}
    srcs = {dt: torch.ones(DECODE_SHAPE, dtype=dt) for dt in dtypes}  # memcpy source, touched
    copies = {dt: torch.empty(DECODE_SHAPE, dtype=dt) for dt in dtypes}

    def run(gran, dt):
        q, scale = stored[gran]
        return lambda: quant.decode_stored(q, dt, scale, gran, block, out=outs[dt])

    exact = {}
    for gran in DECODE_ROUTES:
        q, scale = stored[gran]
        for dt in dtypes:
            run(gran, dt)()  # warm-up (tables, thread pool, first touch of the output)
            ref = quant.dequantize_reference(q, dt, scale, block if gran == "block" else None)
            exact[gran, dt] = torch.equal(outs[dt].view(torch.uint8), ref.view(torch.uint8))
    for dt in dtypes:
        copies[dt].copy_(srcs[dt])
    memcpy: dict = {dt: [] for dt in dtypes}
    times: dict = {(gran, dt): [] for gran in DECODE_ROUTES for dt in dtypes}
    cases = list(times)
    for r in range(rounds):
        for dt in dtypes:
            memcpy[dt].append(_timed(lambda: copies[dt].copy_(srcs[dt])))
        for gran, dt in cases[r % len(cases):] + cases[: r % len(cases)]:
            times[gran, dt].append(_timed(run(gran, dt)))
    n = w.numel()
    rows = []
    for dt in dtypes:
        t = statistics.median(memcpy[dt])
        rows.append(["memcpy (copy_ into a reused buffer)", _short(dt), f"{t * 1e3:.2f}",
                     f"{n * dt.itemsize / t / 1e9:.2f}", "1.00", ""])
    for (gran, dt), ts in times.items():
        t, tm = statistics.median(ts), statistics.median(memcpy[dt])
        rows.append([f"{gran} scale", _short(dt), f"{t * 1e3:.2f}", f"{n * dt.itemsize / t / 1e9:.2f}",
                     f"{tm / t:.2f}", "yes" if exact[gran, dt] else "NO"])
        _goal(f"decode, {gran} scale -> {_short(dt)}: >= {DECODE_VS_MEMCPY_MIN:.2f}x the memcpy rate",
              f"{tm / t:.2f}x ({n * dt.itemsize / t / 1e9:.2f} vs {n * dt.itemsize / tm / 1e9:.2f} GB/s of output)",
              tm / t >= DECODE_VS_MEMCPY_MIN)
        if not exact[gran, dt]:
            _goal(f"decode, {gran} scale -> {_short(dt)}: bit-exact with dequantize_reference",
                  "differs", False)
    print(f"quant.decode_stored of a {DECODE_SHAPE[0]}x{DECODE_SHAPE[1]} float8_e4m3fn weight into a reused "
          f"buffer, {rounds} rounds ({torch.get_num_threads()} threads)")
    print(common.table(["route", "to", "ms (median)", "GB/s of output", "rate vs memcpy", "bit-exact"], rows))


def _short(dtype) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[str(dtype).removeprefix("torch.")]


def _small_checkpoint() -> Path:
    path = common.BENCH_DIR / "llama-small-bf16"
    if not (path / "model.safetensors").is_file():
        common.BENCH_DIR.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-c", common._BUILD.format(cfg=SMALL), str(path)], check=True)
    return path


# -- forward -----------------------------------------------------------------------------------


def forward(rounds: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import loaderkit

    path = _small_checkpoint()
    models = {}
    for compute in ("bfloat16", "float32"):
        short = compute.replace("bfloat", "bf").replace("float", "fp")
        models[f"fp8 ({short} compute)"] = loaderkit.load(path, strategy=loaderkit.strategy("fp8", compute_dtype=compute))
        try:
            fold = loaderkit.strategy("fp8", compute_dtype=compute, fold_scales=True)
        except loaderkit.LoaderKitError:  # a loaderkit without the option
            continue
        models[f"fp8 ({short} compute), fold_scales"] = loaderkit.load(path, strategy=fold)
    try:
        models["int8 (bf16 compute)"] = loaderkit.load(path, strategy="int8")
    except loaderkit.LoaderKitError as exc:  # a loaderkit or torch without it
        print(f"int8 skipped: {exc}")
    models["plain bf16"] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    models["plain fp32"] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, SMALL["vocab_size"], (1, FORWARD_GOAL_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {n: m(input_ids=ids, use_cache=False).logits[0, -1].float() for n, m in models.items()}
    rows = []
    for n in models:
        cells = [n]
        for ref in ("plain bf16", "plain fp32"):
            a, b = logits[n], logits[ref]
            cells += [f"{float(torch.nn.functional.cosine_similarity(a, b, dim=0)):.6f}",
                      f"{float((a - b).abs().max()):.4f}"]
        rows.append(cells)
    print(common.table(["model", "cos vs bf16", "max diff vs bf16", "cos vs fp32", "max diff vs fp32"], rows))
    for tokens in (1, FORWARD_GOAL_TOKENS):
        batch = ids[:, :tokens]
        times = {n: [] for n in models}
        with torch.no_grad():
            for m in models.values():
                for _ in range(3):
                    m(input_ids=batch, use_cache=False)
            for r in range(rounds):
                names = list(models)
                for n in names[r % len(names):] + names[: r % len(names)]:
                    t0 = time.perf_counter()
                    models[n](input_ids=batch, use_cache=False)
                    times[n].append(time.perf_counter() - t0)
        rows = []
        for n, ts in times.items():
            ratio = statistics.median(a / b for a, b in zip(ts, times["plain bf16"]))
            ratio32 = statistics.median(a / b for a, b in zip(ts, times["plain fp32"]))
            rows.append([n, f"{statistics.median(ts) * 1e3:.1f}", f"{min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f}",
                         f"{ratio:.2f}x", f"{ratio32:.2f}x"])
        print(f"\n1 x {tokens} tokens, {rounds} rounds ({torch.get_num_threads()} threads)")
        print(common.table(["model", "forward ms (median)", "min-max", "vs plain bf16", "vs plain fp32"], rows))
        if tokens == FORWARD_GOAL_TOKENS:
            for short in ("bf16", "fp32"):
                fp8, plain = times[f"fp8 ({short} compute)"], times[f"plain {short}"]
                ratio = statistics.median(a / b for a, b in zip(fp8, plain))
                _goal(f"fp8 forward ({short} compute), 1x{tokens}: <= {FORWARD_VS_PLAIN_MAX:.2f}x "
                      f"plain {short}", f"{ratio:.2f}x ({statistics.median(fp8) * 1e3:.1f} vs "
                      f"{statistics.median(plain) * 1e3:.1f} ms; median of per-round ratios)",
                      ratio <= FORWARD_VS_PLAIN_MAX)


# -- load --------------------------------------------------------------------------------------

LOAD_CASES = {
    "lk-fp8": 'loaderkit.load(strategy="fp8")',
    "lk-fp8-bf16": 'loaderkit.load(strategy=fp8, compute_dtype=bfloat16)',
    "peer": "peer: from_pretrained(bf16) + layerwise casting",
}
#: the loaderkit case the goals compare with the peer: the same work (fp8 storage, the other
#: weights kept in bfloat16 for bfloat16 compute). The default case also casts the non-fp8
#: weights to float32 where the CPU probe finds float32 compute faster, which the peer never does.
LOAD_GOAL_CASE = "lk-fp8-bf16"


def load(repeats: int) -> None:
    import torch

    path = _small_checkpoint()
    script = Path(__file__).resolve().with_name("bench_fp8_load.py")  # its cases, on this checkpoint
    runs = common.run_rounds(script, list(LOAD_CASES), path, repeats)
    rows = []
    for case, rs in runs.items():
        rows.append([LOAD_CASES[case], f"{common.median(rs, 'total_s'):.3f}", common.spread(rs, "total_s"),
                     f"{common.median(rs, 'cpu_s'):.3f}", common.mib(common.median(rs, "anon_growth")),
                     common.mib(common.median(rs, "rss_growth")),
                     ", ".join(f"{k} {common.mib(v)}" for k, v in sorted(rs[0]["dtype_bytes"].items()))])
    print(f"quantize-on-load of {path.name} ({common.mib((path / 'model.safetensors').stat().st_size)} MiB bf16), "
          f"{repeats} fresh processes per case, default thread count ({torch.get_num_threads()})")
    print(common.table(["case", "load+touch s (median)", "min-max", "CPU s", "peak anon +MiB", "peak RSS +MiB",
                        "model MiB by dtype"], rows))
    lk, peer = runs[LOAD_GOAL_CASE], runs["peer"]
    for key, what in (("total_s", "wall"), ("cpu_s", "CPU")):
        a, b = common.median(lk, key), common.median(peer, key)
        _goal(f"quantize-on-load (bf16 compute, as the peer) {what} time <= {LOAD_VS_PEER_MAX:.2f}x the peer's",
              f"{a / b:.2f}x ({a:.3f} vs {b:.3f} s)", a <= LOAD_VS_PEER_MAX * b)
    d = runs["lk-fp8"]
    print(f"default strategy: {common.median(d, 'total_s') / common.median(peer, 'total_s'):.2f}x the peer's wall "
          f"time ({', '.join(f'{k} {common.mib(v)} MiB' for k, v in sorted(d[0]['dtype_bytes'].items()))})")
    # the scales are float32 buffers; the only other float32 tensor is the rotary inv_freq buffer
    # (a few hundred bytes), counted here too
    dt = lk[0]["dtype_bytes"]
    final = dt.get("float8_e4m3fn", 0) + dt.get("float32", 0)
    anon = common.median(lk, "anon_growth")
    _goal(f"quantize-on-load peak anonymous memory <= fp8 + scale bytes + {common.mib(LOAD_ANON_SLACK)} MiB",
          f"{common.mib(anon)} MiB (limit {common.mib(final + LOAD_ANON_SLACK)} MiB: {common.mib(final)} MiB of fp8 "
          f"weights and scales)", anon <= final + LOAD_ANON_SLACK)


# -- linear ------------------------------------------------------------------------------------


def linear(rounds: int) -> None:
    import torch
    import torch.nn.functional as F

    from loaderkit.kernels import int8, quant

    n, k = SMALL["intermediate_size"], SMALL["hidden_size"]
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    wb = w.to(torch.bfloat16)
    q8, s8 = int8.quantize_int8(wb)
    f8, sf8 = quant.quantize(wb)
    buf = torch.empty(n, k, dtype=torch.bfloat16)
    cases = {
        "plain bf16": lambda x: F.linear(x, wb),
        "plain fp32": lambda x: F.linear(x.float(), w),
        "int8 kernel": lambda x: int8.int8_linear(x, q8, s8, None, torch.bfloat16),
        "fp8 cast path": lambda x: F.linear(x, quant.upcast(f8, torch.bfloat16, sf8, out=buf)),
    }
    for tokens in (1, 64):
        x = torch.randn(tokens, k, generator=g).to(torch.bfloat16)
        want = x.float() @ w.t()
        times = {c: [] for c in cases}
        with torch.no_grad():
            errors = {c: float((f(x).float() - want).norm() / want.norm()) for c, f in cases.items()}
            for r in range(rounds):
                names = list(cases)
                for c in names[r % len(names):] + names[: r % len(names)]:
                    t0 = time.perf_counter()
                    cases[c](x)
                    times[c].append(time.perf_counter() - t0)
        rows = [[c, f"{statistics.median(ts) * 1e3:.3f}",
                 f"{statistics.median(a / b for a, b in zip(ts, times['plain bf16'])):.2f}x", f"{errors[c]:.4f}"]
                for c, ts in times.items()]
        print(f"\nLinear {n}x{k}, {tokens} tokens, {rounds} rounds ({torch.get_num_threads()} threads); "
              f"load average {os.getloadavg()[0]:.2f}")
        print(common.table(["kernel", "ms (median)", "vs plain bf16", "rel-L2 vs fp32 math"], rows))


# -- quantize ----------------------------------------------------------------------------------


def _hwm_reset() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return common._status()["VmRSS"]


def quantize(rounds: int) -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # every allocation over 64 KiB mapped and unmapped on its own, so that the peak RSS of a
        # call is what it allocates (glibc would otherwise reuse the previous call's memory)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        subprocess.run([sys.executable, __file__, "quantize", "--rounds", str(rounds)], env=env, check=True)
        return
    import torch

    from loaderkit.kernels import int8, quant

    shapes = [(2048, 2048), (5632, 2048), (2048, 5632), (32000, 2048)]
    rows = []
    g = torch.Generator().manual_seed(0)
    for shape in shapes:
        w = (torch.randn(shape, generator=g) / 32).to(torch.bfloat16)
        for gran in ("channel", "tensor", "block", "int8 channel"):
            run = (lambda: int8.quantize_int8(w)) if gran.startswith("int8") else (
                lambda: quant.quantize(w, granularity=gran))
            run()  # warm-up
            wall, cpu, peak = [], [], []
            for _ in range(rounds):
                base = _hwm_reset()
                t0, c0 = time.perf_counter(), time.process_time()
                q, _ = run()
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                peak.append(common._status()["VmHWM"] - base - q.nbytes)
                del q
            n = w.numel()
            t = statistics.median(wall)
            rows.append([f"{shape[0]}x{shape[1]}", gran, f"{t * 1e3:.1f}", f"{statistics.median(cpu) * 1e3:.1f}",
                         f"{n / t / 1e9:.2f}", f"{statistics.median(peak) / common.MiB:.1f}"])
    print(f"quant.quantize of bf16 weights to float8_e4m3fn (int8: int8.quantize_int8), {rounds} runs ({torch.get_num_threads()} threads)")
    print(common.table(["shape", "scales", "wall ms (median)", "CPU ms", "Gelem/s", "peak transient MiB (beyond q)"],
                       rows))


# -- read --------------------------------------------------------------------------------------


def _read_file(folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    file = folder / "model.safetensors"
    # tensors of odd lengths: each one starts at a different page offset in the file
    tensors = {f"t{i:02d}": torch.ones(8 << 20 | (i * 1000 + 8), dtype=torch.uint8) for i in range(24)}
    save_file(tensors, str(file))
    return file


def read(rounds: int) -> None:
    import torch

    import loaderkit
    from loaderkit.plugins.safetensors_format import SafetensorsFormat

    with tempfile.TemporaryDirectory(dir=common.BENCH_DIR) as d:
        file = _read_file(Path(d))
        info = loaderkit.inspect(file)
        names = sorted(info.tensors)
        total = sum(t.nbytes for t in info.tensors.values())
        with open(file, "rb") as f:  # page cache warm
            while f.read(1 << 24):
                pass
        cold, warm = [], []
        for _ in range(rounds):
            reader = SafetensorsFormat().open(info)
            for label, out in (("cold", cold), ("warm", warm)):
                t0 = time.perf_counter()
                for n in names:
                    reader.read(n)
                out.append(time.perf_counter() - t0)
            reader.close()
        rows = [[label, f"{statistics.median(ts) * 1e3:.1f}", f"{total / statistics.median(ts) / 1e9:.2f}"]
                for label, ts in (("fresh reader (first touch of the scratch)", cold), ("same reader again", warm))]
        print(f"SafetensorsReader.read of {len(names)} tensors, {total / common.MiB:.0f} MiB, page cache warm, "
              f"{rounds} runs ({torch.get_num_threads()} threads)")
        print(common.table(["pass", "ms (median)", "GB/s"], rows))


# -- probe -------------------------------------------------------------------------------------

_PROBE = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from loaderkit.plugins import devices
t0 = time.perf_counter(); devices.probe_ratios(); print(time.perf_counter() - t0)
"""


def probe(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, XDG_CACHE_HOME=d)
        rows = []
        for i, threads in enumerate([1, 2] * 3):
            out = subprocess.run([sys.executable, "-c", _PROBE, str(threads)], env=env, text=True,
                                 capture_output=True, check=True).stdout
            rows.append([str(i + 1), str(threads), f"{float(out) * 1e3:.1f}"])
        keys = len(json.loads((Path(d) / "loaderkit" / "cpu-probe.json").read_text()))
    print(f"probe_ratios() in fresh processes, alternating thread counts; cache ends with {keys} keys")
    print(common.table(["process", "threads", "probe ms"], rows))


def report_goals(modes: list[str]) -> bool:
    """Print the goals evaluated in this run and a ``goal missed:`` line for each missed one;
    returns whether all were met."""
    print(f"\n{_load_average()} at the end")
    skipped = [m for m in GOAL_MODES if m not in modes]
    if GOALS:
        print("\n" + common.table(["goal", "measured", "result"],
                                  [[g.name, g.measured, "met" if g.met else "MISSED"] for g in GOALS]))
    if skipped:
        print(f"goals not evaluated in this run (modes not run): {', '.join(skipped)}")
    missed = [g for g in GOALS if not g.met]
    for g in missed:
        print(f"goal missed: {g.name}: {g.measured}")
    return not missed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="*", default=["decode", "probe", "quantize", "read", "linear", "forward", "load"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=5, help="fresh-process loads per case (load)")
    args = ap.parse_args()
    modes = {"decode": decode, "forward": forward, "linear": linear, "load": load, "quantize": quantize, "read": read, "probe": probe}
    unknown = [w for w in args.what if w not in modes]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(modes)}")
    print(_machine(), flush=True)
    for what in args.what:
        print(flush=True)
        modes[what](args.repeats if what == "load" else args.rounds)
    if not report_goals(args.what):
        sys.exit(1)


if __name__ == "__main__":
    main()
