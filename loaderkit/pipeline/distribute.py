"""Loading over a device mesh: ``load(path, strategy, device_mesh=mesh, parallelize=...)``.

Every rank negotiates the same plan from the headers, as a single process does. Then, still
before any tensor data is read:

1. the skeleton (on the meta device) gets the plan's storage dtypes — fp8 where the plan keeps
   or makes fp8 — and its tied parameters become one parameter;
2. the parallelization is applied on meta, by torch itself: FSDP2 ``fully_shard`` (one group
   per block the model's library declares unsplittable, then the root), ``parallelize_module``
   with the library's own tensor-parallel plan (:attr:`ModelFacts.tp_plan`) or the user's, or
   the user's own ``callable(model, mesh)``;
3. each parameter's placements give this rank's box of it
   (``compute_local_shape_and_global_offset``; a strided shard, a packed gate/up weight, is
   several boxes, its ``pieces``, each planned like a box), and the plan records, per tensor,
   the box and the part of the checkpoint tensor read for it
   (:class:`~loaderkit.contract.plan.ShardPlan`);
   impossible shardings (a tensor-parallel split that is uneven or cuts an fp8 block) are a
   :class:`PlanError` on every rank, before anything is read.

Loading then reads only those parts (the safetensors readers ``pread`` exactly the box),
converts them as the plan says — casts element by element, fp8 kept with the scale of its own
rows or blocks, fp8 made on load with per-row scales computed from whole rows, dequantization by
the checkpoint's own scheme on the box — and fills DTensors with the same placements. The ranks
then agree: a rank that failed makes every rank raise, naming it, and no rank is left waiting in
a collective. Cast rules see FSDP's gathered parameters as plain tensors and tensor-parallel
shards as DTensors, which they decode locally with the shard's own scale.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..contract.dtypes import is_fp8, to_torch
from ..contract.plan import ParallelPlan, Plan, ShardPlan, TensorPlan
from ..contract.records import ModelFacts
from ..errors import LoaderKitError, PlanError, UsageError

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Parallel:
    """What ``device_mesh=`` and ``parallelize=`` asked for."""

    mesh: Any
    how: Any  # "fsdp", "tp", a dict of module pattern -> parallel style, or a callable(model, mesh)

    @property
    def style(self) -> str:
        return self.how if isinstance(self.how, str) else "tp-plan" if isinstance(self.how, dict) else "custom"

    @property
    def device(self) -> str:
        """This rank's device: the mesh's device type, at the current index for accelerators."""
        kind = self.mesh.device_type
        if kind == "cpu":
            return "cpu"
        return f"{kind}:{torch.get_device_module(kind).current_device()}"


def request(device_mesh: Any, parallelize: Any) -> Parallel | None:
    """Check ``device_mesh=`` / ``parallelize=``; ``None`` for a single-process load."""
    if device_mesh is None:
        if parallelize is not None:
            raise UsageError("parallelize= needs device_mesh=: pass the torch.distributed DeviceMesh to load over")
        return None
    from torch.distributed.device_mesh import DeviceMesh

    if not isinstance(device_mesh, DeviceMesh):
        raise UsageError(f"device_mesh= takes a torch.distributed DeviceMesh (init_device_mesh), not "
                         f"{type(device_mesh).__name__}")
    how = "fsdp" if parallelize is None else parallelize
    if isinstance(how, str) and how not in ("fsdp", "tp"):
        raise UsageError(f"unknown parallelize={how!r}; use 'fsdp', 'tp', a dict of module pattern -> torch "
                         "parallel style, or a callable(model, mesh)")
    if not isinstance(how, (str, dict)) and not callable(how):
        raise UsageError(f"parallelize= takes 'fsdp', 'tp', a dict or a callable, not {type(how).__name__}")
    if (how == "tp" or isinstance(how, dict)) and device_mesh.ndim != 1:
        raise UsageError(f"tensor parallelism here takes a 1-D mesh (got {device_mesh.ndim}-D); for TP combined "
                         "with FSDP pass parallelize=callable(model, mesh) that applies both")
    return Parallel(device_mesh, how)


@contextlib.contextmanager
def simulated_mesh(world_size: int, rank: int):
    """A 1-D CPU mesh over torch's fake process group, in this one process: any rank's plan can
    be made without starting the others (``loaderkit plan --world-size N --rank R``). Planning
    runs no collective, so the plan is the one that rank would make."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not 0 <= rank < world_size:
        raise UsageError(f"--rank {rank} is not a rank of a world of {world_size}")
    if dist.is_initialized():
        raise UsageError("a process group is already initialized in this process: plan with its own mesh")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


# -- plan time ------------------------------------------------------------------------------------


def plan_shards(model: torch.nn.Module, plan: Plan, facts: ModelFacts, par: Parallel, reader, keymap=None) -> Plan:
    """Storage dtypes on meta, the parallelization on meta, and what this rank reads of each
    tensor. ``reader`` is the checkpoint's opened reader (asked only whether it reads boxes);
    ``keymap`` the library's key mapping (its fused tensors may be built by rows)."""
    import torch.distributed as dist

    from . import stream

    _check_plan(plan)
    with torch.no_grad():
        stream.assign(model, plan, stream.Loaded({tp.key: stream._meta_like(tp) for tp in plan.tensors.values()}))
    groups = _parallelize(model, plan, facts, par)
    _retie(model, plan)
    managed = _fsdp_managed(model)
    named = dict(model.named_modules(remove_duplicate=False))
    fused = keymap.fused if keymap is not None else {}
    shards = {}
    for tp in plan.tensors.values():
        t = _tensor(named, tp.key)
        shards[tp.key] = _shard(t, tp, plan, id(t) in managed, reader, par.mesh, fused.get(tp.key))
    mesh = par.mesh
    pp = ParallelPlan(
        style=par.style, rank=dist.get_rank(), world_size=dist.get_world_size(), mesh=tuple(mesh.shape),
        mesh_dims=tuple(mesh.mesh_dim_names or ()), backend=str(dist.get_backend()), shards=shards, groups=groups,
    )
    return plan.replace(parallel=pp)


