"""Built-in plugin ``devices``: capabilities of CPU and CUDA devices, probed on this machine.

CPU: bfloat16 and float16 are *representable* everywhere but only fast with native
instructions (``avx512_bf16`` / ``amx_bf16`` for bf16, ``avx512_fp16`` / ``amx_fp16`` for fp16);
without them torch emulates them, which on an AVX2 machine measured a bf16 forward 4.9x slower
than fp32. Flags alone are not enough (torch may not use them for every op), so the plugin also
times a small linear + GELU + layer-norm block in each dtype, and an fp8 Linear decoded and
applied in bfloat16 and in float32 (:func:`measure_ratios`; once per machine and thread count: the
result is cached in ``~/.cache/loaderkit/cpu-probe.json``), calls a dtype fast only if it runs
within :data:`FAST_RATIO` of float32, and hands the measured ratios to the strategies
(:attr:`DeviceCaps.speeds`: the ``fp8`` strategy picks its compute dtype from them). Set ``LOADERKIT_DEVICE_PROBE=0`` to decide from the flags
alone. CUDA: bf16 is native from sm 8.0, fp16 from sm 7.0, scaled fp8 matmul from sm 8.9.
"""

from __future__ import annotations

import functools
import os
import platform

import torch

from loaderkit.plugin import DeviceCaps, env_flag, hookimpl
from loaderkit.errors import PlanError


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: a dtype is "fast" on the CPU if the probe block runs within this factor of float32's time.
FAST_RATIO = 1.15


def _cache_file() -> str:
    from loaderkit.kernels.compiled import cache_root

    return str(cache_root() / "cpu-probe.json")


def decode_route() -> str:
    """Which fp8 decode the CPU runs: ``"compiled-<library>"`` (the compiled kernel built and
    checked on this machine) or ``"tables"`` (torch lookup tables): part of the probe's key, as
    the fp8 cast path's speed depends on it."""
    from loaderkit.kernels import compiled

    lib = compiled.library("decode")
    return "tables" if lib is None else f"compiled-{lib.path.name}"


def _probe_key(threads: int | None = None, route: str | None = None) -> str:
    """The cache key of this machine's probe at ``threads`` threads (default: torch's count now)
    with the fp8 decode ``route`` (default: :func:`decode_route`)."""
    import hashlib

    threads = torch.get_num_threads() if threads is None else threads
    route = decode_route() if route is None else route
    parts = (_cpu_name(), " ".join(sorted(cpu_flags())), torch.__version__, str(threads), route)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def probe_ratios() -> dict[str, float]:
    """:func:`measure_ratios`, remembered per machine (CPU model and flags, torch version,
    thread count, fp8 decode route) in ``~/.cache/loaderkit/cpu-probe.json`` so that a process does not pay the
    probe on every first load, and in the process per key (a process that changes its thread
    count gets that count's ratios). A cache that cannot be read or written is ignored."""
    return _ratios_for(_probe_key())


@functools.lru_cache(maxsize=None)
def _ratios_for(key: str) -> dict[str, float]:
    import json

    path = _cache_file()
    known = _read_cache(path)
    cached = known.get(key)
    if isinstance(cached, dict) and all(isinstance(cached.get(n), float) for n in PROBED):
        return cached
    ratios = measure_ratios()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            # every key is kept (thread counts alternate between processes): merged, not replaced
            json.dump({**_read_cache(path), key: ratios}, f)
        os.replace(tmp, path)
    except OSError:
        pass
    return ratios


def _read_cache(path: str) -> dict:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


#: what :func:`measure_ratios` measures (the keys of :attr:`DeviceCaps.speeds` on the CPU).
PROBED = ("bfloat16", "float16", "fp8-bfloat16-rows1", "fp8-bfloat16-rows128")


