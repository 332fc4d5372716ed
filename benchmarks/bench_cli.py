"""Start-up time of the command and memory of long sampling runs.

- `ddimctl --help` and `ddimctl sample --help`: median wall time of 5 fresh processes (goal < 0.5 s), and
  whether torch was imported (it must not be).
- Peak memory (max RSS of a fresh process) of `ddimctl sample --n 512 --batch-size 16` against `--n 16`
  (goal: within 10 %): images stream to disk batch by batch.

    python benchmarks/bench_cli.py [--model mnist] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def peak_rss_mib(cmd: list[str]) -> float:
    """Max RSS of one child process: run it under a fresh Python that reports its child's usage."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True).stdout
    return int(out.strip()) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    exe = [sys.executable, "-m", "ddimctl"]
    for sub in (["--help"], ["sample", "--help"]):
        times = [wall(exe + sub) for _ in range(5)]
        print(f"ddimctl {' '.join(sub):14s}: median {statistics.median(times):.3f} s over 5 runs (goal < 0.5 s)")
    probe = subprocess.run([sys.executable, "-c", "import sys; from typer.testing import CliRunner; from ddimctl.cli import app; "
                            "CliRunner().invoke(app, ['sample', '--help']); print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    print(f"torch imported by `sample --help`: {probe}")
    with tempfile.TemporaryDirectory() as d:
        rss = {}
        for n in (16, 512):
            cmd = exe + ["sample", "--model", args.model, "--n", str(n), "--batch-size", "16", "--steps", str(args.steps),
                         "--out", os.path.join(d, str(n)), "--quiet"]
            rss[n] = peak_rss_mib(cmd)
            print(f"sample --n {n:3d} --batch-size 16: peak RSS {rss[n]:.0f} MiB")
        print(f"ratio n=512 / n=16: {rss[512] / rss[16]:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
