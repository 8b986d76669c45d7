"""Benchmark: what listing the plugins costs, next to what importing torch costs.

Times, in fresh processes of this interpreter, interleaved (one of each per
round, so drift in machine load hits both alike):

- ``tinkex plugins list --json`` (``python -m tinkex``): every installed plugin
  distribution imported and its hooks called;
- ``python -c "import torch"``: the cost a plugin (or tinkex) pays when it
  imports torch at module top.

Prints both medians and their ratio. Target: ratio <= 0.5 -- listing plugins
costs a fraction of one torch import, which holds only while neither tinkex's
own import path nor any installed plugin imports torch until a loss is
computed. Exits 1 when the target is missed (or when ``plugins list`` fails or
imports torch).

    python bench/bench_plugins.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TARGET = 0.5

# `tinkex plugins list --json`, run as the console script does, reporting on
# stderr whether torch got imported along the way.
LIST = (
    "import json, sys\n"
    "from tinkex._cli import main\n"
    "try:\n"
    "    main(['plugins', 'list', '--json'])\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    "else:\n"
    "    code = 0\n"
    "report = {'torch': 'torch' in sys.modules, 'code': code}\n"
    "sys.stderr.write('\\nBENCH ' + json.dumps(report, default=str) + '\\n')\n"
)
TORCH = "import torch"


def _env() -> dict[str, str]:
    # the installed plugins as a user sees them: no allow/deny list, not strict
    return {k: v for k, v in os.environ.items() if not k.startswith("TINKEX_")}


def _time(code: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=300
    )
    return time.perf_counter() - start, proc


def _check_list(proc: subprocess.CompletedProcess[str]) -> tuple[list[str], bool]:
    """The distributions listed and whether torch got imported; SystemExit(1) if listing failed."""
    marker = [line for line in proc.stderr.splitlines() if line.startswith("BENCH ")]
    report = json.loads(marker[-1][len("BENCH ") :]) if marker else None
    if proc.returncode != 0 or report is None or report["code"] not in (0, None):
        print(f"`tinkex plugins list --json` failed:\n{proc.stderr}", file=sys.stderr)
        raise SystemExit(1)
    rows = json.loads(proc.stdout)
    listed = [f"{r['name']} ({'ok' if r['error'] is None else 'broken'})" for r in rows]
    return listed, bool(report["torch"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each command (>= 5)")
    args = parser.parse_args()
    runs = max(5, args.runs)

    # warm-up: the file cache, and the listing's output checked once
    _time(TORCH)
    _, proc = _time(LIST)
    listed, torch_imported = _check_list(proc)

    list_times: list[float] = []
    torch_times: list[float] = []
    for i in range(runs):
        # interleaved, alternating which goes first
        order = [("list", LIST), ("torch", TORCH)]
        for name, code in order if i % 2 == 0 else reversed(order):
            seconds, proc = _time(code)
            if proc.returncode != 0:
                print(f"{name} failed:\n{proc.stderr}", file=sys.stderr)
                return 1
            (list_times if name == "list" else torch_times).append(seconds)

    list_ms = statistics.median(list_times) * 1e3
    torch_ms = statistics.median(torch_times) * 1e3
    ratio = list_ms / torch_ms
    ok = ratio <= TARGET and not torch_imported
    print(f"plugins listed: {', '.join(listed) or 'none'}")
    if torch_imported:
        print("torch was imported by `tinkex plugins list` (tinkex or a plugin imports it eagerly)")
    print(f"{'command':>28} {'median ms':>10}  ({runs} runs each, interleaved)")
    for label, ms in (
        ("tinkex plugins list --json", list_ms),
        ('python -c "import torch"', torch_ms),
    ):
        print(f"{label:>28} {ms:>10.1f}")
    print(
        f"ratio list / import torch: {ratio:.3f}  (target <= {TARGET})  {'ok' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
