"""The ``int8`` strategy: int8 weight-only ``nn.Linear`` storage with per-channel scales, computed
by ``aten._weight_int8pack_mm`` in bfloat16 on the CPU.

Tolerances (rel-L2 = ``|got - want| / |want|``), measured on this project's CPU with torch 2.13
and asserted with about 2x headroom:

- one int8 Linear against ``F.linear`` in float32 with the *decoded* weight and the same bf16
  input: measured <= 0.0025 (the kernel rounds its output to bfloat16) -> asserted <= 0.006;
- a transformers Llama (4 layers, hidden 128) against its fp32 load, logits: measured 0.0148
  (bf16: 0.0068, fp8: 0.0559) -> asserted <= 0.03, and below fp8's;
- the demo model against its fp32 load: measured 0.0081 (bf16: 0.0069, fp8: 0.0246) -> <= 0.016;
- a model of odd widths (``OddNet``, 3-D input) against its fp32 load: measured 0.0019 (bf16: 0.0017)
  -> <= 0.006.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loaderkit
import loaderkit.plugin as lkp
from loaderkit.demo import TinyVideoDiT, sample_inputs, save_sample
from loaderkit.kernels import int8 as k8
from loaderkit.runtime import attach_cast, cast_rule_of

from conftest import run_python, save_st

needs_kernel = pytest.mark.skipif(not k8.kernel_available(), reason="torch has no CPU _weight_int8pack_mm")
pytestmark = needs_kernel


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float().flatten(), want.float().flatten()
    return float((got - want).norm() / want.norm())


class OddNet(nn.Module):
    """Linears of odd widths, with and without bias: 48->33 and 64->16 and 16->5 fit the
    kernel (in_features multiples of 16), 33->64 does not."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(48, 33)
        self.b = nn.Linear(33, 64, bias=False)
        self.c = nn.Linear(64, 16, bias=False)
        self.out = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.c(F.gelu(self.b(F.gelu(self.a(x))))))


@pytest.fixture
def odd_ckpt(tmp_path):
    torch.manual_seed(0)
    ref = OddNet()
    return save_st(tmp_path / "odd.safetensors", ref, torch.bfloat16), ref


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    return save_sample(tmp_path_factory.mktemp("demo"))


# -- the codec ---------------------------------------------------------------------------------


def test_the_definition_rounds_half_to_even_with_a_bfloat16_scale():
    # amax 127 * 2**-7: the scale is exactly 2**-7, so these values sit exactly on .5 codes
    s = 2.0**-7
    w = torch.tensor([[127 * s, 2.5 * s, 3.5 * s, -2.5 * s, -0.5 * s, 0.0]])
    q, scale = k8.quantize_int8_reference(w)
    assert scale.tolist() == [[s]]
    assert q.tolist() == [[127, 2, 4, -2, 0, 0]]
    # a scale that bfloat16 rounds down: the largest value would need 127.4, clamped to 127
    w = torch.tensor([[1.0, -1.0, 0.3]])
    q, scale = k8.quantize_int8_reference(w)
    assert scale.item() == torch.tensor(1 / 127).to(torch.bfloat16).item() and scale.item() < 1 / 127
    assert q.tolist()[0][:2] == [127, -127]


@pytest.fixture(params=["compiled", "torch"])
def int8_route(request, monkeypatch):
    """The codec through the compiled kernel (where this machine builds one) and through torch."""
    from loaderkit.kernels import compiled

    if request.param == "torch":
        monkeypatch.setattr(compiled, "_STATE", {"tried": True, "lib": None, "reason": "turned off by the test"})
    elif compiled.library("quantize") is None:
        pytest.skip(f"no compiled kernel here: {compiled.status()['reason']}")
    return request.param


