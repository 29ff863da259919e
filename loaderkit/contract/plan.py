"""The plan: what will be read, how each tensor is converted, and how each module computes.

A plan is made from headers and config alone (no tensor data is read) and is immutable all the
way down: frozen records, read-only mappings, tuples. It is what :func:`loaderkit.plan` returns
and what :func:`loaderkit.load` executes — the runtime binds cast rules from the plan alone, so
the plan is the whole truth about the loaded model's dtypes.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

from pydantic import Field

from .bases import Kernel
from .lora import LoraPlan
from .modules import ModuleKind
from .records import CheckpointInfo, DeviceCaps, Frozen, Granularity, ReadOnly, ScaleEncoding, thaw

#: how a tensor is filled from its checkpoint tensor.
Conversion = Literal["none", "cast", "dequantize", "quantize"]

class TensorPlan(Frozen):
    """How one model tensor is filled.

    :ivar key: the model's state-dict key.
    :ivar source: the checkpoint key it is read from.
    :ivar shape: its shape in the model.
    :ivar stored_dtype: dtype in the checkpoint.
    :ivar target_dtype: dtype it is stored in, in memory.
    :ivar conversion: ``"none"`` (zero-copy), ``"cast"``, ``"dequantize"`` or ``"quantize"``.
    :ivar companions: checkpoint keys read with it (scales).
    :ivar granularity: scale granularity when quantized in memory (``"channel"``...), else ``None``.
    :ivar block: the block shape of ``"block"`` granularity.
    :ivar scale: the name of the module buffer that holds its float32 scale in memory
        (``"weight_scale"``), or ``None`` for tensors without one.
    :ivar scale_encoding: how the checkpoint stores that scale (``"float"``, ``"ue8m0"``).
    :ivar sources: for a tensor the model's library builds from several checkpoint tensors, those
        keys, in order (``source`` is then the model key itself); empty otherwise.
    :ivar transform: the library's operations on :attr:`sources`, in words.
    :ivar also: other model keys tied to this one (they share the tensor).
    :ivar buffer: it fills a buffer rather than a parameter.
    :ivar device: where it rests after loading: a device, or ``"disk"`` (offload folder).
    :ivar nbytes: bytes in memory after conversion (scales included).
    """

    key: str
    source: str
    shape: tuple[int, ...]
    stored_dtype: str
    target_dtype: str
    conversion: Conversion
    companions: tuple[str, ...] = ()
    granularity: Granularity | None = None
    block: tuple[int, int] | None = None
    scale: str | None = None
    scale_encoding: ScaleEncoding = "float"
    sources: tuple[str, ...] = ()
    transform: str = ""
    also: tuple[str, ...] = ()
    buffer: bool = False
    device: str = "cpu"
    nbytes: int = 0


class ModulePlan(Frozen):
    """How one module (that owns tensors) stores and computes.

    :ivar name: qualified module name.
    :ivar type: class name.
    :ivar kind: what kind of module it is (``"linear"``, ``"conv"``, ``"embedding"``, ``"norm"``,
        ``"other"``), as strategies saw it.
    :ivar compute_dtype: dtype its kernel runs in.
    :ivar storage: local tensor name -> dtype in memory.
    :ivar cast: a runtime cast rule hands its kernel the tensors in ``compute_dtype``.
    :ivar kernel: ``"cast"`` or ``"native"`` (native fp8 matmul) for modules with a cast rule.
    :ivar kernel_reason: why the kernel is what it is when native fp8 matmul was asked for
        (negotiated here against the module, its weight and the device's capabilities).
    :ivar resident: the cast rule keeps a compute-dtype copy resident.
    :ivar fold_scale: the cast rule applies per-channel weight scales to the output.
    :ivar granularity: scale granularity of its quantized weight, if any.
    :ivar device: execution device.
    :ivar offload: where its weights rest between forwards when not on the execution device
        (``"cpu"`` or ``"disk"``), else ``None``.
    :ivar nbytes: bytes of its tensors (in memory, or on disk when offloaded there).
    :ivar reason: why the strategy chose this.
    """

    name: str
    type: str
    kind: ModuleKind = "other"
    compute_dtype: str
    storage: ReadOnly[dict[str, str]]
    cast: bool = False
    kernel: Kernel = "cast"
    kernel_reason: str = ""
    resident: bool = False
    fold_scale: bool = False
    granularity: Granularity | None = None
    device: str = "cpu"
    offload: str | None = None
    nbytes: int = 0
    reason: str = ""


class ShardPlan(Frozen):
    """What one rank holds and reads of one model tensor under a parallel plan.

    :ivar key: the model's state-dict key.
    :ivar placements: the DTensor placements, in words (``"Shard(0)"``, ``"Replicate()"``).
    :ivar box: this rank's part of the tensor: ``(start, stop)`` per dimension.
    :ivar read: the part of the checkpoint tensor this rank reads: the box, or more when the
        conversion needs it (whole rows for a per-row scale computed on load, whole fp8 blocks,
        the whole tensor when the model's library builds it from several tensors).
    :ivar nbytes_read: the bytes of :attr:`read` (scales included).
    :ivar why: why :attr:`read` is wider than :attr:`box`, when it is.
    :ivar gathered: FSDP gathers the whole tensor before each forward, so its scale is kept
        whole on every rank (a tensor-parallel shard keeps the scale of its own rows or blocks).
    :ivar reduce: mesh dimensions whose ranks share this shard's rows: fp8 made on load takes
        each row's maximum over them (an all-reduce), so its per-row scales are the
        single-process ones while each rank reads only its columns.
    :ivar pieces: a packed shard (a strided placement, ``_StridedShard``: a fused gate/up weight
        split so that each rank holds its part of the gate *and* its part of the up block) is
        not one box: it is these boxes of the tensor, each planned and read as a shard of its
        own, concatenated in order along :attr:`dim`. :attr:`box` and :attr:`read` are then
        the boxes spanning them (not what is read), :attr:`nbytes_read` their sum. Empty for a
        shard that is one box.
    :ivar dim: the dimension :attr:`pieces` are concatenated along.
    """

    key: str
    placements: str
    box: tuple[tuple[int, int], ...]
    read: tuple[tuple[int, int], ...]
    nbytes_read: int
    why: str = ""
    gathered: bool = False
    reduce: tuple[int, ...] = ()
    pieces: tuple[ShardPlan, ...] = ()
    dim: int = 0

    @property
    def boxes(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """The boxes of the tensor this rank holds, in the order its local shard holds them."""
        return tuple(p.box for p in self.pieces) or (self.box,)


class ParallelPlan(Frozen):
    """One rank's share of a load over a device mesh (``load(..., device_mesh=, parallelize=)``).

    :ivar style: ``"fsdp"``, ``"tp"``, ``"tp-plan"`` (a plan given as a dict) or ``"custom"``.
    :ivar rank: this process's global rank; :attr:`world_size` the number of processes.
    :ivar mesh: the mesh's shape and :attr:`mesh_dims` its dimension names.
    :ivar backend: the process group's backend (``"gloo"``, ``"nccl"``, ``"fake"``).
    :ivar shards: model key -> this rank's shard of every planned tensor.
    :ivar groups: for FSDP, the modules ``fully_shard`` groups parameters by.
    """

    style: str
    rank: int
    world_size: int
    mesh: tuple[int, ...]
    mesh_dims: tuple[str, ...] = ()
    backend: str = ""
    shards: ReadOnly[dict[str, ShardPlan]] = Field(default_factory=dict)
    groups: tuple[str, ...] = ()

    def bytes_read(self) -> int:
        return sum(s.nbytes_read for s in self.shards.values())

    def sharded(self) -> int:
        return sum(1 for s in self.shards.values() if "Shard" in s.placements)


class Decision(Frozen):
    """A choice made during negotiation, with the reason. ``by`` names who made it."""

    subject: str
    choice: str
    reason: str
    by: str = "loaderkit"


class Plan(Frozen):
    """The negotiated plan for loading one checkpoint into one model.

    :ivar checkpoint: the checkpoint description.
    :ivar strategy: the strategy name; :attr:`options` its validated options.
    :ivar device: capabilities of the execution device.
    :ivar builder: what built the skeleton (a builder name, or ``"model="``).
    :ivar model_type: the skeleton's class name.
    :ivar tensors: model key -> tensor plan, in read order.
    :ivar modules: module name -> module plan, for every module that owns tensors.
    :ivar decisions: every choice made, with its reason.
    :ivar ignored: checkpoint keys not loaded, with why.
    :ivar library_ignored: of :attr:`ignored`, the keys the model's library itself ignores on
        load (legacy buffers): ``convert`` copies them as stored.
    :ivar initialized: model keys the checkpoint lacks that the model's library allows to be
        missing and initializes itself (``ModelFacts.initialize``), after the tensors are read.
    :ivar kept: model keys not in the checkpoint that keep the values the skeleton already has.
    :ivar device_map: module name -> device (``"cuda:0"``, ``"cpu"``, ``"disk"``) when the model is
        spread over several places; ``None`` when it sits on one device.
    :ivar offload_folder: where disk-offloaded tensors are written, if any.
    :ivar loras: the LoRAs applied, in order: the modules each updates and in which mode.
    :ivar parallel: this rank's share when loading over a device mesh, else ``None``.
    """

    checkpoint: CheckpointInfo
    strategy: str
    options: ReadOnly[dict[str, Any]] = Field(default_factory=dict)
    device: DeviceCaps
    builder: str
    model_type: str
    tensors: ReadOnly[dict[str, TensorPlan]]
    modules: ReadOnly[dict[str, ModulePlan]]
    decisions: tuple[Decision, ...] = ()
    ignored: ReadOnly[dict[str, str]] = Field(default_factory=dict)
    library_ignored: tuple[str, ...] = ()
    initialized: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    device_map: ReadOnly[dict[str, str]] | None = None
    offload_folder: str | None = None
    loras: tuple[LoraPlan, ...] = ()
    parallel: ParallelPlan | None = None

    # -- views --------------------------------------------------------------------------------

    def entry_dtype(self) -> str:
        """The compute dtype of most of the model's bytes: what its inputs are cast to."""
        counts: dict[str, int] = {}
        for m in self.modules.values():
            counts[m.compute_dtype] = counts.get(m.compute_dtype, 0) + m.nbytes
        return max(counts, key=counts.get) if counts else "float32"

    def bytes_per_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.device] = out.get(t.device, 0) + t.nbytes
        return out

    def bytes_per_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[t.target_dtype] = out.get(t.target_dtype, 0) + t.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def conversions(self) -> dict[str, int]:
        return dict(Counter(t.conversion for t in self.tensors.values()))

    def key_conversions(self) -> dict[str, str]:
        """Model key -> how the model's library makes it from the checkpoint, for every tensor
        not loaded under its own name: ``"<- source"`` for a rename, ``"<- operations"`` for a
        tensor built from others (fused, split, transposed)."""
        out: dict[str, str] = {}
        for t in self.tensors.values():
            if t.sources:
                how = t.transform or "built"
                out[t.key] = f"<- {how} of " + ", ".join(
                    (f"#{i}={s}" if f"#{i}" in how else s) for i, s in enumerate(t.sources))
            elif t.source != t.key:
                out[t.key] = f"<- {t.source}"
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (what ``loaderkit plan --json`` prints)."""
        return {
            "checkpoint": self.checkpoint.summary(),
            "strategy": self.strategy,
            "options": {k: str(v) for k, v in self.options.items()},
            "device": self.device.model_dump(mode="json"),
            "builder": self.builder,
            "model_type": self.model_type,
            "bytes_per_device": self.bytes_per_device(),
            "bytes_per_dtype": self.bytes_per_dtype(),
            "conversions": self.conversions(),
            "modules": {k: m.model_dump(mode="json") for k, m in self.modules.items()},
            "tensors": {k: t.model_dump(mode="json") for k, t in self.tensors.items()},
            "decisions": [d.model_dump(mode="json") for d in self.decisions],
            "ignored": thaw(self.ignored),
            "kept": list(self.kept),
            "initialized": list(self.initialized),
            "device_map": None if self.device_map is None else thaw(self.device_map),
            "offload_folder": self.offload_folder,
            "loras": [lp.model_dump(mode="json") for lp in self.loras],
            "parallel": None if self.parallel is None else self.parallel.model_dump(mode="json"),
        }

    def table(self, all_modules: bool = False) -> str:
        """A readable rendering. Modules are grouped by identical treatment unless ``all_modules``."""
        lines = [
            f"checkpoint  {self.checkpoint.path}  [{self.checkpoint.format}"
            + (f", {self.checkpoint.quantization.family}" if self.checkpoint.quantization else "")
            + f"]  {len(self.checkpoint.tensors)} tensors, {fmt_bytes(self.checkpoint.total_bytes)}",
            f"model       {self.model_type}  (built by {self.builder})",
            f"strategy    {self.strategy}"
            + (f"  {self.options}" if self.options else ""),
            f"device      {self.device.device}" + (f"  ({self.device.name})" if self.device.name else ""),
            "memory      "
            + ", ".join(f"{d}: {fmt_bytes(b)}" for d, b in self.bytes_per_device().items())
            + "  ("
            + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.bytes_per_dtype().items())
            + ")",
            "conversions " + ", ".join(f"{k}: {v}" for k, v in sorted(self.conversions().items())),
            "",
        ]
        placed = self.device_map is not None
        header = ("module", "type", "storage", "compute", "cast", "scale", "bytes") + (
            ("device", "rests on") if placed else ()
        )
        rows: list[tuple[str, ...]] = []
        if all_modules:
            for m in self.modules.values():
                rows.append(_module_row(m.name or "(root)", m, placed=placed))
        else:
            groups: dict[tuple, list[ModulePlan]] = {}
            for m in self.modules.values():
                sig = (m.type, _storage_str(m), m.compute_dtype, m.cast, m.granularity, m.device, m.offload)
                groups.setdefault(sig, []).append(m)
            for ms in groups.values():
                label = ms[0].name or "(root)"
                if len(ms) > 1:
                    label = f"{label} (+{len(ms) - 1} alike)"
                total = sum(m.nbytes for m in ms)
                rows.append(_module_row(label, ms[0], total, placed=placed))
        lines.extend(_render(header, rows))
        if self.offload_folder:
            lines.insert(5, f"offload     {self.offload_folder}")
        if self.decisions:
            lines.append("")
            lines.append("decisions")
            for d in self.decisions:
                lines.append(f"  - {d.subject}: {d.choice} ({d.reason}) [{d.by}]")
        converted = self.key_conversions()
        if converted:
            lines.append("")
            lines.append(f"key conversions ({len(converted)})")
            for k, how in list(converted.items())[:20]:
                lines.append(f"  - {k} {how}")
            if len(converted) > 20:
                lines.append(f"  ... and {len(converted) - 20} more (plan.key_conversions())")
        if self.parallel is not None:
            lines.extend(_parallel_lines(self))
        for lp in self.loras:
            lines.append("")
            lines.append(f"lora {lp.name}  {lp.path}  [{lp.format}]  strength {lp.strength:g}, mode {lp.mode}, "
                         f"{len(lp.targets)} modules")
            for t in list(lp.targets.values())[:20]:
                lines.append(f"  - {t.module}: rank {t.rank}, scale {t.scale:g}")
            if len(lp.targets) > 20:
                lines.append(f"  ... and {len(lp.targets) - 20} more")
        if self.ignored:
            lines.append("")
            lines.append(f"ignored checkpoint keys ({len(self.ignored)})")
            for k, why in list(self.ignored.items())[:20]:
                lines.append(f"  - {k}: {why}")
            if len(self.ignored) > 20:
                lines.append(f"  ... and {len(self.ignored) - 20} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _parallel_lines(plan: Plan) -> list[str]:
    par = plan.parallel
    stored = plan.checkpoint.tensors
    total = sum(sum(stored[k].nbytes for k in t.sources if k in stored) or t.nbytes if t.sources
                else stored[t.source].nbytes if t.source in stored else t.nbytes
                for t in plan.tensors.values())
    read = par.bytes_read()
    lines = ["", f"parallel    {par.style} on mesh {list(par.mesh)}"
             + (f" {list(par.mesh_dims)}" if par.mesh_dims else "")
             + f" ({par.backend or '?'}), rank {par.rank} of {par.world_size}: reads {fmt_bytes(read)} of "
             f"{fmt_bytes(total)} ({read / total:.0%})" if total else ""]
    if par.groups:
        lines.append(f"  fully_shard groups: {len(par.groups)} ({', '.join(g or '(root)' for g in par.groups[:4])}"
                     + (" ..." if len(par.groups) > 4 else "") + ")")
    rows = []
    for s in list(par.shards.values()):
        box = " + ".join("x".join(f"{a}:{b}" for a, b in b_) for b_ in s.boxes) or "scalar"
        note = s.why or (f"row maxima all-reduced over mesh dim {', '.join(map(str, s.reduce))}" if s.reduce else "-")
        rows.append((s.key, s.placements, box, fmt_bytes(s.nbytes_read), note))
    shown = rows[:24]
    lines.extend("  " + r for r in _render(("tensor", "placement", "this rank's box", "reads", "note"), shown))
    if len(rows) > len(shown):
        lines.append(f"  ... and {len(rows) - len(shown)} more (plan.parallel.shards)")
    return lines


def _storage_str(m: ModulePlan) -> str:
    vals = sorted(set(m.storage.values()))
    if len(vals) <= 1:
        return vals[0] if vals else "-"
    return ",".join(f"{k}:{v}" for k, v in m.storage.items())


def _module_row(label: str, m: ModulePlan, nbytes: int | None = None, placed: bool = False) -> tuple[str, ...]:
    row = (
        label,
        m.type,
        _storage_str(m),
        m.compute_dtype,
        ("native" if m.kernel == "native" else "resident" if m.resident else "folded" if m.fold_scale else "yes")
        if m.cast else "-",
        m.granularity or "-",
        fmt_bytes(m.nbytes if nbytes is None else nbytes),
    )
    return row + ((m.device, m.offload or "-") if placed else ())


def _render(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
