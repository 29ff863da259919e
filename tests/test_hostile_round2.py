"""Hostile input, round 2: one containment rule for every file read, plugin facts that fail named,
storage dtypes that cannot hold weights, decoded weights that must stay finite."""

from __future__ import annotations

import json
import os

import pytest
import torch

import loaderkit
import loaderkit.plugin as lkp
from loaderkit.errors import CorruptCheckpointError, UnsafeCheckpointError

from conftest import TinyNet, save_st, seeded

E4M3 = torch.float8_e4m3fn


# -- symlinks out of the checkpoint ----------------------------------------------------------------


def _linked_dir(tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    return outside, ckpt


def test_a_weights_file_linked_from_outside_the_directory_is_refused(tmp_path):
    outside, ckpt = _linked_dir(tmp_path, "w")
    save_st(outside / "model.safetensors", seeded(TinyNet))
    os.symlink(outside / "model.safetensors", ckpt / "model.safetensors")
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint directory"):
        loaderkit.inspect(ckpt)
    assert loaderkit.inspect(outside / "model.safetensors")  # the file itself, named directly, is fine


@pytest.mark.parametrize("layout", ["single", "sharded", "torch"])
def test_a_file_swapped_for_an_outside_link_between_check_and_open_is_not_read(tmp_path, monkeypatch, layout):
    """The name is checked, then swapped for a link to an outside file with the same tensors,
    then opened: where the opened descriptor really is decides, not the name."""
    from safetensors.torch import load_file, save_file

    outside, ckpt = _linked_dir(tmp_path, "w")
    model = seeded(TinyNet)
    if layout == "single":
        save_st(ckpt / "model.safetensors", model)
        target = ckpt / "model.safetensors"
    elif layout == "torch":
        torch.save(model.state_dict(), ckpt / "pytorch_model.bin")
        target = ckpt / "pytorch_model.bin"
    else:
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        keys = sorted(sd)
        save_file({k: sd[k] for k in keys[:2]}, str(ckpt / "a.safetensors"))
        save_file({k: sd[k] for k in keys[2:]}, str(ckpt / "b.safetensors"))
        weight_map = {k: "a.safetensors" if k in keys[:2] else "b.safetensors" for k in keys}
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        target = ckpt / "b.safetensors"
    secret = outside / ("secret.bin" if layout == "torch" else "secret.safetensors")
    if layout == "torch":
        torch.save({k: torch.full_like(v, 7.0) for k, v in model.state_dict().items()}, secret)
    else:
        save_file({k: torch.full_like(v, 7.0) for k, v in load_file(str(target)).items()}, str(secret))
    real_open, swapped = os.open, []

    def racing_open(path, flags, *args, **kwargs):
        if os.fspath(path) == str(target) and not swapped:  # the attacker wins the race
            swapped.append(path)
            target.unlink()
            target.symlink_to(secret)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", racing_open)
    with pytest.raises(UnsafeCheckpointError, match=r"was opened as .*secret\.(bin|safetensors), outside"):
        loaderkit.load(ckpt, "fp32", model=seeded(TinyNet, seed=1))
    assert swapped


def test_a_config_linked_from_outside_is_refused(tmp_path):
    outside, ckpt = _linked_dir(tmp_path, "c")
    save_st(ckpt / "model.safetensors", seeded(TinyNet))
    (outside / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    os.symlink(outside / "config.json", ckpt / "config.json")
    with pytest.raises(UnsafeCheckpointError, match="config .* outside the checkpoint directory"):
        loaderkit.plan(ckpt, "fp32", model=TinyNet)


def test_convert_never_copies_a_side_file_linked_from_outside(tmp_path):
    outside, ckpt = _linked_dir(tmp_path, "s")
    transformers = pytest.importorskip("transformers")
    from tiny_configs import TINY_LLAMA

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).save_pretrained(ckpt)
    (outside / "id_rsa").write_text("PRIVATE KEY")
    os.symlink(outside / "id_rsa", ckpt / "notes.txt")
    (ckpt / "readme.txt").write_text("fine")
    dst = loaderkit.convert(ckpt, tmp_path / "copy", "bf16", progress=False)
    names = sorted(p.name for p in dst.iterdir())
    assert "notes.txt" not in names and "readme.txt" in names
    assert all("PRIVATE KEY" not in p.read_text(errors="ignore") for p in dst.iterdir() if p.suffix == ".txt")


def test_a_huge_config_is_refused_before_parsing(tmp_path, monkeypatch):
    from loaderkit.contract import io

    monkeypatch.setattr(io, "MAX_JSON_BYTES", 1000)
    save_st(tmp_path / "model.safetensors", seeded(TinyNet))
    (tmp_path / "config.json").write_text(json.dumps({"pad": "x" * 2000}))
    with pytest.raises(CorruptCheckpointError, match="larger than 1,000 bytes"):
        loaderkit.inspect(tmp_path)


# -- plugin facts fail named -----------------------------------------------------------------------


class BadFacts:
    def __init__(self, facts):
        self.facts = facts

    @lkp.hookimpl
    def loaderkit_model_facts(self, model):
        return self.facts()


def test_a_raising_finalize_names_its_plugin(tiny_ckpt):
    def boom(model):
        raise ValueError("finalize went wrong")

    mgr = lkp.PluginManager(autoload=False)
    mgr.register(BadFacts(lambda: lkp.ModelFacts(finalize=(boom,))), name="bad-finalize")
    with pytest.raises(lkp.PluginError, match="bad-finalize.*finalize went wrong") as info:
        loaderkit.load(tiny_ckpt[0], "fp32", model=TinyNet, manager=mgr)
    assert info.value.plugin == "bad-finalize"


def test_an_invalid_regex_in_facts_names_its_plugin(tiny_ckpt):
    mgr = lkp.PluginManager(autoload=False)
    mgr.register(BadFacts(lambda: lkp.ModelFacts(skip_low_precision=("blocks.(",))), name="bad-regex")
    with pytest.raises(lkp.PluginError, match="(?s)bad-regex.*not a valid regular expression") as info:
        loaderkit.plan(tiny_ckpt[0], "fp32", model=TinyNet, manager=mgr)
    assert info.value.plugin == "bad-regex"


# -- storage dtypes that cannot hold weights ------------------------------------------------------


def _storing_linear_weights(dtype: str, granularity: str = "channel") -> lkp.Strategy:
    """A strategy that stores every Linear weight as ``dtype``, computing in float32."""
    class Storing(lkp.Strategy):
        name = "storing"

        def decide(self, module, state):
            return lkp.ModuleDecision(compute="float32", granularity=granularity,
                                      storage={"weight": dtype} if module.kind == "linear" else {})

    return Storing()


@pytest.mark.parametrize("dtype", ["float8_e8m0fnu", "float4_e2m1fn_x2"])
def test_a_strategy_cannot_store_weights_in_scale_or_packed_dtypes(tiny_ckpt, dtype):
    with pytest.raises(loaderkit.PlanError, match=f"store weight as {dtype}, which cannot hold weights"):
        loaderkit.plan(tiny_ckpt[0], _storing_linear_weights(dtype), model=TinyNet)


def test_packed_fp4_weights_are_refused_at_plan_time(tmp_path):
    sd = seeded(TinyNet).state_dict()
    sd["proj.weight"] = torch.zeros(16, 4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    path = save_st(tmp_path / "fp4.safetensors", sd)

    class Packed(torch.nn.Module):  # a model whose proj holds the packed shape
        def __init__(self):
            super().__init__()
            self.inner = TinyNet()
            self.inner.proj.weight = torch.nn.Parameter(torch.empty(16, 4, dtype=torch.float32))

    with pytest.raises(loaderkit.PlanError, match="float4_e2m1fn_x2, which loaderkit cannot decode"):
        loaderkit.plan(path, "fp32", model=lambda: Packed().inner)


# -- decoded weights stay finite ---------------------------------------------------------------------


def _per_tensor(tmp_path, scale, codes=None):
    sd = seeded(TinyNet).state_dict()
    q = (sd["proj.weight"] * 100).clamp(-448, 448).to(E4M3) if codes is None else codes
    sd["proj.weight"] = q
    sd["proj.weight_scale"] = torch.tensor(scale, dtype=torch.float32)
    d = tmp_path / "ckpt"
    d.mkdir()
    save_st(d / "model.safetensors", sd)
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    return d


def test_a_scale_that_overflows_the_compute_dtype_is_refused(tmp_path):
    d = _per_tensor(tmp_path, 1e6)
    with pytest.raises(CorruptCheckpointError, match="decodes to infinite values in float16"):
        loaderkit.load(d, "fp16", model=TinyNet)
    assert torch.isfinite(loaderkit.load(d, "fp32", model=TinyNet).proj.weight).all()  # fp32 holds it


def test_a_kept_fp8_weight_whose_scale_overflows_the_compute_dtype_is_refused_at_load(tmp_path):
    """Kept as stored, the weight is decoded only at forward time: the overflow must be found at load."""
    d = _per_tensor(tmp_path, 1e6)
    fp16 = loaderkit.strategy("fp8", compute_dtype="float16")
    with pytest.raises(loaderkit.PlanError, match="kept as stored and decoded in float16") as err:
        loaderkit.load(d, fp16, model=TinyNet)
    assert err.value.tensor == "proj.weight" and err.value.module == "proj"
    model = loaderkit.load(d, "fp8", model=TinyNet)  # bf16 compute holds it
    assert model.proj.weight.dtype == E4M3
    assert torch.isfinite(model(torch.randn(2, 8, dtype=torch.bfloat16))).all()


def test_a_large_scale_on_small_codes_is_decoded_once_and_kept(tmp_path):
    """max code * scale passes the cheap bound only for small scales; a large scale on small codes is
    checked exactly (here: codes <= 4, scale 1000, so every value fits fp16) and loads."""
    codes = (torch.rand(16, 8) * 8 - 4).to(E4M3)
    d = _per_tensor(tmp_path, 1000.0, codes)
    model = loaderkit.load(d, loaderkit.strategy("fp8", compute_dtype="float16"), model=TinyNet)
    assert model.proj.weight.dtype == E4M3
    y = model(torch.randn(2, 8, dtype=torch.float16))
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_a_per_channel_scale_that_overflows_one_row_names_the_tensor(tmp_path):
    sd = seeded(TinyNet).state_dict()
    codes = torch.full((16, 8), 2.0).to(E4M3)
    codes[3] = 448.0  # one full-range row ...
    scale = torch.ones(16, 1)
    scale[5] = 1000.0  # ... and one large-scale row of small codes: 2000, fits fp16
    sd["proj.weight"], sd["proj.weight_scale"] = codes, scale
    d = tmp_path / "ckpt"
    d.mkdir()
    save_st(d / "model.safetensors", sd)
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fbgemm_fp8"}}))
    fp16 = loaderkit.strategy("fp8", compute_dtype="float16")
    model = loaderkit.load(d, fp16, model=TinyNet)  # the bound (448 * 1000) fails, the exact check passes
    assert torch.isfinite(model(torch.randn(2, 8, dtype=torch.float16))).all()
    scale[3] = 200.0  # 448 * 200 overflows fp16 in row 3
    sd["proj.weight_scale"] = scale
    save_st(d / "model.safetensors", sd)
    with pytest.raises(loaderkit.PlanError, match="'proj.weight' is kept as stored"):
        loaderkit.load(d, fp16, model=TinyNet)


def test_nan_fp8_weight_codes_are_refused(tmp_path):
    codes = torch.zeros(16, 8).to(E4M3)
    codes.view(torch.uint8)[0, 0] = 0x7F  # e4m3fn NaN
    d = _per_tensor(tmp_path, 1.0, codes)
    with pytest.raises(CorruptCheckpointError, match="NaN or infinite codes"):
        loaderkit.load(d, "bf16", model=TinyNet)


# -- atomic, exclusive destinations ---------------------------------------------------------------

from loaderkit.errors import ConvertError  # noqa: E402
from loaderkit.pipeline import files  # noqa: E402


def test_a_destination_that_appears_meanwhile_is_never_replaced(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "new.txt").write_text("new")
    dst = tmp_path / "dst"
    real = files._renameat2

    def racing(src, target, flags):
        if flags == files._RENAME_NOREPLACE:  # another convert finished first
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
        return real(src, target, flags)

    monkeypatch.setattr(files, "_renameat2", racing)
    with pytest.raises(ConvertError, match="appeared while it was being written"):
        files.move_into_place(out, dst)
    assert (dst / "theirs.txt").read_text() == "theirs" and (out / "new.txt").exists()


def test_overwrite_swaps_in_one_step_and_leaves_nothing_behind(tmp_path):
    out, dst = tmp_path / "out", tmp_path / "dst"
    out.mkdir()
    dst.mkdir()
    (out / "model.safetensors").write_text("new")
    (dst / "model.safetensors").write_text("old")
    files.move_into_place(out, dst)
    assert (dst / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(tmp_path):
    src = save_st(tmp_path / "m.safetensors", seeded(TinyNet))
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(ConvertError, match="is not one"):
        loaderkit.convert(src, home, "bf16", overwrite=True, model=TinyNet, progress=False)
    assert (home / "thesis.tex").read_text() == "years of work"


def test_stale_partials_of_killed_converts_are_cleaned(tmp_path):
    src = save_st(tmp_path / "m.safetensors", seeded(TinyNet))
    stale = tmp_path / ".out.safetensors.999999999.deadbeef.partial"
    stale.mkdir()
    (stale / "junk").write_text("x")
    loaderkit.convert(src, tmp_path / "out.safetensors", "bf16", model=TinyNet, progress=False)
    assert not stale.exists() and (tmp_path / "out.safetensors").is_file()


def test_an_unwritable_destination_is_a_convert_error(tmp_path):
    src = save_st(tmp_path / "m.safetensors", seeded(TinyNet))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConvertError, match="cannot write beside"):
        loaderkit.convert(src, tmp_path / "afile" / "sub" / "out.safetensors", "bf16", model=TinyNet, progress=False)


# -- disk full during offload ---------------------------------------------------------------------


def test_a_full_disk_during_offload_is_named_and_cleaned_up(tmp_path, monkeypatch):
    import errno

    import accelerate.utils
    from loaderkit.demo import TinyVideoDiT, save_sample

    (tmp_path / "src").mkdir()
    sample = save_sample(tmp_path / "src")
    folder = tmp_path / "offload"
    real, calls = accelerate.utils.offload_weight, []

    def filling(weight, name, folder, index=None):
        calls.append(name)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(weight, name, folder, index=index)

    monkeypatch.setattr(accelerate.utils, "offload_weight", filling)
    with pytest.raises(lkp.OffloadError, match="No space left on device"):
        loaderkit.load(sample, "fp8", model=TinyVideoDiT, device_map="auto", max_memory={"cpu": "300KB"},
                       offload_folder=folder, progress=False)
    assert len(calls) > 2 and not list(folder.glob("*.dat"))


# -- the command line ---------------------------------------------------------------------------------


def test_cli_model_spec_errors_are_one_line(tiny_ckpt, capsys):
    from loaderkit.cli import main

    assert main(["plan", str(tiny_ckpt[0]), "--model", ".rel:X"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("loaderkit: error: --model '.rel:X': cannot import it") and err.count("\n") == 1


def test_cli_survives_a_closed_pipe(tiny_ckpt):
    import subprocess
    import sys

    proc = subprocess.run(
        f"{sys.executable} -m loaderkit inspect --tensors {tiny_ckpt[0]} | head -c 1",
        shell=True, capture_output=True, text=True, timeout=120,
    )
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_lone_surrogate_tensor_names_are_refused(tmp_path):
    import struct as _struct

    header = '{"__metadata__":{"format":"pt"},"a\\udcff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    raw = header.encode() + b" " * (-len(header) % 8)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(CorruptCheckpointError, match="not valid UTF-8"):
        loaderkit.inspect(path)


def test_a_hook_raising_system_exit_fails_the_plan_named(tiny_ckpt):
    class Exits:
        @lkp.hookimpl
        def loaderkit_plan_ready(self, plan):
            raise SystemExit(0)

    mgr = lkp.PluginManager(autoload=False)
    mgr.register(Exits(), name="exits")
    with pytest.raises(lkp.PluginError, match="exits.*SystemExit"):
        loaderkit.plan(tiny_ckpt[0], "fp32", model=TinyNet, manager=mgr)


def test_zero_copy_aliases_the_file_and_zero_copy_false_does_not(tmp_path):
    """Rewriting the file in place after a load: a zero-copy model sees the new bytes (documented),
    a ``zero_copy=False`` one keeps what it loaded."""
    import mmap

    ref = seeded(TinyNet)
    path = save_st(tmp_path / "m.safetensors", ref)
    aliased = loaderkit.load(path, "fp32", model=TinyNet)
    private = loaderkit.load(path, "fp32", model=TinyNet, zero_copy=False)
    before = private.proj.weight.detach().clone()
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        n = int.from_bytes(m[:8], "little")
        header = json.loads(m[8:8 + n])
        begin, end = header["proj.weight"]["data_offsets"]
        m[8 + n + begin:8 + n + end] = bytes(end - begin)  # zeros, in place
    assert torch.equal(private.proj.weight, before)
    assert torch.count_nonzero(aliased.proj.weight) == 0  # the documented aliasing of a zero-copy load


# -- concurrent skeleton builds -------------------------------------------------------------------


def test_loads_in_eight_threads_and_a_user_thread_building_modules_leave_torch_untouched(tmp_path):
    """Skeletons are built on the meta device in the load's dtype: only the building thread's
    modules may go to meta or get that dtype, overlapping builds must not leave torch patched, and
    every load must produce the checkpoint's weights in its dtype."""
    import threading

    ref = seeded(TinyNet)
    path = save_st(tmp_path / "m.safetensors", ref)
    original = torch.nn.Module.register_parameter
    default = torch.get_default_dtype()
    stop = threading.Event()
    user_meta: list[str] = []
    built = [0]
    errors: list[BaseException] = []
    results: list[torch.nn.Module] = []

    def user():  # a user's own thread, constructing modules throughout
        while not stop.is_set():
            lin = torch.nn.Linear(8, 8)
            built[0] += 1
            if lin.weight.device.type == "meta" or lin.bias.device.type == "meta":
                user_meta.append("meta")
            if lin.weight.dtype != torch.float32 or torch.zeros(1).dtype != torch.float32:
                user_meta.append("not float32")

    def loader(i):
        try:
            for _ in range(5):
                results.append(loaderkit.load(path, "bf16" if i % 2 else "fp32", model=TinyNet))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    u = threading.Thread(target=user)
    u.start()
    threads = [threading.Thread(target=loader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    u.join()
    assert not errors, errors
    assert built[0] > 0 and not user_meta, f"{len(user_meta)} of {built[0]} user modules: {set(user_meta)}"
    assert torch.nn.Module.register_parameter is original
    assert torch.get_default_dtype() == default
    assert len(results) == 40
    assert {m.proj.weight.dtype for m in results} == {torch.float32, torch.bfloat16}
    for m in results:
        assert torch.equal(m.proj.weight.float(), ref.proj.weight.to(m.proj.weight.dtype).float())
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # construction after the loads is normal


# -- shapes torch cannot size ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[2**62, 2**62, 0], [0, 2**40, 2**40], [2**61, 0, 8]])
def test_an_empty_tensor_whose_shape_torch_cannot_size_is_refused_in_the_header(tmp_path, shape):
    """numel 0 needs 0 bytes, but torch computes strides from the other dimensions and overflows."""
    import struct

    from loaderkit.cli import main

    header = json.dumps({"big": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CorruptCheckpointError, match="more than torch can address") as err:
        loaderkit.inspect(path)
    assert err.value.tensor == "big"
    dst = tmp_path / "out"
    assert main(["convert", str(path), str(dst), "--strategy", "bf16"]) != 0
    assert not dst.exists()


# -- torch zip records ----------------------------------------------------------------------------


def _rezip(src, dst, compress=None, pad_pickle=0):
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if pad_pickle and info.filename.endswith("data.pkl"):
                data += b"\x00" * pad_pickle  # bytes after the STOP opcode, never read by pickle
            zout.writestr(info.filename, data, compress_type=compress or zipfile.ZIP_STORED)
    return dst


def test_a_torch_checkpoint_with_compressed_records_is_refused_before_unpickling(tmp_path, monkeypatch):
    import zipfile

    from loaderkit.errors import UnsupportedCheckpointError

    src = tmp_path / "plain.pt"
    torch.save(seeded(TinyNet).state_dict(), src)
    stored = _rezip(src, tmp_path / "stored.pt")  # the same records rewritten stored: still loads
    assert torch.equal(loaderkit.load(stored, "fp32", model=TinyNet).proj.weight, seeded(TinyNet).proj.weight)
    deflated = _rezip(src, tmp_path / "deflated.pt", zipfile.ZIP_DEFLATED)
    called = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: called.append(a))
    with pytest.raises(UnsupportedCheckpointError, match="has a compressed record") as err:
        loaderkit.inspect(deflated)
    assert err.value.path is not None and not called  # refused before torch.load


def test_an_oversized_pickle_record_is_refused_before_unpickling(tmp_path, monkeypatch):
    from loaderkit.plugins import torchzip as tz
    from loaderkit.errors import UnsupportedCheckpointError

    src = tmp_path / "plain.pt"
    torch.save(seeded(TinyNet).state_dict(), src)
    monkeypatch.setattr(tz, "MAX_PICKLE_BYTES", 4096)
    padded = _rezip(src, tmp_path / "padded.pt", pad_pickle=8192)
    with pytest.raises(UnsupportedCheckpointError, match="over the 4096-byte limit"):
        loaderkit.inspect(padded)


def test_a_torch_file_with_a_broken_zip_directory_is_a_corrupt_checkpoint(tmp_path):
    src = tmp_path / "m.pt"
    torch.save(seeded(TinyNet).state_dict(), src)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) - 30])  # cuts into the end-of-central-directory record
    with pytest.raises(CorruptCheckpointError, match="not a readable zip archive"):
        loaderkit.inspect(src)


def test_zero_copy_false_copies_the_scale_of_a_kept_fp8_weight_too(tmp_path):
    import mmap

    d = _per_tensor(tmp_path, 0.5)
    model = loaderkit.load(d, "fp8", model=TinyNet, zero_copy=False)
    assert model.proj.weight.dtype == E4M3
    scale = model.proj.weight_scale.detach().clone()
    path = d / "model.safetensors"
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        n = int.from_bytes(m[:8], "little")
        begin, end = json.loads(m[8:8 + n])["proj.weight_scale"]["data_offsets"]
        m[8 + n + begin:8 + n + end] = bytes(end - begin)  # the scale becomes 0, in place
    assert torch.equal(model.proj.weight_scale, scale) and float(scale.reshape(-1)[0]) == 0.5


def test_a_skeleton_build_never_changes_the_default_dtype_of_other_threads():
    """A build in bfloat16 makes the building thread's default-dtype tensors bfloat16; a thread
    constructing modules meanwhile still gets torch's own default, float32, on the CPU."""
    import threading

    from loaderkit.plugin import meta_init

    inside, done = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def other():
        inside.wait(10)
        lin = torch.nn.Linear(4, 4)
        seen.update(weight=(lin.weight.dtype, lin.weight.device.type), default=torch.get_default_dtype(),
                    tensor=torch.tensor([0.5]).dtype, legacy=torch.Tensor(2).dtype)
        done.set()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("table", torch.arange(0.0, 4.0), persistent=False)
            self.register_buffer("fp32", torch.ones(2, dtype=torch.float32), persistent=False)
            self.default = torch.get_default_dtype()
            self.legacy = torch.nn.Parameter(torch.Tensor(3))  # the legacy constructor (wav2vec2)
            self.log = torch.nn.Parameter(torch.log(torch.arange(1, 5)))  # promoted from integers (Jamba)
            torch.set_default_dtype(torch.float16)  # a constructor setting it changes this build only
            self.half = torch.zeros(1)
            torch.set_default_dtype(torch.bfloat16)
            inside.set()
            done.wait(10)

    t = threading.Thread(target=other)
    t.start()
    with meta_init(torch.bfloat16):
        net = Net()
    t.join()
    assert seen == {"weight": (torch.float32, "cpu"), "default": torch.float32, "tensor": torch.float32,
                    "legacy": torch.float32}
    assert net.legacy.dtype == net.log.dtype == torch.bfloat16 and net.half.dtype == torch.float16
    assert net.default == torch.bfloat16 and net.table.dtype == torch.bfloat16 and net.table.device.type == "cpu"
    assert net.lin.weight.dtype == torch.bfloat16 and net.lin.weight.device.type == "meta"
    assert net.fp32.dtype == torch.float32  # an explicit dtype is kept
    assert torch.get_default_dtype() == torch.float32


# -- hostile sizes --------------------------------------------------------------------------------


def test_a_config_with_far_more_layers_than_the_checkpoint_fails_before_building(tmp_path):
    import time

    transformers = pytest.importorskip("transformers")
    from tiny_configs import TINY_LLAMA

    from loaderkit.errors import BuildError

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LLAMA)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10000}))
    start = time.perf_counter()
    with pytest.raises(BuildError, match=r"sets num_hidden_layers=10000, but the tensor names of the checkpoint "
                                         r"number at most 2 layers") as err:
        loaderkit.load(tmp_path, "fp32")
    assert time.perf_counter() - start < 5
    assert err.value.path == str(tmp_path)


