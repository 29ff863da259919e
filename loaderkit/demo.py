"""``loaderkit demo``: a small sample model shaped like a video diffusion transformer.

The demo saves the sample model in bf16 as safetensors in a temporary directory, converts it to
fp8 in ComfyUI's layout with ``loaderkit convert``, loads the original under each built-in
strategy and the converted copy under ``fp8`` and ``bf16``, and prints for each the plan
summary, bytes in memory, the verify result, agreement of the output with the fp32 load, and the
load time.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F


class Block(nn.Module):
    """Pre-norm attention + MLP block."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyVideoDiT(nn.Module):
    """Conv3d patch embedding (with bias), positional embedding, blocks, norm, linear head."""

    def __init__(self, channels: int = 4, dim: int = 128, depth: int = 4, heads: int = 4,
                 patch: tuple[int, int, int] = (1, 2, 2), tokens: int = 256) -> None:
        super().__init__()
        self.patch_embed = nn.Conv3d(channels, dim, kernel_size=patch, stride=patch, bias=True)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.time_embed = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, channels * patch[0] * patch[1] * patch[2])

    def forward(self, video: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(video).flatten(2).transpose(1, 2)
        x = x + self.pos_embed[:, : x.shape[1]]
        x = x + self.time_embed(t.reshape(-1, 1).to(x.dtype))[:, None]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_out(x))


def sample_inputs(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A (video, timestep) pair for :class:`TinyVideoDiT`: 2 frames of 16x16, 4 channels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 2, 16, 16, generator=g).to(dtype), torch.tensor([0.5], dtype=dtype)


def save_sample(directory: str | Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Save a randomly initialised :class:`TinyVideoDiT` as ``model.safetensors`` in ``directory``."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = TinyVideoDiT()
    with torch.no_grad():
        model.pos_embed.normal_(std=0.02)
    path = Path(directory) / "model.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"format": "pt"})
    return path


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def _load_case(path: Path, strategy: str, label: str) -> tuple[dict, torch.Tensor]:
    """Plan and load ``path`` under ``strategy``; verify with example inputs and run them."""
    import loaderkit

    plan = loaderkit.plan(path, strategy, model=TinyVideoDiT)
    t0 = time.perf_counter()
    model = loaderkit.load(path, strategy, model=TinyVideoDiT)
    load_s = time.perf_counter() - t0
    inputs = sample_inputs()
    report = loaderkit.verify(model, inputs)
    with torch.no_grad():
        out = model(*inputs).float()
    return {
        "checkpoint": label,
        "strategy": strategy,
        "decisions": [f"{d.subject}: {d.choice}" for d in plan.decisions],
        "conversions": plan.conversions(),
        "bytes": sum(plan.bytes_per_device().values()),
        "dtypes": plan.bytes_per_dtype(),
        "verify": report.ok,
        "load_ms": load_s * 1e3,
    }, out


def run_demo(json_output: bool = False) -> int:
    """Run the demo; returns 0 when every load verified and agreed with fp32 (cosine >= 0.99).

    The sample model is saved in bf16, converted to fp8 in ComfyUI's layout with
    :func:`loaderkit.convert` (no config: the architecture is inferred from the file), and
    the original is loaded under each built-in strategy, the converted copy under ``fp8`` (its
    stored bytes kept) and ``bf16`` (dequantized).
    """
    import loaderkit

    from .pipeline.convert import convert
    from .pipeline.discover import get_manager

    names = [e.name for e in get_manager().strategies()]
    order = [s for s in ("fp32", "bf16", "fp16", "fp8", "auto") if s in names]
    results, outs = [], []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loaderkit-demo-") as tmp:
        path = save_sample(tmp)
        t0 = time.perf_counter()
        converted = convert(path, Path(tmp) / "model-fp8.safetensors", "fp8", progress=False)
        info = loaderkit.inspect(converted)
        conversion = {"seconds": time.perf_counter() - t0, "bytes_before": path.stat().st_size,
                      "bytes_after": converted.stat().st_size, "layout": info.quantization.family}
        cases = [(path, s, "original (bf16)") for s in order]
        cases += [(converted, s, "converted (fp8)") for s in ("fp8", "bf16") if s in names]
        for case_path, strategy, label in cases:
            result, out = _load_case(case_path, strategy, label)
            results.append(result)
            outs.append(out)
        pipeline = _pipeline_part(tmp)
    for result, out in zip(results, outs):
        result["cosine_vs_fp32"] = _cosine(out, outs[0])
    ok = all(r["verify"] and r["cosine_vs_fp32"] >= 0.99 for r in results) and (pipeline or {}).get("ok", True)
    seconds = time.perf_counter() - t_start
    if json_output:
        print(json.dumps({"ok": ok, "seconds": seconds, "convert": conversion, "results": results,
                          "pipeline": pipeline}, indent=2))
    else:
        _print_table(order, conversion, results, ok, seconds, pipeline)
    return 0 if ok else 1


def _pipeline_part(tmp: str) -> dict | None:
    """The tiny Wan pipeline, when diffusers and transformers are installed (``None`` otherwise)."""
    from . import demo_pipeline

    return demo_pipeline.pipeline_demo(tmp) if demo_pipeline.available() else None


def _print_table(order: list[str], conversion: dict, results: list[dict], ok: bool, seconds: float,
                 pipeline: dict | None = None) -> None:
    from .contract.plan import fmt_bytes

    print(f"loaderkit demo: TinyVideoDiT saved in bf16, loaded under {', '.join(order)};")
    print(f"converted to fp8 ({conversion['layout']}): {fmt_bytes(conversion['bytes_before'])} -> "
          f"{fmt_bytes(conversion['bytes_after'])} in {conversion['seconds'] * 1e3:.0f}ms, "
          "loaded under fp8 and bf16\n")
    print(f"{'checkpoint':<16} {'strategy':<9} {'memory':>10} {'verify':>7} {'cos vs fp32':>12} {'load':>9}  dtypes")
    for r in results:
        dtypes = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in r["dtypes"].items())
        print(f"{r['checkpoint']:<16} {r['strategy']:<9} {fmt_bytes(r['bytes']):>10} "
              f"{'ok' if r['verify'] else 'FAIL':>7} {r['cosine_vs_fp32']:>12.5f} {r['load_ms']:>7.1f}ms  {dtypes}")
        conv = ", ".join(f"{k} {v}" for k, v in sorted(r["conversions"].items()))
        print(f"{'':<16} - conversions: {conv}")
        for d in r["decisions"]:
            print(f"{'':<16} - {d}")
    if pipeline is not None:
        _print_pipeline(pipeline)
    verdict = "every load verified and agrees with fp32" if ok else "FAILED"
    print(f"\n{verdict} ({seconds:.1f}s)")


def _print_pipeline(pipeline: dict) -> None:
    from .contract.plan import fmt_bytes

    print(f"\nloaderkit.load_pipeline: a tiny {pipeline['pipeline']} saved in bf16, two steps generated, "
          "compared with diffusers' own from_pretrained (bf16)")
    print(f"{'strategy':<9} {'memory':>10} {'verify':>7} {'max |diff|':>11} {'load':>9}  compute per component")
    for r in pipeline["results"]:
        comps = ", ".join(f"{n} {d}" for n, d in r["components"].items())
        print(f"{r['strategy']:<9} {fmt_bytes(r['bytes']):>10} {'ok' if r['verify'] else 'FAIL':>7} "
              f"{r['max_abs_vs_diffusers']:>11.5f} {r['seconds'] * 1e3:>7.0f}ms  {comps}")
