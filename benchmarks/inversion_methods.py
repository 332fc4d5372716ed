"""Inversion under classifier-free guidance, method by method, on the same held-out digits (issue 30, item 3).

For each number of steps and guidance scale w, held-out MNIST digits (every len/N-th test digit, as
benchmarks/conditional.py picks them) are reconstructed with their own labels on a class-conditional model
(default: the built-in mnist-cond) by each inversion ddimctl has:

* ``plain``: classic DDIM inversion (one call per step), decoded under w;
* ``exact``: ddimctl's exact inversion (each inverse step solved, Newton-Krylov into the clean end, the stall rule;
  docs/guided-inversion.md), decoded under w;
* ``negative-prompt`` (Miyake et al. 2023): the null condition is the source's own, so inversion and decode run the
  conditional model (exact inversion under it);
* ``null-text`` (Mokady et al. 2022): plain inversion at w = 1 as the pivot, then per step up to 10 Adam iterations
  on the null condition, decoded with the per-step nulls (refused at w = 1, where the null has no effect).

Per method: MSE of the reconstruction (images in [0, 1]; mean, max, share <= 1e-5), model evaluations per image
(invert + decode; a guided evaluation is one, cond and null in one forward) and wall seconds per image (batch
--batch, one process, --threads threads). Then edits c -> c + 1 (``Engine.edit``, strength 1) through each method
at --edit-guidance: the share the digit classifier of benchmarks/quality.py gives the target class, and the MSE
to the source.

    python benchmarks/inversion_methods.py                          # 20 digits, w = 1, 3, 5 at 10 and 50 steps
    python benchmarks/inversion_methods.py --digits 100 --steps 10 --guidance 3 --no-edits
    python benchmarks/inversion_methods.py --tiny sd15 --digits 5 --steps 10 --guidance 7.5   # text-to-image

``--tiny sd15|sd2|sdxl`` builds the tiny random-weight Stable Diffusion pipeline of tests/t2i.py (its unit-std
variant: latents of about unit std, the denoiser's output scaled by 0.1) into a temporary folder and runs it with
``--prompt`` on crops of scikit-image photographs (``--digits`` of them; no edits: the classifier reads digits);
the MSE is then against the autoencoder's own round trip of each image (what the inversion alone misses). A random
network is close to linear, so this shows the machinery at the pipeline's w, not a trained model's folds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddimctl.data import load_builtin_dataset  # noqa: E402
from ddimctl.engine import Engine, SamplingOptions, batches  # noqa: E402
from ddimctl.errors import SettingError  # noqa: E402
from ddimctl.images import mse  # noqa: E402

METHODS = ("plain", "exact", "negative-prompt", "null-text")


def reconstruct(model: str, method: str, steps: int, w: float, x, y, batch: int) -> dict | None:
    """One method's reconstructions of x under the conditions y (labels, or prompts for a text model)."""
    try:
        engine = Engine.load(model, SamplingOptions(steps=steps, guidance_scale=w, inversion=method, inverting=True))
    except SettingError as e:  # null-text at w = 1
        return {"method": method, "refused": str(e)}
    errs, calls = [], []
    t0 = time.perf_counter()
    for chunk in batches(list(range(len(x))), batch):
        idx = list(chunk)
        rec = engine.reconstruct(x[idx], conditions=[y[i] for i in idx])
        errs.append((rec.mse if rec.inversion_mse is None else rec.inversion_mse).cpu())
        calls += rec.image_calls
    seconds = time.perf_counter() - t0
    e = torch.cat(errs)
    return {"method": method, "steps": steps, "guidance": w, "images": len(x), "mse_mean": float(e.mean()),
            "mse_max": float(e.max()), "share_le_1e-5": float((e <= 1e-5).float().mean()),
            "calls_median": statistics.median(calls), "calls_max": max(calls), "seconds_per_image": seconds / len(x)}