@pytest.mark.usefixtures("int8_route")
def test_zero_rows_tiny_rows_and_nonfinite_values():
    w = torch.zeros(3, 16)
    w[1] = 1e-39  # below bfloat16's smallest normal: the scale is clamped to it
    q, scale = k8.quantize_int8(w)
    assert scale[0].item() == 1.0 and not q[0].any()
    assert scale[1].item() == torch.finfo(torch.bfloat16).tiny
    assert int(q.min()) >= -127
    w[2, 3] = float("nan")
    with pytest.raises(lkp.ConversionError, match="inf or NaN"):
        k8.quantize_int8(w)
    with pytest.raises(lkp.ConversionError, match="2-D floating"):
        k8.quantize_int8(torch.zeros(4, 4, 4))


@pytest.mark.usefixtures("int8_route")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 16), (33, 48), (257, 1040), (5, 3), (1500, 700)])
def test_quantize_is_bit_exact_with_the_reference(dtype, shape, monkeypatch):
    monkeypatch.setattr(k8, "QUANT_BLOCK", 4096)  # several row blocks even for small tensors
    g = torch.Generator().manual_seed(shape[0])
    w = (torch.randn(shape, generator=g) * torch.logspace(-4, 1, shape[0])[:, None]).to(dtype)
    w[0, 0] = 0.0
    q, scale = k8.quantize_int8(w)
    rq, rscale = k8.quantize_int8_reference(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (shape[0], 1)
    assert torch.equal(q, rq) and torch.equal(scale, rscale)
    assert torch.equal(scale, scale.to(torch.bfloat16).float())  # what the kernel gets is exact
    # every weight is within half a step (plus the clamp's 0.4% at the row maximum)
    err = (k8.dequantize_int8(q, scale, torch.float32) - w.float()).abs()
    assert bool((err <= 0.5 * scale * 1.01 + 0.005 * w.float().abs()).all())


# -- the kernel --------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(1,), (64,), (2, 3), (0,), ()])
@pytest.mark.parametrize("nk", [(33, 48), (5, 16), (2816, 1024)])
def test_int8_linear_agrees_with_the_decoded_weight(bias, lead, nk):
    n, k = nk
    g = torch.Generator().manual_seed(n)
    q, scale = k8.quantize_int8(torch.randn(n, k, generator=g) * 0.05)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    x = torch.randn(*lead, k, generator=g)  # float32 activations are cast to bfloat16
    y = k8.int8_linear(x, q, scale, b, torch.bfloat16)
    want = F.linear(x.to(torch.bfloat16).float(), k8.dequantize_int8(q, scale, torch.float32),
                    None if b is None else b.float())
    assert y.dtype == torch.bfloat16 and y.shape == (*lead, n)
    if y.numel():
        assert rel(y, want) <= 0.006


def test_misaligned_operands_are_copied_not_crashed_on():
    """The kernel's vector loads need aligned rows (a view 16 bytes off crashes the process):
    int8_linear copies such operands. Run in a child process so a crash fails only this test."""
    code = """
import torch
from loaderkit.kernels.int8 import int8_linear, quantize_int8, dequantize_int8
q, s = quantize_int8(torch.randn(32, 64))
buf = torch.randint(-127, 128, (32 * 64 + 8,), dtype=torch.int8); buf[8:] = q.view(-1)
qv = buf[8:].view(32, 64)
xb = torch.randn(4 * 64 + 8, dtype=torch.bfloat16); x = xb[8:].view(4, 64)
assert x.data_ptr() % 32 and qv.data_ptr() % 16
y = int8_linear(x, qv, s, None, torch.bfloat16)
want = torch.nn.functional.linear(x.float(), dequantize_int8(q, s, torch.float32))
print(float((y.float() - want).norm() / want.norm()))
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) <= 0.006


# -- plans -------------------------------------------------------------------------------------


def test_the_plan_records_what_runs_and_why(odd_ckpt):
    plan = loaderkit.plan(odd_ckpt[0], "int8", model=OddNet)
    for name in ("a", "c", "out"):
        m = plan.modules[name]
        assert m.storage["weight"] == "int8" and m.kernel == "native" and m.cast and m.compute_dtype == "bfloat16"
        assert m.reason.startswith("int8 weight-only: aten._weight_int8pack_mm, bfloat16 activations")
        tp = plan.tensors[f"{name}.weight"]
        assert (tp.conversion, tp.granularity, tp.scale) == ("quantize", "channel", "weight_scale")
        assert tp.nbytes == tp.shape[0] * tp.shape[1] + 4 * tp.shape[0]
    assert plan.modules["a"].storage["bias"] == "bfloat16"
    b = plan.modules["b"]
    assert b.storage == {"weight": "bfloat16"} and not b.cast
    assert "in_features 33 is not a multiple of 16" in b.reason
    kernels = [d for d in plan.decisions if d.subject == "int8 kernels"]
    assert kernels and kernels[0].choice == "3 modules native, 0 cast"
    assert any(d.subject == "kept in compute dtype" and "not a multiple of 16" in d.reason for d in plan.decisions)


def test_non_linear_modules_and_default_skips_stay_in_bfloat16(demo_path):
    plan = loaderkit.plan(demo_path, "int8", model=TinyVideoDiT)
    assert plan.modules["blocks.0.qkv"].storage["weight"] == "int8"
    assert plan.modules["patch_embed"].storage["weight"] == "bfloat16"  # a Conv3d
    assert "not an nn.Linear" in plan.modules["patch_embed"].reason
    assert plan.modules["head"].storage["weight"] == "bfloat16" and "skip pattern" in plan.modules["head"].reason
    assert plan.modules["blocks.0.norm1"].storage["weight"] == "bfloat16"
    skipped = loaderkit.plan(demo_path, loaderkit.strategy("int8", skip=[r"^blocks\.0\."]), model=TinyVideoDiT)
    assert skipped.modules["blocks.0.qkv"].storage["weight"] == "bfloat16"
    assert skipped.modules["blocks.1.qkv"].storage["weight"] == "int8"


def test_auto_never_picks_int8(demo_path):
    plan = loaderkit.plan(demo_path, "auto", model=TinyVideoDiT)
    assert not any(d == "int8" for m in plan.modules.values() for d in m.storage.values())
    assert not any("int8" in d.choice for d in plan.decisions)


@pytest.mark.parametrize("compute", [torch.float16, torch.float32, "fp16"])
def test_other_compute_dtypes_are_refused_with_the_reason(compute):
    with pytest.raises(loaderkit.StrategyError, match="must be bfloat16"):
        loaderkit.strategy("int8", compute_dtype=compute)
    assert loaderkit.strategy("int8", compute_dtype=torch.bfloat16).options.compute_dtype == "bfloat16"


def test_an_fp8_checkpoint_is_refused_naming_fp8(demo_path, tmp_path):
    fp8 = loaderkit.convert(demo_path, tmp_path / "fp8.safetensors", "fp8")
    with pytest.raises(loaderkit.PlanError, match="fp8 checkpoint.*never requantized.*strategy 'fp8'"):
        loaderkit.plan(fp8, "int8", model=TinyVideoDiT)
    # a plain fp8 file without scales too, naming a tensor
    torch.manual_seed(0)
    sd = {k: (v.to(torch.float8_e4m3fn) if k.endswith("weight") and v.dim() == 2 else v)
          for k, v in OddNet().state_dict().items()}
    plain = save_st(tmp_path / "plain.safetensors", sd)
    with pytest.raises(loaderkit.PlanError, match="'a.weight' is stored in float8_e4m3fn") as exc:
        loaderkit.plan(plain, "int8", model=OddNet)
    assert isinstance(exc.value, loaderkit.LoaderKitError) and exc.value.tensor == "a.weight"


def test_a_gpu_device_is_refused_at_plan_time(odd_ckpt, fresh_manager):
    from loaderkit import hookimpl

    class FakeGPU:
        @hookimpl(tryfirst=True)
        def loaderkit_device_capabilities(self, device):
            return lkp.DeviceCaps(device="cuda:0", kind="cuda", compute_dtypes=("float32", "bfloat16", "float16"))

    name = loaderkit.register(FakeGPU(), name="fake-gpu")
    try:
        with pytest.raises(loaderkit.PlanError, match="cuda:0 is not a CPU.*use strategy 'fp8'"):
            loaderkit.plan(odd_ckpt[0], "int8", model=OddNet)
    finally:
        loaderkit.unregister(name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_real_gpu_is_refused_at_plan_time(odd_ckpt):
    with pytest.raises(loaderkit.PlanError, match="not a CPU"):
        loaderkit.plan(odd_ckpt[0], "int8", model=OddNet, device="cuda")


def test_the_core_refuses_int8_without_channel_scales_and_int8_from_fp8(odd_ckpt, tmp_path):
    class Int8Tensor(lkp.Strategy):
        name = "int8-tensor"

        def decide(self, module, state):
            return lkp.ModuleDecision(compute="bfloat16", granularity="tensor",
                                      storage={"weight": "int8"} if module.kind == "linear" else {})

    with pytest.raises(loaderkit.PlanError, match="store weight as int8, an integer dtype.*granularity='channel'"):
        loaderkit.plan(odd_ckpt[0], Int8Tensor(), model=OddNet)

    class Int8Any(lkp.Strategy):
        name = "int8-any"

        def decide(self, module, state):
            return lkp.ModuleDecision(compute="bfloat16", storage={"weight": "int8"} if module.kind == "linear" else {})

    sd = {k: (v.to(torch.float8_e4m3fn) if k == "a.weight" else v) for k, v in odd_ckpt[1].state_dict().items()}
    with pytest.raises(loaderkit.PlanError, match="stored fp8 is never requantized"):
        loaderkit.plan(save_st(tmp_path / "one.safetensors", sd), Int8Any(), model=OddNet)


def test_convert_refuses_int8(odd_ckpt, tmp_path):
    with pytest.raises(loaderkit.LoaderKitError, match="no on-disk layout is written for it"):
        loaderkit.convert(odd_ckpt[0], tmp_path / "out.safetensors", "int8", model=OddNet)
    assert not (tmp_path / "out.safetensors").exists()


# -- loading and running -----------------------------------------------------------------------


def test_load_runs_the_kernel_and_verifies(odd_ckpt):
    path, ref = odd_ckpt
    model = loaderkit.load(path, "int8", model=OddNet)
    assert model.a.weight.dtype == torch.int8 and model.a.weight_scale.shape == (33, 1)
    assert model.b.weight.dtype == torch.bfloat16
    rule = cast_rule_of(model.a)
    assert rule.native and rule.native_reason.startswith("int8 weight-only")
    x = torch.randn(2, 3, 48, generator=torch.Generator().manual_seed(0))  # 3-D, float32
    report = loaderkit.verify(model, (x,))
    assert report.ok, report
    with torch.no_grad():
        got = model(x)
        want = loaderkit.load(path, "fp32", model=OddNet)(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 5)
    assert rel(got, want) <= 0.006
    assert model.a.weight.dtype == torch.int8 and type(model.a.weight) is nn.Parameter  # restored


def test_a_forward_that_raises_leaves_the_stored_weights(odd_ckpt):
    model = loaderkit.load(odd_ckpt[0], "int8", model=OddNet)
    before = model.a.weight
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 47))
    assert model.a.weight is before and model.a.weight.dtype == torch.int8


def test_state_dict_and_recasting_keep_int8_and_its_scale(odd_ckpt, tmp_path):
    model = loaderkit.load(odd_ckpt[0], "int8", model=OddNet)
    sd = model.state_dict()
    assert sd["a.weight"].dtype == torch.int8 and sd["a.weight_scale"].dtype == torch.float32
    assert sd["b.weight"].dtype == torch.bfloat16 and "b.weight_scale" not in sd
    model.to(torch.bfloat16)  # floating tensors only: int8 weights and their scales stay
    assert model.a.weight.dtype == torch.int8 and model.a.weight_scale.dtype == torch.bfloat16
    assert loaderkit.verify(model, (torch.randn(4, 48),)).ok


def test_disk_offload_gives_the_same_output(demo_path, tmp_path):
    x = sample_inputs()
    with torch.no_grad():
        want = loaderkit.load(demo_path, "int8", model=TinyVideoDiT)(*x)
        model = loaderkit.load(demo_path, "int8", model=TinyVideoDiT, device_map="auto",
                               max_memory={"cpu": 200_000}, offload_folder=tmp_path / "offload")
        got = model(*x)
    assert "disk" in set(loaderkit.plan_of(model).device_map.values())
    assert loaderkit.verify(model, sample_inputs()).ok
    assert torch.equal(got, want)


def test_the_cast_path_decodes_int8_exactly():
    """A rule that does not run the kernel decodes ``q.float() * scale`` into the compute dtype:
    the module then computes exactly ``F.linear`` with the decoded weight."""
    lin = nn.Linear(48, 8).to(torch.bfloat16)
    q, scale = k8.quantize_int8(lin.weight.detach())
    lin.weight = nn.Parameter(q, requires_grad=False)
    lin.register_buffer("weight_scale", scale)
    rule = attach_cast(lin, torch.bfloat16, scales={"weight": ("weight_scale", "channel", None)}, native=False)
    assert not rule.native
    x = torch.randn(3, 48).to(torch.bfloat16)
    with torch.no_grad():
        got = lin(x)
    assert torch.equal(got, F.linear(x, k8.dequantize_int8(q, scale, torch.bfloat16), lin.bias))


def test_demo_model_quality(demo_path):
    x = sample_inputs()
    with torch.no_grad():
        want = loaderkit.load(demo_path, "fp32", model=TinyVideoDiT)(*x)
        model = loaderkit.load(demo_path, "int8", model=TinyVideoDiT)
        got = model(*x)
    assert model.blocks[0].fc1.weight.dtype == torch.int8
    assert loaderkit.verify(model, sample_inputs()).ok
    assert rel(got, want) <= 0.016


def test_transformers_llama_quality(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = loaderkit.load(tmp_path / "llama", "fp32")(ids).logits
        model = loaderkit.load(tmp_path / "llama", "int8")
        got = model(ids).logits
        fp8 = loaderkit.load(tmp_path / "llama", "fp8")(ids).logits
    layer = model.model.layers[0]
    assert layer.mlp.gate_proj.weight.dtype == torch.int8 and layer.self_attn.k_proj.weight.dtype == torch.int8
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert layer.input_layernorm.weight.dtype == torch.bfloat16
    assert loaderkit.verify(model, (ids,)).ok
    assert rel(got, want) <= 0.015  # measured 0.0070 (hidden 32: only the attention is int8)
    assert rel(got, want) < rel(fp8, want)


def test_moe_experts_stay_bfloat16_with_a_reason(tmp_path):
    """transformers 5 fuses a MoE's experts into 3-D parameters of a custom module, not
    nn.Linear layers: they stay in bfloat16 and the plan says why; the attention runs int8."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64, intermediate_size=48,
                                     num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    plan = loaderkit.plan(tmp_path / "moe", "int8")
    experts = [m for m in plan.modules.values() if "experts" in m.name and m.name.endswith("experts")]
    assert experts and all("int8" not in m.storage.values() for m in experts)
    assert all("stacked Linear weights" in m.reason for m in experts)
    assert plan.modules["model.layers.0.self_attn.q_proj"].storage["weight"] == "int8"
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        want = loaderkit.load(tmp_path / "moe", "fp32")(ids).logits
        model = loaderkit.load(tmp_path / "moe", "int8")
        got = model(ids).logits
    assert loaderkit.verify(model, (ids,)).ok
    assert rel(got, want) <= 0.015  # measured 0.0070 (hidden 32: only the attention is int8)


def test_a_device_mesh_is_refused_at_plan_time(demo_path):
    from loaderkit.pipeline.distribute import simulated_mesh

    with simulated_mesh(2, 0) as mesh:
        with pytest.raises(loaderkit.LoaderKitError, match="int8.*not sharded over a device mesh.*'fp8'"):
            loaderkit.plan(demo_path, "int8", model=TinyVideoDiT, device_mesh=mesh)
