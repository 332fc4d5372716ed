"""Draw a training loss curve (metrics.jsonl -> PNG) with Pillow alone: smoothed loss against step, log scale.

    python examples/plot_loss.py runs/mnist/metrics.jsonl examples/loss_mnist.png "mnist (epsilon)"
"""

from __future__ import annotations

import json
import math
import sys

from PIL import Image, ImageDraw


def main(src: str, dst: str, title: str) -> None:
    rows = [json.loads(line) for line in open(src)]
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    k = max(1, len(losses) // 100)  # moving average over ~1 % of the run
    smooth = [sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1]) for i in range(len(losses))]
    W, H, L, R, T, B = 640, 360, 70, 20, 40, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    lo, hi = math.log10(min(smooth)), math.log10(max(smooth[len(smooth) // 50 :] or smooth))
    hi = max(hi, lo + 1e-6)
    x = lambda s: L + (W - L - R) * (s - steps[0]) / max(1, steps[-1] - steps[0])
    y = lambda v: T + (H - T - B) * (hi - math.log10(v)) / (hi - lo)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for i in range(5):
        v = 10 ** (lo + (hi - lo) * i / 4)
        d.line([L - 4, y(v), L, y(v)], fill="black")
        d.text((4, y(v) - 6), f"{v:.3g}", fill="black")
    for i in range(5):
        s = steps[0] + (steps[-1] - steps[0]) * i / 4
        d.text((x(s) - 12, H - B + 6), f"{int(s)}", fill="black")
    d.line([(x(s), y(max(v, 10**lo))) for s, v in zip(steps, smooth)], fill=(200, 30, 30), width=2)
    d.text((L, 12), f"{title}: training loss (moving average), log scale; step", fill="black")
    img.save(dst)


if __name__ == "__main__":
    main(*sys.argv[1:4])
