"""Training steps per second: `ddimctl train`'s loop against a plain diffusers-UNet training step.

Same UNet architecture (by default the built-in models': base 16 channels, multipliers 1,2,4, one layer per
block, attention at 8x8, 8 norm groups), the same initial weights, the same batches of 32x32 single-channel
images, AdamW, MSE on epsilon. Three figures, in interleaved rounds (medians):

* ddimctl's whole training loop, ``ddimctl.train.train`` (data order, noising, forward, backward, gradient
  clipping, AdamW, EMA update, the metrics line), timed between its ``on_step`` calls;
* a plain step with ddimctl's UNet: forward + MSE + backward + AdamW on precomputed (x_t, t, target);
* the same plain step with diffusers' UNet2DModel.

ddimctl.train exposes no single-step function, so its loop is timed whole; the plain step with ddimctl's UNet
separates what the UNet costs from what the loop adds around it.

    python benchmarks/bench_train.py                 # 20 steps x 3 rounds
    python benchmarks/bench_train.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one round of 5 steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--channel-mult", default="1,2,4")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 5
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffusers

    from ddimctl.train import TrainConfig, train, training_example
    from ddimctl.nets.unet2d import UNet2DModel

    W, N = args.warmup, args.steps
    cfg = TrainConfig(
        data="random", base_channels=args.base_channels, channel_mult=tuple(int(v) for v in args.channel_mult.split(",")),
        layers_per_block=1, attention_resolutions=(8,), norm_num_groups=8, batch_size=args.batch,
        train_steps=W + N + 1,  # the last step also writes the checkpoint: it is not timed
        save_every=10**9, sample_every=0, warmup_steps=200,
    )
    data = torch.rand((512, 1, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1  # content is irrelevant
    settings = cfg.settings()
    examples = [training_example(data[: args.batch], k, cfg, settings, 0)[:3] for k in range(W + N)]

    torch.manual_seed(cfg.seed)  # the initial weights train() starts from
    init = UNet2DModel.from_config(cfg.unet_config()).state_dict()
    params = sum(v.numel() for v in init.values())

    def ddimctl_loop() -> tuple[float, float]:
        stamps: dict[int, tuple[float, float]] = {}
        with tempfile.TemporaryDirectory() as d:
            train(cfg, Path(d) / "run", torch.device("cpu"), data=data,
                  on_step=lambda info: stamps.__setitem__(info["step"], (time.perf_counter(), time.process_time())))
        (w0, c0), (w1, c1) = stamps[W], stamps[W + N]
        return N / (w1 - w0), N / (c1 - c0)

    def plain(make) -> tuple[float, float]:
        model = make()
        model.load_state_dict(init)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        for k, (x_t, t, target) in enumerate(examples):
            if k == W:
                start, start_cpu = time.perf_counter(), time.process_time()
            out = model(x_t, t)
            out = out.sample if hasattr(out, "sample") else out
            loss = torch.nn.functional.mse_loss(out, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return N / (time.perf_counter() - start), N / (time.process_time() - start_cpu)

    jobs = {
        "ddimctl train loop": ddimctl_loop,
        "plain step, ddimctl UNet": lambda: plain(lambda: UNet2DModel.from_config(cfg.unet_config())),
        "plain step, diffusers UNet": lambda: plain(lambda: diffusers.UNet2DModel(**cfg.unet_config())),
    }
    names = list(jobs)
    rates: dict[str, list[float]] = {k: [] for k in names}
    cpu_rates: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.rounds):
        for name in names[r % 3:] + names[: r % 3]:  # rotate the order every round
            wall, cpu = jobs[name]()
            rates[name].append(wall)
            cpu_rates[name].append(cpu)
    med = {k: statistics.median(v) for k, v in rates.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_rates.items()}

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, CPU, {torch.get_num_threads()} threads")
    print(f"UNet {cfg.unet_config()['block_out_channels']} ({params / 1e6:.2f} M parameters), batch {args.batch} "
          f"x 1 x 32 x 32, epsilon objective, AdamW; {N} timed steps after {W} untimed, {args.rounds} round(s)")
    for name in names:
        print(f"{name:27s}: {med[name]:7.3f} steps/s   (rounds: {', '.join(f'{v:.3f}' for v in rates[name])}); "
              f"per CPU second (all threads): {med_cpu[name]:.3f}")
    for label, m in (("wall time", med), ("CPU time ", med_cpu)):
        a, b, c = (m[n] for n in names)
        print(f"{label}: ratio ddimctl train loop / plain diffusers step {a / c:.3f} (speed; > 1 is faster), "
              f"plain ddimctl UNet / plain diffusers UNet {b / c:.3f}, ddimctl's loop around the step (noising, "
              f"clipping, EMA, metrics) {100 * (b / a - 1):+.1f} % of a plain step's time")


if __name__ == "__main__":
    main()
