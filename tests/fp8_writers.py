"""Write tiny fp8 checkpoints of each family the way its real writer lays them out.

Every ``write_*`` function takes a directory and returns ``(path, reference)``: ``path`` is what
to hand to ``loaderkit.inspect`` / ``loaderkit.load``, and ``reference`` maps every model tensor key
(scales and markers excluded) to its float32 decoded value, computed here independently of
loaderkit (block scales are applied block by block with slices, channel scales row by row).

The model behind every checkpoint is :class:`TinyNet` (optionally nested under a key prefix with
:func:`tiny_model`): ``a`` is a 320x200 Linear (neither dimension a multiple of 128), ``b`` a
64x320 Linear, ``norm`` a LayerNorm and ``lm_head`` a 10x64 Linear that writers leave unquantized
where the real writer's defaults ignore it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
QUANTIZED = ("a", "b")  # the TinyNet layers fp8 writers quantize (lm_head is ignored)

Written = tuple[Path, dict[str, torch.Tensor]]


class TinyNet(nn.Module):
    """The model every writer saves: keys ``a.*``, ``b.*``, ``norm.*``, ``lm_head.weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(200, 320)
        self.b = nn.Linear(320, 64)
        self.norm = nn.LayerNorm(64)
        self.lm_head = nn.Linear(64, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.b(torch.relu(self.a(x)))))


def tiny_model(prefix: str = "") -> nn.Module:
    """A :class:`TinyNet` whose keys start with ``prefix`` (``"model.diffusion_model."``)."""
    net: nn.Module = TinyNet()
    for part in reversed([p for p in prefix.split(".") if p]):
        outer = nn.Module()
        outer.add_module(part, net)
        net = outer
    return net


def tiny_state_dict(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Deterministic TinyNet weights; ``b`` is 100x smaller than ``a`` (unscaled fp8 flushes it)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in TinyNet().state_dict().items()}
    sd["b.weight"] = sd["b.weight"] * 0.01
    sd["norm.weight"] = 1.0 + sd["norm.weight"]
    sd["a.weight"][:, 0] = 0.0  # a zero column: zeros must survive every recipe
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


# -- independent reference decoding ---------------------------------------------------------------


def ref_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * float(scale.to(torch.float32).reshape(-1)[0])


def ref_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.to(torch.float32).reshape(-1)
    return torch.stack([q[i].to(torch.float32) * s[i] for i in range(q.shape[0])])


