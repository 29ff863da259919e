"""Built-in plugin: diffusers pipeline directories (``model_index.json``) as whole pipelines.

The directory is read the way ``DiffusionPipeline.from_pretrained`` reads it: ``model_index.json``
names the pipeline class and, per component, the library and class; components that are models
(``ModelMixin`` / ``PreTrainedModel`` subclasses) are loaded by loaderkit, each by its own plan;
schedulers, tokenizers and processors by their class's own ``from_pretrained``; the pipeline
object is made by the pipeline class's constructor, as diffusers makes it.

diffusers is imported only when a pipeline is assembled or its components are classified.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Any

from loaderkit.plugin import Assembler, Component
from loaderkit.errors import BuildError, CheckpointError, CorruptCheckpointError, UsageError
from loaderkit.plugin import contained, detach_others, has_runtime_hooks, hookimpl, read_json

from .diffusers_builder import available

INDEX = "model_index.json"


class DiffusersAssembler(Assembler):
    """Assembles diffusers pipelines from ``model_index.json`` directories."""

    name = "diffusers"
    description = "diffusers pipeline directories (model_index.json)"

    def can_assemble(self, path: Path) -> bool:
        return path.is_dir() and (path / INDEX).is_file() and available()

    def _index(self, path: Path) -> dict:
        contained(path, path / INDEX, "pipeline index")
        index = read_json(path / INDEX, "pipeline index")
        if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
            raise CorruptCheckpointError(f"{path / INDEX}: not a diffusers pipeline index (no _class_name)",
                                  path=str(path / INDEX))
        return index

    def components(self, path: Path) -> tuple[Component, ...]:
        index = self._index(path)
        out = []
        for name, spec in index.items():
            if name.startswith("_") or not isinstance(spec, (list, tuple)) or len(spec) != 2:
                continue
            library, class_name = spec
            if library is None or class_name is None:
                out.append(Component(name=name))
                continue
            directory = path / name
            if not directory.is_dir():
                raise CheckpointError(
                    f"{path / INDEX} names component {name!r} ({library}.{class_name}) but {directory} "
                    "is not a directory; the pipeline directory is incomplete",
                    path=str(directory),
                )
            contained(path, directory, f"component {name!r}")
            cls = _class(library, class_name, path)
            weights, role = _classify(cls, name)
            out.append(Component(name=name, library=library, class_name=class_name, directory=str(directory),
                                 weights=weights, role=role))
        return _with_flows(tuple(out))

    def pipeline_class(self, path: Path) -> str:
        return str(self._index(path)["_class_name"])

    def offload_order(self, path: Path, components: tuple[Component, ...]) -> tuple[str, ...]:
        cls = _class("diffusers", self._index(path)["_class_name"], path)
        seq = [n for n in (getattr(cls, "model_cpu_offload_seq", None) or "").split("->") if n]
        models = [c.name for c in components if c.weights]
        return tuple([n for n in seq if n in models] + [n for n in models if n not in seq])

    def load_component(self, path: Path, component: Component) -> Any:
        cls = _class(component.library, component.class_name, path)
        try:
            return cls.from_pretrained(component.directory)
        except Exception as exc:
            raise BuildError(
                f"{component.library}.{component.class_name}.from_pretrained could not load component "
                f"{component.name!r} from {component.directory}: {type(exc).__name__}: {exc}",
                path=component.directory,
            ) from exc

    def assemble(self, path: Path, parts: dict[str, Any]) -> Any:
        cls = _class("diffusers", self._index(path)["_class_name"], path)
        expected, optional = cls._get_signature_keys(cls)
        kwargs = {k: parts.get(k) for k in expected}
        kwargs.update({k: parts[k] for k in optional if k in parts})
        try:
            pipe = cls(**kwargs)
        except Exception as exc:
            raise BuildError(f"{cls.__name__} could not be built from the components of {path}: "
                             f"{type(exc).__name__}: {exc}", path=str(path)) from exc
        pipe.register_to_config(_name_or_path=str(path))
        # diffusers' enable_model_cpu_offload (and maybe_free_model_hooks after every call) first
        # removes *every* accelerate hook from every component, recursively: loaderkit's cast
        # rules with them, and the next forward would reach fp8 weights with bf16 activations.
        # This pipeline's hook removal takes the offload hooks and leaves the cast rules.
        pipe.remove_all_hooks = functools.partial(_remove_offload_hooks, pipe)
        pipe.enable_sequential_cpu_offload = functools.partial(_sequential_offload, pipe)
        return pipe

    def offload(self, pipe: Any, device: str, order: tuple[str, ...]) -> bool:
        pipe.enable_model_cpu_offload(device=device)  # diffusers' own model offload, in its own order
        return True


def _sequential_offload(pipe: Any, *args: Any, **kwargs: Any) -> None:
    """``enable_sequential_cpu_offload``, refused where loaderkit's runtime is attached: accelerate's
    per-module offload hooks replace the hooks a module has, cast rules included, and the first
    forward would then meet fp8 weights with bf16 activations."""
    import torch

    models = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    covered = [n for n, m in models.items() if has_runtime_hooks(m)]
    if covered:
        raise UsageError(
            f"enable_sequential_cpu_offload would replace loaderkit's cast rules in {', '.join(covered)} with "
            "accelerate's per-module offload hooks; use loaderkit.load_pipeline(..., offload='model') (models "
            "take turns on the device), or load one model across devices with "
            "loaderkit.load(path, device_map='auto', max_memory=...)"
        )
    type(pipe).enable_sequential_cpu_offload(pipe, *args, **kwargs)


def _remove_offload_hooks(pipe: Any) -> None:
    """``DiffusionPipeline.remove_all_hooks`` for a pipeline loaderkit loaded: every component's
    accelerate hooks go, except loaderkit's cast rules and input casts."""
    import torch

    for model in pipe.components.values():
        if isinstance(model, torch.nn.Module):
            detach_others(model)
    pipe._all_hooks = []


