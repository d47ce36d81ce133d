#!/usr/bin/env bash
# Issue 13's "same speed through knlp train": the gpt2-brown-124m-speed
# preset (GPT-2 124M, Brown, AdamW, batch 16 x 1024, 200 steps) through
# `knlp train` with the fused kernels, without them, with the fused add +
# layer norm too, and with the kernels again (the loss curves are the
# numerics check on Brown); then the PyTorch anchor (eager and
# torch.compile) and knlp's benchmark step, with and without the fused add
# + layer norm, at batch 16 and 32. From the repository root on the device
# machine, with gpu-bin/ (knlp.xz, gpt2_torch.py) and .deps/cache/brown
# carried.
set -u
. benchmarks/gpu/common.sh
$K defconfig --kconfig Kconfig defconfigs/gpt2-brown-124m-speed > /dev/null
n=0
for mode in k1 k0 k1ln k1; do
    n=$((n + 1)); p=speed-$n-$mode
    kk=1; [ $mode = k0 ] && kk=0
    ln=0; [ $mode = k1ln ] && ln=1
    KNLP_FUSED_KERNELS=$kk KNLP_FUSED_LN=$ln timeout 150 $K train --set PROJECT=$p > $OUT/train-$p.txt 2>&1
    echo "$p exit $?" | tee -a $OUT/train-exit.txt
    for f in $(find runs/$p -name metrics.jsonl); do cp $f $OUT/metrics-$p.jsonl; done
    rm -rf runs/$p
done
for b in 16 32; do
    timeout 150 python3 gpu-bin/gpt2_torch.py --batch $b --steps 20 2>>$OUT/torch.err | grep '^{' | tee -a $OUT/step.jsonl
    for ln in false true; do
        timeout 90 $K run benchmarks/gpt2_gpu.rhai --batch $b --steps 20 --only_step true --fused_ln $ln 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/step.jsonl
    done
done
tail -n 5 $OUT/*.err
