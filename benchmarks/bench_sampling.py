"""ddimctl against diffusers' DDIMPipeline on the same UNet (google/ddpm-cifar10-32's architecture, random weights).

In one run, alternating the two to cancel drift: wall time of 20-step DDIM sampling at batch 16 for both, their
ratio, one UNet forward at batch 16 (ours and diffusers'), and each tool's overhead = total - steps x forward, as a
share of the total. Also checks that both produce the same x0 from the same x_T.

    python benchmarks/bench_sampling.py            # CPU, float32, 3 rounds
    python benchmarks/bench_sampling.py --rounds 1 --steps 5   # quick
    python benchmarks/bench_sampling.py --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

CIFAR10_UNET = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 32,
    "norm_eps": 1e-6, "act_fn": "silu", "time_embedding_type": "positional", "flip_sin_to_cos": False,
    "freq_shift": 1, "downsample_padding": 0, "attention_head_dim": None, "center_input_sample": False,
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    import diffusers

    from ddimctl.checkpoint import load
    from ddimctl.pipeline import Engine, SamplingOptions
    from ddimctl.sampler import make_generators, randn

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        ref_unet = diffusers.UNet2DModel(**CIFAR10_UNET)
        ref_unet.save_pretrained(d)
        sched = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=True)
        sched.save_pretrained(d)
        ckpt = load(d, device=device, dtype=dtype)
    ref_unet = ref_unet.to(device, dtype).eval()
    pipe = diffusers.DDIMPipeline(unet=ref_unet, scheduler=diffusers.DDIMScheduler.from_config(sched.config))
    pipe.set_progress_bar_config(disable=True)
    engine = Engine(ckpt.model, ckpt.settings, SamplingOptions(args.steps), (3, 32, 32), device, dtype)
    seeds = list(range(args.batch))
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, device {device}, {args.dtype}, "
          f"threads {torch.get_num_threads()}, batch {args.batch}, {args.steps} steps, "
          f"{sum(p.numel() for p in ckpt.model.parameters()) / 1e6:.1f} M parameters")

    # Same x_T for both: DDIMPipeline draws randn_tensor(shape, generator) on the CPU.
    x_T = torch.randn((args.batch, 3, 32, 32), generator=torch.Generator().manual_seed(0))

    def run_ours():
        with torch.inference_mode():
            return engine.generate(seeds, x_T)[1]

    def run_diffusers():
        with torch.inference_mode():
            return pipe(batch_size=args.batch, generator=torch.Generator().manual_seed(0), num_inference_steps=args.steps,
                        eta=0.0, output_type="np").images

    t_fw = torch.full((args.batch,), 500.0, device=device)
    x_fw = x_T.to(device, dtype)

    def fw_ours():
        with torch.inference_mode():
            return ckpt.model(x_fw, t_fw)

    def fw_ref():
        with torch.inference_mode():
            return ref_unet(x_fw, t_fw).sample

    run_ours(), run_diffusers(), fw_ours(), fw_ref()  # warm-up
    ours, theirs, f_ours, f_ref = [], [], [], []
    for _ in range(args.rounds):
        ours.append(timed(run_ours, device)[0])
        theirs.append(timed(run_diffusers, device)[0])
        for _ in range(3):
            f_ours.append(timed(fw_ours, device)[0])
            f_ref.append(timed(fw_ref, device)[0])
    x_ours = run_ours()
    x_ref = torch.from_numpy(run_diffusers()).permute(0, 3, 1, 2)
    diff = float(((x_ours.float().cpu() / 2 + 0.5).clamp(0, 1) - x_ref).abs().max())

    t_ours, t_ref = statistics.median(ours), statistics.median(theirs)
    fo, fr = statistics.median(f_ours), statistics.median(f_ref)
    print(f"ddimctl sample      : {t_ours:8.3f} s   (rounds: {', '.join(f'{t:.3f}' for t in ours)})")
    print(f"diffusers DDIMPipe  : {t_ref:8.3f} s   (rounds: {', '.join(f'{t:.3f}' for t in theirs)})")
    print(f"ratio ddimctl / diffusers         : {t_ours / t_ref:.3f}   (goal <= 1.00)")
    print(f"one forward, batch {args.batch}: ddimctl UNet {fo:.4f} s, diffusers UNet {fr:.4f} s (ratio {fo / fr:.3f})")
    print(f"ddimctl overhead   = total - {args.steps} x forward: {t_ours - args.steps * fo:+.4f} s = "
          f"{100 * (t_ours - args.steps * fo) / t_ours:+.2f} % of the total   (goal <= 1 %)")
    print(f"diffusers overhead = total - {args.steps} x forward: {t_ref - args.steps * fr:+.4f} s = "
          f"{100 * (t_ref - args.steps * fr) / t_ref:+.2f} % of the total")
    print(f"same x0 from the same x_T: max abs difference {diff:.2e} (images in [0, 1])")


if __name__ == "__main__":
    main()
