"""fp8 decode routes and fp8-stored Linear forward, timed on this machine.

    python benchmarks/bench_upcast.py [--sizes 4096 8192] [--runs 9] [--threads N] [--layers 8]
                                      [--width 4096] [--tokens 16 256] [--skip-forward] [--skip-upcast]

Prints, for each fp8 tensor size, the throughput of every decode route in Gelem/s (= GB/s of
fp8 read; median and best wall time of ``--runs``, and by median process CPU time), and, for a
stack of Linear layers, the forward time of plain fp32, plain bf16, fp8 storage with loaderkit
cast rules (bf16 / fp32 compute, resident, per-channel scaled) and diffusers' layerwise casting
(when diffusers is installed).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

from loaderkit.kernels import quant
from loaderkit import runtime

E4M3 = torch.float8_e4m3fn


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float, float]:
    """(median wall, best wall, median process CPU) seconds of ``runs`` calls after a warm-up.

    On a shared machine the CPU time is the steadier figure; with several torch threads it also
    counts OpenMP threads spinning at barriers.
    """
    fn()
    wall, cpu = [], []
    for _ in range(runs):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), min(wall), statistics.median(cpu)


def bits_route(q: torch.Tensor) -> torch.Tensor:
    """e4m3fn -> bf16 by bit manipulation: shift, multiply by 2**120 (subnormals), patch NaN."""
    out = torch.empty(q.shape, dtype=torch.bfloat16)
    flat_q, flat_o = q.view(torch.uint8).reshape(-1), out.view(torch.int16).reshape(-1)
    two120 = torch.tensor(2.0**120, dtype=torch.bfloat16)
    for i in range(0, flat_q.numel(), quant.CHUNK):
        x = flat_o[i : i + quant.CHUNK]
        x.copy_(flat_q[i : i + quant.CHUNK])
        sign = (x & 0x80).bitwise_left_shift_(8)
        x.bitwise_and_(0x7F)
        nan = x == 0x7F
        x.bitwise_left_shift_(4).view(torch.bfloat16).mul_(two120)
        x.bitwise_or_(sign).view(torch.bfloat16).masked_fill_(nan, float("nan"))
    return out


def lut256_route(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Single-byte table, int32 index, chunked (no pair table)."""
    table = quant._unscaled_tables(q.dtype, dtype)[0]
    out = torch.empty(q.shape, dtype=dtype)
    codes = q.view(torch.uint8).reshape(-1)
    quant._gather_range(codes, table, out.view(table.dtype).reshape(-1), 0, codes.numel())
    return out


