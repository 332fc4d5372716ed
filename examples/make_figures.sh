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

# Loss curves of the training runs, if the runs are at hand (RUNS=path/to/runs).
if [ -n "${RUNS:-}" ]; then
  python "$E/plot_loss.py" "$RUNS/mnist/metrics.jsonl" "$E/loss_mnist.png" "mnist (epsilon)"
  python "$E/plot_loss.py" "$RUNS/mnist-flow/metrics.jsonl" "$E/loss_mnist-flow.png" "mnist-flow (rectified flow)"
fi
