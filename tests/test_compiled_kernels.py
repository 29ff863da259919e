"""The compiled fp8 decode kernel (loaderkit.kernels.compiled): built, cached, checked, optional.

Its bit-exactness on every route is tested in test_quant.py (every test there runs with and
without it); here: how it is built and found, that a kernel which disagrees with the reference
is never used, and that decoding falls back to the torch route whenever it is unavailable.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from loaderkit.kernels import compiled
from loaderkit.kernels.quant import dequantize_reference, upcast

CC = compiled._compiler()
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and a kernel state to be found again; restored afterwards."""
    saved = dict(compiled._STATE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    compiled.reset()
    yield tmp_path
    compiled._STATE.clear()
    compiled._STATE.update(saved)


def _decode_all(dst=torch.bfloat16):
    q = torch.arange(256, dtype=torch.uint8).repeat(40).view(torch.float8_e4m3fn).reshape(80, 128)
    scale = torch.rand(80, 1, generator=torch.Generator().manual_seed(0)) + 0.01
    return upcast(q, dst, scale), dequantize_reference(q, dst, scale)


@needs_cc
def test_built_once_into_the_cache_and_then_found(fresh):
    state = compiled.status()
    assert state["available"], state["reason"]
    path = compiled.cache_dir() / os.path.basename(state["path"])
    assert path.is_file() and str(fresh) in str(path)
    mtime = path.stat().st_mtime_ns
    compiled.reset()
    assert compiled.status()["path"] == state["path"] and path.stat().st_mtime_ns == mtime  # not rebuilt
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".build-")]  # no temporary left
    got, want = _decode_all()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@needs_cc
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the portable flag below is x86's")
def test_the_portable_build_without_simd_is_exact_too(tmp_path):
    flags = tuple("-march=x86-64" if f == "-march=native" else f for f in compiled.FLAGS)
    lib = compiled.Library(compiled.build(CC, flags, tmp_path))
    assert not lib.simd
    assert compiled.self_check(lib) == ""


@needs_cc
def test_a_kernel_that_disagrees_with_the_reference_is_never_used(fresh, monkeypatch):
    source = fresh / "fp8_decode.c"
    text = compiled.SOURCE.read_text()
    assert "0x7FFF" in text
    source.write_text(text.replace("0x7FFF", "0x8000"))  # bfloat16 rounding off by one tie
    monkeypatch.setattr(compiled, "SOURCE", source)
    state = compiled.status()
    assert not state["available"] and "disagrees with the reference" in state["reason"]
    got, want = _decode_all()  # the torch route, still exact
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_turned_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv(compiled.ENV, "0")
    state = compiled.status()
    assert not state["available"] and compiled.ENV in state["reason"]
    got, want = _decode_all(torch.float16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("cc", ["/bin/false", "no-such-compiler-here"])
def test_no_working_compiler_falls_back_with_a_reason(fresh, monkeypatch, cc):
    monkeypatch.setenv("CC", cc)
    which = shutil.which
    monkeypatch.setattr(compiled.shutil, "which", lambda name: which(name) if name == cc else None)
    state = compiled.status()
    assert not state["available"]
    assert ("failed" in state["reason"]) if cc == "/bin/false" else ("no C compiler" in state["reason"])
    got, want = _decode_all(torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@needs_cc
def test_processes_starting_together_share_one_build(tmp_path):
    """Three processes on an empty cache: each ends with a working, checked kernel, one file."""
    code = "from loaderkit.kernels import compiled; s = compiled.status(); assert s['available'], s; print(s['path'])"
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    paths = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1
    assert [p.name for p in (tmp_path / "loaderkit" / "kernels").iterdir()] == [os.path.basename(paths.pop())]
