"""Runtime cast rules (loaderkit.runtime): fp8 storage, compute-dtype kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import cpu_offload
from accelerate.hooks import AlignDevicesHook, add_hook_to_module, attach_align_device_hook
from torch import nn

from loaderkit import LoaderKitError
from loaderkit import runtime
from loaderkit.kernels.quant import quantize, upcast

E4M3 = torch.float8_e4m3fn
BF16 = torch.bfloat16
CROSS_DTYPE = r"Input type \(c10::BFloat16\) and bias type \(c10::Float8_e4m3fn\) should be the same"


class VideoNet(nn.Module):
    """A tiny video DiT-like model: Conv3d patch embedding, Linear blocks, a norm."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.patch_embed = nn.Conv3d(3, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in range(2)
        )
        self.norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            h = h + block(h)
        return self.proj_out(self.norm(h))


def kernel_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv3d))]


def fp8_model(scaled: str = "none", seed: int = 0) -> VideoNet:
    """VideoNet with every Linear/Conv3d weight and bias stored in fp8 (norm in bf16)."""
    torch.manual_seed(seed)
    model = VideoNet().requires_grad_(False)
    model.norm.to(BF16)
    for _, m in kernel_modules(model):
        granularity = "channel" if scaled == "block" and m.weight.dim() != 2 else scaled
        q, scale = quantize(m.weight.data, E4M3, granularity, block=(16, 16))
        m.weight = nn.Parameter(q, requires_grad=False)
        m.bias = nn.Parameter(m.bias.data.to(E4M3), requires_grad=False)
        if scale is not None:
            m.register_buffer("weight_scale", scale)
    return model


def granularity_of(m: nn.Module) -> str:
    """How ``fp8_model`` scaled this module's weight (from the scale's shape)."""
    scale, weight = m.weight_scale, m.weight
    if scale.numel() == 1:
        return "tensor"
    return "channel" if tuple(scale.shape) == (weight.shape[0],) + (1,) * (weight.dim() - 1) else "block"


def scales_of(m: nn.Module) -> dict | None:
    if "weight_scale" not in m._buffers:
        return None
    granularity = granularity_of(m)
    return {"weight": ("weight_scale", granularity, (16, 16) if granularity == "block" else None)}


def attach_all(model: nn.Module, dtype=BF16, **kw) -> dict[str, runtime.CastRule]:
    return {n: runtime.attach_cast(m, dtype, scales=scales_of(m), name=n, **kw) for n, m in kernel_modules(model)}


def dequantized_reference(model: VideoNet, dtype=BF16) -> VideoNet:
    """A plain model holding the decoded weights in ``dtype``: the definition of correct."""
    ref = VideoNet().requires_grad_(False).to(dtype)
    state = {}
    for name, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            scale = m._buffers.get("weight_scale") if pname == "weight" else None
            block = (16, 16) if scale is not None and granularity_of(m) == "block" else None
            state[f"{name}.{pname}"] = upcast(p.data, dtype, scale, block)
    ref.load_state_dict(state)
    return ref


def video(dtype=BF16) -> torch.Tensor:
    return torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(7)).to(dtype)


def stored_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters()}


# -- the crash regression -----------------------------------------------------------------------


def test_plain_torch_crashes_on_fp8_conv_bias():
    with pytest.raises(RuntimeError, match=CROSS_DTYPE):
        fp8_model()(video())


@pytest.mark.parametrize("scaled", ["none", "tensor", "channel", "block"])
def test_cast_rules_run_and_match_dequantized_reference_exactly(scaled):
    model = fp8_model(scaled)
    before = stored_dtypes(model)
    attach_all(model)
    x = video()
    with torch.no_grad():
        out = model(x)
        expected = dequantized_reference(model)(x)
    assert out.dtype == BF16
    assert torch.equal(out, expected)
    assert stored_dtypes(model) == before  # still fp8 after forward
    assert model.patch_embed.weight.dtype == E4M3 and model.patch_embed.bias.dtype == E4M3


def test_inference_mode_then_no_grad_reuse_the_workspace():
    model = fp8_model("channel")
    attach_all(model)
    x = video()
    with torch.inference_mode():
        first = model(x)
    with torch.no_grad():
        assert torch.equal(model(x), first)
    with torch.inference_mode():
        assert torch.equal(model(x), first)


