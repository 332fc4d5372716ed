"""Done-when: ddimctl on a diffusers checkpoint gives the same samples as diffusers' DDIMPipeline.

A random-weight diffusers UNet2DModel and a DDIMScheduler are saved with ``save_pretrained``; ddimctl loads the
directory with ``checkpoint.load`` and runs its own sampler core (``settings.plan``, ``settings.denoiser``,
``sampler.sample``) from the x_T the pipeline draws. Both runs must agree to 1e-4 on the pipeline's output
(``(x0 / 2 + 0.5).clamp(0, 1)``, NHWC). Step counts divide 1000: for other counts diffusers' ``step()`` assumes
leading spacing when it computes the previous timestep, and the two would differ by design.

The output layer of the random UNet is scaled down. A random network is no denoiser: its eps disagrees with x, and
with clip_sample the rounding differences of two float32 implementations (diffusers keeps alphas_cumprod in float32,
ddimctl computes coefficients in float64) grow by about 1/a_t per early step: at full scale one case reached 1e-3.
Scaled by 0.05, every case agrees to better than 1e-5 while a wrong timestep spacing still differs by more than 2e-3
(checked below), so the tolerance tests the formulas rather than chaos. (Without clipping, an epsilon-model's
trajectory grows like 1/a_T and most pixels of both outputs saturate; the rest still have to agree.)
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ddimctl import checkpoint, families
from ddimctl.sampler import sample
from tinymodels import TINY_UNET_RGB

UNET = {**TINY_UNET_RGB, "sample_size": 16, "block_out_channels": [32, 64]}
BATCH = 2
OUTPUT_SCALE = 0.05


@pytest.fixture(scope="module")
def unet_dir(diffusers, tmp_path_factory):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**UNET).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(OUTPUT_SCALE)
        unet.conv_out.bias.mul_(OUTPUT_SCALE)
    out = tmp_path_factory.mktemp("unet")
    unet.save_pretrained(out)
    return out, unet


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip_sample", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("spacing, steps_offset, steps", [("leading", 1, 20), ("trailing", 0, 10)])
def test_ddimctl_matches_diffusers_ddim_pipeline(diffusers, tmp_path, unet_dir, prediction_type, clip_sample, spacing,
                                                 steps_offset, steps):
    from diffusers.utils.torch_utils import randn_tensor

    src, unet = unet_dir
    model_dir = tmp_path / "model"
    shutil.copytree(src, model_dir)
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=clip_sample, prediction_type=prediction_type,
        timestep_spacing=spacing, steps_offset=steps_offset,
    )
    scheduler.save_pretrained(model_dir)
    seed = 7

    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                      eta=0.0, output_type="np").images  # (B, H, W, C) in [0, 1]

    ckpt = families.load(model_dir)
    settings = ckpt.settings
    assert (settings.prediction_type, settings.clip_sample, settings.timestep_spacing) == (
        prediction_type, clip_sample, spacing)
    shape = (BATCH, *ckpt.image_shape)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))  # what the pipeline draws on the CPU
    assert torch.equal(x_T, randn_tensor(shape, generator=torch.Generator().manual_seed(seed)))

    def run(s) -> np.ndarray:
        with torch.no_grad():
            x0 = sample(s.denoiser(ckpt.model), x_T, s.plan(steps), sampler="ddim", eta=0.0)
        return (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # as the pipeline's output_type="np"

    ours = run(settings)
    assert ours.shape == theirs.shape
    diff = float(np.abs(ours - theirs).max())
    assert diff <= 1e-4, diff
    assert float(np.abs(theirs - theirs.mean()).max()) > 1e-3  # not a constant image that would match anything
    wrong = float(np.abs(run(settings.with_overrides(timestep_spacing="linspace")) - theirs).max())
    assert wrong > 1e-3, wrong  # the tolerance does tell a different schedule apart