def measure_ratios() -> dict[str, float]:
    """Times relative to float32, on this CPU, of:

    * ``"bfloat16"``, ``"float16"``: a linear + GELU + layer-norm block (128 x 1024 activations);
    * ``"fp8-bfloat16-rows1"``, ``"fp8-bfloat16-rows128"``: what an fp8 Linear costs per forward
      on the cast path — its 1024 x 1024 per-channel fp8 weight decoded (:func:`upcast`, into a
      reused buffer) and applied to 1 row (token-by-token generation) or 128 rows (a prompt, a
      batch, a diffusion step) — computing in bfloat16 against computing in float32.

    Each is timed in interleaved rounds and the median of the per-round ratios is kept, so that a
    busy machine slows every dtype alike rather than skewing one of them.
    """
    import statistics
    import time

    import torch.nn.functional as F

    from loaderkit.kernels.quant import quantize, upcast

    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(128, 1024, generator=g)
    w32 = torch.randn(1024, 1024, generator=g) / 32
    names = ("float32", "bfloat16", "float16")
    data = {n: (x32.to(getattr(torch, n)), w32.to(getattr(torch, n))) for n in names}
    q, scale = quantize(w32)
    wide = ("float32", "bfloat16")
    decoded = {n: torch.empty(w32.shape, dtype=getattr(torch, n)) for n in wide}

    def run(name: str) -> float:
        x, w = data[name]
        t0 = time.perf_counter()
        F.layer_norm(F.linear(F.gelu(F.linear(x, w)), w), (1024,))
        return time.perf_counter() - t0

    def run_fp8(name: str, rows: int) -> float:
        x, out = data[name][0][:rows], decoded[name]
        t0 = time.perf_counter()
        F.linear(x, upcast(q, out.dtype, scale, out=out))
        return time.perf_counter() - t0

    ratios: dict[str, list[float]] = {n: [] for n in PROBED}
    with torch.no_grad():
        for n in names:
            run(n)  # warm-up
        for n in wide:
            run_fp8(n, 128)
        for _ in range(9):
            t = {n: run(n) for n in names}
            for n in ("bfloat16", "float16"):
                ratios[n].append(t[n] / t["float32"])
            for rows in (1, 128):
                t = {n: run_fp8(n, rows) for n in wide}
                ratios[f"fp8-bfloat16-rows{rows}"].append(t["bfloat16"] / t["float32"])
    return {n: statistics.median(r) for n, r in ratios.items()}


def cpu_caps(device: str = "cpu") -> DeviceCaps:
    flags = cpu_flags()
    fast = ["float32", "float64"]
    notes = []
    arm = platform.machine().lower() in ("aarch64", "arm64")
    native = {
        "bfloat16": bool({"avx512_bf16", "amx_bf16"} & flags or (arm and "bf16" in flags)),
        "float16": bool({"avx512_fp16", "amx_fp16"} & flags or (arm and {"fphp", "asimdhp"} <= flags)),
    }
    probe = env_flag("LOADERKIT_DEVICE_PROBE", True)
    ratios = probe_ratios() if probe else {}
    for name in ("bfloat16", "float16"):
        ratio = ratios.get(name)
        measured = f"; measured {ratio:.2f}x float32's time" if ratio is not None else ""
        if (ratio is None and native[name]) or (ratio is not None and ratio <= FAST_RATIO):
            fast.append(name)
            notes.append(f"{name} fast ({'native' if native[name] else 'no native'} instructions{measured})")
        else:
            notes.append(f"{name} slow ({'native' if native[name] else 'emulated'}{measured})")
    notes.append("fp8 weights compute only after an upcast on the CPU")
    return DeviceCaps(
        device=device, kind="cpu", name=_cpu_name(), fast_dtypes=tuple(fast), notes=tuple(notes),
        speeds={n: float(r) for n, r in ratios.items() if n in PROBED},
    )


def cuda_caps(device: str) -> DeviceCaps:
    dev = torch.device(device)
    if not torch.cuda.is_available():
        raise PlanError(
            f"device {device!r} does not exist here: torch sees no CUDA device "
            f"(torch {torch.__version__}); use device_map='cpu'"
        )
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise PlanError(
            f"device {device!r} does not exist here: {torch.cuda.device_count()} CUDA device(s) visible"
        )
    major, minor = torch.cuda.get_device_capability(index)
    fast = ["float32"]
    if major >= 7:
        fast.append("float16")
    if major >= 8:
        fast.append("bfloat16")
    fp8 = (major, minor) >= (8, 9) and hasattr(torch, "_scaled_mm")
    compute = ("float32", "float64", "float16") + (("bfloat16",) if major >= 8 else ())
    return DeviceCaps(
        device=f"cuda:{index}",
        kind="cuda",
        name=torch.cuda.get_device_name(index),
        compute_dtypes=compute,
        fast_dtypes=tuple(fast),
        fp8_matmul=fp8,
        capability=(major, minor),
        notes=(f"sm {major}.{minor}",),
    )


@hookimpl(trylast=True)
def loaderkit_device_capabilities(device: str):
    kind = torch.device(device).type
    if kind == "cpu":
        return cpu_caps(device)
    if kind == "cuda":
        return cuda_caps(device)
    return None
