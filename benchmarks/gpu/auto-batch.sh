#!/usr/bin/env bash
# HYPER_PARAM_AUTO on one GPU (docs/workflow.md): GPT-2 124M on the Brown
# corpus through make, the batch chosen from free memory and probed on the
# device, then 30 steps. From the repository root on the device machine, with
# gpu-bin (knlp.xz) and .deps/cache/brown carried.
set -u
. benchmarks/gpu/common.sh
MAKE="make -o build KNLP=$K"
$MAKE defconfig-gpt2-bitter7-baseline > /dev/null
$K config set HYPER_PARAM_AUTO y
$K config get HYPER_PARAM_AUTO
timeout -s INT -k 30 240 $MAKE PROJECT=auto STEPS=30 2>&1 | tee $OUT/auto.log | grep -v '^step'
for f in runs/auto/*/config.json; do
    python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['hyperparams'], indent=1))" $f | tee -a $OUT/auto.log
done
$K gputop --json --count 1 | tee -a $OUT/auto.log