def upcast_routes(n: int) -> dict[str, Callable[[], torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(n, n, generator=gen) * 0.05).to(E4M3)
    bf16, f32 = torch.bfloat16, torch.float32
    ch = torch.rand(n, 1, generator=gen) + 0.5
    blk = torch.rand((n + 127) // 128, (n + 127) // 128, generator=gen) + 0.5
    out_bf16 = torch.empty(n, n, dtype=bf16)
    return {
        "torch q.to(bf16)": lambda: q.to(bf16),
        "torch q.float().to(bf16)": lambda: q.float().to(bf16),
        "bit manipulation -> bf16": lambda: bits_route(q),
        "256-entry table -> bf16": lambda: lut256_route(q, bf16),
        "upcast -> bf16 (pair table)": lambda: quant.upcast(q, bf16),
        "upcast -> bf16, out= buffer": lambda: quant.upcast(q, bf16, out=out_bf16),
        "upcast -> fp32": lambda: quant.upcast(q, f32),
        "torch q.to(fp32)": lambda: q.to(f32),
        "reference tensor-scaled -> bf16": lambda: quant.dequantize_reference(q, bf16, torch.tensor(0.7)),
        "upcast tensor-scaled -> bf16": lambda: quant.upcast(q, bf16, torch.tensor(0.7)),
        "reference channel-scaled -> bf16": lambda: quant.dequantize_reference(q, bf16, ch),
        "upcast channel-scaled -> bf16": lambda: quant.upcast(q, bf16, ch),
        "reference block-scaled -> bf16": lambda: quant.dequantize_reference(q, bf16, blk, (128, 128)),
        "upcast block-scaled -> bf16": lambda: quant.upcast(q, bf16, blk, (128, 128)),
        "upcast channel-scaled -> fp32": lambda: quant.upcast(q, f32, ch),
    }


def bench_upcast(sizes: list[int], runs: int) -> None:
    print("decode routes, float8_e4m3fn (Gelem/s = GB/s of fp8 read)")
    print(f"{'route':36s} {'size':>6s} {'median':>8s} {'best':>8s} {'by CPU':>8s}")
    for n in sizes:
        for name, fn in upcast_routes(n).items():
            slow = name.startswith(("torch", "reference", "bit"))
            med, best, cpu = timed(fn, max(3, runs // 3) if slow else runs)
            rates = (n * n / t / 1e9 for t in (med, best, cpu))
            print(f"{name:36s} {n:6d}" + "".join(f" {r:8.2f}" for r in rates), flush=True)


def linear_stack(layers: int, width: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    with torch.no_grad():
        return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers))).requires_grad_(False)


def to_fp8(model: nn.Sequential, scaled: bool = False) -> nn.Sequential:
    """Store every Linear's weight in fp8 (per-channel scale when ``scaled``); bias stays bf16."""
    for lin in model:
        granularity = "channel" if scaled else "none"
        q, scale = quant.quantize(lin.weight.data, E4M3, granularity)
        lin.weight = nn.Parameter(q, requires_grad=False)
        lin.bias = nn.Parameter(lin.bias.data.to(torch.bfloat16), requires_grad=False)
        if scaled:
            lin.register_buffer("weight_scale", scale)
    return model


def forward_variants(layers: int, width: int) -> dict[str, tuple[nn.Module, torch.dtype]]:
    """name -> (factory result, input dtype); built lazily one at a time by the caller."""

    def cast(compute, resident=False, scaled=False):
        model = to_fp8(linear_stack(layers, width), scaled)
        for lin in model:
            scales = {"weight": ("weight_scale", "channel", None)} if scaled else None
            runtime.attach_cast(lin, compute, scales=scales, resident=resident)
        return model

    def layerwise():
        from diffusers.hooks import apply_layerwise_casting  # noqa: PLC0415

        model = linear_stack(layers, width).to(torch.bfloat16)
        apply_layerwise_casting(model, storage_dtype=E4M3, compute_dtype=torch.bfloat16, skip_modules_pattern=None)
        return model

    return {
        "plain fp32": (lambda: linear_stack(layers, width), torch.float32),
        "plain bf16": (lambda: linear_stack(layers, width).to(torch.bfloat16), torch.bfloat16),
        "fp8 storage, bf16 compute": (lambda: cast(torch.bfloat16), torch.bfloat16),
        "fp8 storage, fp32 compute": (lambda: cast(torch.float32), torch.float32),
        "fp8 + channel scale, bf16 compute": (lambda: cast(torch.bfloat16, scaled=True), torch.bfloat16),
        "fp8 + channel scale, fp32 compute": (lambda: cast(torch.float32, scaled=True), torch.float32),
        "fp8 storage, bf16 compute, resident": (lambda: cast(torch.bfloat16, resident=True), torch.bfloat16),
        "diffusers layerwise casting (bf16)": (layerwise, torch.bfloat16),
    }


def weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def bench_forward(layers: int, width: int, tokens: list[int], runs: int) -> None:
    print(f"\nforward: {layers} x Linear({width}, {width}), input [tokens, {width}], torch.no_grad; ms")
    heads = "".join(f" {f'{t} tok med':>12s} {'best':>7s} {'CPU':>7s}" for t in tokens)
    print(f"{'variant':38s} {'weights':>8s}" + heads)
    inputs = {t: torch.randn(t, width, generator=torch.Generator().manual_seed(t)) for t in tokens}
    for name, (factory, dtype) in forward_variants(layers, width).items():
        try:
            model = factory()
        except ImportError as exc:
            print(f"{name:38s} skipped ({exc})")
            continue
        row = f"{name:38s} {weight_bytes(model) / 2**20:6.0f}Mi"
        with torch.no_grad():
            for t in tokens:
                xin = inputs[t].to(dtype)
                med, best, cpu = timed(lambda: model(xin), runs)
                row += f" {med * 1e3:12.1f} {best * 1e3:7.1f} {cpu * 1e3:7.1f}"
        print(row, flush=True)
        del model
        runtime.release_workspace()


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 256])
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    p.add_argument("--skip-upcast", action="store_true")
    p.add_argument("--skip-forward", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {_load()}")
    if not args.skip_upcast:
        bench_upcast(args.sizes, args.runs)
    if not args.skip_forward:
        bench_forward(args.layers, args.width, args.tokens, args.runs)


if __name__ == "__main__":
    main()
