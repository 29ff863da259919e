"""The compiled fp8 kernel (decode; fp8 and int8 quantize): ``fp8_decode.c``, built on first use
by the system C compiler.

torch's CPU conversions from fp8 are scalar loops, and any chain of eager torch ops that decodes
fp8 makes several passes over memory; the kernel decodes, scales and rounds in one pass at close
to memory speed (AVX2 + F16C where the CPU has them, a portable table loop elsewhere), bit-exact
with :func:`loaderkit.kernels.quant.dequantize_reference`.

The shared library is compiled once per machine with ``-O3 -march=native`` into
``$XDG_CACHE_HOME/loaderkit/kernels/`` (``~/.cache`` by default), under a name made of the hash of
the source, the flags, the compiler and the CPU's flags, and replaced atomically, so processes
that start together and machines that share a home folder each find a library built for them.
Before first use every code of every format is decoded by the library, and every bfloat16 and
float16 value encoded, and the results compared bit for bit with torch's own reference
expressions, once per process and use (decode, quantize: about 20 ms in all); a library that
disagrees is not used.

Nothing here is required: with no C compiler, a failed build or a failed check, or with
``LOADERKIT_COMPILED_KERNELS=0`` in the environment, :func:`library` returns ``None`` and
decoding takes the torch route (lookup tables, several times slower). :func:`status` says which,
and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("fp8_decode.c")
#: ``-ffp-contract=off``: no fused multiply-add may change a rounding; no ``-ffast-math``.
FLAGS = ("-O3", "-march=native", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")
#: the environment variable that turns the compiled kernels off (``0``) or on (anything else).
ENV = "LOADERKIT_COMPILED_KERNELS"

#: code formats the kernel widens without a table; any other 1-byte float goes through ``table``.
FORMATS_IN = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1}
GENERIC_IN = 2
FORMATS_OUT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: what the quantize kernels encode into
FP8_OUT = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1, torch.int8: 2}

_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


class Library:
    """The loaded kernel: its entry points (``flat``, ``grid``: decode; ``amax``, ``encode``:
    quantize; ctypes, the GIL released while they run) and whether it was built with the vector
    path (``simd``)."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        i64, f32, ptr, c_int = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
        lib.lk_decode_flat.argtypes = [ptr, ptr, i64, f32, ptr, c_int, c_int, c_int]
        lib.lk_decode_grid.argtypes = [ptr, ptr, i64, i64, i64, ptr, i64, i64, i64, ptr, c_int, c_int]
        lib.lk_amax_grid.argtypes = [ptr, c_int, i64, i64, i64, ptr, i64, i64, i64]
        lib.lk_encode_grid.argtypes = [ptr, c_int, ptr, i64, i64, i64, ptr, i64, i64, i64, f32, c_int]
        for fn in (lib.lk_decode_flat, lib.lk_decode_grid, lib.lk_simd, lib.lk_amax_grid, lib.lk_encode_grid):
            fn.restype = c_int
        self.flat = lib.lk_decode_flat
        self.grid = lib.lk_decode_grid
        self.amax = lib.lk_amax_grid
        self.encode = lib.lk_encode_grid
        self.simd = bool(lib.lk_simd())
        self.path = path
        self._lib = lib


def status() -> dict[str, object]:
    """Whether the compiled kernel is in use: ``{"available": bool, "reason": str, "path": str}``
    (``reason`` says why not, or how it was built). Builds and checks it if not done yet."""
    available = library("decode") is not None and library("quantize") is not None
    return {"available": available, "reason": _STATE.get("reason", ""), "path": str(_STATE.get("path", ""))}


#: what each use of the library is checked by before its first call
CHECKS = ("decode", "quantize")


