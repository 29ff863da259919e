"""Exactness of fp8 decoding and accuracy of fp8 encoding (loaderkit.kernels.quant)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loaderkit import LoaderKitError
from loaderkit.kernels import compiled, quant
from loaderkit.kernels.quant import (
    dequantize_reference, expand_block_scale, fp8_max, quantize, quantize_reference, upcast,
)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8 = [E4M3, E5M2]
BF16 = torch.bfloat16
COMPUTE = [BF16, torch.float16, torch.float32]
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(scope="module", autouse=True, params=["compiled", "torch"])
def decode_route(request):
    """Every test of this module runs twice: with the compiled decode kernel where this machine
    builds one (skipped where it cannot), and with the torch route it falls back to."""
    saved = dict(compiled._STATE)
    compiled.reset()
    if request.param == "compiled" and compiled.library() is None:
        pytest.skip(f"no compiled kernel here: {compiled.status()['reason']}")
    if request.param == "torch":
        compiled._STATE.update(tried=True, lib=None, reason="turned off by the test")
    yield request.param
    compiled._STATE.clear()
    compiled._STATE.update(saved)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT[t.element_size()])


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    mismatch = (bits(a) != bits(b)).nonzero()
    assert mismatch.numel() == 0, f"{len(mismatch)} elements differ, first at {mismatch[0].tolist()}"


def all_codes(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(256, dtype=torch.uint8).view(dtype)


def random_codes(dtype: torch.dtype, *shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).view(dtype)


# -- exhaustive decoding ------------------------------------------------------------------------


@pytest.mark.parametrize("src", FP8 + [torch.float8_e4m3fnuz, torch.float8_e5m2fnuz])
@pytest.mark.parametrize("dst", COMPUTE + [torch.float64])
def test_all_256_codes_decode_exactly(src, dst):
    q = all_codes(src)
    assert_bit_equal(upcast(q, dst), q.to(dst))
    assert_bit_equal(upcast(q, dst), dequantize_reference(q, dst))


@pytest.mark.parametrize("src", FP8)
@pytest.mark.parametrize("dst", COMPUTE)
def test_special_values(src, dst):
    out = upcast(all_codes(src), dst)
    assert bits(out)[0] == 0  # +0
    assert out[0x80] == 0 and torch.signbit(out[0x80])  # -0 keeps its sign
    subnormal = 2.0**-9 if src == E4M3 else 2.0**-16
    assert out[0x01].item() == subnormal and out[0x81].item() == -subnormal
    nan_codes = [0x7F, 0xFF] if src == E4M3 else [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]
    assert torch.isnan(out[nan_codes]).all()
    assert torch.isnan(out).sum() == len(nan_codes)
    if src == E5M2:
        assert out[0x7C].item() == math.inf and out[0xFC].item() == -math.inf
    assert out.float().nan_to_num(0, 0, 0).abs().max().item() == fp8_max(src)


@pytest.mark.parametrize("src", FP8)
@pytest.mark.parametrize("dst", COMPUTE)
@pytest.mark.parametrize("shape", [(333, 1001), (4097,), (2, 3, 5, 7), (1,), (0, 4)])
def test_large_and_odd_shapes_decode_exactly(src, dst, shape):
    q = random_codes(src, *shape)  # every code, many times: pair table, odd tail, chunk edges
    assert_bit_equal(upcast(q, dst), q.to(dst))


def test_non_contiguous_and_offset_inputs():
    q = random_codes(E4M3, 300, 301)
    for view in (q.t(), q[:, 1:], q[1:, ::2], q.reshape(-1)[1:]):
        assert_bit_equal(upcast(view, torch.bfloat16), view.to(torch.bfloat16))


@pytest.fixture
def threads(request):
    """torch's thread count set to the parameter for the test, then restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_split_over_threads_gives_the_same_bits(monkeypatch, threads):
    monkeypatch.setattr(quant, "PARALLEL_MIN", 1000)  # split even these small tensors
    q = random_codes(E4M3, 301, 1500)
    gen = torch.Generator().manual_seed(5)
    cases = [
        (None, None),
        (torch.tensor(0.3), None),
        (torch.rand(301, 1, generator=gen), None),
        (torch.rand(3, 12, generator=gen), (128, 128)),
        (torch.rand(301, 1500, generator=gen)[:76, :375], (4, 4)),  # float route
    ]
    for scale, block in cases:
        for dst in COMPUTE:
            assert_bit_equal(upcast(q, dst, scale, block), dequantize_reference(q, dst, scale, block))
    narrow = random_codes(E4M3, 5000, 7)  # float route for channel scales
    scale = torch.rand(5000, 1, generator=gen)
    assert_bit_equal(upcast(narrow, BF16, scale), dequantize_reference(narrow, BF16, scale))


