"""The ``loaderkit`` command: inspect, plan, plugins, demo, and how errors are reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import loaderkit
import loaderkit.plugin
from loaderkit import cli
from loaderkit.plugin import Builder
from loaderkit.plugin import to_torch

from conftest import ROOT, TinyNet, save_st, seeded


class TinyBuilder(Builder):
    """Builds :class:`TinyNet` from a config.json naming it, as library builders do."""

    name = "tiny-builder"

    def can_build(self, request) -> bool:
        return (request.checkpoint.config or {}).get("architectures") == ["TinyNet"]

    def build(self, request):
        with loaderkit.plugin.meta_init(to_torch(request.dtype)):
            return TinyNet()


class TinyBuilderPlugin:
    __version__ = "9.9"

    @loaderkit.hookimpl
    def loaderkit_register_builders(self, register):
        register(TinyBuilder())


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A directory with model.safetensors (float32 TinyNet) and a config.json naming it."""
    save_st(tmp_path / "model.safetensors", seeded(TinyNet))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["TinyNet"], "model_type": "tiny"}))
    return tmp_path


@pytest.fixture
def with_builder(fresh_manager):
    name = loaderkit.register(TinyBuilderPlugin(), name="tiny")
    try:
        yield name
    finally:
        loaderkit.unregister(name)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -------------------------------------------------------------------------------------------
# inspect
# -------------------------------------------------------------------------------------------


def test_inspect_text(capsys, model_dir):
    code, out, err = run_cli(capsys, "inspect", str(model_dir), "--tensors")
    assert code == 0 and err == ""
    assert "format       safetensors" in out and "tensors      6" in out
    assert "architectures=['TinyNet']" in out
    assert "  proj.weight  float32  [16, 8]  model.safetensors" in out


def test_inspect_json(capsys, model_dir):
    code, out, _ = run_cli(capsys, "inspect", str(model_dir), "--json", "--tensors")
    assert code == 0
    data = json.loads(out)
    assert data["format"] == "safetensors" and data["files"] == ["model.safetensors"]
    assert data["tensors"] == 6 and data["dtypes"] == {"float32": (16 * 8 + 16 * 3 + 4 * 16 + 4) * 4}
    assert data["config"] == {"architectures": ["TinyNet"], "model_type": "tiny"}
    assert data["quantization"] is None
    assert data["tensor_list"]["head.weight"]["shape"] == [4, 16]


# -------------------------------------------------------------------------------------------
# plan
# -------------------------------------------------------------------------------------------


def test_plan_text_and_json(capsys, model_dir, with_builder):
    code, out, _ = run_cli(capsys, "plan", str(model_dir), "-s", "bf16", "--all")
    assert code == 0
    assert "built by tiny-builder" in out and "strategy    bf16" in out
    assert any(line.split()[:4] == ["proj", "Linear", "bfloat16", "bfloat16"] for line in out.splitlines())

    code, out, _ = run_cli(capsys, "plan", str(model_dir), "--strategy", "fp16", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["builder"] == "tiny-builder" and data["strategy"] == "fp16"
    assert {m["compute_dtype"] for m in data["modules"].values()} == {"float16"}


def test_plan_with_options(capsys, model_dir, with_builder):
    code, out, _ = run_cli(capsys, "plan", str(model_dir), "-s", "auto", "-o", "prefer=memory", "--json")
    assert code == 0
    assert json.loads(out)["options"] == {"prefer": "memory"}
    code, _, err = run_cli(capsys, "plan", str(model_dir), "-s", "auto", "-o", "prefer=quality")
    assert code == 1 and err.startswith("loaderkit: error:") and "prefer" in err
    code, _, err = run_cli(capsys, "plan", str(model_dir), "-o", "no-equals-sign")
    assert code == 1 and "KEY=VALUE" in err


def test_plan_without_builder_says_how_to_pass_model(capsys, model_dir):
    code, out, err = run_cli(capsys, "plan", str(model_dir))
    assert code == 1 and out == ""
    assert err.startswith("loaderkit: error: ") and "model=" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_plan_on_missing_cuda_device(capsys, model_dir, with_builder):
    code, _, err = run_cli(capsys, "plan", str(model_dir), "--device", "cuda")
    assert code == 1 and "cuda" in err and len(err.splitlines()) == 1


# -------------------------------------------------------------------------------------------
# plugins
# -------------------------------------------------------------------------------------------


def test_plugins_json(capsys, with_builder):
    code, out, _ = run_cli(capsys, "plugins", "--json")
    assert code == 0
    records = {r["name"]: r for r in json.loads(out)}
    uniform = records["uniform"]
    assert uniform["source"] == "built-in" and uniform["version"] == loaderkit.__version__
    assert uniform["module"] == "loaderkit.plugins.uniform"
    assert uniform["provides"]["strategies"] == ["fp32", "bf16", "fp16"]
    assert records["safetensors"]["provides"]["formats"] == ["safetensors"]
    assert "loaderkit_device_capabilities" in records["devices"]["provides"]["hooks"]
    tiny = records["tiny"]
    assert (tiny["source"], tiny["version"], tiny["provides"]) == ("runtime", "9.9", {"builders": ["tiny-builder"]})


def test_plugins_text(capsys):
    code, out, _ = run_cli(capsys, "plugins")
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("uniform"))
    assert "built-in" in line and "strategies: fp32, bf16, fp16" in line
    from loaderkit.kernels import compiled

    kernel = next(ln for ln in out.splitlines() if ln.startswith("fp8 CPU kernel:"))
    state = compiled.status()
    assert (state["path"] in kernel) if state["available"] else ("not in use" in kernel and state["reason"] in kernel)


# -------------------------------------------------------------------------------------------
# errors, --debug, --version, no command
# -------------------------------------------------------------------------------------------


def test_error_is_one_line_without_traceback(capsys, tmp_path):
    missing = tmp_path / "absent.safetensors"
    code, out, err = run_cli(capsys, "inspect", str(missing))
    assert code == 1 and out == ""
    assert err.startswith("loaderkit: error: ") and str(missing) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_debug_reraises(tmp_path):
    with pytest.raises(loaderkit.plugin.CheckpointNotFoundError):
        cli.main(["--debug", "inspect", str(tmp_path / "absent.safetensors")])


def test_version_and_help(capsys):
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"loaderkit {loaderkit.__version__}"
    code, out, _ = run_cli(capsys)
    assert code == 2 and "inspect" in out and "plan" in out


def test_demo_runs(capsys):
    code, out, _ = run_cli(capsys, "demo", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["ok"] is True
    by_name = {r["strategy"]: r for r in data["results"]}
    assert {"fp32", "bf16", "fp16", "auto"} <= set(by_name)
    assert all(r["verify"] and r["cosine_vs_fp32"] >= 0.99 for r in data["results"])
    assert by_name["bf16"]["bytes"] * 2 == by_name["fp32"]["bytes"]


# -------------------------------------------------------------------------------------------
# the real entry points, in fresh interpreters
# -------------------------------------------------------------------------------------------


def test_python_dash_m(tmp_path):
    missing = tmp_path / "absent.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "loaderkit", "inspect", str(missing)],
        capture_output=True, text=True, timeout=60, cwd=str(ROOT),
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("loaderkit: error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_console_script_debug_shows_traceback(tmp_path):
    script = Path(sys.executable).parent / "loaderkit"
    if not script.exists():
        pytest.skip("the loaderkit console script is not installed in this environment")
    proc = subprocess.run(
        [str(script), "--debug", "inspect", str(tmp_path / "absent.safetensors")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "CheckpointNotFoundError" in proc.stderr
