"""GPU check: native fp8 matmul vs the cast path vs plain bf16, and cuda + cpu + disk offload.

    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu    # a dry run of the script itself

A stack of ``--layers`` Linear(``--width``) layers is saved in bf16 and loaded four ways:
plain ``bf16``; ``fp8`` with the cast path (weights upcast per forward); ``fp8`` with
``native="auto"`` (``torch._scaled_mm`` on CUDA sm >= 8.9; the plan records the fallback
elsewhere); and ``fp8`` spread over the GPU, the CPU and the disk. For each: the median forward
time over ``--runs`` forwards (synchronised), the kernel each Linear used, and the cosine
similarity of the output to the bf16 load.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import loaderkit
from loaderkit import runtime


class Stack(nn.Module):
    def __init__(self, layers: int = 8, width: int = 4096) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = F.gelu(layer(x))
        return x


def timed(model: nn.Module, x: torch.Tensor, runs: int, device: str) -> float:
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad():
        for _ in range(3):
            model(x)
        sync()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernels(model: nn.Module) -> str:
    used: dict[str, int] = {}
    for rule in runtime.cast_rules(model).values():
        label = f"native requested: {rule.native_reason}" if rule.native else "cast"
        used[label] = used.get(label, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in used.items()) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else None)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    if args.device is None:
        raise SystemExit("no CUDA device here; pass --device cpu for a dry run of this script")
    device = args.device
    if device.startswith("cuda"):
        print(f"{torch.cuda.get_device_name(device)}, sm {'.'.join(map(str, torch.cuda.get_device_capability(device)))}, "
              f"torch {torch.__version__}, native fp8 available: {runtime.native_fp8_available(device)}")

    def factory() -> nn.Module:
        return Stack(args.layers, args.width)

    with tempfile.TemporaryDirectory(prefix="loaderkit-gpu-") as tmp:
        torch.manual_seed(0)
        path = Path(tmp) / "stack.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.to(torch.bfloat16) for k, v in factory().state_dict().items()}, str(path))
        x = torch.randn(args.tokens, args.width, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
        cases = {
            "bf16": dict(strategy="bf16", device_map=device),
            "fp8, cast path": dict(strategy="fp8", device_map=device),
            "fp8, native='auto'": dict(strategy=loaderkit.strategy("fp8", native="auto"), device_map=device),
            "fp8, gpu+cpu+disk": dict(
                strategy="fp8", device_map="auto", offload_folder=str(Path(tmp) / "offload"),
                max_memory=({0: "64MB", "cpu": "64MB"} if device.startswith("cuda") else {"cpu": "64MB"}),
            ),
        }
        ref = None
        print(f"\n{args.layers} x Linear({args.width}), {args.tokens} tokens, median of {args.runs}\n")
        print("| load | forward ms | cosine vs bf16 | kernels | bytes per device |")
        print("|---|---|---|---|---|")
        for name, kwargs in cases.items():
            model = loaderkit.load(path, model=factory, progress=False, **kwargs)
            plan = loaderkit.plan_of(model)
            with torch.no_grad():
                out = model(x).float().flatten().cpu()
            ref = out if ref is None else ref
            ms = timed(model, x, args.runs, device) * 1e3
            cos = F.cosine_similarity(out, ref, dim=0).item()
            per_device = ", ".join(f"{d}: {b / 2**20:.0f} MiB" for d, b in plan.bytes_per_device().items())
            print(f"| {name} | {ms:.2f} | {cos:.5f} | {kernels(model)} | {per_device} |")
            assert loaderkit.verify(model).ok
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