def _check_plan(plan: Plan) -> None:
    if plan.device_map is not None and len(set(plan.device_map.values())) > 1 or plan.offload_folder:
        raise UsageError("device_mesh= places every rank's shard on its own device: device_map policies, "
                         "max_memory and offloading do not apply")
    if plan.loras:
        raise UsageError("LoRAs are not applied when loading over a device mesh yet: load without lora= and "
                         "merge the LoRA into the checkpoint first")
    int8 = next((tp.key for tp in plan.tensors.values() if tp.target_dtype == "int8" and tp.conversion == "quantize"), None)
    if int8 is not None:
        raise UsageError(f"the plan stores {int8} in int8, a CPU weight-only layout that is not sharded over a "
                         "device mesh; use strategy 'fp8' (or a float strategy) with device_mesh=")


def _tensor(named: dict, key: str) -> torch.Tensor:
    mod, _, local = key.rpartition(".")
    m = named[mod]
    return m._parameters[local] if local in m._parameters else m._buffers[local]


def _parallelize(model: torch.nn.Module, plan: Plan, facts: ModelFacts, par: Parallel) -> tuple[str, ...]:
    """Apply the parallelization to the meta skeleton; returns FSDP's groups (module names)."""
    how = par.how
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        named = dict(model.named_modules())
        blocks = [n for n, m in named.items() if n and type(m).__name__ in set(facts.no_split)]
        blocks = [n for n in blocks if not any(n.startswith(o + ".") for o in blocks if o != n)]
        groups = (*blocks, "")
        _check_gatherable(model, named, blocks, par)
        for n in blocks:
            fully_shard(named[n], mesh=par.mesh)
        fully_shard(model, mesh=par.mesh)
        return groups
    if how == "tp" or isinstance(how, dict):
        from torch.distributed.tensor.parallel import parallelize_module

        if how == "tp":
            if facts.tp_plan is None:
                raise PlanError(f"{plan.checkpoint.path}: {plan.model_type}'s library declares no tensor-parallel plan; "
                                "pass parallelize={module pattern: torch parallel style} or parallelize='fsdp'",
                                path=plan.checkpoint.path)
            styles = facts.tp_plan(par.mesh.size())
        else:
            styles = how
            _check_styles(styles)
            _check_patterns(model, styles)  # a library's plan may name modules some of its models lack
        styles = {k: v for k, v in styles.items() if v is not None}
        parallelize_module(model, par.mesh, styles)
        _check_even(model, plan)
        return ()
    out = how(model, par.mesh)
    if out is not None and out is not model:
        raise UsageError("parallelize=callable(model, mesh) must parallelize the model in place (return None or "
                         "the model itself)")
    return ()


def _check_styles(styles: dict) -> None:
    from torch.distributed.tensor.parallel import ParallelStyle

    for pattern, style in styles.items():
        if not isinstance(pattern, str) or not (style is None or isinstance(style, ParallelStyle)):
            raise UsageError(f"parallelize={{{pattern!r}: {style!r}}}: a tensor-parallel plan maps module name "
                             "patterns to torch.distributed.tensor.parallel styles (ColwiseParallel(), "
                             "RowwiseParallel(), ...) or None; parallelize='tp' reads the model library's own plan")


def _check_patterns(model: torch.nn.Module, styles: dict) -> None:
    import fnmatch

    names = [n for n, _ in model.named_modules() if n]
    for pattern in styles:
        parts = pattern.split(".")
        if not any(len(n.split(".")) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(n.split("."), parts))
                   for n in names):
            raise PlanError(f"the tensor-parallel plan names {pattern!r}, which matches no module of "
                            f"{type(model).__name__}; check the pattern (e.g. 'model.layers.*.self_attn.q_proj')")


def _check_gatherable(model: torch.nn.Module, named: dict, blocks: list[str], par: Parallel) -> None:
    """gloo cannot all-gather fp8: an FSDP group whose parameters are all fp8 fails at the
    first forward there (groups of several dtypes are gathered as bytes and work)."""
    import torch.distributed as dist

    if str(dist.get_backend(par.mesh.get_group(0) if par.mesh.ndim == 1 else None)) != "gloo":
        return
    for n in (*blocks, ""):
        inner = [b + "." for b in blocks if b != n and (not n or b.startswith(n + "."))]
        dtypes = {p.dtype for k, p in named[n].named_parameters() if not any((f"{n}.{k}" if n else k).startswith(i) for i in inner)}
        if dtypes and all(is_fp8(str(d).removeprefix("torch.")) for d in dtypes):
            raise PlanError(f"FSDP group {n or '(root)'!r} holds only fp8 parameters, which the gloo backend cannot "
                            "all-gather; use NCCL, or a strategy that keeps a parameter of that group in "
                            "another dtype")


