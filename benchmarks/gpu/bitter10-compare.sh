#!/usr/bin/env bash
# Issue 18's small GPT-2 comparison of bitter3, bitter7 and the bitter10
# family at 50 % (docs/pruning.md), the preset run unchanged but on CUDA,
# through make itself. From the repository root on the device machine, with
# gpu-bin (knlp.xz) and .deps/cache/brown carried.
set -u
. benchmarks/gpu/common.sh
MAKE="make -o build KNLP=$K"
PROJECT=${PROJECT:-b10}
$MAKE defconfig-gpt2-brown-bitter10-compare > /dev/null
timeout -s INT -k 30 ${BUDGET:-300} $MAKE PROJECT=$PROJECT DEVICE=cuda 2>&1 | grep -v '^step' | tee $OUT/b10-make.log
$MAKE results PROJECT=$PROJECT 2>&1 | tee $OUT/b10-results.txt
tar -C runs -cJf $OUT/b10-runs.tar.xz --exclude='*.safetensors' --exclude='*.pt' --exclude='*.ckpt' $PROJECT
