"""Built-in plugin ``lora-formats``: the LoRA key formats ``peft`` and ``kohya``.

* ``peft`` — files written by peft (``save_pretrained``, ``get_peft_model_state_dict``) and by
  diffusers (``save_lora_weights``): ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``,
  under peft's ``base_model.model.`` wrapper or a diffusers component prefix (``transformer.``,
  ``unet.``). The scaling is peft's: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
  ``use_rslora``), with ``rank_pattern`` / ``alpha_pattern`` resolved by peft's own
  ``get_pattern_key``, from the ``adapter_config.json`` beside the file; without one, a
  ``<module>.alpha`` tensor (diffusers' network alphas) gives ``alpha / r``, else 1.
* ``kohya`` — kohya-ss / ComfyUI / A1111 files: ``lora_unet_<module>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``, where ``<module>`` is the model's module name with dots
  written as underscores (``lora_te_``, ``lora_te1_``, ``lora_transformer_``... prefixes alike).
  The scaling is ``alpha / r`` (1 without ``alpha``).

  Files in the *original* naming of a model diffusers converts (Flux:
  ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``...), whose names a diffusers
  model's modules do not match, go through diffusers' own converter
  (``_convert_kohya_flux_lora_to_diffusers``, what ``FluxPipeline.load_lora_weights`` runs), which
  turns them into peft keys — splitting fused ``qkv`` factors and folding each ``alpha`` into them — and
  the factors are those it computes. The file is small; it is read whole, once, to convert it.

Keys a format does not consume (DoRA magnitudes, LoKr/LoHa factors, text-encoder keys for a
denoiser) are reported as unmatched, never skipped.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Callable, Sequence

from loaderkit.plugin import LoraFile, LoraFormat, LoraLayout, LoraPair, TensorInfo, dtype_name, hookimpl

#: peft's wrapper prefix, and the diffusers pipeline components a LoRA file may be saved under.
PEFT_PREFIX = "base_model.model."
COMPONENTS = ("transformer.", "unet.")


def _peft_module(stem: str, modules: set[str]) -> str | None:
    """The model module a peft/diffusers key stem names (its wrappers removed), or ``None``."""
    candidates = [stem]
    if stem.startswith(PEFT_PREFIX):
        candidates.append(stem[len(PEFT_PREFIX):])
    candidates += [c[len(p):] for c in list(candidates) for p in COMPONENTS if c.startswith(p)]
    return next((c for c in candidates if c in modules), None)


def _peft_scale(config: dict | None, module: str, rank: int, alpha: float | None) -> float:
    """peft's scaling of one module (``LoraLayer.update_layer``), or diffusers' network alpha."""
    if config is None:
        return 1.0 if alpha is None else alpha / rank
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(ranks.keys(), module), config.get("r", rank))
    a = alphas.get(get_pattern_key(alphas.keys(), module), config.get("lora_alpha", r))
    return a / math.sqrt(r) if config.get("use_rslora") else a / r


class PeftLora(LoraFormat):
    """``lora_A`` / ``lora_B`` keys, peft's scaling (see the module docstring)."""

    name = "peft"
    priority = 10

    def claim(self, lora: LoraFile) -> bool:
        return any(".lora_A." in k or ".lora_B." in k for k in lora.tensors)

    def read(self, lora: LoraFile, modules: Sequence[str], scalar: Callable[[str], float]) -> LoraLayout:
        known, pairs, used = set(modules), [], set()
        for key in lora.tensors:
            stem, sep, suffix = key.rpartition(".lora_A.")
            if not sep:
                continue
            up = f"{stem}.lora_B.{suffix}"
            module = _peft_module(stem, known)
            if module is None or up not in lora.tensors:
                continue
            alpha_key = f"{stem}.alpha"
            alpha = scalar(alpha_key) if alpha_key in lora.tensors else None
            rank = lora.tensors[key].shape[0]
            pairs.append(LoraPair(module=module, down=key, up=up,
                                  scale=_peft_scale(lora.config, module, rank, alpha)))
            used.update((key, up, alpha_key))
        return LoraLayout(pairs=tuple(pairs), unmatched=tuple(k for k in lora.tensors if k not in used))


