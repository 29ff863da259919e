"""Loading over a device mesh (``load(..., device_mesh=, parallelize=)``), on CPU with gloo.

Each test spawns its ranks (``tests/dist_worker.py``); every rank loads the checkpoint in
parallel and compares with a single-process ``loaderkit.load`` of it, and the test asserts on
what every rank found. One spawn serves many cases.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fp8_writers

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

IDS = [[1, 5, 9, 3, 7, 2, 11, 4]]
WORKER = Path(__file__).with_name("dist_worker.py")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _llama(path: Path, **kw) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    LlamaForCausalLM(LlamaConfig(**{**config, **kw})).save_pretrained(path)
    return str(path)


def _backend(request, world: int) -> str:
    """gloo on CPU always; NCCL where ``world`` GPUs are present (the same cases, unchanged)."""
    if request.param == "nccl" and (not torch.cuda.is_available() or torch.cuda.device_count() < world
                                    or not torch.distributed.is_nccl_available()):
        pytest.skip(f"NCCL needs {world} GPUs")
    return request.param


def _mixtral(path: Path) -> str:
    """transformers 5 fuses Mixtral's per-expert tensors on load (``experts.gate_up_proj``)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, num_local_experts=4, num_experts_per_tok=2)
    MixtralForCausalLM(config).save_pretrained(path)
    return str(path)


