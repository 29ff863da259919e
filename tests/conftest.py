"""Shared fixtures and tiny models for loaderkit's tests.

- ``fresh_manager``: a new process-wide plugin manager for one test (made lazily, so a test can
  set ``LOADERKIT_*`` environment variables first); the previous manager is restored afterwards,
  so runtime registrations and blocked plugins never leak into other tests.
- ``save_st``: write a module's state dict (or a dict of tensors) as a safetensors file.
- ``TinyNet``, ``BufferNet``, ``TiedNet``: small models covering linear/norm layers, non-float
  and computed buffers, and tied parameters.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loaderkit.pipeline import discover as lk_manager

ROOT = Path(__file__).resolve().parent.parent

#: the CPU probe's measurements every test process reads (see :func:`_pin_cpu_probe`)
PINNED_CPU_SPEEDS = {"bfloat16": 0.8, "float16": 0.8, "fp8-bfloat16-rows1": 0.9, "fp8-bfloat16-rows128": 0.6}


def _pin_cpu_probe() -> None:
    """Make every test (and every process a test starts) read one fixed CPU probe result: a CPU
    measured fast in bfloat16 and float16, where fp8 computes in bfloat16.

    The suite runs on CPUs with and without native bf16, and ``auto`` and ``fp8`` choose their
    compute dtype from what the probe measures there; pinned, a test's plan is the same on every
    machine. The probe's cache file is the real one (its path from ``XDG_CACHE_HOME``, a fresh
    folder here), filled for every thread count; the tests of the choice itself describe both
    kinds of CPU with their own device plugins, and the probe's tests their own cache folders.
    """
    import atexit
    import json
    import tempfile

    from loaderkit.plugins import devices

    cache = Path(tempfile.mkdtemp(prefix="loaderkit-test-cache-"))
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    (cache / "loaderkit").mkdir()
    os.environ["XDG_CACHE_HOME"] = str(cache)  # (the compiled kernel is built here, once per run)
    routes = {devices.decode_route(), "tables"}  # tests that turn the compiled kernel off plan alike
    keys = {devices._probe_key(n, r): PINNED_CPU_SPEEDS for n in range(1, max(64, os.cpu_count() or 1) + 1)
            for r in routes}
    (cache / "loaderkit" / "cpu-probe.json").write_text(json.dumps(keys))
    devices._ratios_for.cache_clear()


_pin_cpu_probe()
EXAMPLE_PLUGIN = ROOT / "examples" / "loaderkit-example-plugin"


# -------------------------------------------------------------------------------------------
# tiny models
# -------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """Linear -> LayerNorm -> ReLU -> Linear; 4 parameters tensors per layer pair, 8 -> 4."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.norm(self.proj(x))))


class BufferNet(nn.Module):
    """A model with non-float persistent buffers (int64 ids, a bool mask), a persistent float
    buffer computed by ``__init__`` and a non-persistent one (like rotary ``inv_freq``)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8)
        self.register_buffer("position_ids", torch.arange(6)[None] + 100, persistent=True)
        self.register_buffer("mask", torch.tensor([True, False, True, True, False, True]), persistent=True)
        self.register_buffer("table", torch.linspace(0.5, 1.5, 8), persistent=True)
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) * self.table
        return self.proj(x) * self.mask[: ids.shape[-1], None]


class TiedNet(nn.Module):
    """An embedding and an output head sharing one weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.embed(ids))))


def seeded(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    """An instance of ``cls`` with reproducible random weights."""
    torch.manual_seed(seed)
    return cls()


# -------------------------------------------------------------------------------------------
# writing checkpoints
# -------------------------------------------------------------------------------------------


def save_st(
    path: str | os.PathLike,
    source: nn.Module | dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    *,
    drop: tuple[str, ...] = (),
    extra: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``source`` (a module's state dict, or a dict of tensors) with ``save_file``.

    :param dtype: cast floating-point tensors to it first.
    :param drop: keys to leave out.
    :param extra: tensors to add.
    """
    tensors = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    out = {}
    for k, v in {**tensors, **(extra or {})}.items():
        if k in drop:
            continue
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.detach().clone().contiguous()
    path = Path(path)
    save_file(out, str(path), metadata=metadata if metadata is not None else {"format": "pt"})
    return path


def snapshot(module: nn.Module) -> dict[str, tuple[torch.dtype, str, torch.Tensor]]:
    """A deep copy of a module's state dict: key -> (dtype, device type, values)."""
    return {k: (v.dtype, v.device.type, v.detach().clone()) for k, v in module.state_dict().items()}


def assert_snapshot_equal(module: nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert sorted(after) == sorted(before)
    for k, (dtype, dev, values) in before.items():
        assert after[k][0] == dtype, f"{k}: dtype changed {dtype} -> {after[k][0]}"
        assert after[k][1] == dev, f"{k}: device changed {dev} -> {after[k][1]}"
        assert torch.equal(after[k][2], values), f"{k}: values changed"


# -------------------------------------------------------------------------------------------
# fixtures
# -------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_manager() -> Callable[[], lk_manager.PluginManager]:
    """Reset the process-wide plugin manager for one test; restore the previous one after.

    Returns :func:`loaderkit.plugin.get_manager`: the new manager is made on first use, after any
    environment change the test makes (``monkeypatch.setenv("LOADERKIT_BLOCK_PLUGINS", ...)``).
    """
    with lk_manager.use_manager(None):
        yield lk_manager.get_manager


@pytest.fixture
def tiny_ckpt(tmp_path) -> tuple[Path, nn.Module]:
    """A float32 :class:`TinyNet` saved as ``tiny.safetensors``; returns ``(path, reference)``."""
    ref = seeded(TinyNet)
    return save_st(tmp_path / "tiny.safetensors", ref), ref


def run_python(code: str, *, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this venv; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=str(ROOT),
    )


@pytest.fixture(scope="session")
def example_plugin_site(tmp_path_factory) -> Path:
    """The example plugin package, pip-installed (built as a wheel) into a private directory.

    It goes into a ``--target`` directory rather than the shared virtual environment, so that
    other test processes using the same venv never discover it; a subprocess sees it by putting
    the directory on ``PYTHONPATH`` (entry points are found through its ``.dist-info``). The
    directory is removed with pytest's temporary directories. It is built from a copy of the
    package, so no build files are left in the source tree.
    """
    target = tmp_path_factory.mktemp("example-plugin-site")
    source = tmp_path_factory.mktemp("example-plugin-src") / EXAMPLE_PLUGIN.name
    shutil.copytree(EXAMPLE_PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check",
           "--no-compile", "--target", str(target)]
    if importlib.util.find_spec("setuptools") is not None:  # build with it, offline
        cmd.append("--no-build-isolation")
    proc = subprocess.run([*cmd, str(source)], capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        pytest.fail(f"pip install of {EXAMPLE_PLUGIN} failed:\n{proc.stdout}\n{proc.stderr}")
    return target
