"""Class-conditional sampling, inversion under guidance and class edits, measured on a class-conditional model.

    python benchmarks/conditional.py                          # the built-in mnist-cond (about 10 minutes on 2 cores)
    python benchmarks/conditional.py --model runs/mnist-cond/checkpoint --samples 100 --digits 30
    python benchmarks/conditional.py --parts sampling --samples 100 --steps 25 --guidance 2 --clip-sample on   # 55 %

Scores come from the digit classifier of benchmarks/quality.py (trained here, seeded; never trained on samples):

1. For each guidance scale w: samples at --steps (DDIM, eta 0), image i asking for class i mod 10; the share the
   classifier assigns to the requested class, the share it labels with confidence > 0.9, the worst class's share.
2. Invert-then-sample under guidance (w = --inversion-guidance) on held-out digits with their true labels: per-
   dimension MSE (images in [0, 1]) and model calls at 10 and 50 steps, plain against exact inversion.
3. Edits (``ddimctl edit``): held-out digits of class c turned into class (c + 1) mod 10 at --strength 1 and 0.6;
   the share the classifier assigns to the target class, and how much of the source survives: MSE to the source
   and the overlap (IoU) of the strokes (pixels above mid-grey).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import train_classifier  # noqa: E402

from ddimctl.data import load_builtin_dataset  # noqa: E402
from ddimctl.images import mse  # noqa: E402
from ddimctl.engine import Engine, SamplingOptions, batches  # noqa: E402


def guided_samples(net, model: str, steps: int, n: int, w: float, batch: int, clip: bool | None = None) -> dict:
    engine = Engine.load(model, SamplingOptions(steps=steps, guidance_scale=w, clip_sample=clip))
    wanted = torch.tensor(engine.default_conditions(n))
    probs = []
    for chunk in batches(list(range(n)), batch):
        _, x0 = engine.generate(chunk, conditions=wanted[list(chunk)].tolist())
        with torch.no_grad():
            probs.append(torch.softmax(net(x0.clamp(-1, 1).cpu()), 1))
    p = torch.cat(probs)
    hit = p.argmax(1) == wanted
    per_class = [float(hit[wanted == c].float().mean()) for c in range(10)]
    return {"guidance": w, "steps": steps, "samples": n, "requested_class": float(hit.float().mean()),
            "confident": float((p.max(1).values > 0.9).float().mean()), "worst_class": min(per_class)}


def inversion_under_guidance(model: str, steps: int, w: float, x: torch.Tensor, y: torch.Tensor, batch: int) -> list:
    rows = []
    for inversion in ("plain", "exact"):
        engine = Engine.load(model, SamplingOptions(steps=steps, guidance_scale=w, inversion=inversion, inverting=True))
        errs, calls = [], []
        for chunk in batches(list(range(len(x))), batch):
            rec = engine.reconstruct(x[list(chunk)], conditions=y[list(chunk)].tolist())
            errs.append(rec.mse)
            calls += [c + rec.decode_calls for c in rec.stats.image_calls]  # model evaluations per image
        e = torch.cat(errs)
        rows.append({"steps": steps, "inversion": inversion, "mse_mean": float(e.mean()), "mse_max": float(e.max()),
                     "calls_median": sorted(calls)[len(calls) // 2], "calls_max": max(calls)})
    return rows


def edits(net, model: str, steps: int, w: float, strength: float, x, y, batch: int) -> dict:
    engine = Engine.load(model, SamplingOptions(steps=steps, guidance_scale=w, inverting=True))
    target = (y + 1) % 10
    out = []
    for chunk in batches(list(range(len(x))), batch):
        idx = list(chunk)
        out.append(engine.edit(x[idx], y[idx].tolist(), target[idx].tolist(), strength).edited)
    e = torch.cat(out).clamp(-1, 1).cpu()
    with torch.no_grad():
        hit = float((net(e).argmax(1) == target).float().mean())
    src, dst = x > 0, e > 0
    iou = ((src & dst).flatten(1).sum(1) / (src | dst).flatten(1).sum(1).clamp(min=1)).float()
    return {"strength": strength, "steps": steps, "guidance": w, "edits": len(x), "target_class": hit,
            "mse_to_source": float(mse(e, x).mean()), "stroke_iou": float(iou.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-cond")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", default="1,2,3,5")
    ap.add_argument("--inversion-guidance", type=float, default=3.0)
    ap.add_argument("--digits", type=int, default=50, help="held-out digits for inversion and edits")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--parts", default="sampling,inversion,edits", help="which of the three parts to run")
    ap.add_argument("--inversion-steps", default="10,50", help="step counts of the invert-then-sample part")
    ap.add_argument("--clip-sample", choices=("checkpoint", "on", "off"), default="checkpoint",
                    help="x0 clipping in the sampling part: the checkpoint's, or forced on / off")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    net, acc, ceiling = train_classifier()
    print(f"classifier: {100 * acc:.1f} % held-out accuracy, {100 * ceiling:.1f} % of real digits confident > 0.9\n")
    report: dict = {"classifier_accuracy": acc, "real_confident": ceiling}

    parts = args.parts.split(",")
    clip = {"checkpoint": None, "on": True, "off": False}[args.clip_sample]
    report["sampling"] = [] if "sampling" not in parts else [
        guided_samples(net, args.model, args.steps, args.samples, float(w), args.batch, clip)
        for w in args.guidance.split(",")]
    print(f"| guidance w | steps | requested class | confident (> 0.9) | worst class |\n|---|---|---|---|---|")
    for r in report["sampling"]:
        print(f"| {r['guidance']:g} | {r['steps']} | {100 * r['requested_class']:.1f} % | {100 * r['confident']:.1f} % "
              f"| {100 * r['worst_class']:.1f} % |")

    xt, yt = load_builtin_dataset("mnist-test", 32, with_labels=True)
    pick = torch.arange(0, len(xt), max(1, len(xt) // args.digits))[: args.digits]  # every class alike
    x, y = xt[pick], yt[pick]
    w = args.inversion_guidance
    report["inversion"] = [row for s in (map(int, args.inversion_steps.split(",")) if "inversion" in parts else ())
                           for row in inversion_under_guidance(args.model, s, w, x, y, args.batch)]
    print(f"\ninvert-then-sample under guidance w = {w:g}, {len(x)} held-out digits with their labels:\n")
    print("| steps | inversion | MSE mean | MSE max | model calls (median / max) |\n|---|---|---|---|---|")
    for r in report["inversion"]:
        print(f"| {r['steps']} | {r['inversion']} | {r['mse_mean']:.2e} | {r['mse_max']:.2e} | "
              f"{r['calls_median']} / {r['calls_max']} |")

    report["edits"] = [edits(net, args.model, args.steps, w, s, x, y, args.batch) for s in (1.0, 0.6) if "edits" in parts]
    print(f"\nedits c -> (c + 1) mod 10, {len(x)} held-out digits, {args.steps} steps, w = {w:g}:\n")
    print("| strength | reaches the target class | MSE to source | stroke IoU with source |\n|---|---|---|---|")
    for r in report["edits"]:
        print(f"| {r['strength']:g} | {100 * r['target_class']:.1f} % | {r['mse_to_source']:.3f} | {r['stroke_iou']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
