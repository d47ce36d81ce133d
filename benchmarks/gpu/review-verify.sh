#!/usr/bin/env bash
# After the kernel review fixes (docs/gpu.md "Fused kernels"): the GPU tests,
# the training step with the fused residual add + layer norm against
# without (profiled), the fused absorbed decode against the libtorch step
# and mha (benchmarks/gpu/mla-fused.sh), then the exact bitter7 mask update
# against the seed's sampled one (PyTorch anchor, eager), 15 updates per
# mode, profiled. From the repository root on the device machine, with
# gpu-bin/ (knlp.xz, kernels.xz, attention.xz, gpt2_torch.py) carried.
set -u
. benchmarks/gpu/common.sh
xz -d -c gpu-bin/kernels.xz > gpu-bin/kernels && chmod +x gpu-bin/kernels
timeout 120 gpu-bin/kernels --test-threads=1 2>&1 | grep -v '^\[' | cut -c1-400 > $OUT/kernels-test.txt
echo "exit $?" >> $OUT/kernels-test.txt
tail -n 3 $OUT/kernels-test.txt
for ln in true false true false; do
    timeout 90 $K run benchmarks/gpt2_gpu.rhai --batch 16 --steps 20 --only_step true --fused_ln $ln --profile 3 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/step-ln.jsonl | cut -c1-300
done
bash benchmarks/gpu/mla-fused.sh
timeout 100 python3 gpu-bin/gpt2_torch.py --batch 16 --steps 20 --modes eager 2>>$OUT/torch.err | grep '^{' | tee -a $OUT/anchor.jsonl
timeout 150 $K run benchmarks/gpt2_gpu.rhai --batch 16 --steps 20 --mask_reps 15 --profile 3 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/mask.jsonl | cut -c1-300
tail -n 5 $OUT/*.err
