"""The fp8 strategy end to end: the mixed-precision crash made impossible, storage as planned."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import loaderkit
from loaderkit.demo import TinyVideoDiT, sample_inputs, save_sample


class PatchNet(nn.Module):
    """A Conv3d(+bias) patch embedding followed by Linear blocks (an add-on branch, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv3d(4, 32, kernel_size=(1, 2, 2), stride=(1, 2, 2), bias=True)
        self.blocks = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        h = self.patch(x).flatten(2).transpose(1, 2)
        return self.norm(self.blocks(h))


def _fp8_checkpoint(tmp_path):
    torch.manual_seed(0)
    ref = PatchNet()
    sd = {}
    for k, v in ref.state_dict().items():
        # every Linear/Conv tensor stored fp8, biases included, the way plain fp8 files come
        sd[k] = v.to(torch.float8_e4m3fn) if not k.startswith("norm") else v.to(torch.bfloat16)
    path = tmp_path / "patchnet-fp8.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_plain_torch_crashes_and_loaderkit_runs(tmp_path):
    path, sd = _fp8_checkpoint(tmp_path)
    x = torch.randn(1, 4, 2, 8, 8, dtype=torch.bfloat16)

    plain = PatchNet().to(torch.bfloat16)
    plain.load_state_dict(sd, assign=True)  # what a loader without cast rules produces
    with pytest.raises(RuntimeError, match=r"Input type \(c10::BFloat16\) and bias type \(c10::Float8_e4m3fn\) should be the same"):
        plain(x)
    report = loaderkit.verify(plain)
    assert not report.ok and {p.module for p in report.problems} >= {"patch", "blocks.0", "blocks.2"}

    model = loaderkit.load(path, "fp8", model=PatchNet)
    out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert loaderkit.verify(model, x).ok
    # the stored fp8 bytes are kept as they are
    assert model.patch.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(model.patch.weight.view(torch.uint8), sd["patch.weight"].view(torch.uint8))
    # fp8 biases become compute-dtype biases
    assert model.patch.bias.dtype == torch.bfloat16

    # and the output equals the dequantized bf16 reference
    ref = PatchNet().to(torch.bfloat16)
    ref.load_state_dict({k: v.to(torch.bfloat16) for k, v in sd.items()})
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_fp32_activations_reach_an_fp8_model(tmp_path):
    path, _ = _fp8_checkpoint(tmp_path)
    model = loaderkit.load(path, "fp8", model=PatchNet)
    x = torch.randn(1, 4, 2, 8, 8)  # float32, as a pipeline might pass
    assert model(x).dtype == torch.bfloat16
    no_entry_cast = loaderkit.load(path, "fp8", model=PatchNet, cast_inputs=False)
    assert not loaderkit.verify(no_entry_cast, x).ok


@pytest.fixture(scope="module")
def bf16_sample(tmp_path_factory):
    return save_sample(tmp_path_factory.mktemp("sample"))


def test_quantize_on_load_storage_rules(bf16_sample):
    plan = loaderkit.plan(bf16_sample, "fp8", model=TinyVideoDiT)
    model = loaderkit.load(bf16_sample, "fp8", model=TinyVideoDiT)
    fc1 = model.blocks[0].fc1
    assert fc1.weight.dtype == torch.float8_e4m3fn and fc1.bias.dtype == torch.bfloat16
    assert fc1.weight_scale.shape == (fc1.weight.shape[0], 1)  # per output channel by default
    assert model.blocks[0].norm1.weight.dtype == torch.bfloat16  # norms stay
    assert model.patch_embed.weight.dtype == torch.bfloat16  # patch embedding skipped by default
    assert model.head.weight.dtype == torch.bfloat16  # output head skipped by default
    assert model.pos_embed.dtype == torch.bfloat16
    assert plan.modules["blocks.0.fc1"].cast and plan.modules["blocks.0.fc1"].granularity == "channel"
    assert not plan.modules["head"].cast
    # no full-precision copy of a quantized weight stays around
    assert all(p.dtype != torch.float32 for p in model.parameters())


def test_quality_against_fp32_on_the_sample_model(bf16_sample):
    x = sample_inputs()
    ref = loaderkit.load(bf16_sample, "fp32", model=TinyVideoDiT)
    with torch.no_grad():
        want = ref(*x).float().flatten()
        for strat in (loaderkit.strategy("fp8"), loaderkit.strategy("fp8", compute_dtype=torch.float32)):
            got = loaderkit.load(bf16_sample, strat, model=TinyVideoDiT)(*x).float().flatten()
            assert F.cosine_similarity(got, want, dim=0) >= 0.999


def test_options(bf16_sample):
    s = loaderkit.strategy("fp8", storage_dtype=torch.float8_e5m2, compute_dtype="float32",
                           granularity="tensor", skip=[r"blocks\.0\."], skip_types=["Conv3d"])
    model = loaderkit.load(bf16_sample, s, model=TinyVideoDiT)
    assert model.blocks[1].fc1.weight.dtype == torch.float8_e5m2
    assert model.blocks[1].fc1.weight_scale.shape == ()
    assert model.blocks[0].fc1.weight.dtype == torch.float32
    assert model.blocks[1].norm1.weight.dtype == torch.float32
    assert loaderkit.verify(model, sample_inputs()).ok
    with pytest.raises(loaderkit.StrategyError, match="compute_dtype"):
        loaderkit.strategy("fp8", compute_dtype=torch.float8_e4m3fn)
    with pytest.raises(loaderkit.StrategyError, match="granularity"):
        loaderkit.strategy("fp8", granularity="rows")


def test_resident_option_gives_the_same_output(bf16_sample):
    x = sample_inputs()
    with torch.no_grad():
        a = loaderkit.load(bf16_sample, "fp8", model=TinyVideoDiT)(*x)
        b = loaderkit.load(bf16_sample, loaderkit.strategy("fp8", resident=True), model=TinyVideoDiT)(*x)
    assert torch.equal(a, b)
    plan = loaderkit.plan(bf16_sample, loaderkit.strategy("fp8", resident=True), model=TinyVideoDiT)
    assert plan.modules["blocks.0.fc1"].resident


def test_unscaled_fp8_flushes_small_weights_per_channel_does_not(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        net[1].weight.mul_(1e-4)  # a layer with much smaller weights
    path = tmp_path / "small.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in net.state_dict().items()}, str(path))

    def factory():
        return nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))

    unscaled = loaderkit.load(path, loaderkit.strategy("fp8", granularity="none"), model=factory)
    per_channel = loaderkit.load(path, "fp8", model=factory)
    assert unscaled[1].weight.float().abs().max() == 0  # flushed to zero
    rel = (per_channel[1].weight.float() * per_channel[1].weight_scale - net[1].weight).abs().max()
    assert rel < 0.07 * net[1].weight.abs().max()


