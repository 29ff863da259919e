"""Built-in plugin: build diffusers models from ``config.json`` and declare their facts.

The skeleton is constructed the way ``ModelMixin.from_pretrained`` constructs it:
``cls.from_config(config)`` with torch's weight initialisers disabled and the load dtype as
torch's default dtype, with parameters on the meta device and buffers real.

diffusers is imported only inside the functions that need it: a plain torch model never triggers
the import, and without diffusers installed this plugin contributes nothing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
import importlib.util
import sys
from typing import Any

import torch

from loaderkit.plugin import (
    Builder, BuildRequest, building_thread_only, contained, hookimpl, meta_init, ModelFacts, thaw, to_torch,
)
from loaderkit.errors import BuildError

#: Patterns diffusers' ``enable_layerwise_casting`` skips by default, besides a model's own
#: ``_skip_layerwise_casting_patterns`` and ``_keep_in_fp32_modules``.
DEFAULT_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")


def available() -> bool:
    """True if diffusers is installed (checked without importing it)."""
    return importlib.util.find_spec("diffusers") is not None


class DiffusersBuilder(Builder):
    """Builds diffusers models from a config with ``_class_name``."""

    name = "diffusers"
    description = "diffusers models from config.json (_class_name)"

    def can_build(self, request: BuildRequest) -> bool:
        cfg = request.checkpoint.config
        return isinstance(cfg, dict) and bool(cfg.get("_class_name")) and available()

    def build(self, request: BuildRequest) -> torch.nn.Module:
        import diffusers

        ckpt = request.checkpoint
        cfg = thaw(ckpt.config) or {}
        cls = getattr(diffusers, str(cfg["_class_name"]), None)
        if isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin) and (Path(ckpt.root) / "config.json").is_file():
            contained(Path(ckpt.root), Path(ckpt.root) / "config.json", "config")
            try:  # the library's own reader, as from_pretrained reads it
                cfg = cls.load_config(str(ckpt.root), local_files_only=True)
            except Exception as exc:
                raise BuildError(
                    f"diffusers could not read the config.json of {ckpt.path}: {type(exc).__name__}: {exc}",
                    path=ckpt.path,
                ) from exc
        if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
            raise BuildError(
                f"config.json of {ckpt.path} names _class_name {cfg['_class_name']!r}, which is "
                f"not a model class of diffusers {diffusers.__version__}; pass the architecture "
                "yourself: loaderkit.load(path, model=...)",
                path=ckpt.path,
            )
        model = construct(cls, cfg, to_torch(request.dtype), ckpt.path)
        model.register_to_config(_name_or_path=ckpt.root)
        return model


def construct(cls: type, cfg: Any, dtype: torch.dtype, path: str) -> torch.nn.Module:
    """``cls.from_config(cfg)`` as ``from_pretrained`` constructs it: on the meta device, no
    weight initialisers, ``dtype`` as the default dtype. ``path`` names the checkpoint in errors."""
    try:
        with _init_contexts(dtype):
            return cls.from_config(cfg)
    except Exception as exc:
        raise BuildError(
            f"diffusers could not construct {cls.__name__} from the config for {path}: "
            f"{type(exc).__name__}: {exc}",
            path=path,
        ) from exc


@contextlib.contextmanager
def _init_contexts(dtype: torch.dtype):
    with contextlib.ExitStack() as stack:
        stack.enter_context(meta_init(dtype))
        try:
            from diffusers.models.modeling_utils import no_init_weights

            stack.enter_context(building_thread_only(no_init_weights()))
        except ImportError:
            pass
        yield


# -------------------------------------------------------------------------------------------
# Facts
# -------------------------------------------------------------------------------------------


def _patterns(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def subtree_regex(pattern: str) -> str:
    """Turn a diffusers skip pattern into a regex that also matches the module's descendants.

    diffusers tests ``re.search(pattern, name)`` on a module and, on a match, skips its whole
    subtree. A descendant's name contains its ancestor's name as a prefix, so only a trailing
    ``$`` anchor stops a pattern matching descendants; it becomes ``(?:\\.|$)``.
    """
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        return pattern[:-1] + r"(?:\.|$)"
    return pattern


def _skip_low_precision(model: Any) -> tuple[str, ...]:
    own = _patterns(getattr(model, "_skip_layerwise_casting_patterns", None))
    keep = _patterns(getattr(model, "_keep_in_fp32_modules", None))
    return tuple(dict.fromkeys(subtree_regex(p) for p in (*DEFAULT_SKIP_PATTERNS, *own, *keep)))


def _no_split(model: torch.nn.Module, mixin: type) -> tuple[str, ...]:
    names: list[str] = []
    for module in model.modules():
        if isinstance(module, mixin):
            names.extend(_patterns(getattr(module, "_no_split_modules", None)))
    return tuple(dict.fromkeys(names))


def facts_for(model: torch.nn.Module, mixin: type) -> ModelFacts:
    """The facts diffusers declares about a ``ModelMixin``."""
    keep = _patterns(getattr(model, "_keep_in_fp32_modules", None))
    return ModelFacts(
        keep_fp32=keep,
        skip_low_precision=_skip_low_precision(model),
        ignore_unexpected=_patterns(getattr(model, "_keys_to_ignore_on_load_unexpected", None)),
        no_split=_no_split(model, mixin),
        dtype_source=_dtype_source(model, keep),
        low_precision_advice=_vae_advice(model),
        source=("diffusers",),
    )


def _dtype_source(model: torch.nn.Module, keep: tuple[str, ...]) -> tuple[str, ...]:
    """The module whose parameter diffusers' ``ModelMixin.dtype`` reports: the first floating
    parameter whose name no ``_keep_in_fp32_modules`` entry is part of (``get_parameter_dtype``)."""
    for name, param in model.named_parameters():
        if keep and any(m in name for m in keep):
            continue
        if param.is_floating_point():
            return (name.rpartition(".")[0],)
    return ()


def _vae_advice(model: torch.nn.Module) -> str:
    """VAEs lose visible quality in fp8 storage (decode cosine ~0.96 on a video VAE, against
    ~0.999 in bf16) for little memory: the whole model prefers its compute dtype."""
    try:
        from diffusers.models.autoencoders.vae import AutoencoderMixin
    except ImportError:  # pragma: no cover - older diffusers
        AutoencoderMixin = ()
    if isinstance(model, AutoencoderMixin) or type(model).__name__.startswith("Autoencoder"):
        return f"{type(model).__name__} is a VAE: fp8 storage costs visible decode quality for little memory"
    return ""


# -------------------------------------------------------------------------------------------
# Hooks
# -------------------------------------------------------------------------------------------


@hookimpl
def loaderkit_register_builders(register) -> None:
    """Register the diffusers builder when diffusers is installed."""
    if available():
        register(DiffusersBuilder())


@hookimpl
def loaderkit_model_facts(model: torch.nn.Module) -> ModelFacts | None:
    """Facts for ``ModelMixin`` instances; ``None`` for anything else (no import triggered)."""
    modeling = sys.modules.get("diffusers.models.modeling_utils")
    if modeling is None or not isinstance(model, modeling.ModelMixin):
        return None
    return facts_for(model, modeling.ModelMixin)