def _st_of_tiny_tensors(path, n, key='"data_offsets"'):
    """A valid safetensors file of ``n`` one-element tensors, its header written directly."""
    import struct

    entries = (f'"t{i}":{{"dtype":"U8","shape":[1],{key}:[{i},{i + 1}]}}' for i in range(n))
    header = ("{" + ",".join(entries) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(n))
    return path


def test_a_header_of_a_million_tensors_is_refused_fast(tmp_path):
    import time

    from loaderkit.errors import UnsupportedCheckpointError

    path = _st_of_tiny_tensors(tmp_path / "many.safetensors", 1_000_000)
    start = time.perf_counter()
    with pytest.raises(UnsupportedCheckpointError, match=r"holds more than 250,000 tensors") as err:
        loaderkit.inspect(path)
    assert time.perf_counter() - start < 5
    assert err.value.path == str(path) and "LOADERKIT_MAX_TENSORS_PER_FILE" in str(err.value)


@pytest.mark.parametrize("key", ['"data_offsets"', r'"data_\u006fffsets"'])
def test_the_tensor_limit_per_file_holds_for_escaped_names_and_can_be_raised(tmp_path, monkeypatch, key):
    from loaderkit.errors import UnsupportedCheckpointError

    monkeypatch.setenv("LOADERKIT_MAX_TENSORS_PER_FILE", "100")
    assert len(loaderkit.inspect(_st_of_tiny_tensors(tmp_path / "ok.safetensors", 100, key)).tensors) == 100
    over = _st_of_tiny_tensors(tmp_path / "over.safetensors", 101, key)
    with pytest.raises(UnsupportedCheckpointError, match="more than 100 tensors"):
        loaderkit.inspect(over)
    monkeypatch.setenv("LOADERKIT_MAX_TENSORS_PER_FILE", "101")
    assert len(loaderkit.inspect(over).tensors) == 101
    monkeypatch.setenv("LOADERKIT_MAX_TENSORS_PER_FILE", "many")
    with pytest.raises(UnsupportedCheckpointError, match="not a positive whole number"):
        loaderkit.inspect(over)