def _spawn(world: int, cases: list[dict], out: Path, backend: str = "gloo") -> dict[str, list[dict]]:
    out.mkdir()
    spec = out / "spec.json"
    spec.write_text(json.dumps(dict(world=world, port=_port(), out=str(out), cases=cases, backend=backend)))
    proc = subprocess.run([sys.executable, str(WORKER), str(spec)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {}
    for case in cases:
        ranks = [json.loads((out / f"{case['name']}.{r}.json").read_text()) for r in range(world)]
        for r in ranks:
            assert "crash" not in r, r["crash"]
        results[case["name"]] = ranks
    return results


def _case(name, path, strategy, parallelize, **extra):
    return dict(name=name, path=path, strategy=strategy, parallelize=parallelize, ids=IDS, **extra)


@pytest.fixture(scope="module", params=["gloo", "nccl"])
def two(request, tmp_path_factory):
    backend = _backend(request, 2)
    root = tmp_path_factory.mktemp("dist2")
    llama = _llama(root / "llama")
    ct = str(fp8_writers.write_compressed_tensors_llama(root / "ct", "FP8_DYNAMIC"))
    block_small = str(fp8_writers.write_compressed_tensors_llama(root / "ctb", "FP8_BLOCK"))
    block = str(fp8_writers.write_compressed_tensors_llama(
        root / "ctb256", "FP8_BLOCK", hidden_size=256, intermediate_size=512, num_attention_heads=2,
        num_key_value_heads=2, head_dim=128, vocab_size=256, num_hidden_layers=1))
    heads3 = _llama(root / "heads3", hidden_size=48, num_attention_heads=3, num_key_value_heads=3)
    moe = _mixtral(root / "moe")
    wide = _llama(root / "wide", hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=2,
                  head_dim=128, vocab_size=256, num_hidden_layers=1)
    blocks = {"granularity": "block"}
    from test_conversions import _quantized_moe

    moe8 = {g: str(_quantized_moe(root / f"moe8{g}", g)[0]) for g in ("channel", "block")}
    cases = [_case(f"llama-{p}-{s}", llama, s, p) for p in ("fsdp", "tp") for s in ("fp32", "bf16", "fp8")]
    cases += [_case(f"ct-{p}-{s}", ct, s, p) for p in ("fsdp", "tp") for s in ("fp8", "bf16")]
    cases += [_case(f"block-{p}-{s}", block, s, p) for p in ("fsdp", "tp") for s in ("fp8", "bf16")]
    cases += [
        _case("block-cut-tp", block_small, "fp8", "tp"),
        _case("block-cut-fsdp", block_small, "fp8", "fsdp"),
        _case("heads-tp", heads3, "bf16", "tp"),
        _case("rank-fails", llama, "bf16", "fsdp", fail_rank=1),
        _case("rank-fails-between-collectives", llama, "fp8", "tp", fail_rank=1),
        _case("moe-fsdp-bf16", moe, "bf16", "fsdp"),
        _case("moe-fsdp-fp8", moe, "fp8", "fsdp"),
        _case("moe-fsdp-fp8-tensor", moe, "fp8", "fsdp", options={"granularity": "tensor"}),
        _case("moe-tp", moe, "bf16", "tp"),
        _case("moe-tp-fp8", moe, "fp8", "tp"),
        _case("moe8-channel-tp-fp8", moe8["channel"], "fp8", "tp"),
        _case("moe8-block-tp-bf16", moe8["block"], "bf16", "tp"),
        _case("moe8-block-tp-fp8", moe8["block"], "fp8", "tp"),
        _case("moe8-channel-fsdp-fp8", moe8["channel"], "fp8", "fsdp"),
        _case("moe8-block-fsdp-fp8", moe8["block"], "fp8", "fsdp"),
        _case("moe8-block-fsdp-bf16", moe8["block"], "bf16", "fsdp"),
        _case("quant-block-fsdp", llama, "fp8", "fsdp", options=blocks),
        _case("quant-block-tp", wide, "fp8", "tp", options=blocks),
        _case("quant-block-cut-tp", llama, "fp8", "tp", options=blocks),
    ]
    return _spawn(2, cases, root / "out", backend)


LOADS = [f"llama-{p}-{s}" for p in ("fsdp", "tp") for s in ("fp32", "bf16", "fp8")]
LOADS += [f"ct-{p}-{s}" for p in ("fsdp", "tp") for s in ("fp8", "bf16")]
LOADS += [f"block-{p}-{s}" for p in ("fsdp", "tp") for s in ("fp8", "bf16")] + ["block-cut-fsdp"]
MOE = ["moe-fsdp-bf16", "moe-fsdp-fp8", "moe-fsdp-fp8-tensor", "moe8-channel-fsdp-fp8", "moe8-block-fsdp-fp8", "moe8-block-fsdp-bf16"]
LOADS += ["quant-block-fsdp", "quant-block-tp"]
#: Mixtral's experts under transformers' own TP plan: packed gate/up, row-parallel down, summed output
MOE_TP = ["moe-tp", "moe-tp-fp8", "moe8-channel-tp-fp8"]
LOADS += MOE_TP


@pytest.mark.parametrize("name", LOADS + MOE + ["moe8-block-tp-bf16"])
def test_every_tensor_equals_the_single_process_load(two, name):
    for r in two[name]:
        assert "error" not in r, r["error"]
        assert r["mismatches"] == [], r["mismatches"]
        assert r["verify"] is True
        assert set(r["params"].values()) == {"DTensor"} or "-tp" in name  # norms stay plain under TP


@pytest.mark.parametrize("name", LOADS + MOE + ["moe8-block-tp-bf16"])
def test_forward_agrees_with_the_single_process_model(two, name):
    for r in two[name]:
        assert r["logits_repeat"]
        if "-fsdp-" in name or name.endswith("-fsdp"):
            assert r["logits_max_diff"] == 0.0  # FSDP gathers the very same weights: bitwise
        elif name.endswith("fp32"):
            assert r["logits_max_diff"] <= 1e-5 * max(1.0, r["logits_scale"])
        else:  # tensor parallelism sums partial products in another order, in bf16
            assert r["logits_max_diff"] <= 0.02 * r["logits_scale"]


@pytest.mark.parametrize("name", LOADS)
def test_each_rank_reads_what_its_plan_says(two, name):
    for r in two[name]:
        assert r["read"] == r["planned"]  # counted at the pread calls
        if name == "quant-block-fsdp":  # block scales made on load are whole: those weights are read whole
            assert r["whole"] // 2 < r["read"] < r["whole"]
        elif "fsdp" in name:
            assert r["read"] == r["whole"] // 2  # every tensor halves along its rows
        else:  # fp8 made on load too: row-parallel shards all-reduce their rows' maxima
            sharded = r["whole"] - r["replicated"]
            assert r["read"] == r["replicated"] + sharded // 2


def test_a_per_tensor_scale_made_on_load_reads_every_expert(two):
    """A per-tensor fp8 scale made on load needs every expert's maximum: the fused experts are
    read whole on each rank (and the scale equals the single-process one, tested above), not
    built from the rank's own experts with a scale of its rows alone."""
    for r in two["moe-fsdp-fp8-tensor"]:
        assert r["read"] == r["planned"]
    shown = two["moe-fsdp-fp8-tensor"][0]["plan"]
    assert "built by the model's library from 8 checkpoint tensors: read whole, then cut" in shown
    assert "from its rows' 4 of 8" not in shown


@pytest.mark.parametrize("name", [m for m in MOE if m != "moe-fsdp-fp8-tensor"])
def test_each_rank_reads_only_its_experts(two, name):
    """transformers stacks the experts' tensors; each FSDP rank builds its rows from its own
    experts' tensors by the library's operations, and reads nothing else."""
    for r in two[name]:
        assert r["read"] == r["planned"]
        if name == "moe8-block-fsdp-bf16":  # dequantized by whole blocks: k/v rows 0:8 read blocks of 16
            assert r["whole"] // 2 < r["read"] < r["whole"]
        else:
            assert r["read"] == r["whole"] // 2
    assert "built by the model's library from its rows' 4 of 8 checkpoint tensors" in two[name][0]["plan"]


@pytest.mark.parametrize("name", MOE_TP + ["moe8-block-tp-bf16"])
def test_packed_experts_hold_their_slice_of_gate_and_of_up(two, name):
    """transformers' ``packed_colwise``: each rank's ``gate_up_proj`` is its slice of the gate
    rows and its slice of the up rows (checked against the single-process tensor cut by plain
    slicing), read as those two runs of each expert's ``w1`` and ``w3``."""
    for r in two[name]:
        assert r["packed"] and all(r["packed"].values()), r["packed"]
        assert r["read"] == r["planned"]
    text = two[name][0]["plan"]
    assert "model.layers.0.mlp.experts.gate_up_proj" in text and "_StridedShard(1, split_factor=2)" in text
    if name == "moe8-block-tp-bf16":  # dequantized by whole blocks, which the shards cut: built whole, once
        assert "read whole, then cut" in text
    else:
        assert "from its part of 4 of 8 checkpoint tensors" in text  # each piece: w1's rows, or w3's


def test_tied_weights_stay_one_parameter(two):
    for name in ("llama-fsdp-bf16", "llama-tp-bf16", "llama-tp-fp8"):
        assert all(r["tied"] for r in two[name])


def test_the_plan_shows_each_rank_its_share(two):
    text = two["llama-tp-fp8"][0]["plan"]
    assert "parallel    tp on mesh [2] (" in text and "rank 0 of 2" in text
    assert "model.layers.0.self_attn.q_proj.weight" in text and "Shard(0)" in text
    assert "row maxima all-reduced over mesh dim 0" in text  # o_proj, down_proj: row-parallel


@pytest.mark.parametrize("name, expected", [
    ("block-cut-tp", "cut its [128, 128] blocks"),
    ("heads-tp", "num_attention_heads=3 is not divisible by the tensor-parallel degree 2"),
    ("rank-fails", "rank 1 could not load its shards"),
    ("rank-fails-between-collectives", "rank 1 could not load its shards"),
    ("moe8-block-tp-fp8", "the block-fp8 weight 'model.layers.0.mlp.experts.gate_up_proj' [4, 96, 32] "
                          "(_StridedShard(1, split_factor=2)) cut its [16, 16] blocks"),
    ("quant-block-cut-tp", "cut the [128, 128] blocks it is quantized in"),
])
def test_a_bad_configuration_fails_on_every_rank(two, name, expected):
    errors = [r.get("error", "") for r in two[name]]
    if name.startswith("rank-fails"):  # the failing rank raises its own error, the others name it
        assert "injected read failure on rank 1" in two[name][1]["error"]
        errors = errors[:1]
    assert all(expected in e for e in errors), errors
    assert len(set(errors)) == 1


@pytest.fixture(scope="module", params=["gloo", "nccl"])
def four(request, tmp_path_factory):
    backend = _backend(request, 4)
    root = tmp_path_factory.mktemp("dist4")
    uneven = _llama(root / "uneven", vocab_size=102, intermediate_size=66, num_key_value_heads=4)
    even = _llama(root / "even", num_key_value_heads=4)
    cases = [_case(f"uneven-fsdp-{s}", uneven, s, "fsdp") for s in ("bf16", "fp8")]
    cases += [_case("even-tp-bf16", even, "bf16", "tp"), _case("uneven-tp-bf16", uneven, "bf16", "tp")]
    return _spawn(4, cases, root / "out", backend)


def test_four_ranks_with_uneven_shards(four):
    for name in ("uneven-fsdp-bf16", "uneven-fsdp-fp8", "even-tp-bf16"):
        for r in four[name]:
            assert "error" not in r, r["error"]
            assert r["mismatches"] == [] and r["verify"] is True
            assert r["read"] == r["planned"]
            if "fsdp" in name:
                assert r["logits_max_diff"] == 0.0
            else:
                assert r["logits_max_diff"] <= 0.02 * r["logits_scale"]
    reads = [r["read"] for r in four["uneven-fsdp-bf16"]]
    assert sum(reads) == four["uneven-fsdp-bf16"][0]["whole"] and len(set(reads)) > 1  # uneven, all read once
    errors = {r["error"] for r in four["uneven-tp-bf16"]}
    assert len(errors) == 1 and "is not even" in errors.pop()


# -- in one process: the pieces, and every rank's plan with torch's fake process group --------------


@pytest.mark.parametrize("shape, box", [
    ((6, 4), ((0, 6), (0, 4))), ((6, 4), ((2, 5), (0, 4))), ((6, 4), ((0, 6), (1, 3))),
    ((3, 4, 5), ((1, 3), (0, 4), (2, 5))), ((3, 4, 5), ((0, 3), (1, 2), (0, 5))), ((7,), ((3, 7),)), ((), ()),
])
def test_box_runs_read_exactly_the_box(shape, box):
    from plugins.safetensors_format import box_runs

    whole = torch.arange(max(1, torch.Size(shape).numel()), dtype=torch.int16).reshape(shape)
    flat = whole.reshape(-1).view(torch.uint8)
    part = torch.empty(0, dtype=torch.uint8)
    for offset, length, at in box_runs(shape, box, 2):
        assert at == part.numel()
        part = torch.cat([part, flat[offset:offset + length]])
    want = whole[tuple(slice(a, b) for a, b in box)].contiguous()
    assert torch.equal(part.view(torch.int16).reshape(want.shape), want)


def test_the_safetensors_reader_preads_only_the_box(tmp_path, monkeypatch):
    import os

    from safetensors.torch import save_file

    import loaderkit
    from loaderkit.pipeline.stream import open_source
    from loaderkit.pipeline.discover import get_manager

    w = torch.randn(64, 48).to(torch.bfloat16)
    save_file({"w": w, "v": torch.randn(5)}, tmp_path / "m.safetensors")
    info = loaderkit.inspect(tmp_path / "m.safetensors")
    reader = open_source(info, get_manager())
    counted = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: counted.append(real(fd, bufs, off)) or counted[-1])
    try:
        assert reader.reads_box("w")
        assert torch.equal(reader.read_box("w", ((8, 24), (0, 48))), w[8:24])
        assert counted == [16 * 48 * 2]  # one run: whole rows
        counted.clear()
        assert torch.equal(reader.read_box("w", ((0, 64), (16, 32))), w[:, 16:32])
        assert len(counted) == 64 and sum(counted) == 64 * 16 * 2  # one run per row, nothing else
    finally:
        reader.close()


def _plan_rank(path, world, rank, how, strategy="bf16"):
    import loaderkit
    from loaderkit.pipeline.distribute import simulated_mesh

    with simulated_mesh(world, rank) as mesh:
        return loaderkit.plan(path, strategy, device_mesh=mesh, parallelize=how)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("how", ["fsdp", "tp"])
def test_the_ranks_boxes_cover_every_tensor_once(tmp_path, world, how):
    """Every element of every tensor is held by exactly one rank (or by all, replicated)."""
    path = _llama(tmp_path / "m", vocab_size=60, intermediate_size=60, num_attention_heads=6, num_key_value_heads=6,
                  hidden_size=36)
    if how == "tp" and world == 4:
        from loaderkit.errors import PlanError

        with pytest.raises(PlanError, match="num_attention_heads=6 is not divisible by the tensor-parallel degree 4"):
            _plan_rank(path, world, 0, how)
        return
    plans = [_plan_rank(path, world, r, how) for r in range(world)]
    _assert_every_element_held_once(plans)
    assert {p.parallel.rank for p in plans} == set(range(world))


def _assert_every_element_held_once(plans) -> None:
    """Every element of every tensor is in exactly one rank's boxes (all ranks' if replicated)."""
    for key, tp in plans[0].tensors.items():
        count = torch.zeros(tp.shape, dtype=torch.int32)
        for p in plans:
            for box in p.parallel.shards[key].boxes:
                count[tuple(slice(a, b) for a, b in box)] += 1
        replicated = plans[0].parallel.shards[key].placements == "Replicate()"
        assert bool((count == (len(plans) if replicated else 1)).all()), key


def test_packed_experts_cover_every_element_once_and_read_two_runs(tmp_path):
    """Mixtral under transformers' TP plan, every rank planned in one process: the packed
    ``gate_up_proj`` [E, 2I, H] shard is two boxes (its rows of gate, its rows of up), each read
    from its part of the experts' ``w1`` or ``w3`` alone; every element is held once."""
    path = _mixtral(tmp_path / "m")
    plans = [_plan_rank(path, 2, r, "tp") for r in range(2)]
    key = "model.layers.0.mlp.experts.gate_up_proj"
    sp = plans[1].parallel.shards[key]
    assert sp.placements == "_StridedShard(1, split_factor=2)" and sp.dim == 1
    assert sp.boxes == (((0, 4), (32, 64), (0, 32)), ((0, 4), (96, 128), (0, 32)))
    assert sp.nbytes_read == 4 * 2 * 32 * 32 * 4  # half of each expert's w1 and w3 (float32)
    down = plans[1].parallel.shards["model.layers.0.mlp.experts.down_proj"]
    assert down.placements == "Shard(2)" and down.boxes == (((0, 4), (0, 32), (32, 64)),)
    assert "0:4x32:64x0:32 + 0:4x96:128x0:32" in str(plans[1])
    _assert_every_element_held_once(plans)


def _meta_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    with torch.device("meta"):
        return MixtralForCausalLM(MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                                num_local_experts=4, num_experts_per_tok=2))


