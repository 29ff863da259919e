"""The ``loaderkit`` command: inspect, plan, plugins, convert, demo.

Errors print one line, ``loaderkit: error: ...``, and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .errors import LoaderKitError, UsageError


def build_parser() -> argparse.ArgumentParser:
    """The ``loaderkit`` command's argument parser."""
    p = argparse.ArgumentParser(
        prog="loaderkit",
        description="Load checkpoints with storage and compute dtypes negotiated into a checked plan.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("inspect", help="describe a checkpoint from its headers (no tensor data read)")
    s.add_argument("path")
    s.add_argument("--format", help="force a format plugin by name")
    s.add_argument("--tensors", action="store_true", help="list every tensor")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("plan", help="negotiate and show the loading plan (no tensor data read)")
    s.add_argument("path")
    s.add_argument("--strategy", "-s", default="auto", help="strategy name (default: auto)")
    s.add_argument(
        "--option", "-o", action="append", default=[], metavar="KEY=VALUE",
        help="strategy option; VALUE is parsed as JSON when it can be (repeatable)",
    )
    s.add_argument(
        "--model", metavar="MODULE:ATTR",
        help="the architecture for a checkpoint without a config: a module class or zero-argument "
        "factory, imported from MODULE (e.g. loaderkit.demo:TinyVideoDiT)",
    )
    s.add_argument("--device", default="cpu", help="execution device (default: cpu)")
    s.add_argument("--format", help="force a format plugin by name")
    s.add_argument("--layout", metavar="NAME",
                   help="plan for writing this fp8 layout (what `loaderkit convert` writes), e.g. comfy-mixed")
    s.add_argument("--all", action="store_true", help="one row per module instead of grouping alike ones")
    s.add_argument("--non-strict", action="store_true", help="ignore unexpected checkpoint keys")
    s.add_argument("--component", action="append", default=[], metavar="NAME=STRATEGY",
                   help="pipeline directories: the strategy of one component (repeatable; others use --strategy)")
    s.add_argument("--max-memory", action="append", default=[], metavar="DEVICE=SIZE",
                   help="pipeline directories: a memory budget, e.g. cuda:0=8GiB (repeatable)")
    s.add_argument("--offload", choices=("auto", "none", "model"), default="auto",
                   help="pipeline directories: model offload (default: auto, by the budget)")
    s.add_argument("--world-size", type=int, metavar="N",
                   help="plan one rank of a load over N ranks (a simulated process group; nothing is started)")
    s.add_argument("--rank", type=int, metavar="R", help="the rank to plan, with --world-size (default: 0)")
    s.add_argument("--parallelize", choices=("fsdp", "tp"), help="with --world-size: FSDP2 (default) or the "
                   "model library's tensor-parallel plan")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("plugins", help="list plugins: version, source and what each provides")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("convert", help="write a converted copy of a checkpoint (fp8 layouts other tools read, dtypes)")
    s.add_argument("src", metavar="SRC")
    s.add_argument("dst", metavar="DST")
    s.add_argument("--strategy", "-s", required=True, help="strategy name: fp8, bf16, fp16, fp32, ...")
    s.add_argument(
        "--option", "-o", action="append", default=[], metavar="KEY=VALUE",
        help="strategy option; VALUE is parsed as JSON when it can be (repeatable)",
    )
    s.add_argument("--scheme", choices=("per-channel", "per-tensor", "block"),
                   help="fp8 scales (default: per-channel for transformers models, per-tensor otherwise)")
    s.add_argument("--layout", metavar="NAME",
                   help="fp8 layout to write: compressed-tensors, comfy-mixed or a plugin's (default: the "
                   "first that accepts SRC)")
    s.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest shard of a directory output, e.g. 2GB = 2e9 bytes (default: 5GB)")
    s.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    s.add_argument("--model", metavar="MODULE:ATTR",
                   help="the architecture, for a checkpoint without a config (default: inferred from its tensors)")
    s.add_argument("--no-progress", action="store_true", help="never show a progress bar")

    s = sub.add_parser("demo", help="save a small sample model, load it under each strategy, report")
    s.add_argument("--json", action="store_true", help="print JSON")
    return p


def _options(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"strategy option {pair!r} must look like KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _import_model(spec: str):
    import importlib

    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise UsageError(f"--model {spec!r} must look like MODULE:ATTR, e.g. loaderkit.demo:TinyVideoDiT")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # any failure to import user code is a usage error, named
        raise UsageError(f"--model {spec!r}: cannot import it: {type(exc).__name__}: {exc}") from None
    return obj


def cmd_inspect(args) -> int:
    from .assembly import is_pipeline
    from .loader import inspect

    if args.format is None and is_pipeline(args.path):
        return _inspect_pipeline(args)
    info = inspect(args.path, format=args.format)
    data = info.summary()
    if args.json:
        if args.tensors:
            data["tensor_list"] = {k: t.model_dump(mode="json") for k, t in info.tensors.items()}
        print(json.dumps(data, indent=2, default=str))
        return 0
    from .contract.plan import fmt_bytes

    print(f"path         {data['path']}")
    print(f"format       {data['format']}  ({len(data['files'])} file(s))")
    print(f"tensors      {data['tensors']}, {fmt_bytes(data['total_bytes'])}")
    print("dtypes       " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in data["dtypes"].items()))
    if data["config"]:
        print("config       " + ", ".join(f"{k}={v}" for k, v in data["config"].items()))
    if data["metadata"]:
        meta = ", ".join(f"{k}={v}" for k, v in data["metadata"].items())
        print("metadata     " + (meta if len(meta) < 200 else meta[:197] + "..."))
    q = data["quantization"]
    if q:
        print(f"quantization {q['family']} (scheme {q['scheme']}), {q['granularity']} scales, "
              f"{q['quantized_tensors']} quantized tensors")
        for k, v in q["details"].items():
            text = str(v)
            print(f"  {k}: {text if len(text) < 200 else text[:197] + '...'}")
    if args.tensors:
        for t in info.tensors.values():
            print(f"  {t.name}  {t.dtype}  {list(t.shape)}  {t.file}")
    return 0


def _inspect_pipeline(args) -> int:
    from .assembly import pipeline_components
    from .contract.plan import fmt_bytes
    from .loader import inspect

    rows = []
    for comp in pipeline_components(args.path):
        info = inspect(comp.directory) if comp.weights else None
        rows.append({**comp.model_dump(mode="json"),
                     "checkpoint": None if info is None else info.summary()})
    if args.json:
        print(json.dumps({"path": str(args.path), "components": rows}, indent=2, default=str))
        return 0
    print(f"pipeline     {args.path}")
    for r in rows:
        if r["class_name"] is None:
            continue
        what = f"{r['name']:<16} {r['library']}.{r['class_name']}  ({r['role']})"
        if r["checkpoint"]:
            c = r["checkpoint"]
            what += f"  {c['tensors']} tensors, {fmt_bytes(c['total_bytes'])}: " + ", ".join(
                f"{k} {fmt_bytes(v)}" for k, v in c["dtypes"].items())
        else:
            what += "  loaded by its library"
        print("  " + what)
    return 0


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key or not val:
            raise UsageError(f"{flag} {v!r}: expected NAME=VALUE")
        out[key] = val
    return out


def _plan_pipeline(args, strat) -> int:
    from .assembly import plan_pipeline

    per = _pairs(args.component, "--component")
    strategy_arg = strat
    if per:
        from .assembly import pipeline_components

        models = [c.name for c in pipeline_components(args.path) if c.weights]
        strategy_arg = {n: per.get(n, strat) for n in models} | per
    budget = _pairs(args.max_memory, "--max-memory") or None
    p = plan_pipeline(args.path, strategy_arg, device=args.device, max_memory=budget, offload=args.offload)
    print(json.dumps(p.to_dict(), indent=2, default=str) if args.json else p.table(all_modules=args.all))
    return 0


def cmd_plan(args) -> int:
    from .assembly import is_pipeline
    from .loader import plan, strategy

    strat = strategy(args.strategy, **_options(args.option)) if args.option else args.strategy
    if args.model is None and args.layout is None and args.format is None and is_pipeline(args.path):
        return _plan_pipeline(args, strat)
    if args.component or args.max_memory:
        raise UsageError("--component and --max-memory apply to pipeline directories (model_index.json) only")
    model = _import_model(args.model) if args.model else None
    if args.world_size is None:
        if args.rank is not None or args.parallelize is not None:
            raise UsageError("--rank and --parallelize plan one rank of a parallel load: give --world-size too")
        p = plan(args.path, strat, model=model, device_map=args.device, format=args.format,
                 strict=not args.non_strict, layout=args.layout)
    else:
        from .pipeline.distribute import simulated_mesh

        with simulated_mesh(args.world_size, args.rank or 0) as mesh:
            p = plan(args.path, strat, model=model, format=args.format, strict=not args.non_strict,
                     device_mesh=mesh, parallelize=args.parallelize or "fsdp")
    if args.json:
        print(json.dumps(p.to_dict(), indent=2, default=str))
    else:
        print(p.table(all_modules=args.all))
    return 0


def cmd_plugins(args) -> int:
    from .pipeline.discover import get_manager

    mgr = get_manager()
    mgr.registries()
    records = [
        {"name": r.name, "version": r.version, "source": r.source, "module": r.module, "provides": r.provides}
        for r in mgr.records.values()
    ]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    for r in records:
        provides = "; ".join(f"{k}: {', '.join(v)}" for k, v in r["provides"].items()) or "-"
        print(f"{r['name']:<14} {r['version']:<10} {r['source']:<12} {provides}")
    from .kernels import compiled

    state = compiled.status()
    if state["available"]:
        print(f"\nfp8 CPU kernel: compiled, {state['reason']} ({state['path']})")
    else:
        print(f"\nfp8 CPU kernel: not in use ({state['reason']}); fp8 is decoded by torch lookup tables")
    return 0


def cmd_convert(args) -> int:
    from .loader import inspect
    from .contract.plan import fmt_bytes
    from .pipeline.convert import convert

    strat = args.strategy
    if args.option:
        from .loader import strategy

        strat = strategy(args.strategy, **_options(args.option))
    model = _import_model(args.model) if args.model else None
    dst = convert(args.src, args.dst, strat, scheme=args.scheme, layout=args.layout, max_shard_size=args.max_shard_size,
                  overwrite=args.overwrite, model=model, progress=False if args.no_progress else None)
    info = inspect(dst)
    q = info.quantization
    layout = f"{q.family}, {q.granularity} scales" if q else ", ".join(info.dtype_bytes())
    print(f"wrote {dst}  ({len(info.files)} file(s), {len(info.tensors)} tensors, "
          f"{fmt_bytes(info.total_bytes)}; {layout})")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(json_output=args.json)


COMMANDS = {
    "inspect": cmd_inspect,
    "plan": cmd_plan,
    "plugins": cmd_plugins,
    "convert": cmd_convert,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loaderkit`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"loaderkit {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except LoaderKitError as exc:
        if args.debug:
            raise
        message = str(exc).replace("\r", "\\r").replace("\n", "\\n")  # one line, always
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # printable, always
        print(f"loaderkit: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("loaderkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `loaderkit inspect --tensors | head`: the reader left; so do we
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