def _check_even(model: torch.nn.Module, plan: Plan) -> None:
    """A tensor-parallel split must be even: the model's own reshapes (heads) assume it."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    named = dict(model.named_modules(remove_duplicate=False))
    for tp in plan.tensors.values():
        t = _tensor(named, tp.key)
        if not isinstance(t, DTensor):
            continue
        for i, p in enumerate(t.placements):
            if isinstance(p, _StridedShard) and t.shape[p.dim] % (t.device_mesh.size(i) * p.split_factor):
                raise PlanError(f"{plan.checkpoint.path}: tensor parallelism splits each of the {p.split_factor} "
                                f"packed blocks of {tp.key!r} (dimension {p.dim} of size {t.shape[p.dim]}) over "
                                f"{t.device_mesh.size(i)} ranks, which is not even; use a degree that divides "
                                f"{t.shape[p.dim] // p.split_factor}, or parallelize='fsdp'",
                                path=plan.checkpoint.path, tensor=tp.key)
            if isinstance(p, Shard) and t.shape[p.dim] % t.device_mesh.size(i):
                raise PlanError(f"{plan.checkpoint.path}: tensor parallelism splits {tp.key!r} along dimension "
                                f"{p.dim} of size {t.shape[p.dim]} over {t.device_mesh.size(i)} ranks, which is not "
                                "even; use a degree that divides it, or parallelize='fsdp'",
                                path=plan.checkpoint.path, tensor=tp.key)


def _retie(model: torch.nn.Module, plan: Plan) -> None:
    """Tied keys share one parameter again (parallelize_module distributes each module's own)."""
    named = dict(model.named_modules(remove_duplicate=False))
    for tp in plan.tensors.values():
        if not tp.also:
            continue
        first = _tensor(named, tp.key)
        for k in tp.also:
            mod, _, local = k.rpartition(".")
            other = _tensor(named, k)
            if other is first:
                continue
            if _placements(other) != _placements(first):
                raise PlanError(f"{plan.checkpoint.path}: {tp.key!r} and {k!r} are tied, but the parallelization "
                                f"places them differently ({_placements(first)} vs {_placements(other)}); place "
                                "them alike", path=plan.checkpoint.path, tensor=k)
            named[mod]._parameters[local] = first


def _placements(t: torch.Tensor) -> str:
    """``"Shard(0)"``, ``"Replicate()"``, ``"Shard(0), Replicate()"`` (one per mesh dimension)."""
    placements = getattr(t, "placements", None)
    if placements is None:
        return "Replicate()"
    return ", ".join(f"{type(p).__name__}({getattr(p, 'dim', '')}"
                     + (f", split_factor={p.split_factor})" if hasattr(p, "split_factor") else ")") for p in placements)


def _fsdp_managed(model: torch.nn.Module) -> set[int]:
    """ids of the parameters FSDP2 manages: gathered whole before each forward."""
    from torch.distributed.fsdp import FSDPModule

    out: set[int] = set()
    for m in model.modules():
        if isinstance(m, FSDPModule):
            group = m._get_fsdp_state()._fsdp_param_group
            for fp in group.fsdp_params if group is not None else ():
                out.add(id(fp.sharded_param))
    return out


def _box(t: torch.Tensor, mesh) -> Box:
    """This rank's box of ``t``, from its placements on ``mesh`` (the requested mesh when the
    tensor's equals it: torch may hand an equal mesh object made for another simulated rank of
    this process, and only the requested one knows this rank's coordinate)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return tuple((0, n) for n in t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    own = mesh if t.device_mesh == mesh else t.device_mesh
    shape, offset = compute_local_shape_and_global_offset(t.shape, own, t.placements)
    return tuple((o, o + n) for o, n in zip(offset, shape))


def _pieces(t: torch.Tensor, mesh) -> tuple[int, tuple[Box, ...]] | None:
    """A strided shard's boxes (``_StridedShard``: a packed gate/up weight, where each rank holds
    its slice of every packed block), in the order its local tensor holds them, and the
    dimension they are concatenated along; ``None`` for a tensor without a strided placement,
    whose box is :func:`_box`. Worked out by sharding each dimension's indices as the placements
    shard the tensor, so it is torch's own split (``_split_tensor``)."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(t, DTensor) or not any(isinstance(p, _StridedShard) for p in t.placements):
        return None
    own = mesh if t.device_mesh == mesh else t.device_mesh
    coord = own.get_coordinate()
    idx = [torch.arange(n) for n in t.shape]
    for i, p in enumerate(t.placements):
        if isinstance(p, _StridedShard):
            one = _StridedShard(0, split_factor=p.split_factor)
        elif isinstance(p, Shard):
            one = Shard(0)
        else:
            continue
        d = p.dim % t.dim()
        idx[d] = one._split_tensor(idx[d], own.size(i), with_padding=False)[0][coord[i]]
    runs = [_runs(v.tolist()) for v in idx]
    split = [d for d, r in enumerate(runs) if len(r) > 1]
    if len(split) > 1:
        raise PlanError(f"a strided placement {_placements(t)} of a {list(t.shape)} tensor splits dimensions "
                        f"{split} into several runs each; loaderkit reads a packed shard split along one dimension")
    base = tuple(r[0] if r else (0, 0) for r in runs)
    if not split:
        return None if all(r for r in runs) else (0, (base,))
    d = split[0]
    return d, tuple(base[:d] + (r,) + base[d + 1:] for r in runs[d])


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Consecutive ascending runs of ``values`` as ``(start, stop)``, in order."""
    out: list[tuple[int, int]] = []
    for v in values:
        if out and out[-1][1] == v:
            out[-1] = (out[-1][0], v + 1)
        else:
            out.append((v, v + 1))
    return out


def _shard(t: torch.Tensor, tp: TensorPlan, plan: Plan, gathered: bool, reader, mesh, fused=None) -> ShardPlan:
    """This rank's shard of ``tp`` and what is read for it: one box, or the pieces of a packed
    (strided) shard, each planned as a box of its own."""
    packed = _pieces(t, mesh)
    if packed is None:
        return _shard_box(t, tp, plan, gathered, reader, mesh, fused, _box(t, mesh))
    dim, boxes = packed
    pieces = tuple(_shard_box(t, tp, plan, gathered, reader, mesh, fused, b) for b in boxes)
    if len(pieces) == 1:
        return pieces[0]
    whys = list(dict.fromkeys(p.why for p in pieces if p.why))
    once = _reads_whole_once(tp, pieces)  # every piece needs the whole tensor: it is read once
    nbytes = pieces[0].nbytes_read if once else (sum(p.nbytes_read for p in pieces)
                                                 - (len(pieces) - 1) * _companion_bytes(tp, plan))  # scales once
    return ShardPlan(key=tp.key, placements=_placements(t), box=_hull([p.box for p in pieces]),
                     read=_hull([p.read for p in pieces]), nbytes_read=nbytes,
                     why="; ".join([f"a packed shard: {len(pieces)} pieces along dimension {dim}", *whys]),
                     gathered=gathered, reduce=pieces[0].reduce, pieces=pieces, dim=dim)


def _reads_whole_once(tp: TensorPlan, pieces) -> bool:
    """Whether every piece of a packed shard reads the whole tensor (a scale over all of it, or a
    fused tensor that is built whole): it is then read and converted once, and cut."""
    return len(pieces) > 1 and all(p.read == _full(tp) and not p.reduce for p in pieces)


def _hull(boxes: list[Box]) -> Box:
    return tuple((min(b[d][0] for b in boxes), max(b[d][1] for b in boxes)) for d in range(len(boxes[0])))


def _companion_bytes(tp: TensorPlan, plan: Plan) -> int:
    return sum(plan.checkpoint.tensors[k].nbytes for k in tp.companions)


def _source_boxes(tp: TensorPlan, fused, box: Box, ckpt) -> dict[str, Box] | None:
    """The part of each source of a per-row fused tensor that makes ``box`` of it
    (``FusedTensor.cat_dim``): index ``e`` of dimension 0 is made of its own sources; along
    ``cat_dim`` they lie side by side, and every other fused dimension ``d`` is the sources'
    ``d - 1``. Sources the box does not reach get an empty box. ``None`` where the library's
    operations do not say how (``cat_dim`` -1) or the sources' shapes do not fit."""
    rows = fused.per_row if fused is not None else ()
    cat = fused.cat_dim if fused is not None else -1
    if not rows or len(rows) != tp.shape[0] or cat < 0 or cat >= len(tp.shape):
        return None
    out: dict[str, Box] = {}
    for per in rows[box[0][0]:box[0][1]]:
        if cat == 0 and len(per) != 1:
            return None
        offset = 0
        for k in per:
            shape = ckpt.tensors[k].shape
            if len(shape) != len(tp.shape) - 1:
                return None
            sbox = list(box[1:])
            if cat:
                a, z = box[cat]
                lo, hi = max(a - offset, 0), min(z - offset, shape[cat - 1])
                sbox[cat - 1] = (lo, hi) if lo < hi else (0, 0)
                offset += shape[cat - 1]
            if any(not (0 <= lo <= hi <= n) for (lo, hi), n in zip(sbox, shape)):
                return None
            out[k] = tuple(sbox)
        if cat and offset != tp.shape[cat]:
            return None
    return out


