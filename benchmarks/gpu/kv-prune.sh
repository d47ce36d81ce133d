#!/usr/bin/env bash
# Issue 18's KV-cache pruning on CUDA (docs/attention.md): the preset
# gpt2-brown-kv-prune through make (4 attention variants, KV-pruned
# perplexity with and without the V reconstructor at the end of each run),
# then scripts/kv_prune.rhai --big --recon (the docs' block-256 table with
# a reconstructor column). From the repository root on the device machine,
# with gpu-bin (knlp.xz) and .deps/cache/brown carried.
set -u
. benchmarks/gpu/common.sh
MAKE="make -o build KNLP=$K"
PROJECT=${PROJECT:-kvp}
$MAKE defconfig-gpt2-brown-kv-prune > /dev/null
timeout -s INT -k 30 ${BUDGET:-240} $MAKE PROJECT=$PROJECT DEVICE=cuda YES=1 2>&1 | grep -v '^step' | tee $OUT/kvp-make.log
$MAKE results PROJECT=$PROJECT 2>&1 | tee $OUT/kvp-results.txt
for f in runs/$PROJECT/*/kv_prune.json; do c=$(basename $(dirname $f)); cp $f $OUT/kv_prune-$c.json; done
timeout -s INT -k 30 ${BUDGET2:-240} $K run scripts/kv_prune.rhai --big --recon --device cuda --out runs/kv-prune 2>&1 | grep -v '^step' | tee $OUT/kv-prune-script.txt
