"""What ``import loaderkit`` and the ``loaderkit`` command cost at start-up.

    python benchmarks/bench_import.py [--repeats 9]

Every measurement runs in a fresh Python process (the cases alternate, round after round):

* ``import torch`` alone, timed with ``time.perf_counter`` inside the process;
* ``import torch`` then ``import loaderkit``: the second import is what loaderkit adds;
* ``import torch`` then ``import loaderkit.plugin`` (the plugin authors' namespace);
* the wall time of whole processes: ``python -c pass`` (interpreter start-up),
  ``python -c "import torch"``, ``loaderkit --help``, ``loaderkit --version`` and
  ``loaderkit plugins`` (which discovers and imports every plugin).

After the tables, one ``python -X importtime`` run lists ``loaderkit`` and the packages that
``import loaderkit`` imports first after torch, largest first. Prints medians and min-max; the goal at the end
(``import loaderkit`` at most 0.2 s over ``import torch``) makes the script exit 1 when missed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

#: Goal: ``import loaderkit`` after ``import torch`` adds at most this many seconds (median).
IMPORT_OVER_TORCH_S = 0.2

_INPROC = """
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
for name in sys.argv[1:]:
    __import__(name)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""

#: in-process cases: name -> modules imported after torch
INPROC = {
    "import torch": [],
    "import torch; import loaderkit": ["loaderkit"],
    "import torch; import loaderkit.plugin": ["loaderkit.plugin"],
}


#: children run here, so that the loaderkit measured is the installed one (``python -c`` would
#: otherwise import it from the current directory first)
CWD = tempfile.gettempdir()


def _command() -> list[str]:
    """How to run the ``loaderkit`` command: the installed script next to this Python if there
    is one, else ``python -m loaderkit``."""
    script = Path(sys.executable).with_name("loaderkit")
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "loaderkit"]


def _processes() -> dict[str, list[str]]:
    cli = _command()
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "loaderkit --help": [*cli, "--help"],
        "loaderkit --version": [*cli, "--version"],
        "loaderkit plugins": [*cli, "plugins"],
    }


def _inproc(modules: list[str]) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", _INPROC, *modules], capture_output=True, text=True, check=True,
                         cwd=CWD)
    torch_s, rest_s = out.stdout.split()
    return float(torch_s), float(rest_s)


def _wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=CWD)
    return time.perf_counter() - t0


def _importtime(top: int) -> list[tuple[str, int]]:
    """(package, cumulative microseconds) of ``loaderkit`` and of every top-level package that
    ``import loaderkit`` imports for the first time after torch, largest first."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch; import loaderkit"],
                         capture_output=True, text=True, check=True, cwd=CWD).stderr.splitlines()
    rows = [line for line in err if line.startswith("import time:")]
    start = max(i for i, line in enumerate(rows) if line.rstrip().endswith("| torch")) + 1
    found = []
    for line in rows[start:]:
        _, cumulative, name = line.split("|")
        if "." not in name.strip():
            found.append((name.strip(), int(cumulative)))
    found.sort(key=lambda r: -r[1])
    return found[:top]


def _row(name: str, values: list[float], base: float | None = None) -> list[str]:
    med = statistics.median(values)
    cells = [name, f"{med:.3f}", f"{min(values):.3f}-{max(values):.3f}"]
    if base is not None:
        cells.append(f"{med / base:.2f}x")
    return cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9, help="fresh processes per case (default: 9)")
    args = ap.parse_args()
    print(f"{common.environment()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    procs = _processes()
    where = subprocess.run([sys.executable, "-c", "import loaderkit; print(loaderkit.__file__)"], cwd=CWD,
                           capture_output=True, text=True, check=True).stdout.strip()
    print(f"loaderkit measured: {where}; the command runs as: " + " ".join(procs["loaderkit --help"][:-1]))
    torch_s: dict[str, list[float]] = {n: [] for n in INPROC}
    extra_s: dict[str, list[float]] = {n: [] for n in INPROC}
    wall: dict[str, list[float]] = {n: [] for n in procs}
    for name, mods in INPROC.items():  # warm-up: page cache and bytecode caches
        _inproc(mods)
    for cmd in procs.values():
        _wall(cmd)
    for r in range(args.repeats):
        for name, mods in INPROC.items():
            t, e = _inproc(mods)
            torch_s[name].append(t)
            extra_s[name].append(e)
        for name, cmd in procs.items():
            wall[name].append(_wall(cmd))
        print(f"  round {r + 1}/{args.repeats}: import loaderkit after torch "
              f"{extra_s['import torch; import loaderkit'][-1]:.3f} s", file=sys.stderr, flush=True)

    torch_alone = statistics.median(torch_s["import torch"])
    print(f"\nIn-process imports, seconds, medians of {args.repeats} fresh processes")
    rows = [_row("import torch", torch_s["import torch"], torch_alone)]
    for name, mods in INPROC.items():
        if mods:
            rows.append(_row(f"{name}: the `import {mods[0]}` after torch", extra_s[name], torch_alone))
    print(common.table(["case", "s (median)", "min-max", "vs import torch"], rows))

    base = statistics.median(wall["python -c pass"])
    print(f"\nWhole processes, wall seconds, medians of {args.repeats}")
    print(common.table(["command", "s (median)", "min-max", "vs python -c pass"],
                       [_row(n, v, base) for n, v in wall.items()]))

    print("\n`import loaderkit` and the packages it imports first after torch (one `python -X importtime` run, "
          "cumulative ms, nested packages counted in each)")
    print(common.table(["package", "ms"], [[m, f"{us / 1e3:.1f}"] for m, us in _importtime(12)]))

    added = statistics.median(extra_s["import torch; import loaderkit"])
    ok = added <= IMPORT_OVER_TORCH_S
    print(f"\ngoal: import loaderkit <= {IMPORT_OVER_TORCH_S:.2f} s over import torch: {added:.3f} s "
          f"({added / torch_alone:.2f}x of import torch's {torch_alone:.3f} s): {'met' if ok else 'MISSED'}")
    if not ok:
        print(f"goal missed: import loaderkit adds {added:.3f} s over import torch "
              f"(limit {IMPORT_OVER_TORCH_S:.2f} s)")
        sys.exit(1)


if __name__ == "__main__":
    main()