def test_out_buffer_is_filled_and_returned():
    q = random_codes(E4M3, 64, 300)
    out = torch.empty(64, 300, dtype=torch.bfloat16)
    assert upcast(q, torch.bfloat16, out=out) is out
    assert_bit_equal(out, q.to(torch.bfloat16))
    with pytest.raises(LoaderKitError, match="out="):
        upcast(q, torch.bfloat16, out=torch.empty(64, 300))


# -- scaled decoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("src", FP8)
@pytest.mark.parametrize("dst", COMPUTE)
def test_tensor_scale_exact(src, dst):
    q = random_codes(src, 257, 300)
    for scale in (torch.tensor(0.0123), torch.tensor([3.5]), torch.tensor(1.7, dtype=torch.bfloat16)):
        assert_bit_equal(upcast(q, dst, scale), dequantize_reference(q, dst, scale))


@pytest.mark.parametrize("src", FP8)
@pytest.mark.parametrize("dst", COMPUTE)
@pytest.mark.parametrize("shape", [(300, 200), (300, 7), (1, 5000)])
def test_channel_scale_exact(src, dst, shape):
    q = random_codes(src, *shape)  # (300, 7): few columns -> float route; others -> grouped tables
    scale = torch.rand(shape[0], 1, generator=torch.Generator().manual_seed(1)) * 4 + 1e-3
    assert_bit_equal(upcast(q, dst, scale), dequantize_reference(q, dst, scale))
    assert_bit_equal(upcast(q, dst, scale.bfloat16()), dequantize_reference(q, dst, scale.bfloat16()))


@pytest.mark.parametrize("dst", COMPUTE)
def test_conv_channel_scale_exact(dst):
    q = random_codes(E4M3, 40, 3, 2, 3, 3)  # Conv3d weight [O, I, kt, kh, kw]
    scale = torch.rand(40, 1, 1, 1, 1) + 0.01
    assert_bit_equal(upcast(q, dst, scale), dequantize_reference(q, dst, scale))


@pytest.mark.parametrize("src", FP8)
@pytest.mark.parametrize("dst", COMPUTE)
@pytest.mark.parametrize(
    ("shape", "block"), [((300, 200), (128, 128)), ((130, 1000), (128, 128)), ((9, 10), (4, 3))]
)
def test_block_scale_exact(src, dst, shape, block):
    q = random_codes(src, *shape)
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    scale = torch.rand(grid, generator=torch.Generator().manual_seed(2)) * 3 + 1e-3
    assert_bit_equal(upcast(q, dst, scale, block), dequantize_reference(q, dst, scale, block))


@pytest.mark.parametrize("src", FP8)
@pytest.mark.parametrize("dst", COMPUTE)
def test_extreme_channel_scales_exact(src, dst):
    """Zero, negative, huge (beyond 2**100, where the vector path's 2**8 factor could overflow),
    tiny, infinite and NaN scales: every row bit-exact with the reference, inf * 0 included."""
    q = all_codes(src).repeat(10, 3)[:, :700]
    scale = torch.tensor([0.0, -1.5, 2.0**101, 3.0e38, 2.0**-140, 1e-45, float("inf"), float("-inf"),
                          float("nan"), 0.25])[:, None]
    assert_bit_equal(upcast(q, dst, scale), dequantize_reference(q, dst, scale))
    for s in scale.flatten():
        assert_bit_equal(upcast(q, dst, s), dequantize_reference(q, dst, s))


