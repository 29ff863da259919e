"""Loading over a device mesh at N = 1, 2, 4 ranks (gloo on CPU): per-rank load time, peak memory
and bytes read from the checkpoint, loaderkit side by side with two peers:

* ``lk-fsdp``: ``loaderkit.load(path, "bf16", device_mesh=mesh, parallelize="fsdp")``;
* ``lk-fsdp-fp8``: the same with fp8 made on load (``"fp8"``);
* ``dcp``: torch.distributed.checkpoint's own path for this file — the meta model, ``fully_shard``
  per decoder layer and root, ``to_empty``, then ``dcp.load`` with ``HuggingFaceStorageReader``
  (which reads slices of the safetensors file);
* ``full-then-shard``: every rank loads the whole checkpoint (``loaderkit.load``, bf16), then
  ``fully_shard`` shards it.

The checkpoint is the 1.08 GB bf16 Llama of ``common.py`` (542 M parameters). Each method and N
runs in fresh processes; each rank measures, from a barrier before the load to a barrier after
it: wall time, its peak RSS growth (``VmHWM`` after resetting it), and the bytes it took from the
file: ``pread`` bytes plus the largest growth of its file-backed resident pages (``RssFile``,
sampled every 2 ms: what a memory-mapped read touched). The file is in the page cache (one warm-up load first). With 2 cores,
4 ranks share 2 cores: times at N=4 measure contention as much as loading.

    python benchmarks/bench_distributed.py [--ranks 1 2 4] [--repeats 3]
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
import common  # noqa: E402
from common import ensure_checkpoint, environment, free_port  # noqa: E402

METHODS = ("lk-fsdp", "lk-fsdp-fp8", "dcp", "full-then-shard")


def _rank(rank: int, world: int, port: int, method: str, path: str, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import loaderkit
    import loaderkit.loader  # noqa: F401 - the pipeline, which `import loaderkit` defers to the first call
    import transformers  # noqa: F401 - imported before the clock, as by every method

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    preadv = os.preadv
    counted = [0]

    def counting(fd, bufs, offset, *rest):
        n = preadv(fd, bufs, offset, *rest)
        counted[0] += n
        return n

    os.preadv = counting
    import threading

    peak_file = [0]
    done = threading.Event()

    def sample() -> None:  # file pages a memory-mapped read touches: there is no high-water mark
        while not done.wait(0.002):
            peak_file[0] = max(peak_file[0], common._status()["RssFile"])

    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS mark
    before = common._status()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if method.startswith("lk-fsdp"):
        model = loaderkit.load(path, "fp8" if method.endswith("fp8") else "bf16", device_mesh=mesh,
                               parallelize="fsdp")
    elif method == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device="cpu")
        state = model.state_dict()
        dcp.load(state, storage_reader=HuggingFaceStorageReader(path))
    else:
        model = loaderkit.load(path, "bf16")
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    dist.barrier()
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    after = common._status()
    os.preadv = preadv
    result = {
        "rank": rank, "wall": wall, "peak": after["VmHWM"] - before["VmRSS"],
        "from_file": counted[0] + max(0, max(peak_file[0], after["RssFile"]) - before["RssFile"]),
    }
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    del model
    dist.destroy_process_group()


def run(method: str, world: int, path: Path) -> list[dict]:
    """One load by every rank of a fresh world; the ranks' results."""
    with tempfile.TemporaryDirectory() as out:
        code = ("import sys; sys.path.insert(0, %r); import bench_distributed as b, torch.multiprocessing as mp; "
                "mp.spawn(b._rank, args=(%d, %d, %r, %r, %r), nprocs=%d)"
                % (str(Path(__file__).parent), world, free_port(), method, str(path), out, world))
        subprocess.run([sys.executable, "-c", code], check=True, timeout=900)
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = ap.parse_args()
    path = ensure_checkpoint()
    size = (path / "model.safetensors").stat().st_size
    run("lk-fsdp", 1, path)  # warm the page cache
    rows = []
    for world in args.ranks:
        for method in args.methods:
            runs = [run(method, world, path) for _ in range(args.repeats)]
            wall = statistics.median(max(r["wall"] for r in rs) for rs in runs)  # the slowest rank ends the load
            peak = statistics.median(max(r["peak"] for r in rs) for rs in runs)
            read = statistics.median(max(r["from_file"] for r in rs) for rs in runs)
            rows.append((world, method, wall, peak, read))
            print(f"N={world} {method}: {wall:.2f} s, peak {peak / 2**20:.0f} MiB/rank, "
                  f"{read / size:.2f} of the file/rank", file=sys.stderr, flush=True)
    print(f"\n{environment()}; checkpoint {size / 1e9:.2f} GB bf16 (page cache warm); medians of "
          f"{args.repeats}; per rank: the slowest rank's time, the largest rank's peak RSS growth and bytes from the file\n")
    print("| ranks | method | load s | vs lk-fsdp | peak RSS MiB/rank | vs lk-fsdp | from file/rank (of file) |")
    print("|---|---|---|---|---|---|---|")
    base = {(w, "lk-fsdp"): (t, p) for w, m, t, p, _ in rows if m == "lk-fsdp"}
    for world, method, wall, peak, read in rows:
        bt, bp = base.get((world, "lk-fsdp"), (wall, peak))
        print(f"| {world} | {method} | {wall:.2f} | {wall / bt:.2f}x | {peak / 2**20:.0f} | {peak / bp:.2f}x "
              f"| {read / 2**20:.0f} MiB ({read / size:.2f}) |")


if __name__ == "__main__":
    main()