def test_transformers_moe_styles_map_to_parameter_styles():
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from loaderkit.parallel_styles import ParameterParallel
    from loaderkit.plugins.transformers_builder import tp_plan

    model = _meta_mixtral()
    assert model.tp_plan["model.layers.*.mlp.experts.gate_up_proj"] == "packed_colwise"
    styles = tp_plan(model, 2)
    experts = styles["model.layers.*.mlp.experts"]
    assert isinstance(experts, ParameterParallel) and experts.sum_output  # moe_tp_experts: partial sums all-reduced
    assert experts.placements == {"gate_up_proj": _StridedShard(1, split_factor=2), "down_proj": Shard(2)}
    assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in styles)  # folded into the module's style


@pytest.mark.parametrize("change, expected", [
    ({"model.layers.*.mlp.experts.down_proj": "packed_rowwise"}, "as 'packed_rowwise', which torch's parallel"),
    ({"model.layers.*.mlp.experts": "ep_dispatch_experts"}, "as 'ep_dispatch_experts', which torch's parallel"),
    ({"model.layers.*.mlp.experts": None}, "gives 'model.layers.*.mlp.experts' no style that runs it on their local"),
    ({"model.norm.weight": "rowwise"}, "not biases"),
])
def test_other_transformers_styles_stay_refused(change, expected):
    from loaderkit.errors import PlanError
    from loaderkit.plugins.transformers_builder import tp_plan

    model = _meta_mixtral()
    plan = {**model.tp_plan, **change}
    model._tp_plan = {k: v for k, v in plan.items() if v is not None}
    with pytest.raises(PlanError, match=re.escape(expected)):
        tp_plan(model, 2)