@pytest.mark.parametrize("dst", COMPUTE)
@pytest.mark.parametrize("kind", ["block", "row"])
def test_stacked_expert_scales_exact(dst, kind):
    """Fused experts ``[E, N, K]``: a block grid per expert, or one scale per row of each."""
    q = random_codes(E4M3, 3, 130, 300)
    gen = torch.Generator().manual_seed(4)
    if kind == "block":
        scale, block = torch.rand(3, 2, 3, generator=gen) + 0.01, (128, 128)
    else:
        scale, block = torch.rand(3, 130, 1, generator=gen) + 0.01, None
    want = dequantize_reference(q, dst, scale, block)
    assert_bit_equal(upcast(q, dst, scale, block), want)
    out = torch.empty(q.shape, dtype=dst)
    assert upcast(q, dst, scale, block, out=out) is out or kind == "row"
    assert_bit_equal(out, want)


def test_other_broadcast_scales_follow_the_reference():
    q = random_codes(E4M3, 30, 40)
    per_column = torch.rand(1, 40) + 0.5
    assert_bit_equal(upcast(q, BF16, per_column), dequantize_reference(q, BF16, per_column))
    per_row_1d = torch.rand(40) + 0.5  # a 1-D scale broadcasts along the last dim, as in torch
    assert_bit_equal(upcast(q, BF16, per_row_1d), dequantize_reference(q, BF16, per_row_1d))


def test_block_scale_expansion_uses_ceil_division():
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    full = expand_block_scale(scale, (3, 5), (2, 4))
    assert full.tolist() == [[1, 1, 1, 1, 2], [1, 1, 1, 1, 2], [3, 3, 3, 3, 4]]


def test_scale_errors():
    q = random_codes(E4M3, 300, 200)
    with pytest.raises(LoaderKitError, match=r"needs \[3, 2\]"):
        upcast(q, torch.bfloat16, torch.ones(2, 2), (128, 128))
    with pytest.raises(LoaderKitError, match="compute dtype"):
        upcast(q, E5M2)
    with pytest.raises(LoaderKitError, match="without a block scale"):
        upcast(q, torch.bfloat16, None, (128, 128))


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    kind=st.sampled_from(["none", "tensor", "channel", "block"]),
    dst=st.sampled_from(COMPUTE),
    seed=st.integers(0, 2**16),
)
def test_upcast_matches_reference_property(rows, cols, kind, dst, seed):
    q = random_codes(E4M3, rows, cols, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    block = (8, 16) if kind == "block" else None
    scale = {
        "none": None,
        "tensor": torch.rand((), generator=gen) * 10,
        "channel": torch.rand(rows, 1, generator=gen) * 10,
        "block": torch.rand(math.ceil(rows / 8), math.ceil(cols / 16), generator=gen) * 10,
    }[kind]
    assert_bit_equal(upcast(q, dst, scale, block), dequantize_reference(q, dst, scale, block))


# -- quantize -----------------------------------------------------------------------------------


def _rel_bound(fp8: torch.dtype) -> tuple[float, float]:
    """(relative half-ulp, smallest subnormal) of an fp8 format."""
    return (2.0**-4, 2.0**-9) if fp8 == E4M3 else (2.0**-3, 2.0**-16)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16])
def test_quantize_round_trip_error_is_bounded(fp8, granularity, src):
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(300, 200, generator=gen) * torch.logspace(-3, 1, 300)[:, None]).to(src)
    q, scale = quantize(w, fp8, granularity, block=(128, 128))
    assert q.dtype == fp8 and q.shape == w.shape and scale.dtype == torch.float32
    expected_shape = {"tensor": (), "channel": (300, 1), "block": (3, 2)}[granularity]
    assert tuple(scale.shape) == expected_shape
    block = (128, 128) if granularity == "block" else None
    back = dequantize_reference(q, torch.float32, scale, block)
    full = expand_block_scale(scale, w.shape, block) if block else scale.expand(w.shape)
    rel, sub = _rel_bound(fp8)
    err = (back - w.float()).abs()
    assert (err <= w.float().abs() * rel + full * sub / 2 + 1e-30).all()
    assert not torch.isnan(back).any()
    assert (q.float().abs().amax() <= fp8_max(fp8)).all()


