"""Training steps per second: `ddimctl train`'s loop against a plain diffusers-UNet training step.

Same architecture (the one the built-in models use, or --base-channels/--channel-mult), same batch of MNIST-sized
images, CPU. ddimctl's figure is its whole loop (data order, noising, forward, backward, grad clipping, AdamW,
EMA update, metrics line); the plain step is forward + MSE + backward + AdamW on a diffusers UNet2DModel.

    python benchmarks/bench_train.py --steps 20
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--channel-mult", default="1,2,4")
    args = ap.parse_args()

    import diffusers

    from ddimctl.data import load_builtin_dataset
    from ddimctl.train import TrainConfig, train

    cfg = TrainConfig(data="digits", image_size=32, base_channels=args.base_channels,
                      channel_mult=tuple(int(v) for v in args.channel_mult.split(",")), batch_size=args.batch,
                      train_steps=args.steps + 2, save_every=10**9, warmup_steps=1)
    data = load_builtin_dataset("digits", 32)
    stamps = {}
    with tempfile.TemporaryDirectory() as d:
        train(cfg, Path(d) / "run", torch.device("cpu"), data=data,
              on_step=lambda info: stamps.__setitem__(info["step"], time.perf_counter()))
    ours = args.steps / (stamps[args.steps + 2] - stamps[2])  # steps/s, after two warm-up steps

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**cfg.unet_config())
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr)
    x = data[: args.batch]
    for i in range(args.steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        eps = torch.randn_like(x)
        t = torch.randint(0, 1000, (args.batch,))
        loss = torch.nn.functional.mse_loss(unet(0.5 * x + 0.8 * eps, t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    plain = args.steps / (time.perf_counter() - t0)
    print(f"UNet {cfg.unet_config()['block_out_channels']}, batch {args.batch}, 32x32x1, {torch.get_num_threads()} threads")
    print(f"ddimctl train loop : {ours:.3f} steps/s")
    print(f"plain diffusers    : {plain:.3f} steps/s")
    print(f"ratio ddimctl / plain: {ours / plain:.3f}")


if __name__ == "__main__":
    main()