def edits(net, model: str, method: str, steps: int, w: float, x, y, batch: int) -> dict:
    try:
        engine = Engine.load(model, SamplingOptions(steps=steps, guidance_scale=w, inversion=method, inverting=True))
    except SettingError as e:
        return {"method": method, "refused": str(e)}
    y = torch.tensor(y)
    target = (y + 1) % 10
    out = []
    for chunk in batches(list(range(len(x))), batch):
        idx = list(chunk)
        out.append(engine.edit(x[idx], y[idx].tolist(), target[idx].tolist(), 1.0).edited.cpu())
    e = torch.cat(out).clamp(-1, 1)
    with torch.no_grad():
        hit = float((net(e).argmax(1) == target).float().mean())
    return {"method": method, "steps": steps, "guidance": w, "edits": len(x), "target_class": hit,
            "mse_to_source": float(mse(e, x).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-cond")
    ap.add_argument("--digits", type=int, default=20)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--edit-guidance", type=float, default=3.0)
    ap.add_argument("--edit-steps", type=int, default=10)
    ap.add_argument("--no-edits", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", choices=("sd15", "sd2", "sdxl"), help="a tiny random-weight text-to-image pipeline")
    ap.add_argument("--prompt", default="a photo of a cat", help="--tiny: every image's prompt")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.tiny:
        import tempfile

        from flow_inversion import model_images

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        import t2i

        args.model = str(Path(tempfile.mkdtemp()) / args.tiny)
        t2i.save(getattr(t2i, args.tiny)(**t2i.UNIT_STD[args.tiny]), Path(args.model))
        probe = Engine.load(args.model, SamplingOptions(steps=2, inverting=True))
        x, what = model_images(probe, args.digits)
        from ddimctl.conditioning import Prompt

        y = [Prompt(args.prompt)] * len(x)
        what += f', the prompt "{args.prompt}" (MSE against the autoencoder\'s round trip)'
        args.no_edits = True
    else:
        xt, yt = load_builtin_dataset("mnist-test", 32, with_labels=True)
        pick = torch.arange(0, len(xt), max(1, len(xt) // args.digits))[: args.digits]
        x, y = xt[pick], yt[pick].tolist()
        what = "held-out digits with their labels"
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "reconstruct": [], "edits": []}
    print(f"### {args.tiny or args.model}: {len(x)} {what}, batch {args.batch}\n")
    print("| steps | w | inversion | MSE mean | MSE max | share <= 1e-5 | calls / image (median, max) | s / image |")
    print("|---|---|---|---|---|---|---|---|")
    for steps in args.steps:
        for w in args.guidance:
            for method in args.methods:
                r = reconstruct(args.model, method, steps, w, x, y, args.batch)
                report["reconstruct"].append(r | {"steps": steps, "guidance": w})
                if "refused" in r:
                    print(f"| {steps} | {w:g} | {method} | refused: {r['refused']} | | | | |", flush=True)
                    continue
                print(f"| {steps} | {w:g} | {method} | {r['mse_mean']:.2e} | {r['mse_max']:.2e} | "
                      f"{100 * r['share_le_1e-5']:.0f} % | {r['calls_median']:g}, {r['calls_max']} | "
                      f"{r['seconds_per_image']:.2f} |", flush=True)
    if not args.no_edits:
        from quality import train_classifier

        net, acc, _ = train_classifier()
        print(f"\nEdits c -> c + 1, strength 1, {args.edit_steps} steps, w = {args.edit_guidance:g} (classifier: "
              f"{100 * acc:.1f} % held-out accuracy)\n")
        print("| inversion | target class | MSE to the source |")
        print("|---|---|---|")
        for method in args.methods:
            r = edits(net, args.model, method, args.edit_steps, args.edit_guidance, x, y, args.batch)
            report["edits"].append(r)
            if "refused" in r:
                print(f"| {method} | refused: {r['refused']} | |", flush=True)
            else:
                print(f"| {method} | {100 * r['target_class']:.0f} % | {r['mse_to_source']:.3f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