def test_quantize_zero_rows_and_zero_tensor_decode_to_exact_zeros():
    w = torch.randn(6, 50)
    w[2] = 0
    q, scale = quantize(w, E4M3, "channel")
    assert scale[2].item() == 1.0 and torch.isfinite(scale).all()
    assert (dequantize_reference(q, torch.float32, scale)[2] == 0).all()
    for granularity in ("tensor", "channel", "block"):
        q, scale = quantize(torch.zeros(10, 20), E4M3, granularity, block=(4, 8))
        assert (scale == 1).all()
        block = (4, 8) if granularity == "block" else None
        assert (dequantize_reference(q, torch.bfloat16, scale, block) == 0).all()


def test_per_channel_keeps_small_rows_that_plain_fp8_flushes():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(4, 256, generator=gen)
    w[1] *= 1e-6  # far below e4m3fn's smallest subnormal (2**-9 ~ 2e-3)
    plain = w.to(E4M3).float()
    assert (plain[1] == 0).float().mean() > 0.99  # unscaled fp8 wipes the row out
    q, scale = quantize(w, E4M3, "channel")
    back = dequantize_reference(q, torch.float32, scale)
    assert torch.allclose(back[1], w[1], rtol=2.0**-4, atol=1e-10)
    q_t, s_t = quantize(w, E4M3, "tensor")  # one scale for all rows loses the small row too
    assert (dequantize_reference(q_t, torch.float32, s_t)[1] == 0).float().mean() > 0.9


def test_quantize_values_at_amax_do_not_overflow_to_nan():
    w = torch.tensor([[448.0, -448.0, 1.0], [57344.0, 3.0, -57344.0]])
    for fp8 in FP8:
        for granularity in ("tensor", "channel", "block"):
            q, scale = quantize(w, fp8, granularity, block=(1, 2))
            assert not torch.isnan(q.float()).any() and not torch.isinf(q.float()).any()


def test_quantize_none_saturates():
    q, scale = quantize(torch.tensor([[1000.0, -1000.0, 0.5]]), E4M3, "none")
    assert scale is None
    assert q.float().tolist() == [[448.0, -448.0, 0.5]]


def test_quantize_one_dim_channel_falls_back_to_tensor_scale():
    q, scale = quantize(torch.randn(33), E4M3, "channel")
    assert scale.shape == () and q.shape == (33,)


def test_quantize_chunks_large_tensors_without_changing_results():
    w = torch.randn(2100, 1000)  # > 1M elements: several row chunks
    q, scale = quantize(w, E4M3, "channel")
    ref_scale = (w.abs().amax(dim=1, keepdim=True) / 448).clamp(min=torch.finfo(torch.float32).tiny)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), (w / ref_scale).clamp(-448, 448).to(E4M3).view(torch.uint8))
    q_b, s_b = quantize(w, E4M3, "block", block=(128, 128))
    assert s_b.shape == (17, 8)
    ref_b = torch.nn.functional.pad(w.abs(), (0, 24, 0, 76)).view(17, 128, 8, 128).amax(dim=(1, 3)) / 448
    assert torch.equal(s_b, ref_b)