def _class(library: str, class_name: str, path: Path) -> type:
    """The class a ``model_index.json`` names, as diffusers resolves it (``library.ClassName``)."""
    try:
        module = importlib.import_module(library)
    except ImportError as exc:
        raise BuildError(f"{path / INDEX} names a class of {library!r}, which is not installed: "
                         f"pip install {library}", path=str(path)) from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise BuildError(f"{path / INDEX} names {library}.{class_name}, which {library} does not define",
                         path=str(path))
    return cls


def _classify(cls: type, name: str) -> tuple[bool, str]:
    """Whether a component class is a model with weights, and its role in the pipeline."""
    import diffusers

    is_diffusers_model = issubclass(cls, diffusers.ModelMixin)
    is_transformers_model = False
    try:
        import transformers

        is_transformers_model = issubclass(cls, transformers.PreTrainedModel)
    except ImportError:
        pass
    if not (is_diffusers_model or is_transformers_model):
        return False, "other"
    if is_transformers_model:
        return True, "image_encoder" if name.startswith("image_encoder") else "text_encoder"
    from diffusers.models.autoencoders.vae import AutoencoderMixin

    if issubclass(cls, AutoencoderMixin) or cls.__name__.startswith("Autoencoder"):
        return True, "vae"
    return True, "denoiser"


def _with_flows(components: tuple[Component, ...]) -> tuple[Component, ...]:
    """Who feeds whom in a diffusers pipeline: encoders feed every denoiser, denoisers the VAE."""
    encoders = tuple(c.name for c in components if c.role in ("text_encoder", "image_encoder"))
    denoisers = tuple(c.name for c in components if c.role == "denoiser")
    out = []
    for c in components:
        if c.role == "denoiser":
            c = c.replace(consumes=encoders)
        elif c.role == "vae":
            c = c.replace(consumes=denoisers)
        out.append(c)
    return tuple(out)


@hookimpl
def loaderkit_register_assemblers(register) -> None:
    """Register the diffusers assembler when diffusers is installed."""
    if available():
        register(DiffusersAssembler())