def test_one_dimensional_channel_scale_applies_per_output_row():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).requires_grad_(False)
    q, scale = quantize(lin.weight.data, E4M3, "channel")
    lin.weight = nn.Parameter(q, requires_grad=False)
    lin.register_buffer("weight_scale", scale.reshape(8))  # [N], as some writers store it
    runtime.attach_cast(lin, torch.float32, scales={"weight": ("weight_scale", "channel", None)})
    x = torch.randn(3, 16)
    assert torch.equal(lin(x), F.linear(x, upcast(q, torch.float32, scale), lin.bias))


def test_workspace_is_reused_but_never_while_an_output_aliases_it():
    class FirstRow(nn.Linear):  # a kernel layer whose output is a view of its weight
        def forward(self, x):
            return self.weight[0]

    runtime.release_workspace()
    layers = [FirstRow(64, 32), FirstRow(64, 32), nn.Linear(64, 32)]
    for lin in layers:
        lin.requires_grad_(False)
        lin.weight.data = lin.weight.data.to(E4M3)
        runtime.attach_cast(lin, BF16)
    x = torch.randn(1, 64, dtype=BF16)
    with torch.no_grad():
        first = layers[0](x)
        expected = layers[0].weight[0].to(BF16)
        layers[1](x)  # same shape: must not overwrite the buffer ``first`` lives in
        assert torch.equal(first, expected)
        layers[2](x)
        layers[2](x)
    assert runtime.workspace()[((32, 64), BF16)] == 1  # the Linear's buffer went back and was reused
    runtime.release_workspace()


def test_grad_mode_forward_matches_too():
    model = fp8_model("channel")
    attach_all(model)
    x = video()
    out = model(x)  # grad mode: fresh buffers instead of the reused workspace
    with torch.no_grad():
        assert torch.equal(out, dequantized_reference(model)(x))


def test_fp32_compute_matches_fp32_reference():
    model = fp8_model("channel")
    model.norm.float()
    attach_all(model, torch.float32)
    x = video(torch.float32)
    with torch.no_grad():
        assert torch.equal(model(x), dequantized_reference(model, torch.float32)(x))


def test_parameters_are_the_same_objects_after_forward():
    model = fp8_model("channel")
    ids = {n: id(p) for n, p in model.named_parameters()}
    attach_all(model)
    with torch.no_grad():
        model(video())
    assert {n: id(p) for n, p in model.named_parameters()} == ids


def test_forward_that_raises_restores_fp8_parameters():
    model = fp8_model("channel")
    attach_all(model)
    before = stored_dtypes(model)
    with pytest.raises(RuntimeError):
        model.blocks[0](torch.randn(2, 5, 7, dtype=BF16))  # wrong width: the matmul raises
    assert stored_dtypes(model) == before
    with torch.no_grad():
        model(video())  # and the rules still work afterwards
    assert stored_dtypes(model) == before


def test_exception_inside_kernel_of_cast_module_restores():
    lin = nn.Linear(8, 4).requires_grad_(False)
    lin.weight.data = lin.weight.data.to(E4M3)
    runtime.attach_cast(lin, BF16)
    with pytest.raises(RuntimeError):
        lin(torch.randn(3, 5, dtype=BF16))
    assert lin.weight.dtype == E4M3
    assert lin(torch.randn(3, 8, dtype=BF16)).dtype == BF16


def test_only_differing_tensors_are_upcast():
    seen: dict[str, torch.Tensor] = {}

    class Probe(nn.Linear):
        def forward(self, x):
            seen["weight"], seen["bias"] = self.weight, self.bias
            return super().forward(x)

    probe = Probe(8, 4).requires_grad_(False)
    probe.weight.data = probe.weight.data.to(E4M3)
    probe.bias.data = probe.bias.data.to(BF16)
    bias = probe.bias
    runtime.attach_cast(probe, BF16)
    probe(torch.randn(2, 8, dtype=BF16))
    assert seen["weight"].dtype == BF16 and seen["bias"] is bias  # bias untouched, not copied


