#!/usr/bin/env bash
# The fused (chunked) language-model loss on one H200 (docs/gpu.md): the
# PyTorch anchor (eager and torch.compile) and knlp's training step with and
# without it at batch 16 and 32, then 200 steps of train() on Brown with and
# without it (loss curves, tokens/s through train()). From the repository
# root on the device machine, with gpu-bin/ (knlp.xz, gpt2_torch.py) and
# .deps/cache/brown carried.
set -u
. benchmarks/gpu/common.sh
for b in 16 32; do
    python3 gpu-bin/gpt2_torch.py --batch $b --steps 20 2>>$OUT/torch.err | grep '"gpt2_train_step"' | tee -a $OUT/step.jsonl
    for f in false true; do
        $K run benchmarks/gpt2_gpu.rhai --batch $b --steps 20 --fused $f --only_step true 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/step.jsonl
    done
done
for f in false true; do
    $K run benchmarks/ddp_gpu.rhai --steps ${STEPS:-200} --fused $f --tag fused-$f --out $OUT/runs 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/train.jsonl
    cp $OUT/runs/fused-$f/metrics.jsonl $OUT/metrics-fused-$f.jsonl 2>/dev/null
done
rm -rf $OUT/runs
tail -n 5 $OUT/*.err
