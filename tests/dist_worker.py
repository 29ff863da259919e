"""Ranks for the distributed tests: ``python tests/dist_worker.py SPEC.json`` spawns
``spec["world"]`` processes on a gloo mesh (CPU) or, with ``"backend": "nccl"``, one per GPU; each runs every case of the spec with
``loaderkit.load(..., device_mesh=mesh, parallelize=...)`` and compares what it got with a
single-process ``loaderkit.load`` of the same checkpoint, made in the same rank:

* every parameter and buffer the parallel load made whole (``full_tensor()``; fp8 gathered as
  bytes, since gloo has no fp8) must equal the single-process tensor bitwise;
* a tensor-parallel scale must equal the single-process scale's part for the rank's rows
  (or blocks), and every tensor-parallel fp8 shard, decoded with it, must equal the part of the
  single-process decoded weight;
* the bytes ``pread`` while reading shards are counted.

Each rank writes ``OUT/<case>.<rank>.json``; the test reads them.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def _whole(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t.detach()
    if t.dtype.itemsize == 1 and t.dtype.is_floating_point:  # gloo cannot gather fp8: gather the bytes
        local = t.to_local().view(torch.uint8)
        d = DTensor.from_local(local, t.device_mesh, t.placements, shape=t.shape, stride=t.stride(), run_check=False)
        return d.full_tensor().view(t.dtype)
    return t.full_tensor()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize == 1 and a.dtype.is_floating_point:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def _compare(model, ref, plan) -> list[str]:
    from loaderkit.kernels.quant import decode_stored
    from loaderkit.pipeline.distribute import _scale_part

    bad = []
    mine = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    theirs = dict(ref.named_parameters(remove_duplicate=False)) | dict(ref.named_buffers(remove_duplicate=False))
    local_scales = _tp_scales(plan)
    for k, want in theirs.items():
        got = mine.get(k)
        if got is None:
            bad.append(f"{k}: missing")
        elif k not in local_scales:
            whole = _whole(got)
            if not _same(whole, want.detach()):
                bad.append(f"{k}: differs ({whole.dtype} {list(whole.shape)} vs {want.dtype} {list(want.shape)})")
        else:  # a tensor-parallel shard's scale: the part of the single-process scale for its rows
            wkey, wtp = local_scales[k]
            sp = plan.parallel.shards[wkey]
            scale_parts = [_scale_part(want.detach(), box, wtp.shape, wtp.block) for box in sp.boxes]
            if not _same(got.detach(), _joined(scale_parts, sp).contiguous()):
                bad.append(f"{k}: not the rank's part of the scale")
            decoded = decode_stored(mine[wkey].to_local(), torch.float32, got, wtp.granularity, wtp.block)
            whole_dec = decode_stored(theirs[wkey].detach(), torch.float32, want, wtp.granularity, wtp.block)
            if not torch.equal(decoded, _local_part(whole_dec, sp)):
                bad.append(f"{wkey}: the shard decoded with its scale differs from the single-process weight")
    return bad


def _local_part(whole: torch.Tensor, sp) -> torch.Tensor:
    """The rank's part of a whole tensor: its box, or its packed shard's boxes concatenated."""
    parts = [whole[tuple(slice(a, b) for a, b in box)] for box in sp.boxes]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=sp.dim)


def _joined(parts: list[torch.Tensor], sp) -> torch.Tensor:
    """A packed shard's scale from its pieces' parts: one scale when it does not vary along the
    packed dimension, else the parts concatenated along it."""
    first = parts[0]
    if len(parts) == 1 or first.numel() == 1 or first.dim() <= sp.dim or first.shape[sp.dim] == 1:
        return first
    return torch.cat(parts, dim=sp.dim)


def _packed_shards(model, ref, rank: int, world: int) -> dict[str, bool]:
    """For each packed (strided) parameter: whether its local shard is the rank's slice of each
    packed block of the single-process tensor (transformers' ``packed_colwise``: gate rows
    ``r/n`` and up rows ``r/n``), cut here by plain slicing."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard

    theirs = dict(ref.named_parameters())
    out = {}
    for k, p in model.named_parameters():
        if isinstance(p, DTensor) and isinstance(p.placements[0], _StridedShard):
            pl = p.placements[0]
            blocks = theirs[k].detach().chunk(pl.split_factor, dim=pl.dim)
            want = torch.cat([b.chunk(world, dim=pl.dim)[rank] for b in blocks], dim=pl.dim)
            out[k] = _same(p.to_local().detach(), want.contiguous())
    return out


