"""``loaderkit demo``: the sample model saved in bf16, converted to fp8 (ComfyUI layout), and loaded
under every built-in strategy, the converted copy under fp8 and bf16; all verify and agree."""

from __future__ import annotations

import json

import pytest
import torch

from loaderkit.cli import main
from loaderkit.demo import TinyVideoDiT, sample_inputs, save_sample


@pytest.fixture(scope="module")
def demo_json() -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["demo", "--json"])
    data = json.loads(out.getvalue())
    data["status"] = status
    return data


def test_demo_succeeds_and_every_load_agrees(demo_json):
    assert demo_json["status"] == 0 and demo_json["ok"] is True
    results = demo_json["results"]
    assert all(r["verify"] and r["cosine_vs_fp32"] >= 0.99 for r in results)
    cases = [(r["checkpoint"], r["strategy"]) for r in results]
    assert cases == [("original (bf16)", s) for s in ("fp32", "bf16", "fp16", "fp8", "auto")] + [
        ("converted (fp8)", "fp8"), ("converted (fp8)", "bf16")]
    assert demo_json["seconds"] < 60


def test_demo_converts_to_the_comfy_layout_and_keeps_its_bytes(demo_json):
    conv = demo_json["convert"]
    assert conv["layout"] == "ComfyUI mixed precision"
    assert conv["bytes_after"] < 0.6 * conv["bytes_before"]
    by_case = {(r["checkpoint"], r["strategy"]): r for r in demo_json["results"]}
    kept = by_case[("converted (fp8)", "fp8")]
    assert kept["conversions"] == {"none": sum(kept["conversions"].values())}  # stored bytes kept
    assert kept["bytes"] < by_case[("original (bf16)", "bf16")]["bytes"]
    dense = by_case[("converted (fp8)", "bf16")]
    assert dense["conversions"]["dequantize"] == 16 and set(dense["dtypes"]) == {"bfloat16"}
    assert by_case[("original (bf16)", "bf16")]["bytes"] * 2 == by_case[("original (bf16)", "fp32")]["bytes"]


def test_demo_table(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "converted (fp8)" in out and "every load verified and agrees with fp32" in out


def test_sample_helpers_keep_their_signatures(tmp_path):
    path = save_sample(tmp_path, dtype=torch.float16, seed=1)
    assert path.name == "model.safetensors"
    video, t = sample_inputs(torch.float32, seed=1)
    assert video.shape == (1, 4, 2, 16, 16) and t.shape == (1,)
    assert TinyVideoDiT()(video, t).shape == (1, 128, 16)