def test_parallelize_needs_a_mesh_and_a_known_style(tmp_path):
    import loaderkit
    from loaderkit.errors import UsageError

    path = _llama(tmp_path / "m")
    with pytest.raises(UsageError, match="parallelize= needs device_mesh="):
        loaderkit.plan(path, parallelize="fsdp")
    with pytest.raises(UsageError, match="takes a torch.distributed DeviceMesh"):
        loaderkit.plan(path, device_mesh="cpu")
    from loaderkit.pipeline.distribute import simulated_mesh

    with simulated_mesh(2, 0) as mesh:
        with pytest.raises(UsageError, match="unknown parallelize='zero3'"):
            loaderkit.plan(path, device_mesh=mesh, parallelize="zero3")
        with pytest.raises(UsageError, match="leave device_map, max_memory and offload_folder unset"):
            loaderkit.plan(path, device_mesh=mesh, device_map="auto")
        with pytest.raises(UsageError, match="maps module name patterns to torch.distributed.tensor.parallel styles"):
            loaderkit.plan(path, device_mesh=mesh, parallelize={"model.layers.*.mlp.up_proj": "colwise"})
        with pytest.raises(PlanError := __import__("loaderkit").errors.PlanError, match="matches no module"):
            loaderkit.plan(path, device_mesh=mesh, parallelize={"model.nothing.*": None, "model.layers.*.mlp.nope": _colwise()})