# -- kept fp8 weights holding NaN or infinite codes -----------------------------------------------


def _kept_fp8(tmp_path, codes, scaled):
    sd = seeded(TinyNet).state_dict()
    sd["proj.weight"] = codes
    if scaled:
        sd["proj.weight_scale"] = torch.tensor(1.0)
    d = tmp_path / "ckpt"
    d.mkdir(exist_ok=True)
    save_st(d / "model.safetensors", sd)
    if scaled:
        (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    return d


@pytest.mark.parametrize("where", ["memory", "disk"])
@pytest.mark.parametrize("kind", ["e4m3 NaN", "e4m3 NaN, scaled", "e5m2 inf"])
def test_a_kept_fp8_weight_with_non_finite_codes_is_refused_in_memory_and_offloaded(tmp_path, where, kind):
    """Kept as stored, the weight is decoded only at forward time; offloaded to disk without a
    copy it is only pointed at: either way its codes are checked at load."""
    dtype = torch.float8_e5m2 if kind.startswith("e5m2") else E4M3
    codes = torch.zeros(16, 8).to(dtype)
    codes.view(torch.uint8)[3, 5] = 0x7C if dtype == torch.float8_e5m2 else 0xFF  # +inf / -NaN
    scaled = kind.endswith("scaled")
    d = _kept_fp8(tmp_path, codes, scaled)
    placement = {} if where == "memory" else dict(device_map="auto", max_memory={"cpu": 1},
                                                  offload_folder=tmp_path / "offload")
    plan = loaderkit.plan(d, "fp8", model=TinyNet, **placement)
    assert plan.tensors["proj.weight"].device == ("cpu" if where == "memory" else "disk")
    assert plan.tensors["proj.weight"].conversion == "none"
    with pytest.raises(CorruptCheckpointError, match="'proj.weight' holds NaN or infinite codes") as err:
        loaderkit.load(d, "fp8", model=TinyNet, progress=False, **placement)
    assert err.value.tensor == "proj.weight"
    codes.view(torch.uint8)[3, 5] = 0x10  # a finite code: the same checkpoint loads
    _kept_fp8(tmp_path, codes, scaled)
    model = loaderkit.load(d, "fp8", model=TinyNet, progress=False, **placement)
    assert model.proj.weight.dtype == dtype


@pytest.mark.parametrize("library", ["transformers", "diffusers"])
def test_a_library_build_does_not_stop_other_threads_initialising_their_modules(tmp_path, library):
    """transformers' and diffusers' no_init_weights replace torch.nn.init's functions for the whole
    process while a model is built; another thread's initialisers must still run."""
    import threading

    if library == "transformers":
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
                                     num_key_value_heads=2, vocab_size=32)).save_pretrained(tmp_path / "m")
    else:
        from diffusers import AutoencoderKL

        AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2,
                      layers_per_block=1).save_pretrained(tmp_path / "m")
    stop = threading.Event()
    bad, calls = [], [0]

    def user():
        while not stop.is_set():
            t = torch.zeros(64)
            torch.nn.init.constant_(t, 3.0)
            torch.nn.init.normal_(t, mean=5.0, std=0.1) if t[0] == 3.0 else None
            calls[0] += 1
            if not 4.0 < float(t.mean()) < 6.0:
                bad.append(float(t.mean()))

    u = threading.Thread(target=user)
    u.start()
    try:
        for _ in range(15):
            loaderkit.plan(tmp_path / "m", "bf16")
    finally:
        stop.set()
        u.join()
    assert calls[0] > 0 and not bad, f"{len(bad)} of {calls[0]} initialisations in another thread did nothing"
    t = torch.zeros(4)
    assert torch.equal(torch.nn.init.constant_(t, 2.0), torch.full((4,), 2.0))  # torch's own again


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int32", "bool"])
def test_a_strategy_cannot_store_floating_weights_in_an_integer_dtype(tiny_ckpt, dtype):
    """A float weight cast to int8 keeps only its integer part (nearly all zeros): no decoding
    exists for it without a scale, so it is refused at plan time instead of loading wrong. (int8
    with one scale per output channel is quantized instead, see tests/test_int8_strategy.py;
    here int8 asks for per-tensor scales, which int8 storage does not have.)"""
    strategy = _storing_linear_weights(dtype, "tensor" if dtype == "int8" else "channel")
    with pytest.raises(loaderkit.PlanError, match=f"store weight as {dtype}, an integer dtype"):
        loaderkit.plan(tiny_ckpt[0], strategy, model=TinyNet)
