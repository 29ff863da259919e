"""The contract of whole pipelines: the :class:`Assembler` plugin base, its :class:`Component`
records and the :class:`PipelinePlan` that :func:`loaderkit.plan_pipeline` returns.

An assembler knows one library's pipeline layout (diffusers' ``model_index.json``): which
components a pipeline directory holds, which of them carry weights (loaderkit loads those, each
with its own plan), how the others are loaded (by the library's own loader), which component's
output feeds which, and how to put the loaded parts together into the library's pipeline object.
Nothing here imports the pipeline stages.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar, Literal

from .plan import Plan, fmt_bytes
from .records import Frozen, ReadOnly

#: What a component is in its pipeline: what the pipeline plan checks at the boundaries.
Role = Literal["text_encoder", "image_encoder", "denoiser", "vae", "other"]

#: How a pipeline's components share the execution device.
OffloadMode = Literal["none", "model"]


class Component(Frozen):
    """One entry of a pipeline directory.

    :ivar name: the pipeline's attribute name (``"transformer"``, ``"text_encoder_2"``).
    :ivar library: the library that defines its class (``"diffusers"``, ``"transformers"``), or
        ``None`` for an empty slot.
    :ivar class_name: its class, or ``None`` for an empty slot.
    :ivar directory: where its files are, or ``None`` for an empty slot.
    :ivar weights: ``True`` when it is a model with weights: loaderkit loads it by its own plan.
        ``False``: the library's own loader loads it (schedulers, tokenizers, processors).
    :ivar role: what it is in the pipeline; the plan checks the dtypes handed between roles.
    :ivar consumes: names of the components whose outputs it takes as inputs.
    """

    name: str
    library: str | None = None
    class_name: str | None = None
    directory: str | None = None
    weights: bool = False
    role: Role = "other"
    consumes: tuple[str, ...] = ()


class Assembler(abc.ABC):
    """Base class of assembler plugins: load a library's pipeline directory as its pipeline object."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    priority: ClassVar[int] = 0

    @abc.abstractmethod
    def can_assemble(self, path: Path) -> bool:
        """True if ``path`` is a pipeline directory of this assembler's library (cheap: file names
        and small JSON files only)."""

    @abc.abstractmethod
    def components(self, path: Path) -> tuple[Component, ...]:
        """Every component the pipeline at ``path`` declares, in the library's order."""

    def pipeline_class(self, path: Path) -> str:
        """The name of the pipeline class ``path`` is loaded as (default: the assembler's name)."""
        return self.name

    def offload_order(self, path: Path, components: tuple[Component, ...]) -> tuple[str, ...]:
        """The order the pipeline runs its models in (model offload moves them in this order).
        Default: the order of :meth:`components`."""
        return tuple(c.name for c in components if c.weights)

    @abc.abstractmethod
    def load_component(self, path: Path, component: Component) -> Any:
        """Load a component without weights (``component.weights`` is ``False``) by the library's
        own loader."""

    @abc.abstractmethod
    def assemble(self, path: Path, parts: dict[str, Any]) -> Any:
        """Put the loaded components (name -> object, ``None`` for empty slots) together into the
        library's pipeline object, as the library's own loader does. The library's own offload
        switches must keep loaderkit's cast rules (:func:`loaderkit.plugin.detach_others`)."""

    def offload(self, pipe: Any, device: str, order: tuple[str, ...]) -> bool:
        """Turn on the library's own model offload onto ``device``; ``False`` (the default) when
        the library has none, and loaderkit chains accelerate's ``cpu_offload_with_hook`` itself."""
        return False


# -- the pipeline plan ---------------------------------------------------------------------------


class ComponentPlan(Frozen):
    """One component in a pipeline plan.

    :ivar component: the component.
    :ivar strategy: the strategy it is loaded by (``None``: loaded by its library).
    :ivar plan: its loading plan (``None`` for components loaderkit does not load).
    :ivar device: where it rests once loaded (``"cpu"`` for a model-offloaded component).
    :ivar given: the caller passed it (``components=``): loaderkit does not load it; its plan is
        the one :func:`loaderkit.load` loaded it by, if any.
    :ivar nbytes: its bytes as planned (a given model without a plan: as it is).
    """

    component: Component
    strategy: str | None = None
    plan: Plan | None = None
    device: str | None = None
    given: bool = False
    nbytes: int = 0


