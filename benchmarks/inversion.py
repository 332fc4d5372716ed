"""Inversion cost and accuracy per method and sampler (issue 16): invert held-out MNIST digits, decode them again,
and report the per-dimension MSE (images in [0, 1], as the DDIM paper's Table 2) and the model calls per image
(invert + decode, what one image costs on its own).

Methods: plain DDIM inversion; exact as before (Anderson fixed point, plain first guess, tol 1e-5 on the residual,
the checkpoint's spacing); exact improved (free first guess, decoded-image stopping rule at --tol, Newton-Krylov
where it stalls, logsnr spacing); the bdia sampler; "SAMPLER exact" for the multistep samplers (dpm++2m, dpm++3m,
unipc, ipndm): the multistep solve checked against plain inversion by decoding both (how many images kept the
plain latent goes to stderr).

    python benchmarks/inversion.py                       # mnist, 100 digits, 10/20/50 steps
    python benchmarks/inversion.py --digits 20 --steps 10 --model mnist-flow
    python benchmarks/inversion.py --images photos --steps 10      # real photographs (grayscale crops)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddimctl.data import load_builtin_dataset  # noqa: E402
from ddimctl.images import mse  # noqa: E402
from ddimctl.inversion import InversionStats, invert_ddim  # noqa: E402
from ddimctl.engine import Engine, SamplingOptions  # noqa: E402

PAPER_TABLE2 = {10: 0.014, 20: 0.0065, 50: 0.0023, 100: 0.0009}


PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "motorcycle_left")


def photo_crops(n: int, size: int) -> torch.Tensor:
    """(n, 1, size, size) grayscale crops of scikit-image's photographs in [-1, 1]: each photograph scaled so its
    short side is 5 x size, then cut into a 5 x 5 grid of crops (row by row, photograph by photograph)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    crops = []
    for name in PHOTOS:
        if not hasattr(skimage.data, name):
            continue
        img = Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("L")
        w, h = img.size
        k = 5 * size / min(w, h)
        img = img.resize((max(5 * size, round(w * k)), max(5 * size, round(h * k))), Image.LANCZOS)
        a = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
        for i in range(5):
            for j in range(5):
                crops.append(a[i * size : (i + 1) * size, j * size : (j + 1) * size])
    return torch.from_numpy(np.stack(crops[:n]))[:, None]


def run(model: str, x: torch.Tensor, steps: int, method: str, tol: float) -> tuple[torch.Tensor, list[int]]:
    """(per-image MSE, per-image calls) for one method."""
    if method in ("plain", "exact (before)"):
        e = Engine.load(model, SamplingOptions(steps=steps))  # the checkpoint's spacing, as before
        st = InversionStats()
        with torch.inference_mode():
            x_T = invert_ddim(e.ode_denoiser, x, e.plan, exact=method != "plain", tol=1e-5, max_iter=50, stats=st,
                              solver="anderson")
            rec = e.decode(x_T)
        return mse(rec, x), [c + len(e.plan) for c in st.image_calls]
    sampler = {"exact (improved)": "ddim", "bdia": "bdia"}.get(method) or method.removesuffix(" exact")
    e = Engine.load(model, SamplingOptions(steps=steps, sampler=sampler, tol=tol, inverting=True))
    r = e.reconstruct(x)
    if r.stats.image_plain_kept is not None:
        print(f"  ({method}, {steps} steps: plain inversion kept for {sum(r.stats.image_plain_kept)} of {len(x)} "
              "images)", file=sys.stderr)
    return r.mse, [c + r.decode_calls for c in r.stats.image_calls]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist")
    ap.add_argument("--digits", type=int, default=100, help="how many images")
    ap.add_argument("--images", choices=("digits", "photos"), default="digits",
                    help="held-out MNIST digits, or 32x32 grayscale crops of scikit-image's photographs")
    ap.add_argument("--steps", default="10,20,50")
    ap.add_argument("--tol", type=float, default=3e-3)
    ap.add_argument("--methods", default="plain,exact (before),exact (improved),bdia,dpm++2m exact,dpm++3m exact,"
                    "unipc exact,ipndm exact")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.images == "photos":  # real photographs, far from what the digits model knows
        x = photo_crops(args.digits, load_builtin_dataset("mnist-test").shape[-1])
        what = "grayscale crops of scikit-image photographs"
    else:
        x = load_builtin_dataset("mnist-test")[: args.digits]  # held-out digits, all classes in order
        what = "held-out digits"
    print(f"### Inversion on {len(x)} {what}, model {args.model!r} (per-dimension MSE, [0, 1]; calls per "
          f"image, invert + decode)\n")
    print("| steps | method | MSE max | MSE mean | > 1e-5 | calls median | calls max | DDIM paper T2 (plain) |")
    print("|---|---|---|---|---|---|---|---|")
    t_all = time.perf_counter()
    for steps in [int(s) for s in args.steps.split(",")]:
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            m, calls = run(args.model, x, steps, method, args.tol)
            print(f"| {steps} | {method} | {float(m.max()):.2e} | {float(m.mean()):.2e} | {int((m > 1e-5).sum())} | "
                  f"{statistics.median(calls):.0f} | {max(calls)} | {PAPER_TABLE2.get(steps, '')} |", flush=True)
            print(f"  ({method}, {steps} steps: {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    print(f"\n({time.perf_counter() - t_all:.0f} s in all)", file=sys.stderr)


if __name__ == "__main__":
    main()