def test_module_reading_its_own_weight_dtype_sees_compute_dtype():
    class CastsInput(nn.Linear):
        def forward(self, x):
            return super().forward(x.to(self.weight.dtype))

    m = CastsInput(8, 4).requires_grad_(False)
    m.weight.data, m.bias.data = m.weight.data.to(E4M3), m.bias.data.to(E4M3)
    runtime.attach_cast(m, BF16)
    assert m(torch.randn(2, 8)).dtype == BF16


def test_embedding_returns_compute_dtype_activations():
    emb = nn.Embedding(10, 6).requires_grad_(False)
    emb.weight.data = emb.weight.data.to(E4M3)
    assert emb(torch.tensor([1, 2])).dtype == E4M3  # what plain torch does
    runtime.attach_cast(emb, BF16)
    out = emb(torch.tensor([1, 2]))
    assert out.dtype == BF16 and torch.equal(out, emb.weight[[1, 2]].to(BF16))


def test_multihead_attention_covers_out_proj():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).requires_grad_(False)
    ref = nn.MultiheadAttention(16, 2, batch_first=True).requires_grad_(False)
    for p in mha.parameters():
        p.data = p.data.to(E4M3)
    ref.load_state_dict({k: v.to(BF16) for k, v in mha.state_dict().items()})
    rule = runtime.attach_cast(mha, BF16)
    assert "out_proj.weight" in rule.params
    x = torch.randn(2, 3, 16, dtype=BF16)
    with torch.no_grad():
        assert torch.equal(mha(x, x, x)[0], ref.to(BF16)(x, x, x)[0])
    assert mha.out_proj.weight.dtype == E4M3


# -- inspection, errors, detach -----------------------------------------------------------------


def test_rule_state_is_inspectable():
    model = fp8_model("block")
    rules = attach_all(model)
    rule = runtime.cast_rule_of(model.blocks[0][0])
    assert rule is rules["blocks.0.0"] and rule.compute_dtype == BF16
    assert rule.params == ("weight", "bias")
    assert rule.tensors["weight"] == runtime.TensorCast("weight", "weight_scale", "block", (16, 16))
    assert runtime.cast_rule_of(model.norm) is None
    assert set(runtime.cast_rules(model)) == {n for n, _ in kernel_modules(model)}
    assert rule.describe()["tensors"]["weight"]["granularity"] == "block"