def _tp_scales(plan) -> dict[str, tuple[str, object]]:
    out = {}
    for tp in plan.tensors.values():
        sp = plan.parallel.shards[tp.key]
        if tp.scale and not sp.gathered:
            mod = tp.key.rpartition(".")[0]
            out[f"{mod}.{tp.scale}" if mod else tp.scale] = (tp.key, tp)
    return out


def run_case(case: dict, out: Path, rank: int, mesh) -> None:
    import loaderkit
    from loaderkit.errors import CorruptCheckpointError
    from loaderkit.pipeline import distribute, stream

    result: dict = {"rank": rank}
    counted = [0]
    real_preadv, real_read = os.preadv, distribute.read_shards

    def counting(*a, **k):
        def preadv(fd, bufs, offset, *rest):
            n = real_preadv(fd, bufs, offset, *rest)
            counted[0] += n
            return n

        os.preadv = preadv
        try:
            return real_read(*a, **k)
        finally:
            os.preadv = real_preadv

    reads = [0]
    real_box = stream.Source.read_box

    def failing_box(self, key, box):  # the failing rank's 3rd read fails, mid-load
        reads[0] += 1
        if reads[0] == 3:
            raise CorruptCheckpointError(f"injected read failure on rank {rank}")
        return real_box(self, key, box)

    distribute.read_shards = counting
    if case.get("fail_rank") == rank:
        stream.Source.read_box = failing_box
    strategy = loaderkit.strategy(case["strategy"], **case["options"]) if case.get("options") else case["strategy"]
    try:
        model = loaderkit.load(case["path"], strategy, device_mesh=mesh, parallelize=case["parallelize"])
    except loaderkit.LoaderKitError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        model = None
    finally:
        distribute.read_shards = real_read
        stream.Source.read_box = real_box
    if model is not None:
        result["params"] = {n: type(p).__name__ for n, p in model.named_parameters()}  # before a forward
        plan = loaderkit.plan_of(model)
        ref = loaderkit.load(case["path"], strategy, device_map=plan.device.device)
        ids = torch.tensor(case["ids"], device=plan.device.device)
        with torch.no_grad():
            got, want = model(ids).logits, ref(ids).logits
            again = model(ids).logits
        result.update(
            mismatches=_compare(model, ref, plan),
            verify=loaderkit.verify(model).ok,
            logits_max_diff=float((got.float() - want.float()).abs().max()),
            logits_scale=float(want.float().abs().max()),
            logits_repeat=bool(torch.equal(got, again)),
            read=counted[0],
            planned=sum(_data_bytes(plan, sp) for sp in plan.parallel.shards.values()),
            whole=sum(_stored(plan, t) for t in plan.tensors.values()),
            replicated=sum(_stored(plan, t) for t in plan.tensors.values()
                           if "Shard" not in plan.parallel.shards[t.key].placements),
            tied=model.get_output_embeddings().weight is model.get_input_embeddings().weight,
            packed=_packed_shards(model, ref, rank, dist.get_world_size()),
            plan=str(plan) if rank == 0 else "",
        )
    (out / f"{case['name']}.{rank}.json").write_text(json.dumps(result))


def _stored(plan, tp) -> int:
    """Bytes of the checkpoint tensors ``tp`` is made from (several, when the library fuses them)."""
    return sum(plan.checkpoint.tensors[k].nbytes for k in (tp.sources or (tp.source,)))


def _data_bytes(plan, sp) -> int:
    tp = plan.tensors[sp.key]
    if tp.sources and sp.read == tuple((0, n) for n in tp.shape):
        return 0  # fused by the library from tensors it reads whole, through the memory map
    return sp.nbytes_read - sum(plan.checkpoint.tensors[k].nbytes for k in tp.companions)


def rank_main(rank: int, spec: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
    torch.set_num_threads(1)
    backend = spec.get("backend", "gloo")
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=spec["world"])
    try:
        mesh = init_device_mesh("cuda" if backend == "nccl" else "cpu", (spec["world"],))
        for case in spec["cases"]:
            try:
                run_case(case, Path(spec["out"]), rank, mesh)
            except Exception:
                (Path(spec["out"]) / f"{case['name']}.{rank}.json").write_text(
                    json.dumps({"rank": rank, "crash": traceback.format_exc()}))
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.multiprocessing.spawn(rank_main, args=(spec,), nprocs=spec["world"], join=True)
