#!/usr/bin/env bash
# Re-make every picture in examples/ with the real commands (run from the repository root, after install).
# Each command here is the one the README shows beside its picture.
set -euo pipefail
cd "$(dirname "$0")/.."
E=examples
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

# Sample grids of both built-in models at 10 and 50 steps (seeds 0..63).
for model in mnist mnist-flow; do
  for steps in 10 50; do
    ddimctl sample --model "$model" --steps "$steps" --eta 0 --n 64 --out "$T/$model-$steps" \
      --grid "$E/samples_${model}_${steps}steps.png" --quiet --overwrite > /dev/null
  done
done

# The README's main job, as written there (the default model, 16 images, 50 steps).
ddimctl sample --steps 50 --eta 0 --out "$T/main" --grid "$E/main_job_grid.png" --quiet > /dev/null

# invert + reconstruct a held-out digit (never trained on) and a photograph.
python - "$T" <<'PY'
import sys
from pathlib import Path
from ddimctl.data import load_builtin_dataset
from ddimctl.images import save_png
x = load_builtin_dataset("mnist-test")
for i in (0, 1, 2):
    save_png(x[i * 50 + i], Path(sys.argv[1]) / f"heldout_{i}.png")  # classes 0, 1, 2
PY
ddimctl reconstruct "$T"/heldout_*.png --steps 10 --inversion exact --out "$T/rec-exact" --json > "$E/reconstruct_exact.json"
ddimctl reconstruct "$T"/heldout_*.png --steps 10 --inversion plain --out "$T/rec-plain" --json > "$E/reconstruct_plain.json"
cp "$T/rec-exact/heldout_2.compare.png" "$E/reconstruct_exact_10steps.png"
cp "$T/rec-plain/heldout_2.compare.png" "$E/reconstruct_plain_10steps.png"
ddimctl invert "$T/heldout_1.png" --steps 50 --out "$E/latents" --overwrite --quiet > /dev/null

# Interpolation: between two seeds, and between two held-out digits (inverted first).
ddimctl interpolate seed:3 seed:10 --frames 8 --steps 50 --boomerang --out "$T/interp-seeds" --quiet > /dev/null
cp "$T/interp-seeds/strip.png" "$E/interpolate_seeds_strip.png"
cp "$T/interp-seeds/interpolation.gif" "$E/interpolate_seeds.gif"
ddimctl interpolate "$T/heldout_0.png" "$T/heldout_2.png" --frames 8 --steps 50 --out "$T/interp-digits" --quiet > /dev/null
cp "$T/interp-digits/strip.png" "$E/interpolate_digits_strip.png"

# The class-conditional built-in: 50-step samples under guidance w = 3 (image i asks for digit i mod 10: the grid
# reads 0, 1, 2, ... row by row), and edits of held-out digits c -> c + 1 at strength 1 and 0.6.
ddimctl sample --model mnist-cond --guidance-scale 3 --steps 50 --eta 0 --n 40 --out "$T/cond" \
  --grid "$E/samples_mnist-cond_w3.png" --quiet --overwrite > /dev/null
python - "$T" <<'PY'
import sys
from pathlib import Path
from ddimctl.data import load_builtin_dataset
from ddimctl.images import save_png
x, y = load_builtin_dataset("mnist-test", with_labels=True)
(Path(sys.argv[1]) / "edit-src").mkdir()
for c in range(10):
    save_png(x[c * 50 + 5], Path(sys.argv[1]) / "edit-src" / f"digit_{c}.png")
(Path(sys.argv[1]) / "labels.txt").write_text("".join(f"{c}\n" for c in range(10)))
(Path(sys.argv[1]) / "targets.txt").write_text("".join(f"{(c + 1) % 10}\n" for c in range(10)))
PY
for s in 1.0 0.6; do
  ddimctl edit "$T"/edit-src/digit_*.png --model mnist-cond --class-label "$T/labels.txt" \
    --to-class-label "$T/targets.txt" --guidance-scale 3 --steps 50 --strength "$s" --out "$T/edit-$s" --quiet > /dev/null
done
python - "$T" "$E/edit_mnist-cond.png" <<'PY'
import sys
from pathlib import Path
from PIL import Image
T = Path(sys.argv[1])
rows = [[Image.open(T / "edit-src" / f"digit_{c}.png") for c in range(10)]]
rows += [[Image.open(T / f"edit-{s}" / f"digit_{c}.png") for c in range(10)] for s in ("1.0", "0.6")]
w, h = rows[0][0].size
sheet = Image.new("L", (10 * (w + 2), 3 * (h + 2)), 128)
for r, row in enumerate(rows):
    for c, im in enumerate(row):
        sheet.paste(im.convert("L"), (c * (w + 2), r * (h + 2)))
sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(sys.argv[2])
PY

# Loss curves of the training runs, if the runs are at hand (RUNS=path/to/runs).
if [ -n "${RUNS:-}" ]; then
  python "$E/plot_loss.py" "$RUNS/mnist/metrics.jsonl" "$E/loss_mnist.png" "mnist (epsilon)"
  python "$E/plot_loss.py" "$RUNS/mnist-flow/metrics.jsonl" "$E/loss_mnist-flow.png" "mnist-flow (rectified flow)"
fi
