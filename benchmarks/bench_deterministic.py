"""What ``--deterministic`` costs: sampling with and without it, in one run, on the same model and noise.

    python benchmarks/bench_deterministic.py                 # built-in mnist and the cifar10-32 architecture, 3 rounds
    python benchmarks/bench_deterministic.py --models mnist --rounds 5 --steps 20 --batch 16

Each round times ``Engine.generate`` (what ``ddimctl sample`` runs per batch) once without and once with
``deterministic=True`` (the order flips every round); medians and the ratio are printed, and the two runs' outputs
are compared (they may differ in the last bits: that is the point of the option). The cifar10-32 model is
diffusers' google/ddpm-cifar10-32 architecture with random weights (35.7 M parameters), built by ddimctl itself.
Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CIFAR10_32 = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 32,
    "norm_eps": 1e-6, "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0,
}


def engine(name: str, options):
    from ddimctl.engine import Engine
    from ddimctl.families.unet import in_memory
    from ddimctl.settings import SamplerSettings
    from ddimctl.nets.unet2d import UNet2DModel

    if name != "cifar10-32":
        return Engine.load(name, options)
    torch.manual_seed(0)
    model = UNet2DModel.from_config(CIFAR10_32).eval()
    return Engine(in_memory(model, SamplerSettings.from_config({"clip_sample": True})), options)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist,cifar10-32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from ddimctl.engine import SamplingOptions

    seeds = list(range(args.batch))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.steps} steps, "
          f"median of {args.rounds} rounds\n")
    print(f"{'model':12s} {'default':>10s} {'--deterministic':>16s} {'ratio':>7s} {'max |diff| x0':>14s}")
    for name in args.models.split(","):
        engines = {det: engine(name, SamplingOptions(steps=args.steps, deterministic=det)) for det in (False, True)}
        engines[True].model = engines[False].model  # the very same weights
        engines[False].generate(seeds[:2])  # warm-up (thread pools, allocator)
        engines[True].generate(seeds[:2])
        times = {False: [], True: []}
        outs = {}
        for r in range(args.rounds):
            for det in ((False, True) if r % 2 == 0 else (True, False)):
                t = time.perf_counter()
                outs[det] = engines[det].generate(seeds)[1]
                times[det].append(time.perf_counter() - t)
        a, b = statistics.median(times[False]), statistics.median(times[True])
        diff = float((outs[False] - outs[True]).abs().max())
        print(f"{name:12s} {a:9.2f}s {b:15.2f}s {b / a:7.2f} {diff:14.2e}")


if __name__ == "__main__":
    main()
