#!/usr/bin/env bash
# Where torch.compile wins (kernel time by kind, eager against compile), a
# repeat of the 200-step numerics check (kernels on and off, once more each,
# to size run-to-run noise) and the mask update with 15 updates per mode.
# From the repository root on the device machine, with gpu-bin/ (knlp.xz,
# gpt2_torch.py) carried.
set -u
. benchmarks/gpu/common.sh
python3 benchmarks/profile_gpt2_torch.py gpu-bin/gpt2_torch.py --batch 16 --steps 3 2>>$OUT/torch.err | tee -a $OUT/profile.jsonl
for kk in true false true false; do
    $K run benchmarks/gpt2_gpu.rhai --batch 16 --curve 200 --kernels $kk 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/curve.jsonl
done
python3 gpu-bin/gpt2_torch.py --batch 16 --steps 20 --modes eager 2>>$OUT/torch.err | grep '^{' | tee -a $OUT/anchor.jsonl
$K run benchmarks/gpt2_gpu.rhai --batch 16 --steps 20 --mask_reps 15 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/knlp.jsonl
tail -n 5 $OUT/*.err
