"""``loaderkit convert`` / ``loaderkit.write.convert``: converted copies that other tools read.

- a transformers Llama converted to fp8 (compressed-tensors, every scheme) loads in transformers
  (compressed-tensors installed) and in loaderkit, both agreeing with the original and each other;
- sharded output (index + shards) that both read; every shard passes safetensors and loaderkit's
  strict header parser;
- a config-less file converted to ComfyUI's mixed layout holds exactly what the loader's own
  quantize produces; conv weights and skipped modules stay high precision;
- uniform dtype conversion, and dequantization of fp8 checkpoints;
- atomicity: a failure mid-write (disk full, Ctrl-C) leaves nothing at DST and SRC untouched;
  existing DST refused unless overwrite; bad destinations and combinations are clear errors;
- memory stays bounded (a fresh process, peak RSS measured);
- progress bars: when they show, and that loads feed them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import loaderkit
import loaderkit.plugin
from loaderkit import progress as lk_progress
from loaderkit.cli import main
from loaderkit.kernels.quant import quantize
from loaderkit.demo import TinyVideoDiT, save_sample
from loaderkit.plugins._st_header import read_header
from loaderkit.errors import ConvertError
from loaderkit.pipeline.build import infer_model
from loaderkit.pipeline.convert import convert, parse_size
from loaderkit.pipeline.files import ShardWriter

E4M3 = torch.float8_e4m3fn
TOKENS = torch.tensor([[1, 5, 9, 3, 7, 11, 2, 60, 100, 17]])
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def tree_hash(path: Path) -> str:
    """A hash of every file (name and bytes) under ``path``."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path.parent)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def cli(*args: str) -> int:
    return main(["convert", *map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny Llama saved by transformers in float32 (dimensions multiples of 128, so that the
    block scheme's dynamic group-128 activations run in compressed-tensors' CPU forward too)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("llama") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (path / "notes.md").write_text("not copied")
    return path


@pytest.fixture(scope="module")
def llama_ref(llama):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)(TOKENS).logits


def transformers_logits(path: Path, dequantize: bool = False) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = AutoModelForCausalLM.from_pretrained(path, **extra)
    with torch.no_grad():
        return model(TOKENS).logits


def loaderkit_logits(path: Path, strategy: str = "fp8") -> torch.Tensor:
    with torch.no_grad():
        return loaderkit.load(path, strategy)(TOKENS).logits


# -------------------------------------------------------------------------------------------
# transformers checkpoints -> compressed-tensors
# -------------------------------------------------------------------------------------------

SCHEMES = {"per-channel": ("channel", (256, 1)), "per-tensor": ("tensor", (1,)), "block": ("block", (2, 1))}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_llama_fp8_loads_in_transformers_and_loaderkit(llama, llama_ref, scheme, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig

    dst = tmp_path / "fp8"
    assert cli(llama, dst, "--strategy", "fp8", "--scheme", scheme) == 0
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]
    config = json.loads((dst / "config.json").read_text())
    qc = config["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # compressed-tensors' own schema accepts it
    group = parsed.config_groups["group_0"]
    strategy, scale_shape = SCHEMES[scheme]
    assert group.weights.strategy == strategy and group.weights.type == "float" and group.targets == ["Linear"]
    assert group.input_activations.dynamic is True and qc["ignore"] == ["lm_head"]
    assert config["dtype"] == "bfloat16" and qc["format"] == "float-quantized"
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        w, s = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.gate_proj.weight_scale"
        assert f.get_tensor(w).dtype == E4M3 and f.get_tensor(s).dtype == torch.bfloat16
        assert tuple(f.get_tensor(s).shape) == scale_shape
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
        assert "lm_head.weight_scale" not in f.keys()
    with safe_open(str(llama / "model.safetensors"), "pt") as f:  # the loader's kernel, bit for bit
        q, scale = quantize(f.get_tensor(w), E4M3, granularity=strategy)
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor(w).view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(f.get_tensor(s), scale.to(torch.bfloat16).reshape(scale_shape))

    theirs, ours = transformers_logits(dst), loaderkit_logits(dst, "fp8")
    assert cosine(theirs, llama_ref) >= 0.99 and cosine(ours, llama_ref) >= 0.99
    assert cosine(theirs, ours) >= 0.999  # transformers also quantizes activations (dynamic)
    # dequantized, both readers give the same bits
    assert torch.equal(transformers_logits(dst, dequantize=True), loaderkit_logits(dst, "bf16"))


def test_sharded_output_is_read_by_both(llama, llama_ref, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    convert(llama, single, "fp8", progress=False)
    assert cli(llama, sharded, "-s", "fp8", "--max-shard-size", "100KB") == 0
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for name in shards:
        header = read_header(sharded / name)  # loaderkit's strict parser
        with safe_open(str(sharded / name), "pt") as f:
            assert set(f.keys()) == {e.name for e in header.entries}
            assert all(e.begin % torch.finfo(getattr(torch, e.dtype)).bits // 8 == 0 for e in header.entries)
            for key in f.keys():
                assert index["weight_map"][key] == name
                total += f.get_tensor(key).nbytes
        assert (sharded / name).stat().st_size <= 100_000 + 4096
    assert index["metadata"]["total_size"] == total
    for key, name in index["weight_map"].items():
        if key.endswith(".weight_scale"):  # a weight and its scale are never split
            assert index["weight_map"][key[: -len("_scale")]] == name
    assert torch.equal(loaderkit_logits(sharded), loaderkit_logits(single))
    assert torch.equal(transformers_logits(sharded), transformers_logits(single))
    assert cosine(transformers_logits(sharded), llama_ref) >= 0.99


def test_uniform_fp32_to_bf16(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    dst = convert(llama, tmp_path / "bf16", "bf16", progress=False)
    config = json.loads((dst / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    want = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16)
    got = AutoModelForCausalLM.from_pretrained(dst)
    assert got.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(got(TOKENS).logits, want(TOKENS).logits)
    ours, ref = loaderkit.load(dst, "bf16").state_dict(), loaderkit.load(llama, "bf16").state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_fp8_directory_dequantized_equals_loading_it_in_bf16(llama, tmp_path):
    fp8 = convert(llama, tmp_path / "fp8", "fp8", scheme="block", progress=False)
    dense = convert(fp8, tmp_path / "dense", "bf16", progress=False)
    config = json.loads((dense / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert loaderkit.inspect(dense).quantization is None
    with safe_open(str(dense / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "scale" in k]
        written = {k: f.get_tensor(k) for k in f.keys()}
    want = loaderkit.load(fp8, "bf16").state_dict()
    assert sorted(written) == sorted(want)
    assert all(torch.equal(written[k], want[k]) for k in want)


# -------------------------------------------------------------------------------------------
# config-less files -> ComfyUI mixed precision
# -------------------------------------------------------------------------------------------


@pytest.fixture()
def sample(tmp_path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    return save_sample(folder)


def test_configless_file_to_comfy_layout_holds_the_loaders_quantization(sample, tmp_path):
    dst = tmp_path / "model-fp8.safetensors"
    assert cli(sample, dst, "-s", "fp8") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-fp8.safetensors", "src"]
    info = loaderkit.inspect(dst)
    assert info.quantization.scheme == "comfy-mixed" and info.quantization.granularity == "tensor"
    read_header(dst)
    with safe_open(str(dst), "pt") as f, safe_open(str(sample), "pt") as src:
        keys = set(f.keys())
        quantized = sorted(k[: -len(".comfy_quant")] for k in keys if k.endswith(".comfy_quant"))
        assert quantized == sorted(f"blocks.{i}.{m}" for i in range(4) for m in ("qkv", "proj", "fc1", "fc2"))
        for m in quantized:
            assert bytes(f.get_tensor(f"{m}.comfy_quant").tolist()) == b'{"format": "float8_e4m3fn"}'
            q, scale = quantize(src.get_tensor(f"{m}.weight"), E4M3, granularity="tensor")
            assert torch.equal(f.get_tensor(f"{m}.weight").view(torch.uint8), q.view(torch.uint8))
            stored = f.get_tensor(f"{m}.weight_scale")
            assert stored.dtype == torch.float32 and stored.shape == () and torch.equal(stored, scale)
        for kept in ("patch_embed.weight", "head.weight", "time_embed.0.weight", "pos_embed"):
            assert f.get_tensor(kept).dtype == torch.bfloat16
        assert not [k for k in keys if k.endswith("input_scale")]
    # loaderkit reads it back exactly as it quantizes the original on load
    ours = loaderkit.load(dst, "fp8", model=TinyVideoDiT).state_dict()
    onload = loaderkit.load(sample, loaderkit.strategy("fp8", granularity="tensor"), model=TinyVideoDiT).state_dict()
    assert sorted(ours) == sorted(onload)
    for k in onload:
        a, b = ours[k].reshape(-1), onload[k].reshape(-1)
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), k


def test_comfy_layout_quantizes_linear_weights_only(sample, tmp_path):
    dst = tmp_path / "out.safetensors"
    assert cli(sample, dst, "-s", "fp8", "-o", "default_skips=false") == 0
    with safe_open(str(dst), "pt") as f:
        assert f.get_tensor("head.weight").dtype == E4M3  # no longer skipped
        assert f.get_tensor("patch_embed.weight").dtype == torch.bfloat16  # a Conv3d: not in the layout
        assert "patch_embed.comfy_quant" not in f.keys()


def test_fp8_file_dequantized_equals_loading_it_in_bf16(sample, tmp_path):
    fp8 = convert(sample, tmp_path / "fp8.safetensors", "fp8", progress=False)
    dense = convert(fp8, tmp_path / "dense.safetensors", "bf16", progress=False)
    assert loaderkit.inspect(dense).quantization is None
    with safe_open(str(dense), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    want = loaderkit.load(fp8, "bf16", model=TinyVideoDiT).state_dict()
    assert sorted(written) == sorted(want) and all(torch.equal(written[k], want[k]) for k in want)


def test_model_argument_and_cli_model_option(sample, tmp_path):
    a = convert(sample, tmp_path / "a.safetensors", "fp8", model=TinyVideoDiT, progress=False)
    assert cli(sample, tmp_path / "b.safetensors", "-s", "fp8", "--model", "loaderkit.demo:TinyVideoDiT") == 0
    assert a.read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    inferred = convert(sample, tmp_path / "c.safetensors", "fp8", progress=False)
    assert inferred.read_bytes() == a.read_bytes()  # the inferred kinds give the same plan here


def test_directory_output_of_a_configless_file(sample, tmp_path):
    dst = convert(sample, tmp_path / "out", "fp16", max_shard_size="600KB", progress=False)
    names = sorted(p.name for p in dst.iterdir())
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert len(names) >= 4 and set(names) == {*index["weight_map"].values(), "model.safetensors.index.json"}
    state = loaderkit.load(dst, "fp16", model=TinyVideoDiT).state_dict()
    assert {t.dtype for t in state.values()} == {torch.float16}


def _infer(tensors: dict[str, torch.Tensor], tmp_path: Path) -> torch.nn.Module:
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    return infer_model(loaderkit.inspect(path))


def test_inferred_architecture(tmp_path):
    model = _infer({
        "enc.token_embedding.weight": torch.zeros(10, 4),
        "enc.fc.weight": torch.zeros(6, 4), "enc.fc.bias": torch.zeros(6),
        "enc.fc.sub.weight": torch.zeros(3),
        "conv.weight": torch.zeros(8, 2, 3, 3), "conv.bias": torch.zeros(8),
        "vid.weight": torch.zeros(8, 2, 1, 2, 2),
        "norm.weight": torch.zeros(6),
        "scale": torch.zeros(1),
        "ids": torch.zeros(5, dtype=torch.int64),
    }, tmp_path)
    named = dict(model.named_modules())
    assert isinstance(named["enc.token_embedding"], torch.nn.Embedding)
    assert isinstance(named["enc.fc"], torch.nn.Linear) and named["enc.fc"].bias is not None
    assert isinstance(named["conv"], torch.nn.Conv2d) and isinstance(named["vid"], torch.nn.Conv3d)
    assert type(named["norm"]) is torch.nn.Module and type(named["enc.fc.sub"]) is torch.nn.Module
    assert model.ids.dtype == torch.int64 and not isinstance(model.ids, torch.nn.Parameter)
    assert sorted(model.state_dict()) == sorted([
        "enc.token_embedding.weight", "enc.fc.weight", "enc.fc.bias", "enc.fc.sub.weight", "conv.weight",
        "conv.bias", "vid.weight", "norm.weight", "scale", "ids"])


# -------------------------------------------------------------------------------------------
# atomicity and errors
# -------------------------------------------------------------------------------------------


def _fail_after_first_write(monkeypatch, exc: BaseException) -> list[str]:
    written: list[str] = []
    real = ShardWriter.write

    def write(self, name, tensor):
        if written:
            raise exc
        written.append(name)
        real(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", write)
    return written


@pytest.mark.parametrize("target", ["dir", "file"])
def test_disk_full_mid_convert_leaves_nothing(llama, sample, tmp_path, monkeypatch, capsys, target):
    src = llama if target == "dir" else sample
    before = tree_hash(src)
    out_parent = tmp_path / "out" / "nested"
    dst = out_parent / ("fp8" if target == "dir" else "fp8.safetensors")
    written = _fail_after_first_write(monkeypatch, OSError(28, "No space left on device"))
    with pytest.raises(ConvertError, match="No space left on device") as info:
        convert(src, dst, "fp8", progress=False)
    assert written and info.value.tensor and info.value.tensor != written[0]
    assert not (tmp_path / "out").exists()  # nor the parents it created, nor temporary files
    assert tree_hash(src) == before
    written.clear()
    assert cli(src, dst, "-s", "fp8") == 1
    err = capsys.readouterr().err
    assert err.startswith("loaderkit: error: ") and "No space left" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and tree_hash(src) == before


def test_interrupt_mid_convert_keeps_the_old_destination(sample, tmp_path, monkeypatch):
    dst = tmp_path / "out.safetensors"
    convert(sample, dst, "bf16", progress=False)
    old = dst.read_bytes()
    _fail_after_first_write(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convert(sample, dst, "fp8", overwrite=True, progress=False)
    assert dst.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "src"]


def test_existing_destination_refused_unless_overwrite(llama, tmp_path, capsys):
    dst = tmp_path / "out"
    convert(llama, dst, "bf16", progress=False)
    before = tree_hash(dst)
    with pytest.raises(ConvertError, match="already exists"):
        convert(llama, dst, "fp8", progress=False)
    assert cli(llama, dst, "-s", "fp8") == 1 and "already exists" in capsys.readouterr().err
    assert tree_hash(dst) == before
    assert cli(llama, dst, "-s", "fp8", "--overwrite") == 0
    assert loaderkit.inspect(dst).quantization.scheme == "compressed-tensors-fp8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_destinations(llama, sample, tmp_path):
    with pytest.raises(ConvertError, match="same path"):
        convert(sample, sample, "bf16", overwrite=True)
    with pytest.raises(ConvertError, match="inside the source"):
        convert(llama, llama / "fp8", "fp8")
    with pytest.raises(ConvertError, match="contains the source"):
        convert(sample, sample.parent, "fp8", overwrite=True)
    with pytest.raises(ConvertError, match="give a directory"):
        convert(llama, tmp_path / "x.safetensors", "fp8")
    with pytest.raises(loaderkit.plugin.CheckpointNotFoundError):
        convert(tmp_path / "absent.safetensors", tmp_path / "y", "fp8")
    assert sample.exists() and (llama / "config.json").exists()


def test_unsupported_combinations(llama, sample, tmp_path):
    with pytest.raises(ConvertError, match="one scale per tensor"):
        convert(sample, tmp_path / "a.safetensors", "fp8", scheme="block")
    with pytest.raises(ConvertError, match="unknown scheme"):
        convert(llama, tmp_path / "b", "fp8", scheme="per-row")
    with pytest.raises(ConvertError, match="applies only"):
        convert(llama, tmp_path / "c", "bf16", scheme="per-tensor")
    fp8 = convert(sample, tmp_path / "d.safetensors", "fp8", progress=False)
    with pytest.raises(ConvertError, match="already an fp8 checkpoint") as info:
        convert(fp8, tmp_path / "e.safetensors", "fp8")
    assert info.value.tensor.endswith(".weight")
    with pytest.raises(loaderkit.StrategyError):
        convert(sample, tmp_path / "f.safetensors", "fp4")
    assert not [p for p in tmp_path.iterdir() if p.name not in ("src", "d.safetensors")]


def test_name_clash_with_an_existing_tensor(tmp_path):
    from safetensors.torch import save_file

    save_file({"x.weight": torch.randn(8, 8), "x.weight_scale": torch.ones(3)}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ConvertError, match="two output tensors would be named x.weight_scale"):
        convert(tmp_path / "c.safetensors", tmp_path / "d.safetensors", "fp8", progress=False)
    assert not (tmp_path / "d.safetensors").exists()


def test_diffusers_directory_keeps_its_names_and_config(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from test_real_writers import SD3

    torch.manual_seed(0)
    diffusers.SD3Transformer2DModel(**SD3).save_pretrained(tmp_path / "sd3")
    dst = convert(tmp_path / "sd3", tmp_path / "sd3-fp8", "fp8", progress=False)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((dst / "config.json").read_text()) == json.loads((tmp_path / "sd3" / "config.json").read_text())
    assert loaderkit.inspect(dst).quantization.scheme == "comfy-mixed"
    ref = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path / "sd3")
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([10]))
    with torch.no_grad():
        assert cosine(loaderkit.load(dst, "fp8")(**inputs).sample, ref(**inputs).sample) >= 0.99


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000 and parse_size("500MB") == 500_000_000
    assert parse_size("2GiB") == 2 << 30 and parse_size("1.5kb") == 1500 and parse_size(100) == 100
    for bad in ("", "2XB", "-1GB", "0"):
        with pytest.raises(ConvertError, match="not a size"):
            parse_size(bad)


# -------------------------------------------------------------------------------------------
# memory and progress
# -------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from loaderkit.pipeline.build import infer_model
    from loaderkit.pipeline.convert import convert
    import loaderkit

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    src, dst = sys.argv[1], sys.argv[2]
    # warm up: imports, the device probe, and torch's first-use allocations (thread pools,
    # kernels) on a one-tensor checkpoint of the same kind, so the peak below is convert's own
    from safetensors.torch import save_file
    save_file({"l0.weight": torch.randn(1024, 4096).to(torch.bfloat16)}, dst + ".warm.safetensors")
    convert(dst + ".warm.safetensors", dst + ".warm-out.safetensors", "fp8", progress=False)
    loaderkit.plan(src, "fp8", model=infer_model(loaderkit.inspect(src)))
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak
    base = kib("VmRSS")
    convert(src, dst, "fp8", progress=False)
    print(json.dumps({"base": base, "peak": kib("VmHWM")}))
""")


def test_memory_stays_bounded(tmp_path):
    """12 tensors of 8 MB: the peak grows by about one tensor and the reader's window, not by
    the checkpoint's 96 MB."""
    from safetensors.torch import save_file

    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pytest.skip("this system cannot reset the peak RSS (/proc/self/clear_refs)")
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "big.safetensors"
    save_file({f"l{i}.weight": torch.randn(1024, 4096, generator=g).to(torch.bfloat16) for i in range(12)},
              str(src))
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(src), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    grown_mib = (data["peak"] - data["base"]) / 1024
    # one 8 MiB tensor in flight, its fp8 output and float32 temporaries, the reader's 32 MiB
    # window (measured 32-54 MiB); holding the checkpoint would be 96 MiB plus the output
    assert grown_mib < 80, f"peak RSS grew by {grown_mib:.0f} MiB converting a 96 MiB checkpoint"


def test_progress_enabled_rules(monkeypatch):
    monkeypatch.delenv("LOADERKIT_PROGRESS", raising=False)
    assert lk_progress.enabled(False) is False and lk_progress.enabled(True) is True
    assert lk_progress.enabled(None) is False  # pytest's stderr is not a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert lk_progress.enabled(None) is True
    monkeypatch.setenv("LOADERKIT_PROGRESS", "0")
    assert lk_progress.enabled(None) is False and lk_progress.enabled(True) is False
    monkeypatch.setenv("LOADERKIT_PROGRESS", "1")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert lk_progress.enabled(None) is True


def test_convert_progress_counts_every_byte(sample, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LOADERKIT_PROGRESS", raising=False)
    convert(sample, tmp_path / "quiet.safetensors", "fp8")
    assert capsys.readouterr().err == ""
    counted: list[int] = []
    real = lk_progress.progress_bar

    def spy(total, desc, **kw):
        counted.append(total)
        ctx = real(total, desc, **kw)
        return _Counting(ctx, counted)

    monkeypatch.setattr(lk_progress, "progress_bar", spy)
    convert(sample, tmp_path / "loud.safetensors", "fp8", progress=True)
    assert "converting model.safetensors" in capsys.readouterr().err
    assert counted[0] == loaderkit.inspect(sample).total_bytes == sum(counted[1:])


class _Counting:
    """Wraps a progress_bar context so that every update is recorded."""

    def __init__(self, ctx, counted: list[int]) -> None:
        self.ctx, self.counted = ctx, counted

    def __enter__(self):
        update = self.ctx.__enter__()

        def record(n: int) -> None:
            self.counted.append(n)
            if update is not None:
                update(n)

        return record

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def test_load_feeds_a_progress_bar(sample, monkeypatch):
    seen: list[tuple[int, str, float]] = []
    counted: list[int] = []
    real = lk_progress.progress_bar

    def spy(total, desc, **kw):
        seen.append((total, desc, kw.get("delay", 0.0)))
        return _Counting(real(total, desc, **kw), counted)

    monkeypatch.setattr(lk_progress, "progress_bar", spy)
    plan = loaderkit.plan(sample, "fp8", model=TinyVideoDiT)
    loaderkit.load(sample, "fp8", model=TinyVideoDiT)
    total = sum(t.nbytes for t in plan.tensors.values())
    assert seen == [(total, "loading", 2.0)] and sum(counted) == total
