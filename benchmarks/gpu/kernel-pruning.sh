#!/usr/bin/env bash
# Issue 19 on one GPU: GPT-2 124M on the Linux kernel corpus, dense,
# magnitude, bitter3, bitter7 and bitter9 at 50% (docs/pruning.md, "Does the
# headline hold?"), through make itself. Each call runs the matrix for
# BUDGET seconds, then stops it with SIGINT (a checkpoint is written); the
# next call resumes it with `make continue`. From the repository root on the
# device machine, with gpu-bin carried (knlp.xz and corpus-linux/).
#   BUDGET=540 benchmarks/gpu/kernel-pruning.sh
set -u
. benchmarks/gpu/common.sh
CORPUS=.deps/corpus-linux-100000000
PROJECT=${PROJECT:-kernel50}
MAKE="make -o build KNLP=$K"
command -v make >/dev/null || { echo "make is needed on the device machine" | tee -a $OUT/make.log; exit 1; }
if [ ! -f $CORPUS/meta.json ]; then
    mkdir -p $CORPUS
    for f in train val; do xz -d -T4 -c gpu-bin/corpus-linux/$f.bin.xz > $CORPUS/$f.bin; done
    cp gpu-bin/corpus-linux/meta.json $CORPUS/
fi
sha256sum $CORPUS/*.bin | tee -a $OUT/card.txt
# knlp gputop's log mode, once per call (issue 17's GPU check).
$K gputop --json --count 3 --interval 0.5 >> $OUT/gputop.jsonl 2>> $OUT/card.txt || true
if [ -d runs/$PROJECT ]; then
    echo "== resuming runs/$PROJECT ($(date -u +%T))" | tee -a $OUT/make.log
    timeout -s INT -k 60 ${BUDGET:-540} $MAKE continue PROJECT=$PROJECT 2>&1 | tee -a $OUT/make.log
else
    $MAKE defconfig-${DEFCONFIG:-gpt2-kernel-bitter7} 2>&1 | tee -a $OUT/make.log
    timeout -s INT -k 60 ${BUDGET:-540} $MAKE PROJECT=$PROJECT ${EXTRA:-} 2>&1 | tee -a $OUT/make.log
fi
echo "== make ended with ${PIPESTATUS[0]} ($(date -u +%T))" | tee -a $OUT/make.log
$MAKE results PROJECT=$PROJECT 2>&1 | tee $OUT/results.txt
$MAKE update-graphs PROJECT=$PROJECT > $OUT/graphs.log 2>&1 || tail -3 $OUT/graphs.log
# Everything but checkpoints, for benchmarks/results/.
tar -C runs -cJf $OUT/runs.tar.xz --exclude='*.safetensors' --exclude='*.pt' --exclude='*.ckpt' $PROJECT
ls -la runs/$PROJECT | head -20