def test_attach_errors_name_the_module():
    lin = nn.Linear(8, 4)
    with pytest.raises(LoaderKitError, match="blk.fc.*weight_scale"):
        runtime.attach_cast(lin, BF16, scales={"weight": ("weight_scale", "channel", None)}, name="blk.fc")
    lin.register_buffer("weight_scale", torch.ones(3, 1))
    with pytest.raises(LoaderKitError, match=r"shape \[3, 1\]"):
        runtime.attach_cast(lin, BF16, scales={"weight": ("weight_scale", "channel", None)})
    with pytest.raises(LoaderKitError, match="granularity"):
        runtime.attach_cast(lin, BF16, scales={"weight": ("weight_scale", "per-row", None)})
    with pytest.raises(LoaderKitError, match="no parameter or buffer 'gamma'"):
        runtime.attach_cast(lin, BF16, names=["gamma"])
    with pytest.raises(LoaderKitError, match="not a compute dtype"):
        runtime.attach_cast(lin, E4M3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_supports():
    kernels = (nn.Linear(2, 2), nn.Conv2d(1, 1, 1), nn.Embedding(2, 2), nn.LayerNorm(2))
    assert all(runtime.supports(m) for m in kernels)
    assert runtime.supports(nn.GELU())
    assert not runtime.supports(torch.jit.script(nn.Linear(2, 2)))
    param = nn.Linear(2, 2)
    torch.nn.utils.parametrize.register_parametrization(param, "weight", nn.Identity())
    assert not runtime.supports(param)


def test_detach_removes_only_loaderkit_hooks():
    model = fp8_model()
    cpu_offload(model, execution_device="cpu")
    attach_all(model)
    runtime.attach_input_cast(model, BF16)
    runtime.detach(model)
    assert runtime.cast_rules(model) == {}
    assert isinstance(model.proj_out._hf_hook, AlignDevicesHook)
    assert isinstance(model._hf_hook, AlignDevicesHook)
    assert model.proj_out.weight.device.type == "meta"  # still offloaded, as before


def test_attach_twice_replaces_the_rule():
    lin = nn.Linear(4, 4)
    lin.weight.data = lin.weight.data.to(E4M3)
    runtime.attach_cast(lin, BF16)
    runtime.attach_cast(lin, torch.float32)
    assert runtime.cast_rule_of(lin).compute_dtype == torch.float32
    assert lin(torch.randn(1, 4)).dtype == torch.float32


# -- accelerate offload -------------------------------------------------------------------------


@pytest.mark.parametrize("scaled", ["none", "channel"])
def test_composes_with_cpu_offload(scaled):
    x = video()
    plain = fp8_model(scaled)
    attach_all(plain)
    offloaded = fp8_model(scaled)
    cpu_offload(offloaded, execution_device="cpu")
    attach_all(offloaded)  # after the offload hooks: they load the fp8 weights first
    with torch.no_grad():
        expected = plain(x)
        assert torch.equal(offloaded(x), expected)
        assert torch.equal(offloaded(x), expected)
    for _, m in kernel_modules(offloaded):
        assert m.weight.device.type == "meta" and m.weight.dtype == E4M3  # released again, as stored


def test_composes_with_align_devices_hook_and_weights_map():
    x = video()
    source = fp8_model("channel")
    weights_map = {k: v.clone() for k, v in source.state_dict().items()}
    model = fp8_model("channel")
    attach_align_device_hook(
        model, execution_device="cpu", offload=True, weights_map=weights_map, offload_buffers=True
    )
    add_hook_to_module(model, AlignDevicesHook(io_same_device=True), append=True)
    attach_all(model)
    assert model.blocks[1][2].weight_scale.device.type == "meta"  # scales offloaded too
    attach_all(source)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def test_cast_attached_before_offload_fails_clearly():
    model = fp8_model()
    attach_all(model)
    cpu_offload(model, execution_device="cpu")  # offload hooks appended after the cast rules
    with pytest.raises(LoaderKitError, match="meta device.*after accelerate"):
        model(video())
    for _, m in kernel_modules(model):
        assert m.weight.dtype == E4M3


# -- resident, input cast, native ---------------------------------------------------------------


def test_resident_keeps_a_decoded_copy_and_tracks_changes():
    model = fp8_model("channel")
    attach_all(model, resident=True)
    x = video()
    with torch.no_grad():
        first = model(x)
        hook = model.proj_out._hf_hook
        cached = hook._cache["weight"][1]
        assert torch.equal(model(x), first)
        assert hook._cache["weight"][1] is cached  # reused, not decoded again
        assert torch.equal(first, dequantized_reference(model)(x))
        model.proj_out.weight.copy_(torch.zeros_like(model.proj_out.weight))  # in place (load_state_dict)
        changed = model(x)
        assert hook._cache["weight"][1] is not cached
        assert torch.equal(changed, dequantized_reference(model)(x))
        model.proj_out.weight = nn.Parameter(torch.ones_like(model.proj_out.weight), requires_grad=False)
        assert torch.equal(model(x), dequantized_reference(model)(x))  # replaced parameter
    assert model.proj_out.weight.dtype == E4M3


def test_input_cast_casts_floats_only():
    received = {}

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, ids, extra=None, pair=()):
            received.update(ids=ids, extra=extra, pair=pair)
            return self.emb(ids)

    root = Root()
    runtime.attach_input_cast(root, BF16)
    ids = torch.tensor([[1, 2]])
    extra = {"t": torch.ones(2), "mask": torch.ones(2, dtype=torch.bool)}
    root(ids, extra=extra, pair=(torch.ones(1, dtype=torch.float64), 3))
    assert received["ids"] is ids
    assert received["extra"]["t"].dtype == BF16 and received["extra"]["mask"].dtype == torch.bool
    assert received["pair"][0].dtype == BF16 and received["pair"][1] == 3


def test_input_cast_with_cast_rules_runs_a_float32_input():
    model = fp8_model("channel")
    attach_all(model)
    runtime.attach_input_cast(model, BF16)
    with torch.no_grad():
        assert torch.equal(model(video(torch.float32)), model(video()))