def _fused_part(t: torch.Tensor, tp: TensorPlan, plan: Plan, gathered: bool, reader, mesh, fused, box: Box):
    """The ShardPlan of a per-row fused tensor's box that cuts more than its rows (a
    tensor-parallel shard of stacked experts): built by the library's operations from the parts
    of its sources that make the box, read as boxes. ``None`` where that is not possible, or
    does not give the single-process values; the fused tensor is then read whole."""
    ckpt = plan.checkpoint
    full = _full(tp)
    qw = ckpt.quantization.weights.get(tp.sources[0]) if ckpt.quantization is not None and tp.companions else None
    block = qw.block if qw is not None and qw.granularity == "block" else None
    if block is not None and _blocks(box, tp.shape, block) != box:
        if tp.conversion == "none" and not gathered:
            raise PlanError(f"{ckpt.path}: the shards of the block-fp8 weight {tp.key!r} {list(tp.shape)} "
                            f"({_placements(t)}) cut its {list(block)} blocks, so they cannot be decoded with their "
                            "own scales; use a degree whose shards fall on block boundaries, dequantize it "
                            "(strategy 'bf16'), or parallelize='fsdp'", path=ckpt.path, tensor=tp.key)
        return None  # dequantized by whole blocks: read whole, then cut
    read, why, reduce = box, "", ()
    if tp.conversion == "quantize":
        if tp.granularity == "tensor" or tp.granularity == "block":
            return None  # a scale over the whole tensor (or over blocks of stacked rows): read whole
        if tp.granularity != "none" and box[-1] != full[-1]:
            reduce = _row_sharing_dims(t, mesh, tp, gathered)
            if not reduce:
                read, why = box[:-1] + (full[-1],), "per-row scales made on load need whole rows"
    parts = _source_boxes(tp, fused, read, ckpt)
    if parts is None or not all(reader.reads_box(k) for k, b in parts.items() if _numel(b)):
        return None
    itemsize = {k: ckpt.tensors[k].torch_dtype.itemsize for k in parts}
    need = [k for k, b in parts.items() if _numel(b)]
    nbytes = sum(_numel(b) * itemsize[k] for k, b in parts.items()) + _companion_bytes(tp, plan)
    scales = " and every source's scale" if tp.companions else ""
    note = f"built by the model's library from its part of {len(need)} of {len(tp.sources)} checkpoint tensors{scales}"
    return ShardPlan(key=tp.key, placements=_placements(t), box=box, read=read, nbytes_read=nbytes,
                     why=f"{note}; {why}" if why else note, gathered=gathered, reduce=reduce)


