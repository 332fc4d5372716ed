"""Where the README's main job spends its time: ``ddimctl sample --steps 50 --eta 0`` as a whole process.

    python benchmarks/first_run.py            # 5 runs of each measurement (about a minute on 2 cores)
    python benchmarks/first_run.py --runs 9

Each figure is the median over ``--runs`` fresh processes (run on an otherwise idle machine):

* the whole command, exactly as the README gives it (the console script, offline, into a fresh folder);
* ``python -c pass`` (the interpreter's own start) and ``python -c "import torch"`` (torch's import);
* one instrumented run of the same command inside a fresh interpreter, which times its stages: the CLI's own
  imports, loading the model, the sampling loop and, inside it, the UNet's forwards (forward hooks), writing the
  PNGs, and what is left (option parsing, exit).

"Everything else" is the whole command minus torch's import minus the UNet's forwards: what ddimctl itself adds.
The goal (issue 19) is that it stays under 5 % of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

INSTRUMENTED = r"""
import json, sys, time
T0 = time.perf_counter()
import torch
T1 = time.perf_counter()
import ddimctl.cli
from ddimctl.cli import main
T2 = time.perf_counter()
import ddimctl.checkpoint, ddimctl.images, ddimctl.pipeline
stages = {"load": 0.0, "generate": 0.0, "model": 0.0, "png": 0.0}

def timed(owner, name, key):
    original = getattr(owner, name)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            stages[key] += time.perf_counter() - t
    setattr(owner, name, wrapper)

def add_hooks(ckpt):
    starts = []
    ckpt.model.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter()))
    def done(m, a, out):
        stages["model"] += time.perf_counter() - starts.pop()
    ckpt.model.register_forward_hook(done)
    return ckpt

original_load = ddimctl.checkpoint.load
def load(*a, **k):
    t = time.perf_counter()
    ckpt = original_load(*a, **k)
    stages["load"] += time.perf_counter() - t
    return add_hooks(ckpt)
ddimctl.checkpoint.load = load
timed(ddimctl.pipeline.Engine, "generate", "generate")
timed(ddimctl.images, "save_png", "png")
sys.argv = ["ddimctl", "sample", "--steps", "50", "--eta", "0", "--out", sys.argv[1], "--quiet"]
try:
    main()
except SystemExit:
    pass
T3 = time.perf_counter()
print(json.dumps({"torch_import": T1 - T0, "cli_import": T2 - T1, "command": T3 - T2, **stages}))
"""


def wall(cmd: list[str], env: dict, cwd: str | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    exe = shutil.which("ddimctl")
    if exe is None:
        sys.exit("ddimctl is not on PATH: pip install -e . first")
    tmp = tempfile.mkdtemp(prefix="first_run_")
    whole, start, torch_import, parts = [], [], [], []
    for r in range(args.runs):  # interleaved, so a slow spell of the machine touches every measurement alike
        whole.append(wall([exe, "sample", "--steps", "50", "--eta", "0"], env, cwd=tempfile.mkdtemp(dir=tmp)))
        start.append(wall([sys.executable, "-c", "pass"], env))
        torch_import.append(wall([sys.executable, "-c", "import torch"], env))
        out = subprocess.run([sys.executable, "-c", INSTRUMENTED, os.path.join(tmp, f"i{r}")], check=True, env=env,
                             capture_output=True, text=True)
        parts.append(json.loads(out.stdout.strip().splitlines()[-1]))
    shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    total, py, imp = med(whole), med(start), med(torch_import) - med(start)
    p = {k: med(d[k] for d in parts) for k in parts[0]}
    model = p["model"]
    other = total - imp - model
    print(f"`ddimctl sample --steps 50 --eta 0` (built-in mnist, 16 images, batch 16), median of {args.runs} "
          f"fresh processes, torch {__import__('torch').__version__}, {os.cpu_count()} CPUs:\n")
    rows = [
        ("whole command (console script)", total),
        ("  interpreter start (python -c pass)", py),
        ("  import torch", imp),
        ("  UNet forwards (50 at batch 16)", model),
        ("  everything else = whole - torch import - forwards", other),
        ("instrumented run, the parts of 'everything else':", None),
        ("  ddimctl's own imports (ddimctl.cli: typer, ...)", p["cli_import"]),
        ("  loading the model (resolve, read safetensors, build the UNet)", p["load"]),
        ("  sampling loop outside the UNet (noise, sampler math)", p["generate"] - model),
        ("  writing 16 PNGs (encode + atomic write + fsync)", p["png"]),
        ("  the rest of the command (options, checks, exit)", p["command"] - p["load"] - p["generate"] - p["png"]),
    ]
    for name, v in rows:
        print(f"{name:70s}" + ("" if v is None else f"{v:8.3f} s  {100 * v / total:5.1f} %"))
    print(f"\neverything else: {100 * other / total:.1f} % of the run (goal < 5 %)")


if __name__ == "__main__":
    main()
