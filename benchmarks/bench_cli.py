"""Start-up time of the command, and peak memory of long sampling runs.

* `ddimctl --help` and `ddimctl sample --help`: median wall time of 5 fresh processes, after one untimed run
  (goal < 0.5 s), and whether torch gets imported (`python -X importtime`; it must not be);
* peak memory (max RSS of the fresh process, from os.wait4) of
  `ddimctl sample --n 512 --batch-size 16 --steps 2` against `--n 16` (goal: within 10 %): images stream to disk
  batch by batch, so memory must not grow with --n.

The model is the built-in default (`mnist`) when it is installed; otherwise (or with --tmp-model) a random model
of the built-in models' architecture saved to a temporary directory and passed as `--model PATH`.

    python benchmarks/bench_cli.py
    python benchmarks/bench_cli.py --model path/to/checkpoint --steps 2
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


def ddimctl_command() -> list[str]:
    """The installed console script, as a user runs it (else ``python -m ddimctl``)."""
    script = Path(sys.executable).parent / "ddimctl"
    if script.is_file():
        return [str(script)]
    found = shutil.which("ddimctl")
    return [found] if found else [sys.executable, "-m", "ddimctl"]


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def run_peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one fresh process running ``cmd``."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def imports_of(args: list[str]) -> tuple[bool, list[tuple[int, str]]]:
    """Whether ``python -X importtime -m ddimctl ARGS`` imports torch, and its five heaviest top-level imports."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-m", "ddimctl", *args],
                         capture_output=True, text=True, check=True).stderr
    tops = []
    for line in err.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if not name.startswith("  ") and cumulative.strip().isdigit():  # a top-level import
            tops.append((int(cumulative), name.strip()))
    names = {n for _, n in tops} | {ln.split("|")[-1].strip() for ln in err.splitlines() if "|" in ln}
    return "torch" in names, sorted(tops, reverse=True)[:5]


def make_model(directory: Path) -> Path:
    """A random UNet with the built-in models' architecture, saved in ddimctl's layout."""
    import torch

    from ddimctl.checkpoint import save
    from ddimctl.train import TrainConfig
    from ddimctl.nets.unet2d import UNet2DModel

    cfg = TrainConfig(data="mnist", base_channels=16, channel_mult=(1, 2, 4), layers_per_block=1,
                      attention_resolutions=(8,), norm_num_groups=8)
    torch.manual_seed(0)
    save(directory, UNet2DModel.from_config(cfg.unet_config()), cfg.settings(), {"objective": cfg.objective})
    return directory


def builtin_available(name: str) -> bool:
    try:
        from ddimctl.families import resolve

        resolve(name)
        return True
    except Exception:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model reference (default: the built-in mnist, if installed)")
    ap.add_argument("--tmp-model", action="store_true", help="use a random model saved to a temporary directory")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5, help="timed start-ups of each command")
    args = ap.parse_args()

    exe = ddimctl_command()
    print(f"command: {' '.join(exe)}")
    for sub in (["--help"], ["sample", "--help"]):
        wall(exe + sub)  # untimed: fills the OS file cache
        times = [wall(exe + sub) for _ in range(args.runs)]
        torch_imported, heaviest = imports_of(sub)
        print(f"ddimctl {' '.join(sub):14s}: median {statistics.median(times):.3f} s over {args.runs} runs "
              f"(min {min(times):.3f}, max {max(times):.3f}; goal < 0.5 s); imports torch: "
              f"{'YES' if torch_imported else 'no'}")
        print("    heaviest imports (cumulative): "
              + ", ".join(f"{name} {us / 1000:.0f} ms" for us, name in heaviest))

    with tempfile.TemporaryDirectory() as d:
        if args.model is not None and not args.tmp_model:
            model, what = args.model, args.model
        elif not args.tmp_model and builtin_available("mnist"):
            model, what = "mnist", "built-in mnist"
        else:
            model = str(make_model(Path(d) / "model"))
            what = "random model of the built-in architecture, in a temporary directory (--model PATH)"
        print(f"model: {what}")
        rss: dict[int, list[float]] = {16: [], 512: []}
        for rep in range(2):  # alternate, twice each
            for n in (16, 512):
                out = Path(d) / f"out{n}_{rep}"
                cmd = exe + ["sample", "--model", model, "--n", str(n), "--batch-size", "16",
                             "--steps", str(args.steps), "--out", str(out), "--quiet"]
                mib, seconds = run_peak_rss(cmd)
                written = len(list(out.glob("*.png")))
                if written != n:
                    sys.exit(f"expected {n} images in {out}, found {written}")
                rss[n].append(mib)
                print(f"sample --n {n:3d} --batch-size 16 --steps {args.steps}: peak RSS {mib:7.1f} MiB, "
                      f"{seconds:6.2f} s, {written} PNGs")
        a, b = statistics.median(rss[16]), statistics.median(rss[512])
        print(f"peak RSS, median: n=16 {a:.1f} MiB, n=512 {b:.1f} MiB; ratio n=512 / n=16: {b / a:.3f} "
              f"(goal <= 1.10)")


if __name__ == "__main__":
    main()
