#!/usr/bin/env bash
# After the kernel review fixes (docs/gpu.md "Fused kernels"): the GPU tests,
# the fused absorbed decode against the libtorch step and mha
# (benchmarks/gpu/mla-fused.sh), then the exact bitter7 mask update against
# the seed's sampled one (PyTorch anchor, eager) with 15 updates per mode.
# From the repository root on the device machine, with gpu-bin/ (knlp.xz,
# kernels.xz, attention.xz, gpt2_torch.py) carried.
set -u
bash benchmarks/gpu/mla-fused.sh
. benchmarks/gpu/common.sh
timeout 100 python3 gpu-bin/gpt2_torch.py --batch 16 --steps 20 --modes eager 2>>$OUT/torch.err | grep '^{' | tee -a $OUT/anchor.jsonl
timeout 150 $K run benchmarks/gpt2_gpu.rhai --batch 16 --steps 20 --mask_reps 15 --profile 5 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/mask.jsonl
tail -n 5 $OUT/*.err