def ref_block(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block by block: ``out[i0:i0+b0, j0:j0+b1] = q[...] * scale[i, j]`` (edge blocks cropped)."""
    s = scale if scale.dtype != torch.uint8 else scale.view(torch.float8_e8m0fnu)
    s = s.to(torch.float32)
    out = torch.empty(q.shape, dtype=torch.float32)
    b0, b1 = block
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * b0, (i + 1) * b0), slice(j * b1, (j + 1) * b1)
            out[rows, cols] = q[rows, cols].to(torch.float32) * s[i, j]
    return out


def _plain_ref(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float32) for k, v in sd.items()}


# -- quantization recipes (as the real writers compute them) ----------------------------------------


def _fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def quant_per_tensor_autofp8(w: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoFP8 ``per_tensor_quantize``: ``q = clamp(w * max/amax)``, stored scale = ``amax/max`` (0-d)."""
    finfo = torch.finfo(dtype)
    lo, hi = w.aminmax()
    amax = torch.maximum(lo.abs(), hi.abs()).float()
    scale = finfo.max / amax.clamp(min=1e-12)
    q = (w.float() * scale).clamp(min=finfo.min, max=finfo.max).to(dtype)
    return q, scale.float().reciprocal()


def quant_per_row(w: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """fbgemm ``quantize_fp8_per_row``: scale = row amax / fp8 max, stored as float32 [N, 1]."""
    amax = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    scale = amax / _fp8_max(dtype)
    q = (w.float() / scale).clamp(-_fp8_max(dtype), _fp8_max(dtype)).to(dtype)
    return q, scale


def quant_block_deepseek(
    w: torch.Tensor, block: tuple[int, int] = (128, 128), ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 block recipe on a zero-padded weight: per block ``s = amax / 448`` (rounded up
    to a power of two for ue8m0), ``q = w / s``; returns q cropped to [N, K] and s as float32."""
    n, k = w.shape
    b0, b1 = block
    gn, gk = math.ceil(n / b0), math.ceil(k / b1)
    padded = torch.zeros(gn * b0, gk * b1, dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.reshape(gn, b0, gk, b1)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4)
    s = amax / 448.0
    if ue8m0:
        s = torch.pow(2.0, torch.ceil(torch.log2(s)))
    q = (blocks / s[:, None, :, None]).reshape(gn * b0, gk * b1)[:n, :k].to(E4M3).contiguous()
    return q, s.float()


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _save_dir(
    directory: Path, tensors: dict[str, torch.Tensor], config: dict, shard_bytes: int | None = None
) -> Path:
    """``save_pretrained``'s layout: config.json + model.safetensors, or shards and an index
    written with huggingface_hub's splitter (greedy in key order, as transformers does)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if shard_bytes is None:
        _save(directory / "model.safetensors", tensors, {"format": "pt"})
        return directory
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=shard_bytes)
    for filename, keys in split.filename_to_tensors.items():
        _save(directory / filename, {k: tensors[k] for k in keys}, {"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in tensors.values())},
             "weight_map": split.tensor_to_filename}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def _scale_last(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reorder so every scale comes after all weights (sharding then puts them in other shards)."""
    scales = {k: v for k, v in tensors.items() if "scale" in k.rpartition(".")[2]}
    return {**{k: v for k, v in tensors.items() if k not in scales}, **scales}


# -- writers ----------------------------------------------------------------------------------------


def write_plain_fp8(directory: Path, dtype: torch.dtype = E4M3, seed: int = 0) -> Written:
    """flux1-dev-fp8 / Wan ``*_fp8_e4m3fn`` style: one file, no config, Linear weights cast to
    fp8 with no scale, biases and norms kept bf16, no ``format`` metadata."""
    sd = tiny_state_dict(seed)
    for k in ("a.weight", "b.weight", "lm_head.weight"):
        sd[k] = sd[k].to(dtype)
    name = "model_fp8_e4m3fn.safetensors" if dtype == E4M3 else "model_fp8_e5m2.safetensors"
    return _save(Path(directory) / name, sd), _plain_ref(sd)


def write_per_tensor_fp8(
    directory: Path,
    *,
    input_scale: bool = True,
    scale_key: str = "weight_scale",
    scale_shape: tuple[int, ...] = (),
    shard_bytes: int | None = None,
    seed: int = 0,
) -> Written:
    """AutoFP8 / vLLM per-tensor layout: ``<m>.weight`` e4m3, ``<m>.weight_scale`` float32 0-d (or
    ``scale_shape``), static ``<m>.input_scale``, ``quant_method: fp8``, ``ignored_layers``."""
    sd = tiny_state_dict(seed)
    out, ref = dict(sd), _plain_ref(sd)
    for m in QUANTIZED:
        q, s = quant_per_tensor_autofp8(sd[f"{m}.weight"])
        out[f"{m}.weight"], out[f"{m}.{scale_key}"] = q, s.reshape(scale_shape)
        if input_scale:
            out[f"{m}.input_scale"] = torch.tensor(0.0123, dtype=torch.float32).reshape(scale_shape)
        ref[f"{m}.weight"] = ref_tensor(q, s)
    qc = {"quant_method": "fp8", "activation_scheme": "static" if input_scale else "dynamic",
          "ignored_layers": ["lm_head"]}
    config = {"architectures": ["TinyNet"], "torch_dtype": "bfloat16", "quantization_config": qc}
    tensors = _scale_last(out) if shard_bytes else out
    return _save_dir(Path(directory), tensors, config, shard_bytes), ref


def write_block_fp8(
    directory: Path,
    *,
    scale_fmt: str = "float",
    scale_dtype: torch.dtype = torch.float32,
    block: tuple[int, int] = (128, 128),
    text_config: bool = False,
    shard_bytes: int | None = None,
    seed: int = 0,
) -> Written:
    """DeepSeek-V3 / FineGrainedFP8 layout: ``<m>.weight`` e4m3, ``<m>.weight_scale_inv`` over a
    ceil-division grid (``a`` is 320x200: partial edge blocks). ``scale_fmt="ue8m0"`` rounds scales
    to powers of two (DeepSeek-V3.1); ``scale_dtype`` float8_e8m0fnu or uint8 stores them as bytes."""
    sd = tiny_state_dict(seed)
    out, ref = dict(sd), _plain_ref(sd)
    for m in QUANTIZED:
        q, s = quant_block_deepseek(sd[f"{m}.weight"], block, ue8m0=scale_fmt == "ue8m0")
        stored = s if scale_dtype == torch.float32 else s.to(torch.float8_e8m0fnu)
        if scale_dtype == torch.uint8:
            stored = stored.view(torch.uint8)
        out[f"{m}.weight"], out[f"{m}.weight_scale_inv"] = q, stored
        ref[f"{m}.weight"] = ref_block(q, stored, block)
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
          "weight_block_size": list(block)}
    if scale_fmt != "float":
        qc["scale_fmt"] = scale_fmt
    config: dict = {"architectures": ["TinyNet"], "torch_dtype": "bfloat16"}
    if text_config:
        config["text_config"] = {"quantization_config": qc}
    else:
        config["quantization_config"] = qc
    tensors = _scale_last(out) if shard_bytes else out
    return _save_dir(Path(directory), tensors, config, shard_bytes), ref


def write_fbgemm_fp8(directory: Path, seed: int = 0) -> Written:
    """transformers ``fbgemm_fp8`` layout: ``<m>.weight`` e4m3, ``<m>.weight_scale`` float32 [N, 1],
    ``modules_to_not_convert``; no input scale is saved (its upper bound is a config value)."""
    sd = tiny_state_dict(seed)
    out, ref = dict(sd), _plain_ref(sd)
    for m in QUANTIZED:
        q, s = quant_per_row(sd[f"{m}.weight"])
        out[f"{m}.weight"], out[f"{m}.weight_scale"] = q, s
        ref[f"{m}.weight"] = ref_channel(q, s)
    qc = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0, "modules_to_not_convert": ["lm_head"]}
    config = {"architectures": ["TinyNet"], "torch_dtype": "bfloat16", "quantization_config": qc}
    return _save_dir(Path(directory), out, config), ref


def write_modelopt_fp8(directory: Path, algo: str = "FP8", seed: int = 0) -> Written:
    """NVIDIA ModelOpt fp8 export layout (as vLLM's ``modelopt`` loader reads it; ModelOpt itself
    is not installed here): ``<m>.weight`` e4m3 with ``<m>.weight_scale`` float32 (0-d per tensor
    for ``FP8``, [N, 1] for ``FP8_PER_CHANNEL_PER_TOKEN``) and a static ``<m>.input_scale``."""
    sd = tiny_state_dict(seed)
    out, ref = dict(sd), _plain_ref(sd)
    for m in QUANTIZED:
        w = sd[f"{m}.weight"].float()
        amax = w.abs().amax() if algo == "FP8" else w.abs().amax(dim=1, keepdim=True)
        scale = amax / 448.0
        q = (w / scale).clamp(-448.0, 448.0).to(E4M3)
        out[f"{m}.weight"], out[f"{m}.weight_scale"] = q, scale
        if algo == "FP8":
            out[f"{m}.input_scale"] = torch.tensor(0.0123)
        ref[f"{m}.weight"] = ref_tensor(q, scale) if algo == "FP8" else ref_channel(q, scale)
    qc = {"quant_method": "modelopt", "quant_algo": algo, "exclude_modules": ["lm_head"]}
    config = {"architectures": ["TinyNet"], "torch_dtype": "bfloat16", "quantization_config": qc}
    return _save_dir(Path(directory), out, config), ref


def write_compressed_tensors(
    directory: Path, preset: str = "FP8_DYNAMIC", ignore: tuple[str, ...] = ("lm_head",), seed: int = 0
) -> Written:
    """llm-compressor's save path with the compressed-tensors library itself: apply a preset
    scheme (``FP8``, ``FP8_DYNAMIC``, ``FP8_BLOCK``) to TinyNet, set min-max scales with
    compressed-tensors' ``calculate_qparams`` (what its observers compute), compress the model
    with ``ModelCompressor``, save its state dict and let ``update_config`` write config.json."""
    model = TinyNet().to(torch.bfloat16)
    model.load_state_dict(tiny_state_dict(seed))
    compressor = _quantize_and_compress(model, preset, ignore)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    directory = _save_dir(Path(directory), sd, {"architectures": ["TinyNet"], "torch_dtype": "bfloat16"})
    compressor.update_config(str(directory))
    return directory, _ct_reference(sd, compressor.quantization_config.config_groups["group_0"].weights)


def write_compressed_tensors_llama(directory: Path, preset: str = "FP8_DYNAMIC", seed: int = 0, **config_kw) -> Path:
    """llm-compressor's full save path on a tiny transformers Llama: quantize with a preset,
    ``compress_model``, ``save_pretrained``, ``update_config``. Returns the directory; the
    reference reader is transformers' ``from_pretrained`` with ``dequantize=True``. ``config_kw``
    overrides the tiny ``LlamaConfig``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64), **config_kw})
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    compressor = _quantize_and_compress(model, preset, ("lm_head",))
    model.save_pretrained(directory)
    compressor.update_config(str(directory))
    return Path(directory)


def _quantize_and_compress(model: nn.Module, preset: str, ignore: tuple[str, ...]):
    """Apply a compressed-tensors preset to every Linear, set min-max scales (static input scales
    0.0123), compress in place; returns the ``ModelCompressor`` (for ``update_config``)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig, apply_quantization_config, preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    config = QuantizationConfig(
        config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=list(ignore)
    )
    apply_quantization_config(model, config, show_progress=False)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            args = module.quantization_scheme.weights
            lo, hi = _observe(module.weight.data, args)
            scale, _ = calculate_qparams(lo, hi, args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "input_scale"):
                module.input_scale.data.fill_(0.0123)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    return compressor


def _observe(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max per tensor, row or block (what a min-max observer records for the weights)."""
    if args.strategy == "tensor":
        return w.amin(), w.amax()
    if args.strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if args.strategy == "group":
        groups = w.reshape(w.shape[0], -1, args.group_size)
        return groups.amin(-1), groups.amax(-1)
    b0, b1 = args.block_structure
    n, k = w.shape
    padded = torch.zeros(math.ceil(n / b0) * b0, math.ceil(k / b1) * b1, dtype=w.dtype)
    padded[:n, :k] = w
    blocks = padded.reshape(padded.shape[0] // b0, b0, padded.shape[1] // b1, b1)
    return blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))


