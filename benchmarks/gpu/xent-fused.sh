#!/usr/bin/env bash
# The fused softmax cross-entropy kernel in GPT-2 124M's training step
# (docs/gpu.md "The language-model loss without logits"): the GPU tests,
# the PyTorch anchor (eager and torch.compile) and knlp's step with the
# fused kernels on and off (and the eager-logits loss) at batch 16 and 32,
# then 200 steps on a fixed batch with the kernels on and off (numerics).
# From the repository root on the device machine, with gpu-bin/ (knlp.xz,
# kernels.xz, gpt2_torch.py) carried.
set -u
. benchmarks/gpu/common.sh
xz -d -c gpu-bin/kernels.xz > gpu-bin/kernels && chmod +x gpu-bin/kernels
gpu-bin/kernels --test-threads=1 2>&1 | grep -v '^\[' | cut -c1-400 | tee $OUT/kernels-test.txt
for b in 16 32; do
    python3 gpu-bin/gpt2_torch.py --batch $b --steps 20 2>>$OUT/torch.err | grep '"gpt2_train_step"' | tee -a $OUT/step.jsonl
    for a in "--kernels true" "--kernels false" "--fused false"; do
        $K run benchmarks/gpt2_gpu.rhai --batch $b --steps 20 --only_step true $a 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/step.jsonl
    done
done
for kk in true false; do
    $K run benchmarks/gpt2_gpu.rhai --batch 16 --curve 200 --kernels $kk 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/curve.jsonl
done
tail -n 5 $OUT/*.err