def test_native_falls_back_on_cpu_with_a_reason():
    lin = nn.Linear(32, 16).requires_grad_(False)
    lin.weight.data = lin.weight.data.to(E4M3)
    rule = runtime.attach_cast(lin, BF16, native=True)
    x = torch.randn(4, 32, dtype=BF16)
    assert torch.equal(lin(x), F.linear(x, lin.weight.to(BF16), lin.bias.to(BF16)))
    assert "compute capability" in rule.native_reason


@pytest.mark.parametrize("granularity", ["none", "tensor", "channel"])
def test_native_path_plumbing_with_cpu_scaled_mm(monkeypatch, granularity):
    """The native path, run through torch._scaled_mm's CPU implementation."""
    monkeypatch.setattr(runtime, "native_fp8_available", lambda device=None: True)
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).requires_grad_(False)
    q, scale = quantize(lin.weight.data, E4M3, granularity)
    lin.weight = nn.Parameter(q, requires_grad=False)
    lin.bias.data = lin.bias.data.to(BF16)
    scales = None
    if scale is not None:
        lin.register_buffer("weight_scale", scale)
        scales = {"weight": ("weight_scale", granularity, None)}
    rule = runtime.attach_cast(lin, BF16, scales=scales, native=True)
    x = torch.randn(3, 5, 64, dtype=BF16)
    out = lin(x)
    assert rule.native_reason.startswith("native"), rule.native_reason
    reference = F.linear(x.float(), upcast(q, torch.float32, scale), lin.bias.float())
    assert out.shape == (3, 5, 32) and out.dtype == BF16
    assert (out.float() - reference).abs().max() <= 0.08 * reference.abs().max()  # fp8 activations
    assert lin.weight.dtype == E4M3 and type(lin.weight) is nn.Parameter


def test_native_path_composes_with_cpu_offload(monkeypatch):
    monkeypatch.setattr(runtime, "native_fp8_available", lambda device=None: True)

    def make() -> nn.Sequential:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).requires_grad_(False)
        for lin in (model[0], model[2]):
            q, scale = quantize(lin.weight.data, E4M3, "tensor")
            lin.weight = nn.Parameter(q, requires_grad=False)
            lin.register_buffer("weight_scale", scale)
        return model

    x = torch.randn(4, 32)
    plain, offloaded = make(), make()
    cpu_offload(offloaded, execution_device="cpu")
    for model in (plain, offloaded):
        for lin in (model[0], model[2]):
            scales = {"weight": ("weight_scale", "tensor", None)}
            runtime.attach_cast(lin, torch.float32, scales=scales, native=True)
    assert torch.equal(offloaded(x), plain(x))
    assert runtime.cast_rule_of(offloaded[0]).native_reason.startswith("native")
    assert offloaded[0].weight.device.type == "meta" and offloaded[0].weight.dtype == E4M3
    assert type(offloaded[0].weight) is nn.Parameter


def _cuda_fp8() -> bool:
    return torch.cuda.is_available() and runtime.native_fp8_available("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_fp8(), reason="needs a CUDA device with compute capability >= 8.9")
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_native_fp8_matmul_on_gpu(granularity):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).requires_grad_(False)
    q, scale = quantize(lin.weight.data, E4M3, granularity)
    lin = lin.cuda()
    lin.weight = nn.Parameter(q.cuda(), requires_grad=False)
    lin.bias.data = lin.bias.data.to(BF16)
    lin.register_buffer("weight_scale", scale.cuda())
    rule = runtime.attach_cast(lin, BF16, scales={"weight": ("weight_scale", granularity, None)}, native=True)
    x = torch.randn(7, 256, device="cuda", dtype=BF16)
    out = lin(x)
    assert rule.native_reason.startswith("native"), rule.native_reason
    reference = F.linear(x.float(), upcast(q.cuda(), torch.float32, scale.cuda()), lin.bias.float())
    assert (out.float() - reference).abs().max() <= 0.08 * reference.abs().max()
    assert lin.weight.dtype == E4M3


# -- folded per-channel scales ------------------------------------------------------------------


