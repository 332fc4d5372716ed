"""Stable Diffusion through ddimctl against diffusers' own pipeline: whole-process time and peak memory per image.

    python benchmarks/text_to_image.py                        # SD 1.5 sizes, 256x256, 4 steps, 3 rounds (CPU)
    python benchmarks/text_to_image.py --size 512 --steps 20  # on a GPU machine

The model is Stable Diffusion 1.5's architecture with random weights (its UNet, CLIP ViT-L/14 text encoder and
VAE configs; a character-level tokenizer, since no real vocabulary can be fetched here), saved once as a diffusers
folder under --cache. Each round runs, in fresh processes, one after the other:

* ``ddimctl sample --model DIR --prompt P --steps S --height H --width H --n 1`` (the console script, DDIM, w 7.5);
* the same job written as a user would with diffusers: ``StableDiffusionPipeline.from_pretrained(DIR)`` with
  ``DDIMScheduler.from_config(...)``, ``pipe(P, num_inference_steps=S, height=H, width=H)``, the image saved as PNG.

Both load the same safetensors files with the same libraries' classes and run the same number of guided UNet calls
(one batched forward of 2 per step); the wall time and the peak resident memory of each process (``/usr/bin/time``)
are compared as medians over the rounds, ratio ddimctl / diffusers (goal: <= 1.00 for both). Then, in ddimctl: what
guidance costs (the same job at w = 1), the model calls exact inversion costs (``reconstruct --json``, 10 steps, at
w = 1 and 7.5) and ``ddimctl --help``'s time (goal < 0.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SD15_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)

DIFFUSERS_JOB = """
import sys, torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
folder, prompt, steps, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
image = pipe(prompt, num_inference_steps=steps, height=size, width=size,
             generator=torch.Generator().manual_seed(0)).images[0]
image.save(out)
"""


def build(folder: Path) -> Path:
    """SD 1.5's architecture with random weights, saved as a diffusers folder (once)."""
    if (folder / "model_index.json").is_file():
        return folder
    sys.path.insert(0, str(ROOT / "tests"))
    import t2i  # the offline character-level CLIP tokenizer
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = t2i.clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, **SD15_CLIP))
    pipe = StableDiffusionPipeline(AutoencoderKL(**SD15_VAE), text_encoder, tokenizer,
                                   UNet2DConditionModel(**SD15_UNET), DDIMScheduler(**SD15_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = folder.with_name(folder.name + ".tmp")
    pipe.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of one process, from /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        t0 = time.perf_counter()
        r = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", f.name, *cmd], capture_output=True, text=True,
                           env=env)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed:\n{r.stderr}")
        return wall, int(f.read().strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / ".bench-cache" / "sd15-random")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    folder = build(args.cache)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    prompt = "a photograph of an astronaut riding a horse"
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            ours.append(timed(["ddimctl", "sample", "--model", str(folder), "--prompt", prompt, "--steps",
                               str(args.steps), "--height", str(args.size), "--width", str(args.size), "--n", "1",
                               "--device", args.device, "--quiet", "--out", f"{tmp}/ours{k}"], env))
            theirs.append(timed([sys.executable, "-c", DIFFUSERS_JOB, str(folder), prompt, str(args.steps),
                                 str(args.size), f"{tmp}/theirs{k}.png"], env))
            print(f"round {k + 1}: ddimctl {ours[-1][0]:.1f} s {ours[-1][1]:.0f} MiB, diffusers "
                  f"{theirs[-1][0]:.1f} s {theirs[-1][1]:.0f} MiB", file=sys.stderr)
        t_o, m_o = (statistics.median(v) for v in zip(*ours))
        t_d, m_d = (statistics.median(v) for v in zip(*theirs))
        unguided = statistics.median(timed(["ddimctl", "sample", "--model", str(folder), "--prompt", prompt,
                                            "--steps", str(args.steps), "--height", str(args.size), "--width",
                                            str(args.size), "--n", "1", "--guidance-scale", "1", "--quiet", "--out",
                                            f"{tmp}/w1-{k}"], env)[0] for k in range(args.rounds))
        from PIL import Image

        Image.new("RGB", (args.size, args.size), (120, 160, 200)).save(f"{tmp}/photo.png")
        inversion = {}
        for w in ("1", "7.5"):
            r = subprocess.run(["ddimctl", "reconstruct", f"{tmp}/photo.png", "--model", str(folder), "--prompt", prompt,
                                "--steps", "10", "--guidance-scale", w, "--height", str(args.size), "--width",
                                str(args.size), "--quiet", "--json", "--out", f"{tmp}/rec{w}"],
                               capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise SystemExit(r.stderr)
            record = json.loads(r.stdout)["images"][0]
            inversion[w] = (record["model_calls"], record["inversion_mse"])
        helps = []
        for _ in range(5):
            t0 = time.perf_counter()
            subprocess.run(["ddimctl", "--help"], capture_output=True, env=env)
            helps.append(time.perf_counter() - t0)
    print(f"\nStable Diffusion 1.5 architecture, random weights, {args.size}x{args.size}, {args.steps} DDIM steps, "
          f"guidance 7.5, one image, device {args.device}; medians of {args.rounds} rounds\n")
    print("| | ddimctl | diffusers | ratio |")
    print("|---|---|---|---|")
    print(f"| whole process, wall time | {t_o:.1f} s | {t_d:.1f} s | {t_o / t_d:.3f} |")
    print(f"| peak resident memory | {m_o:.0f} MiB | {m_d:.0f} MiB | {m_o / m_d:.3f} |")
    print(f"| the same, unguided (w = 1: one forward of 1 per step, not 2) | {unguided:.1f} s | | "
          f"guidance costs {t_o / unguided:.2f}x |")
    for w, (calls, err) in inversion.items():
        print(f"\nreconstruct (exact inversion, then sampling) at 10 steps, w = {w}: {calls} batched model calls, "
              f"inversion MSE against the autoencoder's round trip {err:.2e} (random weights: no denoiser, so the "
              "solver may stop at its iteration cap; FACTS.md)")
    print(f"\n`ddimctl --help`: {statistics.median(helps):.2f} s (median of 5)")

if __name__ == "__main__":
    main()