def test_native_fp8_is_negotiated_against_the_device(bf16_sample):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    plan = loaderkit.plan(bf16_sample, loaderkit.strategy("fp8", native="auto"), model=TinyVideoDiT)
    fallback = [d for d in plan.decisions if d.subject == "fp8 kernel"]
    assert fallback and "sm >= 8.9" in fallback[0].reason
    assert all(m.kernel == "cast" for m in plan.modules.values())
    with pytest.raises(loaderkit.PlanError, match="native fp8 matmul"):
        loaderkit.plan(bf16_sample, loaderkit.strategy("fp8", native="always"), model=TinyVideoDiT)


def test_compute_dtype_the_device_cannot_run_fails_at_plan_time(bf16_sample, fresh_manager):
    from loaderkit import hookimpl
    from loaderkit.plugin import DeviceCaps

    class NoHalf:
        @hookimpl(tryfirst=True)
        def loaderkit_device_capabilities(self, device):
            return DeviceCaps(device="cpu", kind="cpu", compute_dtypes=("float32",))

    name = loaderkit.register(NoHalf(), name="no-half")
    try:
        with pytest.raises(loaderkit.PlanError, match="cannot compute in bfloat16"):
            loaderkit.plan(bf16_sample, loaderkit.strategy("fp8", compute_dtype="bfloat16"), model=TinyVideoDiT)
        plan = loaderkit.plan(bf16_sample, "fp8", model=TinyVideoDiT)  # compute_dtype="auto": what it can run
        assert {m.compute_dtype for m in plan.modules.values()} == {"float32"}
        assert "computes bfloat16 slowly" in next(d.reason for d in plan.decisions if d.subject == "compute")
    finally:
        loaderkit.unregister(name)