def _shard_box(t: torch.Tensor, tp: TensorPlan, plan: Plan, gathered: bool, reader, mesh, fused, box: Box) -> ShardPlan:
    """This rank's box ``box`` of ``tp`` and what is read for it."""
    ckpt = plan.checkpoint
    full = tuple((0, n) for n in tp.shape)
    read, why = box, ""
    if tp.sources:
        rows = fused.per_row if fused is not None else ()
        # (a per-tensor scale made on load needs every row's maximum: such a tensor is read whole)
        whole_scale = tp.conversion == "quantize" and tp.granularity == "tensor"
        if rows and len(rows) == tp.shape[0] and box[1:] == full[1:] and box != full and not whole_scale:
            need = [k for per in rows[box[0][0]:box[0][1]] for k in per]  # this rank's experts' tensors
            scales = " and every source's scale" if tp.companions else ""
            return ShardPlan(key=tp.key, placements=_placements(t), box=box, read=box,
                             nbytes_read=sum(ckpt.tensors[k].nbytes for k in (*need, *tp.companions)), gathered=gathered,
                             why=f"built by the model's library from its rows' {len(need)} of {len(tp.sources)} "
                                 f"checkpoint tensors{scales}")
        if box != full:
            part = _fused_part(t, tp, plan, gathered, reader, mesh, fused, box)
            if part is not None:
                return part
        read, why = full, f"built by the model's library from {len(tp.sources)} checkpoint tensors: read whole, then cut"
        nbytes = sum(ckpt.tensors[k].nbytes for k in (*tp.sources, *tp.companions))
        return ShardPlan(key=tp.key, placements=_placements(t), box=box, read=read, nbytes_read=nbytes, why=why,
                         gathered=gathered)
    gran = tp.granularity
    if tp.conversion == "quantize" and box != full:
        if gran == "tensor":
            read, why = full, "a per-tensor scale made on load needs the whole tensor"
        elif gran == "block" and gathered:
            read, why = full, "block scales made on load are kept whole under FSDP"
        elif gran == "block":
            if _blocks(box, tp.shape, tp.block) != box:
                raise PlanError(f"{ckpt.path}: the shards of {tp.key!r} {list(tp.shape)} ({_placements(t)}) cut the "
                                f"{list(tp.block)} blocks it is quantized in, so they cannot be decoded with their own "
                                "scales; use a degree whose shards fall on block boundaries, per-channel scales, or "
                                "parallelize='fsdp'", path=ckpt.path, tensor=tp.key)
        elif gran != "none" and box[-1] != full[-1]:
            reduce = _row_sharing_dims(t, mesh, tp, gathered)
            if reduce:
                return ShardPlan(key=tp.key, placements=_placements(t), box=box, read=box,
                                 nbytes_read=_numel(box) * ckpt.tensors[tp.source].torch_dtype.itemsize,
                                 gathered=gathered, reduce=reduce)
            read, why = box[:-1] + (full[-1],), "per-row scales made on load need whole rows"
    qw = ckpt.quantization.weights.get(tp.source) if ckpt.quantization is not None else None
    block = qw.block if qw is not None and qw.granularity == "block" else None
    if block is not None and box != full:
        aligned = _blocks(box, tp.shape, block)
        if tp.conversion == "dequantize":
            read, why = aligned, "dequantized by whole fp8 blocks"
        elif aligned != box and not gathered:
            raise PlanError(f"{ckpt.path}: the shards of the block-fp8 weight {tp.source!r} {list(tp.shape)} "
                            f"({_placements(t)}) cut its {list(block)} blocks, so they cannot be decoded with their "
                            "own scales; use a degree whose shards fall on block boundaries, dequantize it "
                            "(strategy 'bf16'), or parallelize='fsdp'", path=ckpt.path, tensor=tp.source)
    info = ckpt.tensors[tp.source]
    if reader.reads_box(tp.source):
        nbytes = _numel(read) * info.torch_dtype.itemsize
    else:
        read, nbytes, why = full, info.nbytes, why or "the checkpoint's format reads whole tensors"
    nbytes += sum(ckpt.tensors[k].nbytes for k in tp.companions)
    return ShardPlan(key=tp.key, placements=_placements(t), box=box, read=read, nbytes_read=nbytes, why=why,
                     gathered=gathered)


def _row_sharing_dims(t: torch.Tensor, mesh, tp: TensorPlan, gathered: bool) -> tuple[int, ...]:
    """The mesh dimensions that split ``t``'s rows (its last dimension) for fp8 made on load with
    per-row scales: the rows' maxima are then all-reduced over them. Empty where the weight is
    not a tensor-parallel shard of a 2-D Linear weight (or a stack of them) on this mesh."""
    from torch.distributed.tensor import DTensor, Shard

    if gathered or not isinstance(t, DTensor) or t.device_mesh != mesh or len(tp.shape) not in (2, 3):
        return ()
    last = len(tp.shape) - 1
    dims = tuple(i for i, p in enumerate(t.placements) if isinstance(p, Shard) and p.dim % len(tp.shape) == last)
    others = [p for i, p in enumerate(t.placements) if i not in dims and not p.is_replicate()]
    return () if others and any(not isinstance(p, Shard) for p in others) else dims