def library(use: str = "decode") -> Library | None:
    """The kernel library for ``use`` (``"decode"`` or ``"quantize"``), built and loaded on the
    first call and checked against torch's reference before the first call of each use (decode
    about 6 ms, quantize about 14 ms); ``None`` when unavailable or when its check failed."""
    key = f"checked-{use}"
    if key in _STATE:
        return _STATE["lib"] if _STATE[key] == "" else None  # type: ignore[return-value]
    with _LOCK:
        if "tried" not in _STATE:
            _STATE["lib"], _STATE["reason"] = _load()
            _STATE["tried"] = True
        lib = _STATE.get("lib")
        if lib is None:
            return None
        if key not in _STATE:
            problem = (self_check if use == "decode" else _quantize_check)(lib)  # type: ignore[arg-type]
            _STATE[key] = problem
            if problem:
                _STATE["reason"] = f"{lib.path.name} disagrees with the reference conversions ({problem}); not used"
                _STATE["lib"] = None
                for other in CHECKS:
                    _STATE[f"checked-{other}"] = problem  # one wrong conversion: none of it is used
    return _STATE["lib"] if _STATE.get(key) == "" else None  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded library (the next :func:`library` builds or finds it again)."""
    with _LOCK:
        _STATE.clear()


def _load() -> tuple[Library | None, str]:
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"turned off by {ENV}={os.environ[ENV]}"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc or clang)"
    try:
        path = build(compiler)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        return None, f"building {SOURCE.name} failed: {exc}"
    _STATE["path"] = path
    try:
        lib = Library(path)
    except OSError as exc:
        return None, f"loading {path} failed: {exc}"
    return lib, f"built by {compiler} with {' '.join(FLAGS[:2])}" + (" (AVX2 + F16C path)" if lib.simd else "")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_root() -> Path:
    """loaderkit's per-machine cache folder: ``$XDG_CACHE_HOME/loaderkit`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loaderkit"


def cache_dir() -> Path:
    """Where the compiled libraries are kept."""
    return cache_root() / "kernels"


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()


def build(compiler: str, flags: tuple[str, ...] = FLAGS, folder: Path | None = None) -> Path:
    """Compile the kernel with ``compiler`` and ``flags`` into ``folder`` (default
    :func:`cache_dir`), unless a library of the same source, flags, compiler and CPU is there."""
    source = SOURCE.read_bytes()
    stat = os.stat(compiler)
    key = "|".join([hashlib.sha256(source).hexdigest(), " ".join(flags), compiler, str(stat.st_size),
                    str(int(stat.st_mtime)), platform.machine(), _cpu_flags()])
    folder = cache_dir() if folder is None else folder
    path = folder / f"fp8_decode-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"{compiler} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def self_check(lib: Library) -> str:
    """Decode every code of every format, per segment and through the grid, with a few scales
    (and odd lengths for the tails) and compare with torch's reference bits; '' when all agree."""
    scales = (1.0, 0.0123, 3.0e-5, 2.0 ** -120, 7.5e20, 0.0, -2.5, 2.0 ** 101, float("inf"))
    for src in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz):
        codes = torch.arange(256, dtype=torch.uint8).repeat(2)[:509].view(src)
        for dst in FORMATS_OUT:
            for s in scales:
                want = (codes.float() * torch.tensor(s, dtype=torch.float32)).to(dst)
                got = torch.empty_like(want)
                rc = decode_flat(lib, codes, float(torch.tensor(s, dtype=torch.float32)), got)
                if rc or not torch.equal(got.view(_bits(dst)), want.view(_bits(dst))):
                    return f"{src} -> {dst}, scale {s}"
            want, got = codes.to(dst), torch.empty(codes.shape, dtype=dst)
            if decode_flat(lib, codes, None, got) or not torch.equal(got.view(_bits(dst)), want.view(_bits(dst))):
                return f"{src} -> {dst}, unscaled"
            grid = torch.tensor([[0.5, 3.0e-3], [7.0, 1.0]], dtype=torch.float32)
            q = codes[:500].reshape(20, 25)
            want = (q.float() * grid.repeat_interleave(10, 0).repeat_interleave(13, 1)[:, :25]).to(dst)
            got = torch.empty_like(want)
            rc = decode_grid(lib, q, grid, (10, 13), got, 0, 20)
            if rc or not torch.equal(got.view(_bits(dst)), want.view(_bits(dst))):
                return f"{src} -> {dst}, block grid"
    return ""


