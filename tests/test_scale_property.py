"""Property: for every built-in fp8 scheme and every strategy, a load of a checkpoint whose scale
layout was corrupted (a scale dropped, its suffix renamed, its grid reshaped) either reproduces
the reference dequantization within the strategy's documented bound or raises LoaderKitError."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loaderkit
from loaderkit.errors import LoaderKitError
from loaderkit.kernels.quant import upcast

import fp8_writers as W

MD = "model.diffusion_model."
WRITERS = {
    "per-tensor": W.write_per_tensor_fp8,
    "block": W.write_block_fp8,
    "block-ue8m0": lambda d: W.write_block_fp8(d, scale_fmt="ue8m0", scale_dtype=torch.uint8),
    "fbgemm": W.write_fbgemm_fp8,
    "modelopt": W.write_modelopt_fp8,
    "ct-fp8-dynamic": lambda d: W.write_compressed_tensors(d, "FP8_DYNAMIC"),
    "ct-fp8-block": lambda d: W.write_compressed_tensors(d, "FP8_BLOCK"),
    "comfy-scaled": W.write_comfy_scaled_fp8,
    "comfy-mixed": W.write_comfy_mixed,
}
RENAMES = ("weight_scale", "weight_scale_inv", "scale_weight", "weight_scal", "wscale", "input_scale")


def _file(path: Path) -> Path:
    return path / "model.safetensors" if path.is_dir() else path


def _scales(tensors) -> list[str]:
    return sorted(k for k in tensors if k.rpartition(".")[2] in ("weight_scale", "weight_scale_inv", "scale_weight"))


def _corrupt(tensors: dict, how: str, pick: int, rename: str) -> None:
    scales = _scales(tensors)
    if how == "none" or not scales:
        return
    key = scales[pick % len(scales)]
    s = tensors.pop(key)
    if how == "drop":
        return
    if how == "rename":
        tensors[key.rpartition(".")[0] + "." + rename] = s
        return
    if how == "flatten":
        tensors[key] = s.reshape(-1).contiguous() if s.dim() != 1 else s.reshape(1, -1).contiguous()
    elif how == "regroup":  # twice as many groups along the last axis (a wrong group size)
        tensors[key] = torch.cat([s, s], dim=-1).contiguous() if s.dim() else torch.stack([s, s])
    elif how == "transpose":
        tensors[key] = s.reshape(1, -1).t().contiguous() if s.dim() < 2 else s.t().contiguous()


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    return {name: writer(tmp_path_factory.mktemp(name)) for name, writer in WRITERS.items()}


@settings(max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(sorted(WRITERS)),
    how=st.sampled_from(["none", "drop", "rename", "flatten", "regroup", "transpose"]),
    pick=st.integers(0, 5),
    rename=st.sampled_from(RENAMES),
    strategy=st.sampled_from(["fp32", "bf16", "fp8"]),
)
def test_a_corrupted_scale_layout_loads_exactly_or_is_refused(originals, tmp_path_factory, name, how, pick, rename, strategy):
    source, ref = originals[name]
    work = tmp_path_factory.mktemp("case")
    target = work / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    f = _file(target)
    with safe_open(str(f), "pt") as h:
        metadata = h.metadata()
    tensors = load_file(str(f))
    _corrupt(tensors, how, pick, rename)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(f), metadata=metadata)
    prefix = MD if name.startswith("comfy") else ""
    try:
        model = loaderkit.load(target, strategy, model=W.tiny_model(prefix))
    except LoaderKitError:
        assert how != "none", f"{name} under {strategy} refused an intact checkpoint"
        return
    sd = model.state_dict()
    for key, want in ref.items():
        got = sd[key]
        if strategy == "fp32":
            assert torch.equal(got, want), (name, how, key)
        elif strategy == "bf16":
            assert torch.equal(got, want.to(torch.bfloat16)), (name, how, key)
        elif got.dtype.itemsize == 1:  # fp8 kept as stored: decoded with its scale, it is the reference
            owner = model.get_submodule(key.rpartition(".")[0])
            scale = getattr(owner, "weight_scale", None)
            tc = loaderkit.runtime.cast_rule_of(owner).tensors["weight"]
            if tc.granularity == "channel":
                scale = scale.reshape(-1, 1)
            decoded = upcast(got, torch.float32, scale, tc.block if tc.granularity == "block" else None)
            assert torch.equal(decoded, want), (name, how, key)
        else:
            assert torch.equal(got, want.to(got.dtype)), (name, how, key)
