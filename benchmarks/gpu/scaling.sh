#!/usr/bin/env bash
# The scaling-curve sweeps of docs/scaling.md on one GPU, through make:
# GPT-2 (4 layers, 128 wide) on Brown at MLP:attention ratios 0.5..3.0
# (300 steps each), and depths 8..64 (50 steps each), then the report.
# From the repository root on the device machine, with gpu-bin (knlp.xz)
# and .deps/cache/brown carried.
set -u
. benchmarks/gpu/common.sh
MAKE="make -o build KNLP=$K"
B=defconfigs/gpt2-brown-small
timeout -s INT -k 30 ${BUDGET_RATIO:-200} $MAKE sweep SWEEP=sweeps/scaling-ratio.sweep BASE=$B PROJECT=scaling-ratio DEVICE=cuda YES=1 2>&1 | grep -v '^step' | tee $OUT/scaling-ratio.log
timeout -s INT -k 30 ${BUDGET_DEPTH:-150} $MAKE sweep SWEEP=sweeps/scaling-depth.sweep BASE=$B PROJECT=scaling-depth DEVICE=cuda STEPS=50 YES=1 2>&1 | grep -v '^step' | tee $OUT/scaling-depth.log
for p in scaling-ratio scaling-depth; do
    $MAKE results PROJECT=$p 2>&1 | tee $OUT/$p-results.txt
    $MAKE scaling-curves PROJECT=$p 2>&1 | tee -a $OUT/$p-results.txt
done
tar -C runs -cJf $OUT/scaling-runs.tar.xz --exclude='*.safetensors' --exclude='*.pt' --exclude='*.ckpt' scaling-ratio scaling-depth
