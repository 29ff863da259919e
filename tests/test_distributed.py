"""Loading over a device mesh (``load(..., device_mesh=, parallelize=)``), on CPU with gloo.

Each test spawns its ranks (``tests/dist_worker.py``); every rank loads the checkpoint in
parallel and compares with a single-process ``loaderkit.load`` of it, and the test asserts on
what every rank found. One spawn serves many cases.
"""

from __future__ import annotations

import json
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
    cases = [_case(f"llama-{p}-{s}", llama, s, p) for p in ("fsdp", "tp") for s in ("fp32", "bf16", "fp8")]
    cases += [_case(f"ct-{p}-{s}", ct, s, p) for p in ("fsdp", "tp") for s in ("fp8", "bf16")]
    cases += [_case(f"block-{p}-{s}", block, s, p) for p in ("fsdp", "tp") for s in ("fp8", "bf16")]
    cases += [
        _case("block-cut-tp", block_small, "fp8", "tp"),
        _case("block-cut-fsdp", block_small, "fp8", "fsdp"),
        _case("heads-tp", heads3, "bf16", "tp"),
        _case("rank-fails", llama, "bf16", "fsdp", fail_rank=1),
        _case("moe-fsdp-bf16", moe, "bf16", "fsdp"),
        _case("moe-fsdp-fp8", moe, "fp8", "fsdp"),
        _case("moe-tp", moe, "bf16", "tp"),
    ]
    return _spawn(2, cases, root / "out", backend)


LOADS = [f"llama-{p}-{s}" for p in ("fsdp", "tp") for s in ("fp32", "bf16", "fp8")]
LOADS += [f"ct-{p}-{s}" for p in ("fsdp", "tp") for s in ("fp8", "bf16")]
LOADS += [f"block-{p}-{s}" for p in ("fsdp", "tp") for s in ("fp8", "bf16")] + ["block-cut-fsdp"]
MOE = ["moe-fsdp-bf16", "moe-fsdp-fp8"]


@pytest.mark.parametrize("name", LOADS + MOE)
def test_every_tensor_equals_the_single_process_load(two, name):
    for r in two[name]:
        assert "error" not in r, r["error"]
        assert r["mismatches"] == [], r["mismatches"]
        assert r["verify"] is True
        assert set(r["params"].values()) == {"DTensor"} or "-tp-" in name  # norms stay plain under TP


@pytest.mark.parametrize("name", LOADS + MOE)
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
        if "fsdp" in name:
            assert r["read"] == r["whole"] // 2  # every tensor halves along its rows
        elif not name.endswith("fp8") or name.startswith(("ct", "block")):
            sharded = r["whole"] - r["replicated"]
            assert r["read"] == r["replicated"] + sharded // 2
        else:  # fp8 made on load: row-parallel weights read whole rows for their scales
            assert r["replicated"] + (r["whole"] - r["replicated"]) // 2 < r["read"] < r["whole"]


@pytest.mark.parametrize("name", MOE)
def test_fused_experts_are_read_whole_and_the_plan_says_so(two, name):
    r = two[name][0]
    assert r["read"] == r["planned"]  # what it preads (the fused experts come through the memory map)
    assert "built by the model's library from 4 checkpoint tensors: read whole, then cut" in r["plan"]


def test_tied_weights_stay_one_parameter(two):
    for name in ("llama-fsdp-bf16", "llama-tp-bf16", "llama-tp-fp8"):
        assert all(r["tied"] for r in two[name])


def test_the_plan_shows_each_rank_its_share(two):
    text = two["llama-tp-fp8"][0]["plan"]
    assert "parallel    tp on mesh [2] (" in text and "rank 0 of 2" in text
    assert "model.layers.0.self_attn.q_proj.weight" in text and "Shard(0)" in text
    assert "per-row scales made on load need whole rows" in text


@pytest.mark.parametrize("name, expected", [
    ("block-cut-tp", "cut its [128, 128] blocks"),
    ("heads-tp", "num_attention_heads=3 is not divisible by the tensor-parallel degree 2"),
    ("rank-fails", "rank 1 could not load its shards"),
    ("moe-tp", "'packed_colwise', which torch's parallel styles do not express"),
])
def test_a_bad_configuration_fails_on_every_rank(two, name, expected):
    errors = [r.get("error", "") for r in two[name]]
    if name == "rank-fails":  # the failing rank raises its own error, the others name it
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