def _ct_reference(sd: dict[str, torch.Tensor], args) -> dict[str, torch.Tensor]:
    ref = {}
    for k, v in sd.items():
        leaf = k.rpartition(".")[2]
        if leaf in ("weight_scale", "input_scale"):
            continue
        scale = sd.get(k + "_scale") if leaf == "weight" else None
        if scale is None:
            ref[k] = v.to(torch.float32)
        elif args.strategy == "tensor":
            ref[k] = ref_tensor(v, scale)
        elif args.strategy == "channel":
            ref[k] = ref_channel(v, scale)
        elif args.strategy == "group":  # MXFP8: uint8 e8m0 exponents, as compressed-tensors decodes them
            s = 2.0 ** (scale.to(torch.int32) - 127).to(torch.bfloat16)
            ref[k] = (v.to(torch.bfloat16).reshape(s.shape[0], s.shape[1], -1) * s[..., None]).reshape(v.shape).float()
        else:
            ref[k] = ref_block(v, scale, tuple(args.block_structure))
    return ref


def write_comfy_scaled_fp8(
    directory: Path,
    *,
    prefix: str = "model.diffusion_model.",
    marker_dtype: torch.dtype = E4M3,
    weight_dtype: torch.dtype | None = None,
    scale_input: bool = True,
    full_precision_mm: bool = False,
    dummy_scale_on_high_precision: bool = False,
    seed: int = 0,
) -> Written:
    """ComfyUI legacy ``fp8_scaled`` file: ``<prefix>scaled_fp8`` marker (empty, or 2 elements for
    full-precision matmul; float32 means e4m3fn), per-tensor ``<m>.scale_weight`` float32 0-d and
    ``<m>.scale_input``; no ``format`` metadata. ``dummy_scale_on_high_precision`` adds a 1.0
    ``scale_weight`` to the bf16 ``lm_head`` as some converters did."""
    wdtype = weight_dtype or (E4M3 if marker_dtype == torch.float32 else marker_dtype)
    sd = tiny_state_dict(seed)
    out, ref = dict(sd), _plain_ref(sd)
    for m in QUANTIZED:
        w = sd[f"{m}.weight"].float()
        scale = w.abs().amax() / _fp8_max(wdtype)
        q = (w / scale).clamp(-_fp8_max(wdtype), _fp8_max(wdtype)).to(wdtype)
        out[f"{m}.weight"], out[f"{m}.scale_weight"] = q, scale.reshape(())
        if scale_input:
            out[f"{m}.scale_input"] = torch.ones((), dtype=torch.float32)
        ref[f"{m}.weight"] = ref_tensor(q, scale)
    if dummy_scale_on_high_precision:
        out["lm_head.scale_weight"] = torch.ones((), dtype=torch.float32)
    out = {prefix + k: v for k, v in out.items()}
    out[prefix + "scaled_fp8"] = torch.empty(2 if full_precision_mm else 0, dtype=marker_dtype)
    ref = {prefix + k: v for k, v in ref.items()}
    return _save(Path(directory) / "model_fp8_scaled.safetensors", out), ref


