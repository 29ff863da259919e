"""The one home of fp8 layout rules: granularities, block shapes and the scale shapes they imply.

Schemes (reading), strategies and the negotiator (planning), the codec and the runtime
(decoding) and ``convert`` (writing) all ask these functions, so a scale shape is judged the
same way everywhere. Shapes only: no tensor is touched here.
"""

from __future__ import annotations

import math
from typing import Sequence

#: every scale granularity (``"none"``: unscaled fp8). ``"channel"`` is one scale per output
#: channel of a Linear or convolution (dimension 0); ``"row"`` one per row of the last dimension
#: of a stack of Linear weights (``[experts, out, in]`` -> scales ``[experts, out, 1]``).
GRANULARITIES: tuple[str, ...] = ("none", "tensor", "channel", "row", "block")
#: the block shape of block-scaled fp8 when a writer or a config does not say (DeepSeek-V3,
#: transformers FineGrainedFP8 and llm-compressor FP8_BLOCK all use it).
DEFAULT_BLOCK: tuple[int, int] = (128, 128)
#: a scale layout: (granularity, block shape or None).
Layout = tuple[str, "tuple[int, int] | None"]
TENSOR: Layout = ("tensor", None)
CHANNEL: Layout = ("channel", None)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def block_grid(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    """The scale grid of a block-scaled weight: leading dims, then ``ceil(N/b0), ceil(K/b1)``."""
    ws = tuple(shape)
    return ws[:-2] + (ceil_div(ws[-2], block[0]), ceil_div(ws[-1], block[1]))


def expected_scale_shapes(weight_shape: Sequence[int], layout: Layout) -> list[tuple[int, ...]]:
    """The scale shapes a stored weight of ``weight_shape`` may have under ``layout`` (empty: none).

    Per tensor: ``[]`` or all-ones; per channel: ``[..., N, 1]`` or ``[..., N]``; per block: the
    ceil-division grid over the last two dimensions.
    """
    gran, block = layout
    ws = tuple(weight_shape)
    if gran == "tensor":
        return [(), (1,)] + [(1,) * n for n in range(2, max(len(ws), 1) + 1)]
    if gran in ("channel", "row") and len(ws) >= 2:
        return [ws[:-1] + (1,), ws[:-1]]
    if gran == "block" and len(ws) >= 2 and block is not None:
        return [block_grid(ws, block)]
    return []


def describe_layout(layout: Layout) -> str:
    gran, block = layout
    return f"block {block[0]}x{block[1]}" if gran == "block" and block else gran


def scale_fits(shape: Sequence[int], scale_shape: Sequence[int], granularity: str, block: Sequence[int] | None) -> bool:
    """Whether an in-memory float32 scale of ``scale_shape`` decodes a tensor of ``shape``.

    What the runtime accepts: one value for any granularity but ``"block"``; ``N`` values (any
    shape) per output channel; exactly the ceil-division grid of a 2-D weight per block.
    """
    numel = math.prod(scale_shape)
    if granularity == "block":
        return block is not None and len(shape) >= 2 and tuple(scale_shape) == block_grid(shape, block)
    if granularity == "row":
        return len(shape) >= 2 and numel == math.prod(shape[:-1])
    return numel == 1 or (granularity == "channel" and bool(shape) and numel == shape[0])


def scale_numel(shape: Sequence[int], granularity: str | None, block: Sequence[int] | None = None) -> int:
    """How many scale values quantizing a tensor of ``shape`` on load produces (0: unscaled)."""
    if granularity in (None, "none"):
        return 0
    if granularity == "tensor" or not shape:
        return 1
    if granularity == "channel":
        return shape[0] if len(shape) >= 2 else 1
    if granularity == "row":
        return math.prod(shape[:-1]) if len(shape) >= 2 else 1
    b = tuple(block or DEFAULT_BLOCK)
    if len(shape) > 2:  # a stack of block-scaled weights: the grid over the last two dimensions
        return math.prod(block_grid(shape, b))
    k = math.prod(shape[1:]) if len(shape) > 1 else 1
    return ceil_div(shape[0], b[0]) * ceil_div(k, b[1])


def block_problem(shape: Sequence[int], granularity: str, block: Sequence[int] | None) -> str:
    """Why a tensor of ``shape`` cannot be quantized with this granularity on load ('' if it can)."""
    if granularity != "block":
        return ""
    if len(shape) != 2:
        return f"block scales need a 2-D weight; this one has shape {list(shape)}"
    if block is None or len(block) != 2 or min(block) < 1:
        return f"block shape {block!r} is not two positive integers"
    return ""


#: key leaves that hold quantization data (scales, zero points, packing metadata) in some
#: library's layout: never model tensors to drop quietly.
QUANTIZATION_LEAVES = frozenset({
    "weight_scale", "weight_scale_inv", "scale_weight", "input_scale", "scale_input", "activation_scale",
    "weight_zero_point", "zero_point", "weight_global_scale", "weight_packed", "weight_shape", "qweight",
    "qzeros", "scales", "g_idx", "SCB", "absmax", "quant_map", "quant_state", "nested_absmax", "_data", "_scale",
    "comfy_quant", "scaled_fp8",
})


def looks_like_quantization_data(key: str, keys: "set[str] | dict | None" = None) -> bool:
    """Whether a checkpoint key is named like quantization data of some weight (a scale, a zero
    point, a packed payload) rather than a model tensor. With ``keys`` (the checkpoint's), a
    leaf containing ``scale`` beside a ``weight`` of the same module counts too."""
    module, _, leaf = key.rpartition(".")
    if leaf in QUANTIZATION_LEAVES or leaf.endswith("_scale") or ".weight." in f".{key}":
        return True
    return keys is not None and "scale" in leaf and f"{module}.weight" in keys