def _blocks(box: Box, shape: tuple[int, ...], block) -> Box:
    """``box`` widened to whole blocks over its last two dimensions."""
    out = list(box)
    for d, b in zip((len(shape) - 2, len(shape) - 1), block):
        if d >= 0:
            a, z = box[d]
            out[d] = (a // b * b, min(shape[d], -(-z // b) * b))
    return tuple(out)


def _numel(box: Box) -> int:
    return math.prod(b - a for a, b in box)


# -- load time ------------------------------------------------------------------------------------


def read_shards(prep, mgr) -> tuple[dict[str, torch.Tensor], dict[tuple[str, str], torch.Tensor], list]:
    """Read and convert this rank's part of every planned tensor. Returns the local tensors, the
    scales, and the scales still to gather from every rank (FSDP, fp8 made on load)."""
    from . import stream

    plan, ckpt = prep.plan, prep.plan.checkpoint
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[tuple[str, str], torch.Tensor] = {}
    gather: list[tuple[str, str, torch.Tensor, TensorPlan]] = []
    error: Exception | None = None
    try:
        reader = stream.open_source(ckpt, mgr)
    except Exception as exc:  # this rank still takes part in every collective below
        error, reader = exc, None
    try:
        with torch.no_grad():
            for tp in plan.tensors.values():
                sp = plan.parallel.shards[tp.key]
                got = []
                if _reads_whole_once(tp, sp.pieces) and error is None:
                    try:
                        got = _whole_pieces(tp, sp, plan, reader, mgr, prep.keymap)
                    except Exception as exc:  # reported to every rank after the read
                        error = exc
                for piece in () if got else sp.pieces or (sp,):  # a packed shard: each piece read as a shard
                    if piece.reduce:  # a collective: every rank takes part, also one that already failed
                        local, scale, error = _quantize_shared_rows(tp, piece, plan, reader, prep.keymap,
                                                                    prep.request.parallel.mesh, error)
                    elif error is not None:
                        continue  # this rank failed: it only keeps up with the others' collectives
                    else:
                        try:
                            local, scale = _read_part(tp, piece, plan, reader, mgr, prep.keymap)
                        except Exception as exc:  # reported to every rank after the read
                            error = exc
                            continue
                    if error is None:
                        got.append((piece, local, scale))
                if error is not None:
                    continue
                local, scale = got[0][1:] if len(got) == 1 else _join_pieces(sp, got)
                mod = tp.key.rpartition(".")[0]
                tensors[tp.key] = local
                if scale is not None:
                    if tp.conversion == "quantize" and sp.gathered and sp.read != _full(tp):
                        # only this rank's rows were quantized: their scales are gathered after
                        gather.append((mod, tp.scale, scale, tp))
                    else:
                        scales[(mod, tp.scale)] = scale
    finally:
        if reader is not None:
            reader.close()
    if error is not None:
        raise error
    return tensors, scales, gather


def _whole_pieces(tp: TensorPlan, sp: ShardPlan, plan: Plan, reader, mgr, keymap) -> list:
    """The pieces of a packed shard that all need the whole tensor, from one whole read."""
    full = _full(tp)
    whole = sp.pieces[0].model_copy(update={"box": full, "read": full})
    tensor, scale = _read_part(tp, whole, plan, reader, mgr, keymap)
    return [(p, _cut(tensor, p.box, full).contiguous(), _local_scale(scale, tp, p, p.gathered)) for p in sp.pieces]


def _join_pieces(sp: ShardPlan, got: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A packed shard's local tensor and scale from its pieces': concatenated along
    ``sp.dim``; a scale that does not vary along it (one per tensor, or kept whole) is one."""
    local = torch.cat([t for _, t, _ in got], dim=sp.dim)
    scales = [s for _, _, s in got]
    if scales[0] is None:
        return local, None
    first, extent = scales[0], got[0][0].box[sp.dim][1] - got[0][0].box[sp.dim][0]
    if sp.gathered or first.numel() == 1 or first.dim() <= sp.dim or (first.shape[sp.dim] == 1 and extent > 1):
        return local, first
    return local, torch.cat(scales, dim=sp.dim).contiguous()


def _quantize_shared_rows(tp: TensorPlan, sp: ShardPlan, plan: Plan, reader, keymap, mesh, error: Exception | None):
    """fp8 made on load for a shard whose rows other ranks share: its columns are read, each
    row's maximum is all-reduced over the ranks sharing it, and the shard is encoded with the
    single-process scales. A rank that failed earlier contributes zeros and encodes nothing, so
    no rank waits for it. Returns ``(q, scale, error)``."""
    import torch.distributed as dist

    from ..errors import CorruptCheckpointError
    from ..kernels.quant import quantize_rows, row_amax

    rows = tuple(b - a for a, b in sp.box[:-1])
    raw, amax = None, torch.zeros(rows, dtype=torch.float32)
    if error is None:
        try:
            raw = _fused_rows(tp, sp, plan, reader, keymap) if tp.sources else reader.read_box(tp.source, sp.read)
            amax = row_amax(raw)
            if not bool(torch.isfinite(amax).all()):
                raise CorruptCheckpointError(f"{tp.source!r} holds inf or NaN values, which cannot be quantized",
                                             tensor=tp.source)
        except Exception as exc:
            error, raw, amax = exc, None, torch.zeros(rows, dtype=torch.float32)
    device = "cpu" if mesh.device_type == "cpu" else Parallel(mesh, "fsdp").device
    shared = amax.to(device)
    for d in sp.reduce:
        dist.all_reduce(shared, op=dist.ReduceOp.MAX, group=mesh.get_group(d))
    if error is not None:
        return None, None, error
    try:
        q, scale = quantize_rows(raw, to_torch(tp.target_dtype), shared.cpu())
    except Exception as exc:  # still reported after the read: the collectives ahead must not wait
        return None, None, exc
    return q, scale, None


def _full(tp: TensorPlan) -> Box:
    return tuple((0, n) for n in tp.shape)


def _cut(t: torch.Tensor, box: Box, within: Box) -> torch.Tensor:
    """The part ``box`` of a tensor ``t`` that holds the part ``within`` of the whole."""
    return t[tuple(slice(a - w, b - w) for (a, b), (w, _) in zip(box, within))]


def _scale_part(scale: torch.Tensor, box: Box, shape: tuple[int, ...], block) -> torch.Tensor:
    """The part of a weight's scale that decodes the part ``box`` of the weight: its rows (or
    stacked rows) for per-row scales, its grid cells for block scales; a single scale whole."""
    if scale.numel() == 1:
        return scale
    if block is not None:
        lead = len(shape) - 2
        idx = [slice(a, b) for a, b in box[:lead]]
        idx += [slice(a // k, -(-b // k)) for (a, b), k in zip(box[lead:], block)]
        return scale[tuple(idx[: scale.dim()])]
    idx = []
    for i in range(min(scale.dim(), len(shape) - 1)):
        idx.append(slice(*box[i]) if scale.shape[i] == shape[i] else slice(None))
    return scale[tuple(idx)]


def _read_part(tp: TensorPlan, sp: ShardPlan, plan: Plan, reader, mgr, keymap):
    """(this rank's part of ``tp`` converted as planned, its scale or ``None``)."""
    from . import stream

    ckpt = plan.checkpoint
    gathered = sp.gathered
    if tp.sources and tp.companions and sp.read != _full(tp):  # quantized experts: their part, every scale
        q = _fused_rows(tp, sp, plan, reader, keymap)
        scale = stream.fused_scales(tp, plan, reader, mgr, keymap)  # small: read whole, kept whole under FSDP
        first = ckpt.quantization.weights[tp.sources[0]]
        block = first.block if first.granularity == "block" else None
        if tp.conversion == "none":
            _check_range(q, scale, tp, sp, plan, reader)
            return q, _local_scale(scale, tp, sp, gathered)
        return stream.decode_fused(tp, plan, q, _scale_part(scale, sp.read, tp.shape, block).contiguous())
    if tp.sources and sp.read != _full(tp):  # built by the library from (parts of) its rows' sources only
        part = tp.model_copy(update={"shape": tuple(b - a for a, b in sp.read)})
        tensor, scale = stream.convert_tensor(part, _fused_rows(tp, sp, plan, reader, keymap), ckpt, reader, mgr)
        if sp.read == sp.box:
            return tensor, scale
        if tp.conversion == "quantize" and scale is not None:  # whole rows read for per-row scales
            inner = tuple((a - r, b - r) for (a, b), (r, _) in zip(sp.box, sp.read))
            scale = _scale_part(scale, inner, part.shape, tp.block).contiguous()
        return _cut(tensor, sp.box, sp.read).contiguous(), scale
    if tp.sources:  # built by the library from several tensors: whole, then cut
        tensor, scale = stream._read_one(tp, plan, reader, mgr, keymap)
        return _cut(tensor, sp.box, _full(tp)).clone(), _local_scale(scale, tp, sp, gathered)
    qw = ckpt.quantization.weights.get(tp.source) if ckpt.quantization is not None else None
    raw = reader.read_box(tp.source, sp.read)
    if tp.conversion == "none":
        scale = stream.kept_scale(ckpt, tp, reader, mgr) if tp.companions else None
        if scale is not None:
            _check_range(raw, scale, tp, sp, plan, reader)
        return raw, _local_scale(scale, tp, sp, gathered)
    if tp.conversion == "dequantize":
        entry = stream.scheme_entry(ckpt, mgr)
        block = qw.block if qw.granularity == "block" else None
        companions = {k: _scale_part(reader.get(k), sp.read, tp.shape, block) if k == qw.scale else reader.get(k)
                      for k in tp.companions}
        target = to_torch(tp.target_dtype)
        try:
            out = mgr.call(entry, entry.obj.dequantize, qw, raw, companions, target, returns=torch.Tensor)
        except LoaderKitError as exc:
            raise exc.with_context(path=ckpt.path, plugin=entry.plugin)
        stream._check_finite(out, raw, tp, ckpt)
        return _cut(out, sp.box, sp.read).contiguous(), None
    part = tp.model_copy(update={"shape": tuple(b - a for a, b in sp.read)})
    tensor, scale = stream.convert_tensor(part, raw, ckpt, reader, mgr)
    if tp.conversion == "quantize" and scale is not None:
        inner = tuple((a - r, b - r) for (a, b), (r, _) in zip(sp.box, sp.read))
        scale = _scale_part(scale, inner, part.shape, tp.block)
    return _cut(tensor, sp.box, sp.read).contiguous(), scale


def _fused_rows(tp: TensorPlan, sp: ShardPlan, plan: Plan, reader, keymap) -> torch.Tensor:
    """The part ``sp.read`` of a tensor the library stacks from per-row sources (experts), by its
    own operations on those rows' sources alone: each read whole (``pread``) when the part has
    whole rows (FSDP), else only the part of each source that makes it (``FusedTensor.cat_dim``:
    a tensor-parallel shard of stacked experts; a source it does not reach is an empty tensor)."""
    from . import stream

    ckpt = plan.checkpoint
    tensors = ckpt.tensors
    full = _full(tp)
    parts = None
    if sp.read[1:] != full[1:]:
        fused = keymap.fused.get(tp.key) if keymap is not None else None
        parts = _source_boxes(tp, fused, sp.read, ckpt)
        if parts is None:
            raise PlanError(f"{tp.key!r}: the plan reads part {sp.read} of it, but the library's operations do not "
                            "say which parts of its sources make it; this is a bug in loaderkit, please report it",
                            tensor=tp.key)

    def fetch(key: str) -> torch.Tensor:
        box = parts[key] if parts is not None else tuple((0, n) for n in tensors[key].shape)
        if not _numel(box):
            return torch.empty(tuple(b - a for a, b in box), dtype=tensors[key].torch_dtype)
        return reader.read_box(key, box)

    return stream.build_fused(tp, plan, reader, keymap, rows=sp.read[0], fetch=fetch,
                              shape=tuple(b - a for a, b in sp.read))


def _check_range(raw: torch.Tensor, scale: torch.Tensor, tp: TensorPlan, sp: ShardPlan, plan: Plan, reader) -> None:
    """The single-process check that a kept fp8 weight's scale cannot overflow its compute
    dtype, on this rank's part. The check decodes (rarely: only when the scale's bound fails),
    and decoding needs whole blocks: an FSDP shard that cuts blocks is then re-read whole-block."""
    from . import stream
    from ..kernels.quant import fp8_max

    block = tp.block if tp.granularity == "block" else None
    box = sp.read if block is None else _blocks(sp.read, tp.shape, block)
    if box != sp.read:
        mp = plan.modules.get(tp.key.rpartition(".")[0])
        dtype = to_torch(mp.compute_dtype) if mp is not None else torch.float32
        if not dtype.is_floating_point or dtype.itemsize < 2:
            return
        if fp8_max(raw.dtype) * float(scale.abs().amax()) <= torch.finfo(dtype).max:
            return  # the bound clears it without decoding
        raw = reader.read_box(tp.source, box)
    stream._check_kept_range(raw, _scale_part(scale, box, tp.shape, block), tp, plan)


def _local_scale(scale, tp: TensorPlan, sp: ShardPlan, gathered: bool):
    """The scale a rank keeps: whole where FSDP gathers the weight before the forward, else the
    part of its own rows or blocks."""
    if scale is None or gathered:
        return scale
    return _scale_part(scale, sp.box, tp.shape, tp.block).contiguous()


def execute(prep, mgr) -> torch.nn.Module:
    """Read this rank's shards, agree with every rank, then fill the parallelized skeleton, bind
    its runtime and verify it."""
    from . import bind, stream
    from .verify import verify

    plan, model = prep.plan, prep.model
    device = torch.device(prep.placement.main_device)
    error: BaseException | None = None
    try:
        tensors, scales, gather = read_shards(prep, mgr)
    except Exception as exc:  # every rank must reach the agreement below, or the others wait forever
        error, tensors, scales, gather = exc, {}, {}, []
    _agree(error, plan, prep.request.parallel.mesh)
    named = dict(model.named_modules(remove_duplicate=False))
    with torch.no_grad():
        for mod, name, local, tp in gather:
            scales[(mod, name)] = _gather_rows(local.to(device), tp, _tensor(named, tp.key))
        _fill(model, plan, tensors, scales, device)
        if plan.initialized:
            prep.facts.initialize(model, plan.initialized)
        for fn in prep.facts.finalize:
            fn(model)
    stream.check_complete(model, plan)
    bind.bind_runtime(model, plan, prep.request.cast_inputs)
    model.eval()
    report = verify(model, plan=plan)
    if not report.ok:
        raise PlanError(f"{plan.checkpoint.path}: the loaded shard of rank {plan.parallel.rank} failed its dtype "
                        f"check, which is a bug in a plugin or in loaderkit; please report it: {report}")
    bind.remember(model, plan)
    mgr.hook.loaderkit_model_loaded(model=model, plan=plan)
    return model


def _agree(error: BaseException | None, plan: Plan, mesh) -> None:
    """Every rank of the mesh learns whether every rank read its shards; any failure raises on
    all of them. (A 1-D mesh over some of the processes agrees among its own ranks.)"""
    import torch.distributed as dist

    mine = None if error is None else f"{type(error).__name__}: {error}"
    group = mesh.get_group(0) if mesh.ndim == 1 and mesh.size() != dist.get_world_size() else None
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    failed = [(r, m) for r, m in enumerate(every) if m is not None]
    if error is not None:
        raise error
    if failed:
        r, m = failed[0]
        raise LoaderKitError(f"{plan.checkpoint.path}: rank {r} could not load its shards ({m}); no rank keeps a "
                             "half-loaded model", path=plan.checkpoint.path)


def _gather_rows(local: torch.Tensor, tp: TensorPlan, weight: torch.Tensor) -> torch.Tensor:
    """The whole per-row scale of an fp8 weight made on load under FSDP, from every rank's rows
    (``local`` on this rank's device: NCCL gathers device tensors)."""
    from torch.distributed.tensor import DTensor

    rows = tuple(local.shape)
    whole = (tp.shape[0],) + rows[1:]
    stride = tuple(math.prod(whole[i + 1:]) for i in range(len(whole)))
    dt = DTensor.from_local(local.contiguous(), weight.device_mesh, weight.placements, shape=whole, stride=stride,
                            run_check=False)
    return dt.full_tensor()


def _fill(model: torch.nn.Module, plan: Plan, tensors: dict, scales: dict, device: torch.device) -> None:
    """Put each local part into the skeleton as a DTensor with the placements the
    parallelization gave it (tied keys share it), then the scales; everything else the
    skeleton holds (computed buffers) moves to this rank's device."""
    from torch.distributed.tensor import DTensor

    named = dict(model.named_modules(remove_duplicate=False))
    for key, local in tensors.items():
        tp = plan.tensors[key]
        meta = _tensor(named, key)
        local = local.to(device)
        if isinstance(meta, DTensor):
            local = DTensor.from_local(local, meta.device_mesh, meta.placements, shape=meta.shape,
                                       stride=meta.stride(), run_check=False)
        value = None
        for k in (key, *tp.also):
            mod, _, name = k.rpartition(".")
            m = named[mod]
            if name in m._parameters:
                if value is None:
                    value = torch.nn.Parameter(local, requires_grad=meta.requires_grad)
                m._parameters[name] = value
            else:
                m._buffers[name] = local
    for (mod, name), scale in scales.items():
        m = named[mod]
        m._buffers.pop(name, None)
        m.register_buffer(name, scale.to(device), persistent=True)
    for m in named.values():
        for name, b in list(m._buffers.items()):
            if b is not None and b.device.type != "meta" and b.device != device:
                m._buffers[name] = b.to(device)
