"""Write original-layout single files of tiny diffusers models, with diffusers' own converters
run backwards.

Nothing here is a key table. The original keys are found by asking the converter: for converters
that pop named keys (SD3, Flux), by running it on what is known so far and adding each key its
``KeyError`` names (:func:`discover_keys`); for the per-key renaming of Wan, by inverting the
converter's own rename table and keeping only preimages the converter maps back exactly
(:func:`per_key_preimages`). Shapes and values then come from running the converter on uniquely
valued tensors: every element of every output says which input element it was
(:func:`original_state_dict`), and the inverse is checked by converting the result forward
again.

The UNet's converter finds its blocks by enumerating the keys it is given, so probes cannot
discover them: :func:`unet_original` inverts it from diffusers' own fixed-key mapping, the
resnet renames in the converter's source and the converter's block arithmetic, and is checked
the same way (and against ``from_single_file`` in the tests).
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
from typing import Callable

import torch

Convert = Callable[[dict], dict]

#: the length of the probe tensors while discovering keys: divisible as the converters chunk
#: (in 2 and 3) and equal to the sum Flux's converter splits ``linear1`` into (3 * 3072 + 12288).
PROBE = 21504


def _probe(keys: list[str]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(PROBE, 1, device="meta") for k in keys}


def discover_keys(convert: Convert, seeds: list[str], limit: int = 2000) -> list[str]:
    """The original keys ``convert`` asks for by name, found one ``KeyError`` at a time; ``seeds``
    are keys it counts blocks from (dropped again when the converter does not use them)."""
    keys = list(seeds)
    for _ in range(limit):
        try:
            out = convert(_probe(keys))
        except KeyError as exc:
            missing = exc.args[0]
            assert missing not in keys, f"the converter asks for {missing!r} but does not take it"
            keys.append(missing)
            continue
        used = {id(t) for t in out.values()}
        assert used, "the converter produced nothing"
        return [k for k in keys if k not in seeds]
    raise AssertionError("key discovery did not converge")


def rename_table(fn: Callable, name: str) -> dict[str, str]:
    """The literal dict ``name`` assigned inside the converter ``fn`` (its own rename table)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{fn.__name__} assigns no {name}")


def per_key_preimages(convert: Convert, table: dict[str, str], targets: list[str],
                      known: frozenset[str] = frozenset()) -> dict[str, str]:
    """For a converter that renames every key on its own: one original key per target that
    ``convert`` maps back to exactly that target. Among several, a key the library's own layout
    detection looks for (``known``) wins, then the one undoing the most rules, then the shortest."""
    pairs = list(table.items())

    def forward(key: str) -> str:
        out = convert({key: torch.zeros(1, device="meta")})
        assert len(out) == 1
        return next(iter(out))

    def search(key: str, start: int, depth: int) -> list[tuple[int, str]]:
        found = []
        for i in range(start, -1, -1):  # undo the rules last to first
            old, new = pairs[i]
            if new in key:
                cand = key.replace(new, old)
                found.append((1, cand))
                if depth > 1:
                    found.extend((n + 1, c) for n, c in search(cand, i - 1, depth - 1))
        return found

    out = {}
    for target in targets:
        options = [(0, target)] + search(target, len(pairs) - 1, 3)
        good = [(c not in known, -n, len(c), c) for n, c in options if forward(c) == target]
        assert good, f"no original key converts to {target!r}"
        out[min(good)[3]] = target
    return out


