"""Shared harness of the loading benchmarks.

* :func:`ensure_checkpoint` builds a Llama-like transformers checkpoint (bf16, ~1.1 GB, random
  weights) once under ``.bench/`` at the repository root and reuses it afterwards.
* Every measured case runs in a fresh Python process (``python <script> --child CASE ...``).
  The child imports the same libraries for every case, then times *load + touch*: the load itself
  and one read of every byte of every parameter and buffer (a ``uint8`` sum), so lazily mapped
  tensors pay for their page faults like everyone else.
* Memory: the child resets its peak-RSS counter (``/proc/self/clear_refs``) just before the load
  and reads ``VmHWM`` after the touch (exact total peak RSS). Anonymous memory has no kernel
  high-water mark, so the parent samples the child's ``/proc/<pid>/statm`` (resident - shared)
  about every millisecond, from the child's start marker to its loaded marker. Both are reported
  as growth over the level just before the load (imports excluded).
* :func:`run_rounds` runs every case once to warm the page cache, then ``repeats`` rounds with
  the cases alternating; :func:`median` and :func:`spread` summarise them.
* :func:`interleaved_forwards` times forwards of several models loaded into one process,
  round-robin, so that other load on the machine slows every model alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / ".bench"
MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")

#: the benchmark checkpoint: ~542 M parameters, ~1.08 GB in bf16.
LLAMA_CONFIG: dict[str, Any] = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

#: imported by every child before the clock starts, so import time is the same for every case.
#: ``import loaderkit`` defers its pipeline to the first call, so the modules behind its public
#: functions are named too (plugin discovery still happens in the first timed call).
PRELOAD = (
    "torch",
    "safetensors",
    "safetensors.torch",
    "accelerate",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "loaderkit",
    "loaderkit.plugin",
    "loaderkit.loader",
    "loaderkit.assembly",
    "loaderkit.pipeline.convert",
)

_BUILD = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(**{cfg!r})
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(sys.argv[1], safe_serialization=True)
"""


# -- checkpoint --------------------------------------------------------------------------------


def ensure_checkpoint(name: str = "llama-bf16") -> Path:
    """The bf16 benchmark checkpoint directory, built (in a subprocess) on first use."""
    path = BENCH_DIR / name
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        return path
    BENCH_DIR.mkdir(exist_ok=True)
    tmp = BENCH_DIR / f"{name}.tmp{os.getpid()}"
    print(f"building benchmark checkpoint {path} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-c", _BUILD.format(cfg=LLAMA_CONFIG), str(tmp)], check=True)
    tmp.rename(path)
    size = (path / "model.safetensors").stat().st_size
    if size < 10**9:
        raise SystemExit(f"benchmark checkpoint is only {size / 1e9:.2f} GB, expected >= 1 GB")
    return path


def checkpoint_facts(path: Path) -> dict[str, int]:
    """File size and largest tensor (elements) of a single-file checkpoint, from its header."""
    from safetensors import safe_open

    file = path / "model.safetensors"
    largest = 0
    with safe_open(str(file), framework="pt") as f:
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            largest = max(largest, n)
    return {"file_bytes": file.stat().st_size, "largest_elems": largest}


def free_port() -> int:
    """A TCP port free on this machine now, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- child side --------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def touch(model) -> tuple[int, int]:
    """Read every byte of every distinct parameter and buffer (a ``uint8`` max per 64 MiB chunk:
    no temporary is allocated). Returns ``(bytes, xor of the chunk maxima)``."""
    import torch

    seen: set[tuple[int, int]] = set()
    total = acc = 0
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            key = (t.data_ptr(), t.nbytes)
            if key in seen or t.numel() == 0:
                continue
            if t.device.type == "meta":
                raise RuntimeError("a parameter is still on the meta device")
            seen.add(key)
            flat = t.detach().reshape(-1).view(torch.uint8)
            for chunk in flat.split(1 << 26):
                acc ^= int(chunk.max())
            total += t.nbytes
    return total, acc


def _dtype_bytes(model) -> dict[str, int]:
    seen, out = set(), {}
    for t in (*model.parameters(), *model.buffers()):
        if (t.data_ptr(), t.nbytes) in seen:
            continue
        seen.add((t.data_ptr(), t.nbytes))
        name = str(t.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + t.nbytes
    return out


def _emit(tag: str, payload: dict | None = None) -> None:
    print(f"@@{tag} {json.dumps(payload or {})}", flush=True)


def _batch(tokens: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, LLAMA_CONFIG["vocab_size"], (1, tokens), generator=gen)


def _forward(model, ids) -> float:
    """Seconds of one forward (no_grad, as transformers' ``generate`` runs); checks the output."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=False).logits
        dt = time.perf_counter() - t0
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("the forward produced NaN or Inf")
    return dt


def interleaved_forwards(
    cases: dict[str, Callable], names: list[str], path: Path, rounds: int, warmup: int, tokens: int
) -> dict:
    """Load every model into this process, then time forwards round-robin.

    Each round runs one forward of every model (the starting model rotates), so a busy machine
    slows all models alike; per-round ratios between models are therefore much steadier than
    the times themselves. Anonymous-memory deltas are measured around each load and around each
    model's warm-up forwards (the models share one process, so they are indicative).
    """
    import gc

    for mod in PRELOAD:
        __import__(mod)
    models, mem = {}, {}
    for name in names:
        gc.collect()
        a0 = _status()["RssAnon"]
        models[name] = cases[name](path)
        touch(models[name])
        mem[name] = {"load_anon": _status()["RssAnon"] - a0}
    ids = _batch(tokens)
    for name in names:
        a0 = _status()["RssAnon"]
        for _ in range(warmup):
            _forward(models[name], ids)
        mem[name]["warmup_anon"] = _status()["RssAnon"] - a0
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(_forward(models[name], ids))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {times[n][-1]:.2f}" for n in names),
              file=sys.stderr, flush=True)
    return {"times": times, "memory": mem}


