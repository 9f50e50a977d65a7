"""Start-up time of the command line, as ratios against baselines measured in the same run.

    python benchmarks/bench_startup.py [--runs 5]

Each command runs ``--runs`` times in a fresh interpreter (a subprocess, as a shell would start it) and the
median wall time is shown beside two baselines: an empty interpreter (``python -c pass``) and the import of
torch alone, which every command but these needs. Third-party autoloading is left as installed. Prints a
table and, with ``--json``, the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

#: what is timed: label → argv (after the interpreter)
BASELINES = {"python -c pass": ["-c", "pass"], "python -c 'import torch'": ["-c", "import torch"]}
COMMANDS = {"fluency --version": ["--version"], "fluency --help": ["--help"], "fluency plugins": ["plugins"]}
#: the command line started as its console script does
ENTRY = "import sys; from fluency.cli import main; sys.argv[0] = 'fluency'; main()"


def median_seconds(argv: list[str], runs: int) -> float:
    """Median wall time of ``python ARGV`` over ``runs`` fresh interpreters (output discarded)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(runs: int) -> dict[str, float]:
    """Median seconds of every baseline and command."""
    timed = {label: median_seconds(argv, runs) for label, argv in BASELINES.items()}
    timed.update({label: median_seconds(["-c", ENTRY, *args], runs) for label, args in COMMANDS.items()})
    return timed


def table(timed: dict[str, float]) -> str:
    """The medians with their ratios to the two baselines, in 80 columns."""
    empty, torch_import = timed["python -c pass"], timed["python -c 'import torch'"]
    lines = [f"{'command':<28}{'median s':>10}{'÷ python':>12}{'÷ import torch':>16}"]
    for label, seconds in timed.items():
        lines.append(f"{label:<28}{seconds:>10.3f}{seconds / empty:>12.1f}{seconds / torch_import:>16.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh interpreters per command (median)")
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    args = parser.parse_args()
    timed = measure(args.runs)
    print(f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, median of {args.runs} runs")
    print(table(timed))
    if args.json:
        print(json.dumps(timed, indent=2))


if __name__ == "__main__":
    main()
