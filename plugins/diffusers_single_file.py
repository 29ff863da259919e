"""Built-in plugin: single ``.safetensors`` files in their original layout, loaded into diffusers
classes.

Official release files and ComfyUI's repackaged files (``model.diffusion_model.`` prefixes,
``scaled_fp8`` markers, plain fp8) keep the key layout of the code that trained the model.
diffusers converts them in ``from_single_file`` with its own detection
(``infer_diffusers_model_type``) and converters (``SINGLE_FILE_LOADABLE_CLASSES``). This plugin
uses exactly those, without reading tensor data:

* the converter runs once over meta tensors built from the file's header, while
  :mod:`loaderkit.plugins.op_capture` records what makes each output tensor: a rename, or the
  library's operations on some inputs (``chunk`` of a fused ``qkv``, ``cat``, the swapped halves
  of ``norm_out``). Renames become ``KeyMap.renamed``; everything else a fused tensor whose
  ``run`` replays the recorded calls on real tensors, one model tensor at a time, while streaming.
  fp8 stays fp8 (the operations move bytes), and each scale follows its weight. Converters that
  find blocks by enumerating the keys (the UNet's) see every key of the file, as in
  ``from_single_file``;
* a skeleton is built with the config the user gives (:func:`model`), or, for a class or no
  ``model=`` at all, the config diffusers would fetch — found only in the local Hugging Face
  cache (nothing is downloaded).

diffusers is imported only when a diffusers model or a config-less single file is met.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from loaderkit.errors import BuildError, UnsupportedCheckpointError
from loaderkit.plugin import Builder, BuildRequest, FusedTensor, KeyMap, ModelFacts, hookimpl, to_torch

from . import op_capture
from .diffusers_builder import construct

PLUGIN = "diffusers-single-file"


def available() -> bool:
    """True if diffusers is installed (checked without importing it)."""
    return importlib.util.find_spec("diffusers") is not None


def _library():
    from diffusers.loaders import single_file_model, single_file_utils

    return single_file_model, single_file_utils


def mapping_class(cls: type) -> str | None:
    """The ``SINGLE_FILE_LOADABLE_CLASSES`` entry diffusers uses for ``cls`` (as
    ``from_single_file`` finds it: the first listed class ``cls`` derives from), or ``None``."""
    import diffusers

    sfm, _ = _library()
    for name in sfm.SINGLE_FILE_LOADABLE_CLASSES:
        base = getattr(diffusers, name, None)
        if isinstance(base, type) and issubclass(cls, base):
            return name
    return None


def meta_checkpoint(tensors) -> dict[str, torch.Tensor]:
    """Meta tensors of the described shapes and dtypes (no data), by key."""
    return op_capture.meta_tensors({k: (tuple(t.shape), to_torch(t.dtype)) for k, t in tensors.items()})


def detect_layout(tensors) -> str | None:
    """diffusers' model type for these tensors (``infer_diffusers_model_type``), or ``None`` when
    the file is none of the layouts it knows (its detection answers ``"v1"`` for anything; here
    ``"v1"`` needs its marker key)."""
    _, sfu = _library()
    try:
        meta = meta_checkpoint(tensors)
        kind = sfu.infer_diffusers_model_type(meta)
    except Exception:  # noqa: BLE001 - a detection that reads values, or odd shapes: none of its layouts
        return None
    if kind == "v1" and sfu.CHECKPOINT_KEY_NAMES["v1"] not in meta:
        return None
    return kind


# -------------------------------------------------------------------------------------------
# Configs: given by the user, or the one diffusers would fetch, from the local cache only
# -------------------------------------------------------------------------------------------


def model(cls: type, config: str | Path | dict, *, subfolder: str | None = None) -> Callable[[], torch.nn.Module]:
    """``model=`` for a diffusers class and its config: a local diffusers model directory (or a
    pipeline directory with ``subfolder``), or a config dict. Nothing is downloaded.

    ``loaderkit.load(file, "fp8", model=model(WanTransformer3DModel, "Wan2.1-T2V-1.3B/transformer"))``
    """
    if isinstance(config, dict):
        cfg = dict(config)
    else:
        try:
            cfg = cls.load_config(str(config), subfolder=subfolder, local_files_only=True)
        except Exception as exc:
            raise BuildError(f"diffusers could not read the config of {cls.__name__} in {config}: "
                             f"{type(exc).__name__}: {exc}; pass a local diffusers model directory") from exc

    def build() -> torch.nn.Module:
        return construct(cls, cfg, torch.get_default_dtype(), str(config) if not isinstance(config, dict) else "config")

    build.__name__ = f"{cls.__name__}.from_config"
    return build


def _candidates(kind: str, mapping: dict | None) -> list[tuple[str, str | None]]:
    """(repo, subfolder) pairs where the config of a ``kind`` file's model may be cached."""
    _, sfu = _library()
    path = dict(sfu.DIFFUSERS_DEFAULT_PIPELINE_PATHS.get(kind) or {})
    repo = path.get("pretrained_model_name_or_path")
    if not repo:
        return []
    if mapping is not None:
        return [(repo, mapping.get("default_subfolder") or path.get("subfolder"))]
    subs = [path.get("subfolder"), "transformer", "unet", None]
    return [(repo, s) for s in dict.fromkeys(subs)]