def original_shapes(convert: Convert, keys: list[str], model_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The shape of every original key ``convert`` uses: a run on uniquely valued probes says which
    input each output is made of, and the input is its outputs stacked along dimension 0."""
    base = {k: i * PROBE for i, k in enumerate(keys)}
    probe = {k: torch.arange(b, b + PROBE, dtype=torch.float64).reshape(PROBE, 1) for k, b in base.items()}
    parts: dict[str, list[str]] = {}
    for target, value in convert(dict(probe)).items():
        assert target in model_shapes, f"the converter makes {target!r}, which the model does not have"
        owners = {int(v) // PROBE for v in value.flatten().tolist()}
        assert len(owners) == 1, f"{target!r} is made of several inputs; not invertible here"
        parts.setdefault(keys[owners.pop()], []).append(target)
    shapes = {}
    for key, targets in parts.items():
        first = model_shapes[targets[0]]
        shapes[key] = (sum(model_shapes[t][0] for t in targets), *first[1:]) if first else ()
    return shapes


def header_only_file(path, shapes: dict[str, tuple[int, ...]], dtype_of: Callable[[str, tuple], str]) -> None:
    """A safetensors file with these tensors whose data region is a hole (all zeros, no disk
    space): enough for everything that reads headers alone."""
    import json
    import struct

    sizes = {"F8_E4M3": 1, "BF16": 2, "F32": 4}
    header, offset = {}, 0
    for key, shape in shapes.items():
        dtype = dtype_of(key, shape)
        n = math.prod(shape) * sizes[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def original_state_dict(convert: Convert, keys: list[str], model_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors under the original ``keys`` that ``convert`` turns into ``model_sd`` exactly.

    Each output of the converter must be made of one input (renamed, sliced, reordered): a first
    run on uniquely valued probes says which, and the input's shape is its outputs' stacked along
    dimension 0; a second run on uniquely valued inputs of those shapes says where each element
    goes, and the model's values are put there."""
    shapes = original_shapes(convert, keys, {k: tuple(v.shape) for k, v in model_sd.items()})
    offsets, total = {}, 0
    for key in shapes:
        offsets[key] = total
        total += math.prod(shapes[key])
    ids = {k: torch.arange(offsets[k], offsets[k] + math.prod(s), dtype=torch.float64).reshape(s) for k, s in shapes.items()}
    flat = torch.full((total,), float("nan"), dtype=torch.float64)
    for target, value in convert(dict(ids)).items():
        assert tuple(value.shape) == tuple(model_sd[target].shape), target
        flat[value.flatten().long()] = model_sd[target].double().flatten()
    assert not bool(torch.isnan(flat).any()), "some original elements are not used by the converter"
    dtype = next(iter(model_sd.values())).dtype
    return {k: flat[offsets[k]: offsets[k] + math.prod(s)].reshape(s).to(dtype) for k, s in shapes.items()}


def comfy_scaled_fp8(sd: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.",
                     fp8: torch.dtype = torch.float8_e4m3fn) -> dict[str, torch.Tensor]:
    """ComfyUI's legacy scaled fp8 layout of ``sd``: every 2-D ``weight`` in ``fp8`` with a
    float32 ``scale_weight`` (amax / fp8 max), everything else as it is, keys under ``prefix``,
    and the ``scaled_fp8`` marker."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key.endswith(".weight") and t.dim() == 2:
            scale = (t.float().abs().amax() / torch.finfo(fp8).max).clamp(min=1e-12)
            out[prefix + key] = (t.float() / scale).to(fp8)
            out[prefix + key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[prefix + key] = t
    out["scaled_fp8"] = torch.empty(0, dtype=fp8)
    return out


def plain_fp8(sd: dict[str, torch.Tensor], fp8: torch.dtype, prefix: str = "",
              convs: bool = False) -> dict[str, torch.Tensor]:
    """Every 2-D ``weight`` cast to ``fp8`` (no scales), as plain fp8 releases store them; with
    ``convs`` the convolutions' (3-D to 5-D) weights too."""
    dims = (2, 3, 4, 5) if convs else (2,)
    return {prefix + k: (t.to(fp8) if k.endswith(".weight") and t.dim() in dims else t) for k, t in sd.items()}


def wan_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Wan transformer's state dict in the original (release) layout, by inverting diffusers'
    own ``convert_wan_transformer_to_diffusers`` (its rename table, read from its source)."""
    from diffusers.loaders import single_file_utils as sfu

    fn = sfu.convert_wan_transformer_to_diffusers
    known = frozenset(k for v in sfu.CHECKPOINT_KEY_NAMES.values() for k in ([v] if isinstance(v, str) else v))
    table = rename_table(fn, "TRANSFORMER_KEYS_RENAME_DICT")
    keys = per_key_preimages(lambda c: fn(c), table, list(state), known)
    return original_state_dict(lambda c: fn(c), list(keys), state)


def replace_chain(fn: Callable) -> list[tuple[str, str]]:
    """The literal ``.replace(old, new)`` calls inside ``fn``, in source order (a converter's own
    renames written as a chain of string replacements)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "replace"
             and len(n.args) == 2 and all(isinstance(a, ast.Constant) for a in n.args)]
    calls.sort(key=lambda n: (n.lineno, n.col_offset))
    return [(n.args[0].value, n.args[1].value) for n in calls]


