"""Headers over many ranks: every rank reads them, or rank 0 reads and broadcasts?

    python benchmarks/bench_headers.py [--ranks 2 4] [--repeats 5]

Two checkpoints, headers only (sparse files): a 1,000-tensor one (20 files of 50 tensors) and
the DeepSeek-V3-sized index of ``bench_metadata.py`` (163 files, 90,427 tensors). For each N,
N gloo ranks on this machine describe the checkpoint (``loaderkit.inspect``) two ways:

* ``every-rank``: each rank reads every header itself;
* ``rank0-broadcast``: rank 0 reads them and ``broadcast_object_list`` sends the description
  (pickled) to the others.

Per way: the time from a barrier until the slowest rank holds the description (median of the
repeats). The file headers are in the page cache; on a shared network filesystem every-rank
reads cost more, which this machine cannot show.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_metadata  # noqa: E402
from common import BENCH_DIR, environment, free_port  # noqa: E402


def ensure_small() -> Path:
    """20 sparse safetensors files of 50 bf16 [1024, 1024] tensors each, and their index."""
    root = BENCH_DIR / "headers-1000"
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for f in range(20):
        name = f"model-{f + 1:05d}-of-00020.safetensors"
        header, offset = {}, 0
        for t in range(50):
            key = f"model.layers.{f}.block.{t}.weight"
            header[key] = {"dtype": "BF16", "shape": [1024, 1024], "data_offsets": [offset, offset + (2 << 20)]}
            offset += 2 << 20
            weight_map[key] = name
        bench_metadata.write_sparse(root / name, header, offset)
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def _rank(rank: int, world: int, port: int, way: str, path: str, repeats: int, out: str) -> None:
    import torch.distributed as dist

    import loaderkit

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loaderkit.inspect(path)  # imports and plugin discovery, untimed
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        if way == "every-rank":
            info = loaderkit.inspect(path)
        else:
            box = [loaderkit.inspect(path) if rank == 0 else None]
            dist.broadcast_object_list(box, src=0)
            info = box[0]
        times.append(time.perf_counter() - t0)
        assert len(info.tensors) > 0
    Path(out, f"{rank}.json").write_text(json.dumps(times))
    dist.destroy_process_group()


def run(way: str, world: int, path: Path, repeats: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        code = ("import sys; sys.path.insert(0, %r); import bench_headers as b, torch.multiprocessing as mp; "
                "mp.spawn(b._rank, args=(%d, %d, %r, %r, %d, %r), nprocs=%d)"
                % (str(Path(__file__).parent), world, free_port(), way, str(path), repeats, out, world))
        subprocess.run([sys.executable, "-c", code], check=True, timeout=1800)
        per_rank = [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]
    return statistics.median(max(ts) for ts in zip(*per_rank))  # the slowest rank, per repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    checkpoints = {"1,000 tensors / 20 files": ensure_small(),
                   "90,427 tensors / 163 files": bench_metadata.ensure_index()}
    print(f"{environment()}; medians of {args.repeats}; time until the slowest rank holds the description\n")
    print("| checkpoint | ranks | every rank reads | rank 0 reads + broadcast | broadcast / every |")
    print("|---|---|---|---|---|")
    for label, path in checkpoints.items():
        for world in args.ranks:
            every = run("every-rank", world, path, args.repeats)
            bcast = run("rank0-broadcast", world, path, args.repeats)
            print(f"| {label} | {world} | {every:.3f} s | {bcast:.3f} s | {bcast / every:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
