#!/usr/bin/env bash
# The exact commands that trained the built-in models shipped in ddimctl/models/ (CPU, one thread each, run
# side by side on a 2-core machine, about 0.7 s per step each: an hour for 5,000 steps). The runs were started
# with STEPS=6000 and stopped once both had saved step 5000; nothing in a run depends on --train-steps (the
# learning rate is constant after warm-up, the EMA ramp depends on the step), so STEPS=5000 reproduces the
# shipped weights bit for bit (same torch build and CPU kind, one thread). Afterwards the checkpoint/ folder of
# each run is copied into the package:
#   cp runs/mnist/checkpoint/*      ddimctl/models/mnist/
#   cp runs/mnist-flow/checkpoint/* ddimctl/models/mnist-flow/
set -euo pipefail
COMMON=(--base-channels 16 --channel-mult 1,2,4 --layers-per-block 1 --attention-resolutions 8 --norm-groups 8
        --batch-size 32 --lr 5e-4 --warmup-steps 200 --ema-decay 0.999 --grad-clip 1.0 --seed 0
        --save-every 500 --sample-every 1000 --threads 1 --device cpu --quiet)
STEPS=${STEPS:-5000}
ddimctl train mnist --out runs/mnist      --objective epsilon --beta-schedule linear --train-steps "$STEPS" "${COMMON[@]}" &
ddimctl train mnist --out runs/mnist-flow --objective flow                           --train-steps "$STEPS" "${COMMON[@]}" &
wait