def _cached_config(repo: str, subfolder: str | None) -> dict | None:
    from huggingface_hub import try_to_load_from_cache

    name = f"{subfolder}/config.json" if subfolder else "config.json"
    found = try_to_load_from_cache(repo, name)
    if not isinstance(found, str):
        return None
    with open(found, encoding="utf-8") as f:
        cfg = json.load(f)
    return cfg if isinstance(cfg, dict) else None


def _no_config(path: str, kind: str, what: str, tried: list[tuple[str, str | None]]) -> BuildError:
    where = ", ".join(f"{r}/{s or ''}config.json".replace("//", "/") for r, s in tried) or "none is known"
    return BuildError(
        f"{path} is a {kind!r} single file (diffusers' detection), but {what}: looked in the local Hugging "
        f"Face cache for {where}, and nothing is downloaded. Pass the architecture with its config: "
        "model=loaderkit.plugins.diffusers_single_file.model(<diffusers class>, <local model directory>), "
        "or a skeleton module",
        path=path,
    )


class SingleFileBuilder(Builder):
    """Builds the diffusers model of a config-less original-layout single file, with the config
    diffusers would fetch for it — from the local Hugging Face cache only."""

    name = "diffusers-single-file"
    description = "diffusers models for original-layout single files (config from the local HF cache)"
    priority = -10

    def can_build(self, request: BuildRequest) -> bool:
        ckpt = request.checkpoint
        return not ckpt.config and len(ckpt.files) == 1 and available() and detect_layout(_model_tensors(ckpt)) is not None

    def build(self, request: BuildRequest) -> torch.nn.Module:
        import diffusers

        sfm, _ = _library()
        ckpt = request.checkpoint
        kind = detect_layout(_model_tensors(ckpt))
        tried = _candidates(kind, None)
        for repo, sub in tried:
            cfg = _cached_config(repo, sub)
            name = str((cfg or {}).get("_class_name", ""))
            if name in sfm.SINGLE_FILE_LOADABLE_CLASSES and hasattr(diffusers, name):
                return self._make(getattr(diffusers, name), repo, sub, request)
        raise _no_config(ckpt.path, kind, "no cached config names a class diffusers converts single files into", tried)

    def build_class(self, request: BuildRequest, cls: type) -> torch.nn.Module | None:
        ckpt = request.checkpoint
        if ckpt.config or not available() or "diffusers" not in sys.modules:
            return None
        name = mapping_class(cls)
        kind = detect_layout(_model_tensors(ckpt)) if name else None
        if kind is None:
            return None  # not an original-layout file: loaderkit calls cls()
        sfm, _ = _library()
        tried = _candidates(kind, sfm.SINGLE_FILE_LOADABLE_CLASSES[name])
        for repo, sub in tried:
            if _cached_config(repo, sub) is not None:
                return self._make(cls, repo, sub, request)
        raise _no_config(ckpt.path, kind, f"the config of {cls.__name__} diffusers would fetch is not cached", tried)

    @staticmethod
    def _make(cls: type, repo: str, sub: str | None, request: BuildRequest) -> torch.nn.Module:
        try:
            cfg = cls.load_config(repo, subfolder=sub, local_files_only=True)
        except Exception as exc:
            raise BuildError(f"diffusers could not read the cached config {repo}/{sub or ''} of {cls.__name__}: "
                             f"{type(exc).__name__}: {exc}", path=request.checkpoint.path) from exc
        return construct(cls, cfg, to_torch(request.dtype), request.checkpoint.path)


def _model_tensors(ckpt) -> dict:
    q = ckpt.quantization
    skip = q.companion_keys() if q else set()
    return {k: t for k, t in ckpt.tensors.items() if k not in skip}


# -------------------------------------------------------------------------------------------
# Key conversions: diffusers' converter, captured from headers and replayed while streaming
# -------------------------------------------------------------------------------------------


def is_native(model_keys: set[str], keys: list[str]) -> bool:
    """True when the checkpoint is already in the model's own layout: most of its keys are the
    model's (a diffusers-layout file, even with a few extra or missing keys, is left to the matcher)."""
    return bool(keys) and sum(k in model_keys for k in keys) * 2 > len(keys)


def key_map(model: torch.nn.Module, tensors) -> KeyMap:
    """diffusers' single-file conversion of ``tensors`` (headers) into ``model``'s keys."""
    keys = list(tensors)
    model_keys = set(model.state_dict())
    if is_native(model_keys, keys):
        return KeyMap()
    cls = type(model).__name__
    kind = detect_layout(tensors)
    name = mapping_class(type(model))
    if name is None:
        sfm, _ = _library()
        raise UnsupportedCheckpointError(
            f"the checkpoint is not in {cls}'s diffusers layout (detected layout: {kind or 'unknown'}), and "
            f"diffusers has no single-file converter for {cls}; classes it converts single files into: "
            f"{', '.join(sfm.SINGLE_FILE_LOADABLE_CLASSES)}. Pass the class the file was made for",
            tensor=keys[0] if keys else None)
    capture = _capture(model, name, tensors, kind)
    _check_fits(capture, model_keys, cls, kind, _config_hint(name, cls))
    return _keymap(capture, cls)