def test_library_declarations_are_honoured(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    model = loaderkit.load(tmp_path / "llama", "fp8")
    layer = model.model.layers[0]
    assert layer.mlp.gate_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.input_layernorm.weight.dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16  # output head skipped by default


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
def test_quality_transformers_llama(tmp_path, compute):
    """Documented in docs/strategies.md: fp8 storage vs the fp32 model, cosine >= 0.99."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = loaderkit.load(tmp_path / "llama", "fp32")(ids).logits.float().flatten()
        model = loaderkit.load(tmp_path / "llama", loaderkit.strategy("fp8", compute_dtype=compute))
        got = model(ids).logits.float().flatten()
    assert F.cosine_similarity(got, want, dim=0) >= 0.99


def test_quality_diffusers_transformer(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
    )
    net.save_pretrained(tmp_path / "sd3")
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 6, 32, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g),
        timestep=torch.tensor([500.0]),
    )
    with torch.no_grad():
        want = loaderkit.load(tmp_path / "sd3", "fp32")(**inputs).sample.float().flatten()
        model = loaderkit.load(tmp_path / "sd3", "fp8")
        got = model(**inputs).sample.float().flatten()
    assert any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
    assert F.cosine_similarity(got, want, dim=0) >= 0.99


def test_multihead_attention_out_proj_is_not_stored_fp8(tmp_path):
    """MultiheadAttention reads out_proj's tensors itself: a cast rule on out_proj would never run."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    torch.manual_seed(0)
    path = tmp_path / "attn.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in Attn().state_dict().items()}, str(path))
    model = loaderkit.load(path, "fp8", model=Attn)
    assert model.attn.out_proj.weight.dtype == torch.bfloat16
    assert model.fc.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(1, 3, 16)
    assert loaderkit.verify(model, x).ok


def test_verify_accepts_tensors_covered_by_a_parents_cast_rule():
    from loaderkit import runtime

    mha = nn.MultiheadAttention(16, 2)
    mha.out_proj.weight.data = mha.out_proj.weight.data.to(torch.float8_e4m3fn)
    assert not loaderkit.verify(mha).ok
    runtime.attach_cast(mha, torch.float32)
    x = torch.randn(3, 1, 16)
    assert loaderkit.verify(mha, (x, x, x)).ok


def test_fold_scales_option_reaches_the_linear_cast_rules(tmp_path):
    """``fold_scales=True`` is recorded in the plan and the Linear rules scale their output;
    the forward agrees with the default (decoded-weight) load within bf16 rounding."""
    from loaderkit import runtime

    torch.manual_seed(0)
    path = tmp_path / "patchnet-bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in PatchNet().state_dict().items()}, str(path))
    fold = loaderkit.strategy("fp8", fold_scales=True)
    folded = loaderkit.load(path, fold, model=PatchNet)
    plain = loaderkit.load(path, "fp8", model=PatchNet)
    rules = runtime.cast_rules(folded)
    assert rules["blocks.0"].fold_scale and not runtime.cast_rules(plain)["blocks.0"].fold_scale
    plan = loaderkit.plan(path, fold, model=PatchNet)
    assert plan.modules["blocks.0"].fold_scale and "folded" in plan.table()
    x = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        a, b = folded.blocks(folded.patch(x).flatten(2).transpose(1, 2)), plain.blocks(plain.patch(x).flatten(2).transpose(1, 2))
    assert not torch.equal(a, b)  # folded: rounded differently
    assert F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0) > 0.9999


class WideNet(nn.Module):
    """Linear layers whose rows do not fill whole 128-row blocks, and a stored bf16 embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 96)
        self.up = nn.Linear(96, 1000)
        self.down = nn.Linear(1000, 300, bias=False)

    def forward(self, ids):
        return self.down(F.gelu(self.up(self.embed(ids))))


@pytest.mark.parametrize("strategy", [
    "bf16", "fp32", "fp8", "int8", loaderkit.strategy("fp8", granularity="block"),
    loaderkit.strategy("fp8", granularity="tensor"), loaderkit.strategy("fp8", compute_dtype="float32"),
])
def test_large_tensors_converted_in_row_blocks_are_bitwise_the_whole_tensor_conversion(tmp_path, monkeypatch, strategy):
    """Casts and fp8 quantization of large tensors go one block of rows at a time (through
    ``read_box``: a few MiB of transient memory instead of the whole source tensor): every
    stored tensor and scale is the one the whole-tensor conversion gives."""
    from loaderkit.pipeline import stream
    from loaderkit.plugins.safetensors_format import SafetensorsReader

    torch.manual_seed(0)
    stored = torch.float32 if strategy == "bf16" else torch.bfloat16
    sd = {k: (v * 3).to(stored) for k, v in WideNet().state_dict().items()}
    path = tmp_path / "wide.safetensors"
    save_file(sd, str(path))
    plan = loaderkit.plan(path, strategy, model=WideNet)
    expected = {tp.source for tp in plan.tensors.values() if tp.conversion == "cast"
                or tp.conversion == "quantize" and tp.granularity != "tensor"} - {"up.bias"}  # too small
    # (per-tensor scales need the whole tensor's amax first: those tensors are read whole)
    whole = loaderkit.load(path, strategy, model=WideNet)
    boxes = []
    read_box = SafetensorsReader.read_box
    monkeypatch.setattr(SafetensorsReader, "read_box",
                        lambda self, name, box: boxes.append((name, box)) or read_box(self, name, box))
    monkeypatch.setattr(stream, "ROW_BLOCKS_MIN", 1000)
    monkeypatch.setattr(stream, "ROW_BLOCK_BYTES", 30_000)
    blocks = loaderkit.load(path, strategy, model=WideNet)
    assert {name for name, _ in boxes} == expected
    assert len(boxes) > 2 * len(expected) or not expected
    assert expected or all(tp.granularity == "tensor" for tp in plan.tensors.values() if tp.conversion == "quantize")
    a, b = whole.state_dict(), blocks.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k
    ids = torch.tensor([[1, 5, 999]])
    assert torch.equal(whole(ids), blocks(ids))
