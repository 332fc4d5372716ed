"""Where the README's main job spends its time: ``ddimctl sample --steps 50 --eta 0`` as a whole process.

    python benchmarks/first_run.py            # 5 rounds (about a minute and a half on 2 cores)
    python benchmarks/first_run.py --runs 9

Each round runs, in fresh processes on an otherwise idle machine:

* the whole command, exactly as the README gives it (the console script, offline, into a fresh folder);
* the same command inside an instrumented interpreter that times every stage of that one process from the outside
  in: interpreter start (spawn to first line), ``import torch``, ddimctl's own imports, loading the model, the
  sampling loop and, inside it, the UNet's forwards (forward hooks), writing the PNGs, the rest of the command
  (option parsing, checks) and the interpreter's shutdown (last line to exit);
* a baseline process that only imports torch and exits the way ddimctl exits (``gc.freeze()`` first, below).

"Everything else" is, per round, the instrumented command's wall time minus the baseline's wall time minus the
command's UNet forwards: what ddimctl adds to torch's import and the model's own work. The goal (issue 19) is that
it stays under 5 % of the run. Figures are medians over the rounds.

Shutdown: ``python -c "import torch"`` spends about 0.5 s exiting on 2 cores, 0.35 s of it the cyclic garbage
collector walking torch's objects one last time. ``ddimctl``'s entry point skips that walk (``gc.freeze()`` once its
work is done), and so does the baseline here, so that saving is not counted as ddimctl's; the plain
``python -c "import torch"`` is printed beside it.

Bytecode: pip compiles a package's bytecode when it installs it; an editable install under
``PYTHONDONTWRITEBYTECODE=1`` (set on this project's machines) compiles ddimctl from source on every run. The rounds
run with the bytecode compiled (``python -m compileall``); the whole command is also timed without it first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# argv: OUT_DIR. Prints one JSON line of stage times; "done_at" is the epoch time of its last line.
INSTRUMENTED = r"""
import json, sys, time
E0 = time.time()
T0 = time.perf_counter()
import torch
T1 = time.perf_counter()
import ddimctl.cli
from ddimctl.cli import main
T2 = time.perf_counter()
import ddimctl.checkpoint, ddimctl.images, ddimctl.engine
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
timed(ddimctl.engine.Engine, "generate", "generate")
timed(ddimctl.images, "save_png", "png")
sys.argv = ["ddimctl", "sample", "--steps", "50", "--eta", "0", "--out", sys.argv[1], "--quiet"]
try:
    main()  # ends in gc.freeze() and sys.exit, like the console script
except SystemExit:
    pass
T3 = time.perf_counter()
print(json.dumps({"started_at": E0, "torch_import": T1 - T0, "cli_import": T2 - T1, "command": T3 - T2,
                  "done_at": time.time(), **stages}), flush=True)
"""

# The baseline: torch's import, and an exit like ddimctl's.
BASELINE = r"""
import json, time
E0 = time.time()
T0 = time.perf_counter()
import gc, torch
T1 = time.perf_counter()
gc.freeze()
print(json.dumps({"started_at": E0, "torch_import": T1 - T0, "done_at": time.time()}), flush=True)
"""


def wall(cmd: list[str], env: dict, cwd: str | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def timed_process(code: str, env: dict, *argv: str) -> dict:
    """Run ``code`` in a fresh interpreter; its JSON line plus wall, start (spawn to first line) and shutdown (last
    line to exit) in seconds."""
    spawned = time.time()
    out = subprocess.run([sys.executable, "-c", code, *argv], check=True, env=env, capture_output=True, text=True)
    exited = time.time()
    d = json.loads(out.stdout.strip().splitlines()[-1])
    d["wall"], d["start"] = exited - spawned, d.pop("started_at") - spawned
    d["shutdown"] = exited - d.pop("done_at")
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    exe = shutil.which("ddimctl")
    if exe is None:
        sys.exit("ddimctl is not on PATH: pip install -e . first")
    tmp = tempfile.mkdtemp(prefix="first_run_")
    command = [exe, "sample", "--steps", "50", "--eta", "0"]
    package = os.path.dirname(importlib.util.find_spec("ddimctl").origin)
    for sub in ("", "cli"):
        shutil.rmtree(os.path.join(package, sub, "__pycache__"), ignore_errors=True)
    uncompiled = [wall(command, env, cwd=tempfile.mkdtemp(dir=tmp)) for _ in range(args.runs)]
    subprocess.run([sys.executable, "-m", "compileall", "-q", package], check=True)

    whole, plain_torch, runs, base = [], [], [], []
    for r in range(args.runs):  # interleaved, so a slow spell of the machine touches every measurement alike
        whole.append(wall(command, env, cwd=tempfile.mkdtemp(dir=tmp)))
        runs.append(timed_process(INSTRUMENTED, env, os.path.join(tmp, f"i{r}")))
        base.append(timed_process(BASELINE, env))
        plain_torch.append(wall([sys.executable, "-c", "import torch"], env))
    shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    p = {k: med(d[k] for d in runs) for k in runs[0]}
    b = {k: med(d[k] for d in base) for k in base[0]}
    other = [d["wall"] - e["wall"] - d["model"] for d, e in zip(runs, base)]
    total = p["wall"]
    print(f"`ddimctl sample --steps 50 --eta 0` (built-in mnist, 16 images, batch 16), median of {args.runs} rounds "
          f"of fresh processes, torch {__import__('torch').__version__}, {os.cpu_count()} CPUs:\n")
    rows = [
        ("the console script as the README gives it", med(whole)),
        ("  the same, ddimctl compiled from source on every run", med(uncompiled)),
        ("instrumented command, one process (= 100 %)", total),
        ("  interpreter start", p["start"]),
        ("  import torch", p["torch_import"]),
        ("  ddimctl's own imports (ddimctl.cli: typer, ...)", p["cli_import"]),
        ("  loading the model (resolve, read safetensors, build the UNet)", p["load"]),
        ("  UNet forwards (50 at batch 16)", p["model"]),
        ("  sampling loop outside the UNet (noise, sampler math)", p["generate"] - p["model"]),
        ("  writing 16 PNGs (encode + atomic write + fsync)", p["png"]),
        ("  the rest of the command (option parsing, checks, lazy imports)",
         p["command"] - p["load"] - p["generate"] - p["png"]),
        ("  interpreter shutdown", p["shutdown"]),
        ("baseline: import torch, exit as ddimctl does", b["wall"]),
        ("  of which shutdown", b["shutdown"]),
        ("python -c 'import torch' (its shutdown walks every object)", med(plain_torch)),
    ]
    for name, v in rows:
        print(f"{name:70s}{v:8.3f} s  {100 * v / total:5.1f} %")
    print(f"\neverything else (command - baseline - forwards, per round): {med(other):.3f} s, "
          f"{100 * med(other) / total:.1f} % of the run (goal < 5 %)")


if __name__ == "__main__":
    main()
