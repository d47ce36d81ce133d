#!/usr/bin/env bash
# The fused (NVRTC) mask update and radix selection (docs/gpu.md "Mask
# update"): their GPU tests against libtorch, then the seed's sampled bitter7
# update (the PyTorch anchor, eager only) and knlp's updates with and without
# the fused kernels, in one call. From the repository root on the device
# machine, with gpu-bin/ (knlp.xz, kernels.xz, gpt2_torch.py) carried.
set -u
. benchmarks/gpu/common.sh
xz -d -c gpu-bin/kernels.xz > gpu-bin/kernels && chmod +x gpu-bin/kernels
gpu-bin/kernels --test-threads=1 2>&1 | tee $OUT/kernels-test.txt
python3 gpu-bin/gpt2_torch.py --batch 16 --steps 20 --modes eager 2>>$OUT/torch.err | grep '^{' | tee -a $OUT/anchor.jsonl
$K run benchmarks/gpt2_gpu.rhai --batch 16 --steps 20 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/knlp.jsonl
tail -n 5 $OUT/*.err