def test_quantize_errors():
    with pytest.raises(LoaderKitError, match="inf or NaN"):
        quantize(torch.tensor([[1.0, float("inf")]]), E4M3, "channel")
    with pytest.raises(LoaderKitError, match="granularity"):
        quantize(torch.ones(2, 2), E4M3, "per-row")
    with pytest.raises(LoaderKitError, match="2-D"):
        quantize(torch.ones(2, 2, 2), E4M3, "block")
    with pytest.raises(LoaderKitError, match="8-bit"):
        quantize(torch.ones(2, 2), torch.bfloat16)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([(1, 1), (3, 5), (9, 1), (1, 300), (129, 257), (700, 1500), (4, 0), (2, 3, 4),
                           (5, 7, 3, 3), (17,), ()]),
    src=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]),
    granularity=st.sampled_from(["channel", "tensor", "block", "row", "none"]),
    fp8=st.sampled_from(FP8),
    seed=st.integers(0, 2**16),
)
def test_quantize_in_row_blocks_is_bitwise_the_reference(shape, src, granularity, fp8, seed):
    """Row-block quantization (amax, scale and encoding per block, no clamp) gives the bits of
    the whole-tensor definition: zero rows, tiny and large magnitudes, every source dtype."""
    if (granularity == "block" and len(shape) != 2) or (granularity == "row" and (len(shape) < 2 or 0 in shape)):
        return
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    w = (w * torch.rand(shape, generator=gen, dtype=torch.float64) ** 4 * 10.0 ** (seed % 9 - 4)).to(src)
    if w.dim() == 2 and w.shape[0] > 2:
        w[1] = 0
    kw = {"block": (128, 64)} if granularity == "block" else {}
    q, scale = quantize(w, fp8, granularity, **kw)
    q_ref, scale_ref = quantize_reference(w, fp8, granularity, **kw)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert (scale is None and scale_ref is None) or (scale.shape == scale_ref.shape and torch.equal(scale, scale_ref))


@pytest.mark.parametrize("threads", [1, 2, 3], indirect=True)
def test_quantize_split_over_threads_gives_the_reference_bits(monkeypatch, threads):
    monkeypatch.setattr(quant, "PARALLEL_MIN", 1000)  # split even these small tensors
    gen = torch.Generator().manual_seed(threads)
    w = torch.randn(301, 1500, generator=gen) * torch.logspace(-8, 2, 301)[:, None]
    for src in (torch.bfloat16, torch.float16, torch.float32):
        for granularity in ("channel", "tensor", "block"):
            for fp8 in FP8:
                q, scale = quantize(w.to(src), fp8, granularity)
                rq, rscale = quantize_reference(w.to(src), fp8, granularity)
                assert_bit_equal(q, rq)
                assert_bit_equal(scale, rscale)


def test_quantize_in_row_blocks_across_several_blocks(monkeypatch):
    monkeypatch.setattr(quant, "QUANT_BLOCK", 3000)  # a few rows per block, a ragged last one
    w = (torch.randn(103, 250) * torch.logspace(-6, 3, 103)[:, None]).to(torch.bfloat16)
    for granularity in ("channel", "row"):
        q, scale = quantize(w, E4M3, granularity)
        q_ref, scale_ref = quantize_reference(w, E4M3, granularity)
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scale, scale_ref)
    with pytest.raises(LoaderKitError, match="inf or NaN"):
        quantize(torch.cat([w, torch.full((1, 250), float("nan"), dtype=w.dtype)]), E4M3, "channel")


@pytest.mark.parametrize("shape, cuts", [((64, 96), (32,)), ((7, 33), (5, 20)), ((3, 16, 40), (13,)), ((5, 1), ())])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_rows_quantized_in_column_slices_with_their_shared_maxima_match_whole_rows(shape, cuts, fp8):
    """What each tensor-parallel rank does with a row-parallel weight: the row maxima of every
    column slice, combined, then each slice encoded: the very scales and codes of the whole rows."""
    from loaderkit.kernels.quant import quantize_rows, row_amax

    torch.manual_seed(0)
    w = (torch.randn(shape) * 4).to(torch.bfloat16)
    w[0] = 0  # an all-zero row gets scale 1
    q, s = quantize(w, fp8, "row" if w.dim() == 3 else "channel")
    edges = (0, *cuts, shape[-1])
    parts = [w[..., a:b] for a, b in zip(edges, edges[1:])]
    amax = torch.stack([row_amax(p) for p in parts]).amax(0)
    for (a, b), part in zip(zip(edges, edges[1:]), parts):
        q2, s2 = quantize_rows(part, fp8, amax)
        assert torch.equal(s2, s)
        assert torch.equal(q2.view(torch.uint8), q[..., a:b].contiguous().view(torch.uint8))