def _colwise():
    from torch.distributed.tensor.parallel import ColwiseParallel

    return ColwiseParallel()


def test_a_custom_parallelization_is_read_as_placed(tmp_path):
    """A callable parallelizes the skeleton itself; loaderkit reads the placements it gave."""
    from torch.distributed.fsdp import fully_shard

    path = _llama(tmp_path / "m")
    seen = []

    def shard_mlps_only(model, mesh):
        seen.append(type(model).__name__)
        for layer in model.model.layers:
            fully_shard(layer.mlp, mesh=mesh)

    plan = _plan_rank(path, 2, 1, shard_mlps_only)
    assert seen == ["LlamaForCausalLM"] and plan.parallel.style == "custom"
    sp = plan.parallel.shards
    assert sp["model.layers.0.mlp.up_proj.weight"].box == ((32, 64), (0, 32))
    assert sp["model.layers.0.self_attn.q_proj.weight"].placements == "Replicate()"
    assert sp["model.layers.0.mlp.up_proj.weight"].gathered


def test_plan_cli_shows_any_rank(tmp_path):
    from conftest import run_python

    path = _llama(tmp_path / "m")
    out = run_python(f"import sys; from loaderkit.cli import main; sys.exit(main(['plan', {path!r}, '-s', 'fp8', "
                     "'--world-size', '2', '--rank', '1', '--parallelize', 'tp']))")
    assert out.returncode == 0, out.stderr
    assert "parallel    tp on mesh [2] (fake), rank 1 of 2" in out.stdout
    assert "model.layers.0.self_attn.q_proj.weight" in out.stdout
    out = run_python(f"import sys; from loaderkit.cli import main; sys.exit(main(['plan', {path!r}, '--json', "
                     "'--world-size', '2', '--rank', '1']))")
    assert out.returncode == 0, out.stderr
    par = __import__("json").loads(out.stdout)["parallel"]
    assert (par["style"], par["rank"], par["world_size"]) == ("fsdp", 1, 2)
    assert par["shards"]["model.embed_tokens.weight"]["box"] == [[32, 64], [0, 32]]