def _unet_block(key: str, layers: int, attended: set[str]) -> str:
    """The original (``input_blocks``/``middle_block``/``output_blocks``) name of one diffusers
    UNet key, numbered the way ``convert_ldm_unet_checkpoint`` counts them back."""
    parts = key.split(".")
    if parts[0] == "mid_block":  # middle_block.0 / .2 are the resnets, .1 the attention
        index = 1 if parts[1] == "attentions" else 2 * int(parts[2])
        return ".".join(["middle_block", str(index), *parts[3:]])
    block, kind, layer, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    slot = "1" if kind == "attentions" else "0"  # a layer's resnet, then its attention
    if parts[0] == "down_blocks":
        if kind == "downsamplers":  # after the block's resnets: input_blocks.N.0.op
            return ".".join(["input_blocks", str(1 + block * (layers + 1) + layers), "0", "op", *rest[1:]])
        return ".".join(["input_blocks", str(1 + block * (layers + 1) + layer), slot, *rest])
    if kind == "upsamplers":  # in the block's last layer, after its attention if it has one
        layer, slot = layers, "2" if f"up_blocks.{block}.attentions.{layers}" in attended else "1"
    return ".".join(["output_blocks", str(block * (layers + 1) + layer), slot, *rest])


def unet_original(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """A ``UNet2DConditionModel``'s state dict in the original (LDM / SGM) layout, for diffusers'
    ``convert_ldm_unet_checkpoint``, which finds blocks by enumerating the keys it is given and so
    cannot be run backwards on probes. The fixed keys come from diffusers' own
    ``DIFFUSERS_TO_LDM_MAPPING``, the resnet renames from the converter's replacement chain (read
    from its source), the block numbering is the converter's arithmetic inverted; the result is
    checked by converting it forward again (and, in the tests, by ``from_single_file``)."""
    from diffusers.loaders import single_file_utils as sfu

    fixed = dict(sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    for kind in ("class_embed_type", "addition_embed_type"):
        if config.get(kind) in ("timestep", "projection", "text_time"):
            fixed.update(sfu.DIFFUSERS_TO_LDM_MAPPING["unet"][kind])
    resnet = [(new, old) for old, new in replace_chain(sfu.update_unet_resnet_ldm_to_diffusers)]
    layers = config["layers_per_block"]
    attended = {".".join(k.split(".")[:4]) for k in state if ".attentions." in k}
    out = {}
    for key, value in state.items():
        if key in fixed:
            name = fixed[key]
        else:
            name = _unet_block(key, layers, attended)
            if ".resnets." in key:
                head, tail = name.split(".", 2)[:2], name.split(".", 2)[2]
                for new, old in resnet:
                    tail = tail.replace(new, old)
                name = ".".join([*head, tail])
        out[sfu.LDM_UNET_KEY + name] = value
    back = sfu.convert_ldm_unet_checkpoint(dict(out), config)
    assert set(back) == set(state) and all(back[k] is state[k] for k in back), "the inverse is not exact"
    return out