def write_comfy_mixed(
    directory: Path,
    *,
    layout: str = "comfy_quant",
    prefix: str = "model.diffusion_model.",
    fmt: str = "float8_e4m3fn",
    input_scale: bool = True,
    metadata_prefix: bool = True,
    seed: int = 0,
) -> Written:
    """ComfyUI mixed-precision file: per quantized layer ``weight`` (fp8), ``weight_scale`` float32
    0-d and ``input_scale``, described either by ``<m>.comfy_quant`` uint8 JSON-bytes tensors
    (``layout="comfy_quant"``) or by ``__metadata__["_quantization_metadata"]`` (``"metadata"``;
    ``metadata_prefix=False`` writes layer names without the key prefix)."""
    wdtype = getattr(torch, fmt)
    sd = tiny_state_dict(seed)
    out, ref = dict(sd), _plain_ref(sd)
    for m in QUANTIZED:
        w = sd[f"{m}.weight"].float()
        scale = w.abs().amax() / _fp8_max(wdtype)
        q = (w / scale).clamp(-_fp8_max(wdtype), _fp8_max(wdtype)).to(wdtype)
        out[f"{m}.weight"], out[f"{m}.weight_scale"] = q, scale.reshape(())
        if input_scale:
            out[f"{m}.input_scale"] = torch.tensor(0.0123, dtype=torch.float32)
        if layout == "comfy_quant":
            out[f"{m}.comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
        ref[f"{m}.weight"] = ref_tensor(q, scale)
    out = {prefix + k: v for k, v in out.items()}
    metadata = None
    if layout == "metadata":
        names = {(prefix if metadata_prefix else "") + m: {"format": fmt} for m in QUANTIZED}
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": names})}
    ref = {prefix + k: v for k, v in ref.items()}
    return _save(Path(directory) / "model_mixed.safetensors", out, metadata), ref


#: every writer with default arguments, for tests that sweep all families.
ALL_WRITERS: dict[str, Callable[[Path], Written]] = {
    "plain-e4m3": write_plain_fp8,
    "plain-e5m2": lambda d: write_plain_fp8(d, dtype=E5M2),
    "per-tensor": write_per_tensor_fp8,
    "block": write_block_fp8,
    "block-ue8m0": lambda d: write_block_fp8(d, scale_fmt="ue8m0", scale_dtype=torch.float8_e8m0fnu),
    "fbgemm": write_fbgemm_fp8,
    "modelopt": write_modelopt_fp8,
    "ct-fp8": lambda d: write_compressed_tensors(d, "FP8"),
    "ct-fp8-dynamic": lambda d: write_compressed_tensors(d, "FP8_DYNAMIC"),
    "ct-fp8-block": lambda d: write_compressed_tensors(d, "FP8_BLOCK"),
    "ct-mxfp8": lambda d: write_compressed_tensors(d, "MXFP8"),
    "comfy-scaled": write_comfy_scaled_fp8,
    "comfy-mixed": write_comfy_mixed,
    "comfy-mixed-metadata": lambda d: write_comfy_mixed(d, layout="metadata"),
}
