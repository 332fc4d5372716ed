"""ddimctl.prediction: converting between the parameterizations (epsilon, v, sample, flow), x0 clipping and
dynamic thresholding (against diffusers' DDIMScheduler)."""

import torch

from ddimctl.prediction import Denoiser, Thresholding, from_x0_eps, threshold, to_x0_eps


def test_parameterization_round_trip():
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    for a, b in [(0.8, 0.6), (0.3, 0.7)]:
        x = a * x0 + b * eps
        for pt in ["epsilon", "v_prediction", "sample", "flow"]:
            got = to_x0_eps(from_x0_eps(x0, eps, a, b, pt), x, a, b, pt)
            if pt == "v_prediction" and a * a + b * b != 1:
                continue  # v = a eps - b x0 is defined for VP; the general inverse still holds below
            torch.testing.assert_close(got[0], x0, atol=1e-5, rtol=0)
            torch.testing.assert_close(got[1], eps, atol=1e-5, rtol=0)


def test_clipping_and_thresholding():
    x = torch.tensor([[3.0, -0.5, 0.2, -2.0]], dtype=torch.float64)
    den = Denoiser(lambda x, t: torch.zeros_like(x), "epsilon", clip_sample=1.0)
    x0, eps = den(x, torch.zeros(1), 1.0, 0.0)
    assert x0.tolist() == [[1.0, -0.5, 0.2, -1.0]] and torch.equal(eps, torch.zeros_like(x))
    th = threshold(x, Thresholding(ratio=1.0, max_value=2.5))  # s = min(max|x|, 2.5) = 2.5
    torch.testing.assert_close(th, x.clamp(-2.5, 2.5) / 2.5)
    th1 = threshold(x, Thresholding(ratio=0.5, max_value=10.0))  # s = median of |x| = (0.5 + 2) / 2
    torch.testing.assert_close(th1, x.clamp(-1.25, 1.25) / 1.25)
    th2 = threshold(x * 0.1, Thresholding(ratio=0.5, max_value=10.0))  # s clamped to min 1: plain clipping
    torch.testing.assert_close(th2, (x * 0.1).clamp(-1, 1))


def test_thresholding_matches_diffusers(diffusers):
    sch = diffusers.DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.7)
    x = 2 * torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(threshold(x, Thresholding(0.9, 1.7)), sch._threshold_sample(x))
