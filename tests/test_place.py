"""Placement and offloading: multi-tier (CPU + disk) loads equal in-memory loads."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import loaderkit
from loaderkit.demo import TinyVideoDiT, sample_inputs, save_sample

TINY_CPU = {"cpu": "300KB"}


def _budget(path, strategy):
    """A CPU budget holding about 40% of the planned model: the rest must go to disk."""
    total = sum(loaderkit.plan(path, strategy, model=TinyVideoDiT).bytes_per_device().values())
    return {"cpu": int(total * 0.4)}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return save_sample(tmp_path_factory.mktemp("sample"))


def _run(model):
    with torch.no_grad():
        return model(*sample_inputs())


@pytest.mark.parametrize("strategy", ["fp32", "bf16", "fp8"])
def test_cpu_plus_disk_equals_in_memory(sample, tmp_path, strategy):
    ref = _run(loaderkit.load(sample, strategy, model=TinyVideoDiT))
    folder = tmp_path / "offload"
    budget = _budget(sample, strategy)
    plan = loaderkit.plan(
        sample, strategy, model=TinyVideoDiT, device_map="auto", max_memory=budget, offload_folder=folder
    )
    devices = plan.bytes_per_device()
    assert set(devices) == {"cpu", "disk"}, devices
    assert devices["cpu"] <= budget["cpu"]
    assert not folder.exists(), "plan() must not write anything"
    model = loaderkit.load(
        sample, strategy, model=TinyVideoDiT, device_map="auto", max_memory=budget, offload_folder=folder
    )
    out = _run(model)
    assert torch.equal(out, ref)
    assert torch.equal(_run(model), ref), "a second forward must give the same result"
    assert loaderkit.verify(model, sample_inputs()).ok
    # offloaded weights rest on the meta device between forwards, in their storage dtype
    for key, tp in plan.tensors.items():
        mod, _, local = key.rpartition(".")
        t = getattr(model.get_submodule(mod), local)
        if tp.device == "disk":
            assert t.device.type == "meta" and t.dtype == getattr(torch, tp.target_dtype), key


def test_disk_holds_fp8_bytes_where_the_plan_says_fp8(sample, tmp_path):
    folder = tmp_path / "offload"
    plan = loaderkit.plan(
        sample, "fp8", model=TinyVideoDiT, device_map="auto", max_memory=TINY_CPU, offload_folder=folder
    )
    loaderkit.load(sample, "fp8", model=TinyVideoDiT, device_map="auto", max_memory=TINY_CPU, offload_folder=folder)
    index = json.loads((folder / "index.json").read_text())
    on_disk = {k: t for k, t in plan.tensors.items() if t.device == "disk"}
    fp8 = [k for k, t in on_disk.items() if t.target_dtype == "float8_e4m3fn"]
    assert fp8, "the tiny max_memory must push fp8 weights to disk"
    for key in fp8:
        assert index[key]["dtype"] == "float8_e4m3fn"
        numel = torch.Size(plan.tensors[key].shape).numel()
        assert os.path.getsize(folder / f"{key}.dat") == numel  # one byte per element
    for key, tp in on_disk.items():
        if tp.conversion == "none":  # bf16 biases and norms: pointed at, not copied
            assert index[key]["safetensors_file"] == str(sample)
            assert not (folder / f"{key}.dat").exists()


def test_zero_copy_offload_writes_only_the_index(sample, tmp_path):
    folder = tmp_path / "offload"
    loaderkit.load(sample, "bf16", model=TinyVideoDiT, device_map="auto", max_memory=TINY_CPU, offload_folder=folder)
    assert sorted(os.listdir(folder)) == ["index.json"]


def test_explicit_device_map_dict(sample, tmp_path):
    ref = _run(loaderkit.load(sample, "fp8", model=TinyVideoDiT))
    dm = {"": "cpu", "blocks.1": "disk", "blocks.3.fc1": "disk"}
    model = loaderkit.load(sample, "fp8", model=TinyVideoDiT, device_map=dm, offload_folder=tmp_path / "o")
    assert torch.equal(_run(model), ref)
    plan = loaderkit.plan(sample, "fp8", model=TinyVideoDiT, device_map=dm, offload_folder=tmp_path / "o")
    assert plan.modules["blocks.1.qkv"].offload == "disk"
    assert plan.modules["blocks.1.qkv"].device == "cpu"
    assert plan.modules["blocks.0.qkv"].offload is None
    assert "rests on" in plan.table()


def test_fp8_sizes_are_planned_storage_sizes(sample):
    """With the same budget, fp8 keeps more on the CPU than bf16 (sizes from the plan)."""
    budget = {"cpu": "600KB"}
    bf16 = loaderkit.plan(sample, "bf16", model=TinyVideoDiT, device_map="auto", max_memory=budget, offload_folder="x")
    fp8 = loaderkit.plan(sample, "fp8", model=TinyVideoDiT, device_map="auto", max_memory=budget, offload_folder="x")
    assert fp8.bytes_per_device().get("disk", 0) < bf16.bytes_per_device().get("disk", 0)
    assert fp8.bytes_per_device()["cpu"] <= 600_000


def test_memory_too_small_without_offload_folder(sample):
    with pytest.raises(loaderkit.PlanError, match="offload_folder"):
        loaderkit.plan(sample, "bf16", model=TinyVideoDiT, device_map="auto", max_memory=TINY_CPU)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_offload_folder(sample, tmp_path):  # pragma: no cover - CI runs as root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(loaderkit.PlanError, match="not writable"):
        loaderkit.plan(sample, "bf16", model=TinyVideoDiT, device_map="auto", max_memory=TINY_CPU,
                       offload_folder=ro / "sub")


def test_offload_folder_that_is_a_file(sample, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(loaderkit.PlanError, match="not a directory"):
        loaderkit.plan(sample, "bf16", model=TinyVideoDiT, device_map="auto", max_memory=TINY_CPU,
                       offload_folder=f / "sub")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device_map", ["cuda", "cuda:0", {"": 0}, {"": "cpu", "blocks": "cuda:0"}])
def test_cuda_on_a_cpu_machine_fails_at_plan_time(sample, device_map):
    with pytest.raises(loaderkit.PlanError, match="does not exist here"):
        loaderkit.plan(sample, "bf16", model=TinyVideoDiT, device_map=device_map)


def test_device_map_must_cover_every_module(sample):
    with pytest.raises(loaderkit.PlanError, match="does not place module"):
        loaderkit.plan(sample, "bf16", model=TinyVideoDiT, device_map={"blocks": "cpu"})


@pytest.mark.parametrize("bad", ["disk", 3.5, {}])
def test_invalid_device_map(sample, bad):
    with pytest.raises(loaderkit.PlanError):
        loaderkit.plan(sample, "bf16", model=TinyVideoDiT, device_map=bad)


def test_failed_offload_load_leaves_no_model(sample, tmp_path, monkeypatch):
    import loaderkit.pipeline.place as place

    def broken(self, key, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(place.DiskWriter, "write", broken)
    with pytest.raises(OSError):
        loaderkit.load(sample, "fp8", model=TinyVideoDiT, device_map="auto", max_memory=TINY_CPU,
                       offload_folder=tmp_path / "o")


def test_verify_flags_meta_weights_without_offload_hook():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4, device="meta"))
    report = loaderkit.verify(model)
    assert not report.ok
    assert report.problems[0].module == "1" and report.problems[0].kind == "placement"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ["bf16", "fp8"])
def test_cuda_cpu_disk(sample, tmp_path, strategy):  # pragma: no cover - GPU only
    ref = _run(loaderkit.load(sample, strategy, model=TinyVideoDiT)).float()
    model = loaderkit.load(
        sample, strategy, model=TinyVideoDiT, device_map="auto",
        max_memory={0: "300KB", "cpu": "300KB"}, offload_folder=tmp_path / "o",
    )
    plan = loaderkit.plan(
        sample, strategy, model=TinyVideoDiT, device_map="auto",
        max_memory={0: "300KB", "cpu": "300KB"}, offload_folder=tmp_path / "o",
    )
    assert {"cuda:0", "cpu", "disk"} <= set(plan.bytes_per_device())
    out = _run(model).float().cpu()
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert loaderkit.verify(model).ok


def test_unwritable_offload_folder_reported_before_loading(sample, tmp_path, monkeypatch):
    """The writability check runs at plan time (simulated denial: the suite may run as root)."""
    import loaderkit.pipeline.place as place

    monkeypatch.setattr(place.os, "access", lambda path, mode: False)
    with pytest.raises(loaderkit.PlanError, match="not writable") as err:
        loaderkit.load(sample, "bf16", model=TinyVideoDiT, device_map="auto", max_memory=TINY_CPU,
                       offload_folder=tmp_path / "o")
    assert str(tmp_path / "o") in str(err.value)
    assert not (tmp_path / "o").exists()