def _folded_linear(dtype, bias: bool = True, seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """An fp8 Linear with per-channel scales and (optionally) a bias in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(96, 40, bias=bias).requires_grad_(False)
    w = torch.randn(40, 96, generator=gen) * torch.logspace(-2, 1, 40)[:, None]
    q, scale = quantize(w, E4M3, "channel")
    lin.weight = nn.Parameter(q, requires_grad=False)
    if bias:
        lin.bias = nn.Parameter(torch.randn(40, generator=gen).to(dtype), requires_grad=False)
    lin.register_buffer("weight_scale", scale)
    return lin, q, scale


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_folded_scale_agrees_with_the_decoded_weight_within_a_rounding(dtype, bias):
    lin, q, scale = _folded_linear(dtype, bias)
    stored_bias = lin.bias
    rule = runtime.attach_cast(lin, dtype, scales={"weight": ("weight_scale", "channel", None)}, fold_scale=True)
    assert rule.fold_scale and rule.describe()["fold_scale"]
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        out = lin(x)
    exact = F.linear(x.double(), q.double() * scale.double(), None if not bias else stored_bias.double())
    decoded = F.linear(x, upcast(q, dtype, scale), stored_bias)
    assert out.dtype == dtype and out.shape == decoded.shape
    # two roundings of the result (before and after the scale), float32 accumulation of the terms
    unit = 2.0**-8 if dtype == BF16 else 2.0**-24
    terms = F.linear(x.double().abs(), (q.double() * scale.double()).abs())
    # (the first is relative to the unbiased product, at most ``terms``)
    assert ((out.double() - exact).abs() <= (exact.abs() + terms) * unit + terms * 2.0**-20).all()
    # the decoded weight's own rounding (each weight rounded to ``dtype``) bounds the difference
    assert ((out.double() - decoded.double()).abs() <= (exact.abs() + terms) * 2 * unit + terms * 2.0**-19).all()
    assert lin.weight.dtype == E4M3 and lin.bias is stored_bias  # restored after the forward


def test_folded_scale_stands_down_where_it_cannot_apply():
    """With gradients, another hook, a low-rank update or a non-channel scale the weight is
    decoded with its scale: bit-identical to the decoded reference."""
    lin, q, scale = _folded_linear(BF16)
    runtime.attach_cast(lin, BF16, scales={"weight": ("weight_scale", "channel", None)}, fold_scale=True)
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(2)).to(BF16)
    expected = F.linear(x, upcast(q, BF16, scale), lin.bias)
    assert torch.equal(lin(x), expected)  # grad mode on
    runtime.add_low_rank(lin, runtime.LowRank("d", "weight", torch.zeros(40, 2, dtype=BF16),
                                               torch.zeros(2, 96, dtype=BF16), 1.0))
    with torch.no_grad():
        assert torch.equal(lin(x), expected)
    runtime.remove_low_rank(lin, "d")
    with torch.no_grad():
        assert not torch.equal(lin(x), expected)  # folded again
    plain = fp8_model("channel")
    attach_all(plain)
    model = fp8_model("channel")
    cpu_offload(model, execution_device="cpu")
    attach_all(model, fold_scale=True)  # after the offload hooks: they move the tensors
    with torch.no_grad():
        assert torch.equal(model(video()), plain(video()))
    tensor_scaled = fp8_model("tensor")
    attach_all(tensor_scaled, fold_scale=True)
    with torch.no_grad():
        assert torch.equal(tensor_scaled(video()), dequantized_reference(tensor_scaled)(video()))


def test_folded_scale_restores_the_module_when_the_forward_raises():
    lin, q, scale = _folded_linear(BF16)
    stored = (lin.weight, lin.bias)
    runtime.attach_cast(lin, BF16, scales={"weight": ("weight_scale", "channel", None)}, fold_scale=True)
    with torch.no_grad(), pytest.raises(RuntimeError):
        lin(torch.ones(2, 7, dtype=BF16))  # wrong width
    assert (lin.weight, lin.bias) == stored
    with torch.no_grad():
        good = lin(torch.ones(2, 96, dtype=BF16))
    assert good.shape == (2, 40) and (lin.weight, lin.bias) == stored