def child_main(cases: dict[str, Callable], argv: list[str]) -> None:
    """Run one case in this (fresh) process and print its measurements as marker lines."""
    import importlib

    ap = argparse.ArgumentParser()
    ap.add_argument("--child", required=True)
    ap.add_argument("--path", required=True)
    args = ap.parse_args(argv)
    for mod in PRELOAD:
        importlib.import_module(mod)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status()
    _emit("start")
    t0, c0 = time.perf_counter(), time.process_time()
    model = cases[args.child](Path(args.path))
    t1 = time.perf_counter()
    nbytes, _ = touch(model)
    t2, c2 = time.perf_counter(), time.process_time()
    after = _status()
    _emit("loaded")
    result = {
        "load_s": t1 - t0,
        "total_s": t2 - t0,
        "cpu_s": c2 - c0,
        "model_bytes": nbytes,
        "dtype_bytes": _dtype_bytes(model),
        "base_rss": before["VmRSS"],
        "base_anon": before["RssAnon"],
        "peak_rss": after["VmHWM"],
        "rss_growth": after["VmHWM"] - before["VmRSS"],
        "final_anon_growth": after["RssAnon"] - before["RssAnon"],
    }
    _emit("result", result)


# -- parent side -------------------------------------------------------------------------------


def _statm_anon(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            fields = f.read().split()
    except OSError:
        return None
    return (int(fields[1]) - int(fields[2])) * PAGE


def child_env() -> dict[str, str]:
    """The environment of a measured child: bytecode cached (under ``.bench/pycache``) for every
    package, this checkout's included, as an installed package has it, even where the shell sets
    ``PYTHONDONTWRITEBYTECODE`` (then every first load would pay for compiling loaderkit's
    sources, and only loaderkit's: the peers' installed packages carry their bytecode)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path(__file__).resolve().parent.parent / ".bench" / "pycache"))
    return env


def run_child(script: Path, case: str, path: Path, interval: float = 0.001) -> dict:
    """Run ``case`` of ``script`` in a fresh process; returns its measurements plus the sampled
    anonymous peak (``peak_anon``, absolute, and ``anon_growth`` over the pre-load level)."""
    cmd = [sys.executable, str(script), "--child", case, "--path", str(path)]
    errfile = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty child never blocks
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errfile, text=True, env=child_env())
    state = {"start": threading.Event(), "loaded": threading.Event(), "result": None}
    lines: list[str] = []

    def reader() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("@@start"):
                state["start"].set()
            elif line.startswith("@@loaded"):
                state["loaded"].set()
            elif line.startswith("@@result"):
                state["result"] = json.loads(line.split(" ", 1)[1])

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    peak = 0
    while proc.poll() is None and not state["loaded"].is_set():
        if state["start"].is_set():
            anon = _statm_anon(proc.pid)
            if anon is not None:
                peak = max(peak, anon)
        time.sleep(interval)
    proc.wait()
    th.join()
    errfile.seek(0)
    err = errfile.read()
    errfile.close()
    if proc.returncode != 0 or state["result"] is None:
        raise RuntimeError(f"case {case!r} failed (exit {proc.returncode}):\n{''.join(lines)}\n{err[-4000:]}")
    res = state["result"]
    res["peak_anon"] = peak
    res["anon_growth"] = peak - res["base_anon"]
    return res


def run_rounds(script: Path, cases: list[str], path: Path, repeats: int = 5) -> dict[str, list[dict]]:
    """One warm-up run per case (page cache), then ``repeats`` alternating rounds."""
    for case in cases:
        print(f"  warm-up {case}", file=sys.stderr, flush=True)
        run_child(script, case, path)
    out: dict[str, list[dict]] = {c: [] for c in cases}
    for r in range(repeats):
        for case in cases:
            res = run_child(script, case, path)
            out[case].append(res)
            print(
                f"  round {r + 1}/{repeats} {case}: {res['total_s']:.2f} s, "
                f"anon +{res['anon_growth'] / MiB:.0f} MiB, rss +{res['rss_growth'] / MiB:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    return out


def run_json(cmd: list[str]) -> dict:
    """Run ``cmd`` (a child printing an ``@@result`` line); its stderr streams through."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("@@result"):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")


def median(runs: list[dict], key: str) -> float:
    """Median of ``key`` over runs."""
    return statistics.median(r[key] for r in runs)


def spread(runs: list[dict], key: str) -> str:
    """``min-max`` of ``key`` over runs, formatted in seconds."""
    vals = [r[key] for r in runs]
    return f"{min(vals):.2f}-{max(vals):.2f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def mib(n: float) -> str:
    """Bytes as MiB, no decimals."""
    return f"{n / MiB:.0f}"


def environment() -> str:
    """One line describing the machine and library versions."""
    import platform

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16") if x in have]
                    break
    except OSError:
        pass
    cpu += f" ({', '.join(flags) or 'no avx2'})"
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, python {platform.python_version()}"
    )


def verdict(ok: bool) -> str:
    """``PASS`` or ``FAIL``."""
    return "PASS" if ok else "FAIL"