class KohyaLora(LoraFormat):
    """``lora_down`` / ``lora_up`` / ``alpha`` keys with underscored module names."""

    name = "kohya"
    priority = 5

    def claim(self, lora: LoraFile) -> bool:
        return any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in lora.tensors)

    def read(self, lora: LoraFile, modules: Sequence[str], scalar: Callable[[str], float]) -> LoraLayout:
        plain = self._plain(lora, modules, scalar)
        if (plain.pairs and not plain.unmatched) or importlib.util.find_spec("diffusers") is None:
            return plain  # the names are the model's own (or no converter to try)
        return _original_layout(lora, modules) or plain

    def tensors(self, lora: LoraFile, keys: Sequence[str]) -> dict:
        converted = _converted(lora.path, *_stamp(lora.path)) or {}
        return {k: converted[k] for k in keys if k in converted}

    def _plain(self, lora: LoraFile, modules: Sequence[str], scalar: Callable[[str], float]) -> LoraLayout:
        flat: dict[str, list[str]] = {}
        for m in modules:
            flat.setdefault(m.replace(".", "_"), []).append(m)
        pairs, used = [], set()
        for key in lora.tensors:
            stem, sep, _ = key.rpartition(".lora_down.weight")
            up = f"{stem}.lora_up.weight"
            module = _kohya_module(stem, flat) if sep and up in lora.tensors else None
            if module is None:
                continue
            alpha_key = f"{stem}.alpha"
            rank = lora.tensors[key].shape[0]
            scale = scalar(alpha_key) / rank if alpha_key in lora.tensors else 1.0
            pairs.append(LoraPair(module=module, down=key, up=up, scale=scale))
            used.update((key, up, alpha_key))
        return LoraLayout(pairs=tuple(pairs), unmatched=tuple(k for k in lora.tensors if k not in used))


def _kohya_module(stem: str, flat: dict[str, list[str]]) -> str | None:
    """The module named by ``lora_<component>_<module with underscores>``: the shortest prefix
    whose rest is exactly one module's underscored name (two modules writing alike match none)."""
    if not stem.startswith("lora_"):
        return None
    for i, ch in enumerate(stem):
        if ch == "_" and i >= 4:
            hit = flat.get(stem[i + 1:])
            if hit is not None:
                return hit[0] if len(hit) == 1 else None
    return None


def _original_layout(lora: LoraFile, modules: Sequence[str]) -> LoraLayout | None:
    """``lora`` in a model's original naming, converted by diffusers' own converter into peft
    keys whose factors it computes; ``None`` when the converter does not take it."""
    converted = _converted(lora.path, *_stamp(lora.path))
    if converted is None:
        return None
    known, pairs, used = set(modules), [], set()
    for key in converted:
        stem, sep, suffix = key.rpartition(".lora_A.")
        up = f"{stem}.lora_B.{suffix}"
        module = _peft_module(stem, known) if sep and up in converted else None
        if module is not None:  # the converter folded each alpha into the factors
            pairs.append(LoraPair(module=module, down=key, up=up, scale=1.0))
            used.update((key, up))
    if not pairs:
        return None
    derived = {k: TensorInfo(name=k, shape=tuple(converted[k].shape), dtype=dtype_name(converted[k].dtype),
                             file=os.path.basename(lora.path), nbytes=0) for k in used}
    return LoraLayout(pairs=tuple(pairs), unmatched=tuple(k for k in converted if k not in used), derived=derived)


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _converted(path: str, size: int, mtime_ns: int) -> dict | None:
    """The file converted by diffusers' converter for original-layout kohya Flux LoRAs, or
    ``None`` when that converter does not take it (another family)."""
    from safetensors.torch import load_file
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    state = load_file(path)
    try:
        out = _convert_kohya_flux_lora_to_diffusers(dict(state))
    except (ValueError, KeyError, AssertionError, RuntimeError):
        return None
    if not isinstance(out, dict) or not out:
        return None
    return {k: v.contiguous() for k, v in out.items()}


@hookimpl
def loaderkit_register_lora_formats(register):
    register(PeftLora())
    register(KohyaLora())
