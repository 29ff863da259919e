"""What ``import loaderkit`` and the ``loaderkit`` command import, checked in fresh processes.

``import loaderkit`` imports only the errors and the version: the public functions, ``Plan``,
``hookimpl`` and ``loaderkit.plugin`` are imported on first use (``loaderkit/__init__.py``'s
module ``__getattr__``), and with them torch, pydantic, pluggy, the pipeline and the plugins.
``benchmarks/bench_import.py`` measures what that saves.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import loaderkit

#: imported by none of ``import loaderkit``, ``loaderkit --help`` and ``loaderkit --version``
DEFERRED = ("torch", "pydantic", "pydantic_core", "pluggy", "accelerate", "safetensors", "transformers",
            "diffusers", "tqdm")
#: the only loaderkit modules ``import loaderkit`` imports
EAGER = {"loaderkit", "loaderkit.errors", "loaderkit.version"}

_STEPS = """
import json, sys
seen = set(sys.modules)
def step(name):
    global seen
    now = set(sys.modules)
    print(json.dumps([name, sorted(now - seen)]))
    seen = now
step("start")
{body}
"""


def _steps(body: str) -> dict[str, set[str]]:
    """Run ``body`` in a fresh Python; ``step(name)`` calls in it record which modules were
    imported since the previous step. Returns step name -> module names."""
    code = _STEPS.format(body=body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    steps = dict(json.loads(line) for line in out.stdout.splitlines() if line.startswith("["))
    return {k: set(v) for k, v in steps.items()}


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in DEFERRED)


def _tiny(tmp_path) -> str:
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    path = tmp_path / "model.safetensors"
    save_file(model.to(torch.bfloat16).state_dict(), str(path))
    return str(path)


def test_import_loaderkit_defers_the_heavy_modules_until_a_call_needs_them(tmp_path):
    path = _tiny(tmp_path)
    steps = _steps(f"""
import loaderkit
step("import")
assert loaderkit.__file__ == {loaderkit.__file__!r}, loaderkit.__file__  # the loaderkit under test
info = loaderkit.inspect({path!r})
assert info.format == "safetensors", info.format
step("inspect")
import torch
factory = lambda: torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
model = loaderkit.load({path!r}, "fp8", model=factory)
assert model[0].weight.dtype == torch.float8_e4m3fn, model[0].weight.dtype
step("load")
""")
    imported = steps["import"]
    assert not _heavy(imported), _heavy(imported)
    assert {m for m in imported if m.startswith("loaderkit")} == EAGER
    # a real call imports them: a regression that imported them eagerly would fail above
    inspected = steps["inspect"]
    assert {"torch", "pydantic", "pluggy", "loaderkit.plugin", "loaderkit.pipeline.discover",
            "loaderkit.contract.records", "loaderkit.plugins.safetensors_format"} <= inspected
    assert "accelerate" not in inspected  # the runtime (accelerate's hooks) waits for a load
    assert {"accelerate", "loaderkit.runtime"} <= steps["load"]


def test_the_command_starts_without_the_heavy_modules():
    steps = _steps("""
import contextlib, io
from loaderkit.cli import build_parser, main
with contextlib.redirect_stdout(io.StringIO()) as out:
    assert main(["--version"]) == 0
    assert main([]) == 2  # no command: prints the help
assert "loaderkit 0.1.0" in out.getvalue() and "COMMAND" in out.getvalue(), out.getvalue()
assert "inspect" in build_parser().format_help()
step("cli")
from loaderkit.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    assert main(["plugins"]) == 0
assert "fp8" in out.getvalue(), out.getvalue()
step("plugins")
""")
    assert not _heavy(steps["cli"]), _heavy(steps["cli"])
    assert {"pydantic", "pluggy", "torch", "loaderkit.plugins.fp8"} <= steps["plugins"]


def test_import_loaderkit_plugin_imports_its_records():
    """``loaderkit.plugin`` is the plugin authors' namespace: importing it gives every record
    at once (it is not lazy; plugins need the records when they are imported)."""
    steps = _steps("import loaderkit.plugin\nstep('plugin')")
    assert {"loaderkit.contract.records", "loaderkit.contract.bases", "pydantic", "pluggy"} <= steps["plugin"]


@pytest.mark.parametrize("name", loaderkit.__all__)
def test_every_public_name_resolves_to_its_definition(name):
    value = getattr(loaderkit, name)
    assert name in dir(loaderkit)
    module = loaderkit._LAZY.get(name)
    if module == f"loaderkit.{name}":
        assert value is importlib.import_module(module)
    elif module is not None:
        assert value is getattr(importlib.import_module(module), name)
    else:
        assert name in loaderkit.__dict__


def test_the_lazy_names_are_public_and_unknown_names_are_errors():
    assert set(loaderkit._LAZY) <= {*loaderkit.__all__, "plugin"}
    assert loaderkit.plugin is importlib.import_module("loaderkit.plugin")
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        loaderkit.lod  # noqa: B018
    from loaderkit import load, plan_of, verify

    assert load is loaderkit.loader.load and plan_of is loaderkit.pipeline.bind.plan_of
    assert verify is loaderkit.pipeline.verify.verify
