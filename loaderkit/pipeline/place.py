"""Stages 5 and 8, place and dispatch: placement and offloading, through accelerate.

``device_map`` is a device string (``"cpu"``, ``"cuda:0"``), one of accelerate's policies
(``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) or an explicit
``{module name: device}`` dict as accelerate takes it (devices: a GPU index, ``"cuda:N"``,
``"cpu"`` or ``"disk"``).

Sizes are those of the *plan* — each tensor in its planned storage dtype (fp8 counts one byte),
scales included — not of the skeleton. Offloaded weights rest in their storage dtype on the CPU
or on disk and reach the compute dtype only on the execution device, during the forward: the
offload hook brings the stored bytes, then loaderkit's cast rule upcasts them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..contract.plan import Plan
from ..errors import OffloadError, PlanError

POLICIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass(frozen=True)
class Placement:
    """The user's placement request, normalised.

    :ivar device_map: the request as given (a device string, a policy name, or a dict).
    :ivar main_device: the device modules execute on unless the map says otherwise.
    :ivar max_memory: accelerate's ``max_memory`` (device -> bytes or ``"8GiB"``), or ``None``.
    :ivar offload_folder: where disk-offloaded weights go.
    :ivar offload_buffers: offload buffers as well as parameters.
    :ivar no_split: module class names never split across devices (added to the builder's).
    """

    device_map: Any = "cpu"
    main_device: str = "cpu"
    max_memory: dict | None = None
    offload_folder: str | None = None
    offload_buffers: bool = False
    no_split: tuple[str, ...] = ()

    @property
    def single(self) -> bool:
        return not isinstance(self.device_map, dict) and self.device_map not in POLICIES


def _device_str(dev: Any) -> str:
    if isinstance(dev, int) and not isinstance(dev, bool):
        return f"cuda:{dev}"
    if isinstance(dev, torch.device):
        return str(dev)
    if isinstance(dev, str):
        if dev in ("cpu", "disk"):
            return dev
        try:
            d = torch.device(dev)
        except (RuntimeError, TypeError) as exc:
            raise PlanError(f"device_map: invalid device {dev!r}: {exc}") from None
        return f"{d.type}:{d.index}" if d.type == "cuda" and d.index is not None else str(d)
    raise PlanError(f"device_map: invalid device {dev!r}; use a GPU index, 'cuda:N', 'cpu' or 'disk'")


def normalise(
    device_map: Any,
    max_memory: dict | None,
    offload_folder: str | os.PathLike | None,
    offload_buffers: bool,
    no_split: tuple[str, ...] | list[str] | None,
) -> Placement:
    """Validate the placement arguments and pick the main (execution) device."""
    if isinstance(device_map, torch.device):
        device_map = str(device_map)
    if isinstance(device_map, dict):
        if not device_map:
            raise PlanError("device_map is an empty dict; map module names to devices, e.g. {'': 'cpu'}")
        devices = [_device_str(v) for v in device_map.values()]
        gpus = [d for d in devices if d not in ("cpu", "disk")]
        main = gpus[0] if gpus else "cpu"
    elif isinstance(device_map, str) and device_map in POLICIES:
        main = "cuda:0" if torch.cuda.is_available() else "cpu"
    elif isinstance(device_map, str):
        main = _device_str(device_map)
        if main == "disk":
            raise PlanError("device_map='disk' is not a device; use device_map='auto' with offload_folder=")
    else:
        raise PlanError(
            f"device_map={device_map!r}: pass a device ('cpu', 'cuda:0'), 'auto', 'balanced', "
            "'balanced_low_0', 'sequential' or a dict of module name -> device"
        )
    folder = None if offload_folder is None else str(Path(offload_folder).expanduser().absolute())
    return Placement(device_map, main, max_memory, folder, bool(offload_buffers), tuple(no_split or ()))


def check_folder_writable(folder: str) -> None:
    """Fail at plan time if ``folder`` cannot be created or written (nothing is created here)."""
    p = Path(folder)
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise PlanError(f"offload_folder {folder} is not a directory ({probe} is a file)", path=folder)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PlanError(
            f"offload_folder {folder} is not writable ({probe} denies writing); pass a writable folder",
            path=folder,
        )


@contextlib.contextmanager
def _sized_as_planned(model: torch.nn.Module, plan: Plan):
    """Temporarily give fp8 modules meta scale buffers so accelerate counts their bytes."""
    named = dict(model.named_modules())
    added: list[tuple[torch.nn.Module, str]] = []
    try:
        for key, tp in plan.tensors.items():
            scale_bytes = tp.nbytes - _numel(tp.shape) * torch.empty((), dtype=getattr(torch, tp.target_dtype)).element_size()
            if scale_bytes <= 0:
                continue
            mod_name, _, local = key.rpartition(".")
            module = named[mod_name]
            name = tp.scale
            if name is not None and name not in module._buffers:
                module.register_buffer(name, torch.empty(scale_bytes // 4, device="meta"), persistent=False)
                added.append((module, name))
        yield
    finally:
        for module, name in added:
            module._buffers.pop(name, None)
            module._non_persistent_buffers_set.discard(name)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def infer_device_map(model: torch.nn.Module, plan: Plan, placement: Placement, no_split: tuple[str, ...]) -> dict:
    """accelerate's device map for a policy, sized by the plan's storage dtypes."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    special = {}
    for key, tp in plan.tensors.items():
        for k in (key, *tp.also):
            special[k] = getattr(torch, tp.target_dtype)
    try:
        max_memory = get_max_memory(placement.max_memory)
    except (ValueError, TypeError) as exc:
        raise PlanError(f"max_memory={placement.max_memory!r} is invalid: {exc}") from None
    policy = placement.device_map
    gpus = [k for k in max_memory if isinstance(k, int)]
    with _sized_as_planned(model, plan):
        if policy in ("balanced", "balanced_low_0") or (policy == "auto" and len(gpus) > 1):
            max_memory = get_balanced_memory(
                model,
                max_memory=max_memory,
                no_split_module_classes=list(no_split),
                special_dtypes=special,
                low_zero=policy == "balanced_low_0",
            )
        return dict(
            infer_auto_device_map(
                model,
                max_memory=max_memory,
                no_split_module_classes=list(no_split),
                special_dtypes=special,
            )
        )


def _owner(device_map: dict, name: str) -> Any:
    """The device of the longest device-map entry covering ``name`` (a tensor key or module)."""
    best, best_len = None, -1
    for prefix, dev in device_map.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if len(prefix) > best_len:
                best, best_len = dev, len(prefix)
    return best, best_len >= 0


def partition(model: torch.nn.Module, device_map: dict) -> dict:
    """Rewrite a device map whose entries nest (``{"": "cpu", "blocks.1": "disk"}``) into the
    non-overlapping form accelerate dispatches: a nested entry's parent is replaced by its
    children (and its own tensors), each inheriting the parent's device unless mapped."""
    # Example: {"": "cpu", "blocks.1": "disk"} -> pass 1 expands "" (it contains "blocks.1") into
    # "patch_embed": cpu, "blocks": cpu, "head": cpu, ... ("blocks.1" stays, setdefault keeps it)
    # -> pass 2 expands "blocks" (it contains "blocks.1") into "blocks.0": cpu, "blocks.2": cpu
    # -> no key contains another: done. A module's own tensors (not in a child) become entries
    # too, so nothing the parent held is lost. Each pass removes at least one nesting level, so
    # the loop ends after at most the depth of the deepest mapped module.
    out = dict(device_map)
    while True:
        nested = [
            k for k in out
            if any(o != k and (k == "" or o.startswith(k + ".")) for o in out)
        ]
        if not nested:
            return out
        for key in nested:
            dev = out.pop(key)
            try:
                module = model.get_submodule(key)
            except AttributeError:
                raise PlanError(f"device_map names {key!r}, which is not a module of the model") from None
            prefix = f"{key}." if key else ""
            for name, _ in module.named_children():
                out.setdefault(prefix + name, dev)
            for name, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
                out.setdefault(prefix + name, dev)


def place(model: torch.nn.Module, plan: Plan, placement: Placement, no_split: tuple[str, ...]) -> Plan:
    """Return the plan with every tensor's resting device and every module's execution device."""
    if placement.single:
        return plan
    if isinstance(placement.device_map, dict):
        device_map = partition(model, dict(placement.device_map))
    else:
        device_map = infer_device_map(model, plan, placement, (*no_split, *placement.no_split))
    device_map = {k: _device_str(v) for k, v in device_map.items()}
    for dev in set(device_map.values()):
        if dev.startswith("cuda"):
            _check_cuda(dev)
    if "disk" in device_map.values():
        disk = [k or "(root)" for k, v in device_map.items() if v == "disk"]
        if placement.offload_folder is None:
            need = sum(plan.bytes_per_device().values())
            raise PlanError(
                f"the model needs {need / 2**20:.1f} MiB as planned and does not fit in max_memory="
                f"{placement.max_memory}; {len(disk)} module(s) would go to disk ({', '.join(disk[:5])}"
                f"{' ...' if len(disk) > 5 else ''}): pass offload_folder= to offload them, or raise max_memory"
            )
        check_folder_writable(placement.offload_folder)
    main = placement.main_device
    tensors, modules = {}, {}
    for key, tp in plan.tensors.items():
        mod_name = key.rpartition(".")[0]
        dev, found = _owner(device_map, key)
        if not found:
            raise PlanError(
                f"device_map does not place module {mod_name or '(root)'!r} (tensor {key!r}); map it or one "
                "of its parents, or use device_map='auto'",
                module=mod_name,
                tensor=key,
            )
        rest = dev
        if dev == "disk" and tp.buffer and not placement.offload_buffers:
            rest = "cpu" if main == "cpu" else main
        tensors[key] = tp.model_copy(update={"device": rest})
    for name, mp in plan.modules.items():
        first = next(iter(mp.storage))
        dev, _ = _owner(device_map, f"{name}.{first}" if name else first)
        execution = main if dev in ("cpu", "disk") else dev
        offload = dev if dev == "disk" or (dev == "cpu" and main != "cpu") else None
        nbytes = sum(t.nbytes for k, t in tensors.items() if k.rpartition(".")[0] == name)
        modules[name] = mp.model_copy(update={"device": execution, "offload": offload, "nbytes": nbytes})
    return plan.model_copy(
        update={
            "tensors": tensors,
            "modules": modules,
            "device_map": device_map,
            "offload_folder": placement.offload_folder if "disk" in device_map.values() else None,
        }
    )


def _check_cuda(dev: str) -> None:
    if not torch.cuda.is_available():
        raise PlanError(
            f"device_map places modules on {dev!r}, which does not exist here: torch sees no CUDA device; "
            "use 'cpu' (with offload_folder= for disk)"
        )
    index = torch.device(dev).index or 0
    if index >= torch.cuda.device_count():
        raise PlanError(f"device {dev!r} does not exist here: {torch.cuda.device_count()} CUDA device(s) visible")


class DiskWriter:
    """Writes disk-offloaded tensors during streaming, in accelerate's offload-folder layout.

    A tensor stored in a safetensors file and needing no conversion is not copied: its index entry
    points at the original file. Everything else is written as ``<key>.dat`` (raw bytes, fp8
    staying one byte per element).
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.index: dict[str, dict] = {}
        self.written: list[str] = []
        self.wrote_index = False
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise OffloadError(f"cannot create the offload folder {folder}: {exc.strerror or exc}", path=folder) from exc

    def point(self, key: str, file: str, name: str, dtype: str) -> None:
        self.index[key] = {"safetensors_file": file, "weight_name": name, "dtype": dtype}

    def write(self, key: str, tensor: torch.Tensor) -> None:
        from accelerate.utils import offload_weight

        self.written.append(os.path.join(self.folder, f"{key}.dat"))
        try:
            offload_weight(tensor.detach().cpu(), key, self.folder, index=self.index)
        except OSError as exc:
            raise OffloadError(
                f"cannot write {key!r} to the offload folder {self.folder}: {exc.strerror or exc}; free some space "
                "or choose another offload_folder (the load was undone, its offload files removed)",
                path=self.folder,
                tensor=key,
            ) from exc

    def finish(self) -> None:
        from accelerate.utils import save_offload_index

        try:
            self.wrote_index = True
            save_offload_index(self.index, self.folder)
        except OSError as exc:
            raise OffloadError(f"cannot write the offload index in {self.folder}: {exc.strerror or exc}",
                               path=self.folder) from exc

    def abandon(self) -> None:
        """Remove every file this load wrote into the offload folder (after a failed load)."""
        index = [os.path.join(self.folder, "index.json")] if self.wrote_index else []
        for path in (*self.written, *index):
            try:
                os.unlink(path)
            except OSError:
                pass


def dispatch(model: torch.nn.Module, plan: Plan, placement: Placement, writer: DiskWriter | None) -> None:
    """Attach accelerate's offload hooks according to the plan's device map."""
    if plan.device_map is None:
        return
    import logging
    import warnings

    from accelerate import dispatch_model

    dm = {k: (int(v.split(":")[1]) if v.startswith("cuda:") else v) for k, v in plan.device_map.items()}
    log = logging.getLogger("accelerate.big_modeling")
    level = log.level
    log.setLevel(logging.ERROR)  # the plan already says which modules rest where
    try:
        with warnings.catch_warnings():
            # accelerate's own maps name root-level parameters, which its check then warns about
            warnings.filterwarnings("ignore", message="The following device_map keys do not match")
            dispatch_model(
                model,
                device_map=dm,
                main_device=placement.main_device,
                offload_dir=plan.offload_folder,
                offload_index=writer.index if writer is not None else None,
                offload_buffers=placement.offload_buffers,
            )
    finally:
        log.setLevel(level)
