"""`tinkex sweep` against the same runs started one by one, and `--jobs 2` against `--jobs 1`.

Three arms, each timed from the outside as whole processes (start-up, training,
reports and, for the sweeps, the comparison at the end all included), on the
shipped config (the tiny model on the shipped data) at ``--steps`` steps, one
variant per KL weight (``--grid regularizers.kl_ref.weight=0,0.1,...``), seed 0:

- serial: ``tinkex train --seed 0 --set regularizers.kl_ref.weight=W`` once per
  variant, one after the other -- what you would do by hand;
- jobs1:  ``tinkex sweep --grid ... --jobs 1`` of the same variants;
- jobs2:  the same sweep with ``--jobs 2`` (two runs at a time, one torch thread each).

Targets: jobs1 / serial <= 1.10 (the sweep costs next to nothing over the runs
themselves), and, on a machine with 2 cores or more, jobs2 / jobs1 <= 0.80.
Exits 1 when a ratio misses its target.

    python bench/bench_sweep.py [--steps 100] [--variants 4] [--rounds 1] [--keep DIR]

With ``--rounds R`` every arm runs R times, in a rotating order, and the
medians are compared. On a shared, busy machine the wall times move by 10% or
more: read the per-round columns too.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"jobs1 / serial": 1.10, "jobs2 / jobs1": 0.80}
TINKEX = [sys.executable, "-m", "tinkex"]


def weights(n: int) -> list[str]:
    """``n`` KL weights, 0 to 0.3."""
    return ["0"] + [f"{0.3 * i / (n - 1):.3g}" for i in range(1, n)] if n > 1 else ["0.2"]


def _run(args: list[str], cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "TINKEX_LOG_JSON"}
    start = time.perf_counter()
    proc = subprocess.run(
        [*TINKEX, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    took = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bench_sweep: `tinkex {' '.join(args)}` exited {proc.returncode}:\n{proc.stderr}")
    return took


def serial(work: Path, ws: list[str], steps: int) -> float:
    total = 0.0
    for i, w in enumerate(ws):
        total += _run(
            [
                "train",
                "--out",
                str(work / f"v{i}"),
                "--seed",
                "0",
                "--steps",
                str(steps),
                "--set",
                f"regularizers.kl_ref.weight={w}",
                "-q",
            ],
            work,
        )
    return total


def sweep(work: Path, ws: list[str], steps: int, jobs: int) -> float:
    return _run(
        [
            "sweep",
            "--grid",
            f"regularizers.kl_ref.weight={','.join(ws)}",
            "--steps",
            str(steps),
            "--jobs",
            str(jobs),
            "--out",
            str(work / "sweep"),
            "-q",
        ],
        work,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps of every run")
    parser.add_argument("--variants", type=int, default=4, help="variants (KL weights)")
    parser.add_argument("--rounds", type=int, default=1, help="times each arm runs (medians)")
    parser.add_argument("--keep", type=Path, help="keep the runs in this directory")
    args = parser.parse_args(argv)
    ws = weights(args.variants)
    base = args.keep or Path(tempfile.mkdtemp(prefix="tinkex-bench-sweep-"))
    arms = {
        "serial": lambda d: serial(d, ws, args.steps),
        "jobs1": lambda d: sweep(d, ws, args.steps, 1),
        "jobs2": lambda d: sweep(d, ws, args.steps, 2),
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    try:
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                work = base / f"round{r}-{name}"
                work.mkdir(parents=True)
                times[name].append(arms[name](work))
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{len(ws)} variants (kl_ref.weight {', '.join(ws)}) x {args.steps} steps of the shipped "
        f"config, {cores} cores, load average {load:.2f} at the end, {args.rounds} round(s)"
    )
    print(f"{'arm':<8} {'median s':>9}  per round")
    for name, ts in times.items():
        print(f"{name:<8} {med[name]:>9.1f}  {' '.join(f'{t:.1f}' for t in ts)}")
    ratios = {
        "jobs1 / serial": med["jobs1"] / med["serial"],
        "jobs2 / jobs1": med["jobs2"] / med["jobs1"],
    }
    ok = True
    print(f"{'ratio':<15} {'value':>6} {'target':>7}  ok")
    for name, value in ratios.items():
        target = TARGETS[name]
        applies = not (name == "jobs2 / jobs1" and cores < 2)
        passed = value <= target or not applies
        ok &= passed
        mark = "yes" if value <= target else ("NO" if applies else "n/a (1 core)")
        print(f"{name:<15} {value:>6.3f} {target:>7.2f}  {mark}")
    print(
        f"sweep overhead over the runs by hand: {med['jobs1'] - med['serial']:+.1f} s "
        f"({(med['jobs1'] - med['serial']) / len(ws):+.2f} s per run)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