def _quantize_check(lib: Library) -> str:
    """Encode every finite bfloat16 and float16 value, and float32 values around each fp8
    rounding boundary, with a few scales; compare with ``(w.float() / s).clamp(-m, m).to(fp8)``
    and the amax with ``w.abs().amax()``."""
    g = torch.Generator().manual_seed(0)
    every16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    sources = [every16.view(torch.bfloat16), every16.view(torch.float16),
               torch.randn(8192, generator=g) * torch.logspace(-12, 3, 8192),
               torch.arange(0, 1 << 16, dtype=torch.int32).mul_(1 << 15).add_(3 << 23).view(torch.float32)]
    for w in sources:
        w = w[torch.isfinite(w)]
        w = w[: w.numel() - w.numel() % 64].reshape(64, -1)
        for fp8 in FP8_OUT:
            top = float(torch.finfo(fp8).max) if fp8.is_floating_point else 127.0
            for s in (1.0, 0.0123, 2.0 ** -120):
                if fp8.is_floating_point:
                    want = (w.float() / torch.tensor(s)).clamp(-top, top).to(fp8)
                else:  # int8: round half to even, as torch.round
                    want = torch.round(w.float() / torch.tensor(s)).clamp(-top, top).to(fp8)
                got = torch.empty(w.shape, dtype=fp8)
                grid = torch.full((1, 1), s, dtype=torch.float32)
                if (encode_grid(lib, w, got, grid, tuple(w.shape), top, 0, w.shape[0])
                        or not torch.equal(got.view(torch.uint8), want.view(torch.uint8))):
                    return f"encoding {w.dtype} -> {fp8}, scale {s}"
        amax = torch.zeros(w.shape[0], 1)
        if amax_grid(lib, w, amax, (1, w.shape[1]), 0, w.shape[0]) or not torch.equal(
                amax.flatten(), w.abs().amax(dim=1).float()):
            return f"amax of {w.dtype}"
    return ""


def checked(rc: int) -> None:
    """Raise for a kernel call that refused its arguments (a non-zero status)."""
    if rc:
        from ..errors import ConversionError

        raise ConversionError(f"the compiled fp8 kernel refused its arguments (status {rc})")


def _bits(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32}[dtype.itemsize]


@functools.lru_cache(maxsize=8)
def code_table(src: torch.dtype) -> torch.Tensor:
    """The float32 value of each of the 256 codes of ``src``, torch's own conversion."""
    return torch.arange(256, dtype=torch.uint8).view(src).float().contiguous()


def decode_flat(lib: Library, codes: torch.Tensor, scale: float | None, out: torch.Tensor) -> int:
    """``out = (codes.float() * scale).to(out.dtype)``, or ``codes.to(out.dtype)`` when ``scale``
    is ``None``, for contiguous CPU ``codes`` (1-byte) and ``out``; returns the kernel's status
    (0: done). ``scale`` must not be NaN (which NaN a product keeps differs between machines;
    the caller decodes NaN scales by the reference expression)."""
    table = code_table(codes.dtype)
    return lib.flat(codes.data_ptr(), out.data_ptr(), codes.numel(), 1.0 if scale is None else scale,
                    table.data_ptr(), FORMATS_IN.get(codes.dtype, GENERIC_IN), FORMATS_OUT[out.dtype],
                    int(scale is None))


def decode_grid(lib: Library, codes: torch.Tensor, grid: torch.Tensor, block: tuple[int, int],
                out: torch.Tensor, r0: int, r1: int) -> int:
    """Rows ``r0:r1`` of the 2-D ``codes`` times the float32 scale ``grid`` (one value per
    ``block`` of elements, none NaN) into ``out``; returns the kernel's status (0: done)."""
    table = code_table(codes.dtype)
    rows, cols = codes.shape
    return lib.grid(codes.data_ptr(), out.data_ptr(), r0, r1, cols, grid.data_ptr(), block[0], block[1],
                    grid.shape[1], table.data_ptr(), FORMATS_IN.get(codes.dtype, GENERIC_IN), FORMATS_OUT[out.dtype])


def amax_grid(lib: Library, w: torch.Tensor, grid: torch.Tensor, block: tuple[int, int], r0: int, r1: int) -> int:
    """``grid`` (float32, contiguous) ``= max(grid, |w|)`` per ``block`` of the contiguous 2-D
    ``w`` (float32 / bfloat16 / float16), over rows ``r0:r1``; NaN wins. Returns the kernel's status."""
    return lib.amax(w.data_ptr(), FORMATS_OUT[w.dtype], r0, r1, w.shape[1], grid.data_ptr(), block[0], block[1],
                    grid.shape[1])


def encode_grid(lib: Library, w: torch.Tensor, q: torch.Tensor, grid: torch.Tensor, block: tuple[int, int],
                top: float, r0: int, r1: int) -> int:
    """Rows ``r0:r1`` of ``q = (w.float() / scale).clamp(-top, top).to(q.dtype)`` with one float32
    scale of ``grid`` per ``block``; ``w`` and ``q`` contiguous 2-D. Returns the kernel's status."""
    return lib.encode(w.data_ptr(), FORMATS_OUT[w.dtype], q.data_ptr(), r0, r1, w.shape[1], grid.data_ptr(),
                      block[0], block[1], grid.shape[1], top, FP8_OUT[q.dtype])
