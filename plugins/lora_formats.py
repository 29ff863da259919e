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

Keys a format does not consume (DoRA magnitudes, LoKr/LoHa factors, text-encoder keys for a
denoiser) are reported as unmatched, never skipped.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from loaderkit.plugin import LoraFile, LoraFormat, LoraLayout, LoraPair, hookimpl

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


@hookimpl
def loaderkit_register_lora_formats(register):
    register(PeftLora())
    register(KohyaLora())
