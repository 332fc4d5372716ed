"""Text-to-image models through ddimctl against diffusers' own pipelines: whole-process time and peak memory per image.

    python benchmarks/text_to_image.py                        # SD 1.5, 256x256, 4 steps, 3 rounds (CPU)
    python benchmarks/text_to_image.py --family sd3           # SD3-medium widths, reduced depth
    python benchmarks/text_to_image.py --family flux          # Flux.1-dev widths, reduced depth
    python benchmarks/text_to_image.py --size 512 --steps 20  # on a GPU machine

The models have random weights and a character-level tokenizer (no real weights or vocabularies can be fetched
here), saved once as diffusers folders under --cache: ``sd15`` is Stable Diffusion 1.5's full architecture (UNet,
CLIP ViT-L/14 text encoder, VAE); ``sd3`` SD3-medium's widths (a 1536-wide MMDiT, CLIP-L, CLIP-G, T5-XXL, the
16-channel VAE) with 4 of its 24 transformer layers, 4 of CLIP-G's 32 and 2 of T5's 24; ``flux`` Flux.1-dev's widths
(3072-wide, guidance embedding) with 2 of its 19 double and 4 of its 38 single blocks and 2 T5 layers. Each round
runs, in fresh processes, one after the other:

* ``ddimctl sample --model DIR --prompt P --steps S --height H --width H --n 1`` (the console script, the
  pipeline's default guidance; DDIM for SD 1.5, the pipeline's own flow-matching sigmas for SD3 and Flux);
* the same job written as a user would with diffusers: ``DiffusionPipeline.from_pretrained(DIR)`` (SD 1.5 with
  ``DDIMScheduler.from_config(...)``), ``pipe(P, num_inference_steps=S, height=H, width=H)``, the image saved as PNG.

Both load the same safetensors files with the same libraries' classes and run the same number of network calls
(SD 1.5 and SD3: one batched forward of 2 per step, classifier-free guidance; Flux-dev: one of 1, embedded); the wall time and the peak resident memory of each process (``/usr/bin/time``)
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

CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=4, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)  # 4 of 32 layers
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, feed_forward_proj="gated-gelu")  # 2 of 24
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, pos_embed_max_size=192)  # 4 of 24 layers
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))  # 2 of 19 double, 4 of 38 single blocks
VAE16 = dict(SD15_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)

DIFFUSERS_JOB = """
import sys, torch
from diffusers import DDIMScheduler, DiffusionPipeline
folder, prompt, steps, size, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
pipe = DiffusionPipeline.from_pretrained(folder)
if type(pipe).__name__ == "StableDiffusionPipeline":
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
image = pipe(prompt, num_inference_steps=steps, height=size, width=size,
             generator=torch.Generator().manual_seed(0)).images[0]
image.save(out)
"""


def build(family: str, folder: Path) -> Path:
    """The ``family``'s architecture with random weights, saved as a diffusers folder (once)."""
    if (folder / "model_index.json").is_file():
        return folder
    sys.path.insert(0, str(ROOT / "tests"))
    import t2i  # the offline tokenizers
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    torch.manual_seed(0)

    def clip(size: dict, projection: bool, pad: str = "<|endoftext|>"):
        tok = t2i.clip_tokenizer(pad_token=pad)
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        return tok, cls(CLIPTextConfig(vocab_size=49408, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id, **size))

    def t5():
        return t2i.t5_tokenizer(), T5EncoderModel(T5Config(vocab_size=32128, pad_token_id=0, eos_token_id=1,
                                                           decoder_start_token_id=0, tie_word_embeddings=False,
                                                           **T5_XXL))

    if family == "sd15":
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel

        tok, enc = clip(SD15_CLIP, False)
        pipe = StableDiffusionPipeline(AutoencoderKL(**SD15_VAE), enc, tok, UNet2DConditionModel(**SD15_UNET),
                                       DDIMScheduler(**SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif family == "sd3":
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        (tok, enc), (tok2, enc2), (tok3, enc3) = clip(SD15_CLIP, True), clip(CLIP_G, True, "!"), t5()
        vae = AutoencoderKL(**VAE16, scaling_factor=1.5305, shift_factor=0.0609)
        pipe = StableDiffusion3Pipeline(SD3Transformer2DModel(**SD3_MEDIUM), FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae, enc, tok, enc2, tok2, enc3, tok3)
    else:
        from diffusers import FluxPipeline, FluxTransformer2DModel

        (tok, enc), (tok2, enc2) = clip(SD15_CLIP, False), t5()
        vae = AutoencoderKL(**VAE16, scaling_factor=0.3611, shift_factor=0.1159)
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(sched, vae, enc, tok, enc2, tok2, FluxTransformer2DModel(**FLUX_DEV))
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
    ap.add_argument("--family", choices=("sd15", "sd3", "flux"), default="sd15")
    ap.add_argument("--cache", type=Path, default=ROOT / ".bench-cache")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-extras", action="store_true",
                    help="only the time and memory comparison and --help (no w = 1 run, no reconstructs: on a CPU "
                    "the 10-step exact inversions of the full-width models take many minutes)")
    args = ap.parse_args()
    folder = build(args.family, args.cache / f"{args.family}-random")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    prompt = "a photograph of an astronaut riding a horse"
    ours, theirs = [], []
    for f in folder.rglob("*"):  # the files into the page cache first: otherwise the first process pays a cold read
        if f.is_file():
            f.read_bytes()
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
        unguided, inversion = None, {}
        if not args.no_extras:
            unguided = statistics.median(timed(["ddimctl", "sample", "--model", str(folder), "--prompt", prompt,
                                                "--steps", str(args.steps), "--height", str(args.size), "--width",
                                                str(args.size), "--n", "1", "--guidance-scale", "1", "--quiet",
                                                "--out", f"{tmp}/w1-{k}"], env)[0] for k in range(args.rounds))
        from PIL import Image

        Image.new("RGB", (args.size, args.size), (120, 160, 200)).save(f"{tmp}/photo.png")
        for w in () if args.no_extras else ("1", "7.5"):
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
    name = {"sd15": "Stable Diffusion 1.5 architecture", "sd3": "SD3-medium widths, reduced depth",
            "flux": "Flux.1-dev widths, reduced depth"}[args.family]
    print(f"\n{name}, random weights, {args.size}x{args.size}, {args.steps} steps, the pipeline's default guidance, "
          f"one image, device {args.device}; medians of {args.rounds} rounds\n")
    print("| | ddimctl | diffusers | ratio |")
    print("|---|---|---|---|")
    print(f"| whole process, wall time | {t_o:.1f} s | {t_d:.1f} s | {t_o / t_d:.3f} |")
    print(f"| peak resident memory | {m_o:.0f} MiB | {m_d:.0f} MiB | {m_o / m_d:.3f} |")
    if unguided is not None:
        print(f"| the same at w = 1 (no classifier-free guidance: one forward of 1 per step) | {unguided:.1f} s | | "
              f"guidance costs {t_o / unguided:.2f}x |")
    for w, (calls, err) in inversion.items():
        print(f"\nreconstruct (exact inversion, then sampling) at 10 steps, w = {w}: {calls} batched model calls, "
              f"inversion MSE against the autoencoder's round trip {err:.2e} (random weights: no denoiser, so the "
              "solver may stop at its iteration cap; FACTS.md)")
    print(f"\n`ddimctl --help`: {statistics.median(helps):.2f} s (median of 5)")

if __name__ == "__main__":
    main()