class Flow(Frozen):
    """The activations one component hands to the next, and what happens at the boundary.

    :ivar producer: the component whose output it is.
    :ivar consumer: the component that takes it.
    :ivar produced: the dtype the producer computes (and reports as its ``.dtype``) in.
    :ivar expected: the dtype the consumer computes in.
    :ivar action: ``"none"`` when they match (the pipeline's own code hands them over, as with its
        library's loader); ``"cast"`` when they differ and the consumer's input cast converts them
        at the boundary.
    """

    producer: str
    consumer: str
    produced: str
    expected: str
    action: Literal["none", "cast"] = "none"


class PipelinePlan(Frozen):
    """The plan of a whole pipeline: one plan per model, the dtypes at every boundary, and where
    every component runs and rests. ``print(plan)`` shows it readably.

    :ivar path: the pipeline directory.
    :ivar assembler: the assembler plugin that read it.
    :ivar pipeline_class: the library's pipeline class name.
    :ivar components: component name -> its plan, in the library's order.
    :ivar flows: every boundary between components, with its dtypes.
    :ivar device: the execution device.
    :ivar offload: ``"none"`` (every model resident on ``device``) or ``"model"`` (models rest on
        the CPU and move to ``device`` one at a time, in :attr:`order`).
    :ivar order: the order the models run (and move) in.
    :ivar budget: the execution device's memory budget in bytes, if one was given.
    :ivar reason: why this placement was chosen.
    """

    path: str
    assembler: str
    pipeline_class: str
    components: ReadOnly[dict[str, ComponentPlan]]
    flows: tuple[Flow, ...] = ()
    device: str = "cpu"
    offload: OffloadMode = "none"
    order: tuple[str, ...] = ()
    budget: int | None = None
    reason: str = ""

    def models(self) -> dict[str, Plan]:
        """Component name -> plan, for the components loaderkit loads."""
        return {n: c.plan for n, c in self.components.items() if c.plan is not None}

    def bytes_per_device(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.components.values():
            if c.device is not None:
                out[c.device] = out.get(c.device, 0) + c.nbytes
        return out

    def bytes_per_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.models().values():
            for dtype, n in p.bytes_per_dtype().items():
                out[dtype] = out.get(dtype, 0) + n
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (what ``loaderkit plan --json`` prints for a pipeline)."""
        return {
            "path": self.path,
            "assembler": self.assembler,
            "pipeline_class": self.pipeline_class,
            "device": self.device,
            "offload": self.offload,
            "order": list(self.order),
            "budget": self.budget,
            "reason": self.reason,
            "bytes_per_device": self.bytes_per_device(),
            "bytes_per_dtype": self.bytes_per_dtype(),
            "flows": [f.model_dump(mode="json") for f in self.flows],
            "components": {
                n: {
                    **c.component.model_dump(mode="json"),
                    "strategy": c.strategy,
                    "given": c.given,
                    "device": c.device,
                    "nbytes": c.nbytes,
                    "plan": None if c.plan is None else c.plan.to_dict(),
                }
                for n, c in self.components.items()
            },
        }

    def table(self, all_modules: bool = False) -> str:
        """A readable rendering: the pipeline summary, then every model's own plan."""
        lines = [f"pipeline  {self.path}  [{self.pipeline_class}, assembled by {self.assembler}]"]
        budget = "" if self.budget is None else f", budget {fmt_bytes(self.budget)}"
        where = "resident on" if self.offload == "none" else "model offload onto"
        lines.append(f"placement  {where} {self.device}{budget}: {self.reason}")
        rows = [("component", "class", "strategy", "storage", "compute", "bytes", "rests on")]
        for n, c in self.components.items():
            if c.device is None:
                continue
            total = max(c.nbytes, 1)
            storage = "?" if c.plan is None else ", ".join(
                f"{d} {100 * b / total:.0f}%" for d, b in c.plan.bytes_per_dtype().items())
            compute = "?" if c.plan is None else c.plan.entry_dtype()
            rows.append((n, c.component.class_name or "", c.strategy or "", storage, compute,
                         fmt_bytes(c.nbytes), c.device))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        if self.flows:
            lines.append("boundaries")
            flows = [(f"{f.producer} -> {f.consumer}", f"{f.produced} -> {f.expected}",
                      "same dtype" if f.action == "none" else f"cast to {f.expected} by {f.consumer}'s input cast")
                     for f in self.flows]
            widths = [max(len(r[i]) for r in flows) for i in range(2)]
            lines += [f"  {a.ljust(widths[0])}  {b.ljust(widths[1])}  {c}" for a, b, c in flows]
        others = [f"{n} ({c.component.class_name}, {c.component.library})" for n, c in self.components.items()
                  if c.device is None and not c.given and c.component.class_name]
        if others:
            lines.append("loaded by their libraries: " + ", ".join(others))
        for n, p in self.models().items():
            lines += ["", f"== {n} ==", p.table(all_modules)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