def _converter(name: str) -> Callable:
    sfm, _ = _library()
    return sfm.SINGLE_FILE_LOADABLE_CLASSES[name]["checkpoint_mapping_fn"]


def _config_hint(name: str, cls: str) -> str:
    """What else to check when a converter that takes the model's config fails (the UNet's counts
    blocks with ``layers_per_block``): the config given may not be the file's."""
    fn = _converter(name)
    try:
        reads_config = "config" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        reads_config = False
    if not reads_config:
        return ""
    return (f", or the config given is not the file's ({fn.__name__} reads the model's config): pass the "
            f"config of the {cls} the file was made from")


def _capture(model: torch.nn.Module, name: str, tensors, kind: str | None) -> op_capture.Capture:
    fn = _converter(name)
    config = dict(model.config)
    layout = f"detected layout: {kind}" if kind else "diffusers detects none of its layouts"
    try:
        return op_capture.capture(lambda checkpoint: fn(config=config, checkpoint=checkpoint), meta_checkpoint(tensors))
    except op_capture.CaptureError as exc:
        raise UnsupportedCheckpointError(
            f"diffusers' single-file converter for {type(model).__name__} ({fn.__name__}) cannot be planned from "
            f"the file's headers: {exc}; load it with {type(model).__name__}.from_single_file") from exc
    except Exception as exc:
        key = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
        raise UnsupportedCheckpointError(
            f"diffusers' single-file converter for {type(model).__name__} ({fn.__name__}) failed on this file: "
            f"{type(exc).__name__}: {exc} ({layout}). The file is not a {type(model).__name__} single file in a "
            f"layout diffusers converts; pass the class it was made for{_config_hint(name, type(model).__name__)}",
            tensor=str(key) if key else None) from exc


def _check_fits(capture: op_capture.Capture, model_keys: set[str], cls: str, kind: str | None, hint: str) -> None:
    """The converter's output must be mostly the model's keys: otherwise the file is another
    family's (diffusers' converters rename whatever they are given), or, for a converter that
    reads the config, the config is not the file's."""
    outputs = list(capture.outputs)
    detected = f"diffusers detects it as {kind or 'none of its layouts'}"
    if not outputs:
        raise UnsupportedCheckpointError(
            f"diffusers' single-file converter for {cls} found none of the keys it converts in the file: the file "
            f"is not in a {cls} layout diffusers converts ({detected}; its first key is "
            f"{next(iter(capture.unused), 'none')!r}); pass the class it was made for")
    hits = sum(k in model_keys for k in outputs)
    if hits * 2 <= len(outputs):
        stray = [k for k in outputs if k not in model_keys][:3]
        raise UnsupportedCheckpointError(
            f"diffusers' single-file converter for {cls} turned the file into {len(outputs)} keys, of which only "
            f"{hits} are {cls}'s (e.g. {', '.join(stray)}): the file is not in a {cls} layout "
            f"({detected}); pass the class it was made for{hint}",
            tensor=stray[0])


def _keymap(capture: op_capture.Capture, cls: str) -> KeyMap:
    uses = Counter(s for k in capture.outputs for s in capture.sources(k))
    renamed: dict[str, str] = {}
    fused: dict[str, FusedTensor] = {}
    for key in capture.outputs:
        sources = capture.sources(key)
        if capture.is_rename(key) and uses[sources[0]] == 1:
            if sources[0] != key:
                renamed[sources[0]] = key
            continue
        fused[key] = FusedTensor(key=key, sources=sources, transform=capture.describe(key, placeholders=True),
                                 shape=capture.shapes[key])
    used_roots = {s.split(".", 1)[0] for s in uses}
    ignored = {
        k: f"another component of the file: diffusers' converter for {cls} does not use it"
        for k in capture.unused if k.split(".", 1)[0] not in used_roots
    }

    def run(target: str, fetch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {target: capture.replay(target, fetch)}

    return KeyMap(renamed=renamed, fused=fused, ignored=ignored, run=run)


# -------------------------------------------------------------------------------------------
# Hooks
# -------------------------------------------------------------------------------------------


@hookimpl
def loaderkit_register_builders(register) -> None:
    """Register the single-file builder when diffusers is installed."""
    if available():
        register(SingleFileBuilder())


@hookimpl
def loaderkit_model_facts(model: torch.nn.Module) -> ModelFacts | None:
    """diffusers' single-file key conversion for ``ModelMixin`` instances (it converts nothing
    for a checkpoint already in the model's layout); ``None`` for anything else."""
    modeling = sys.modules.get("diffusers.models.modeling_utils")
    if modeling is None or not isinstance(model, modeling.ModelMixin):
        return None
    return ModelFacts(key_mapping=functools.partial(key_map, model), source=("diffusers single-file",))
