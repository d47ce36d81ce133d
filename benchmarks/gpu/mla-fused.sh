#!/usr/bin/env bash
# The fused absorbed decode step (kernels::mla) against the libtorch step
# and mha, graphed, bf16, 256 new tokens: first the GPU tests
# (tests/kernels.rs and the graphed decode test), then 1k and 16k context
# at batch 1 (the issue-10 gap), and 16k at batch 32 (KNLP_FUSED_MLA_DECODE=1:
# the kernels are off by default until this script has run). With ANCHOR=1, the
# anchors too (Hugging Face's KV-cache loop, the plain PyTorch MLA). From
# the repository root on the device machine, with gpu-bin/ (knlp.xz,
# kernels.xz, attention.xz) carried.
set -u
source benchmarks/gpu/common.sh
for t in kernels attention; do
    xz -d -c gpu-bin/$t.xz > gpu-bin/$t && chmod +x gpu-bin/$t
done
# Most important first: a call cut short keeps what it wrote under $OUT.
[ -s $OUT/kernels-test.txt ] || timeout 120 gpu-bin/kernels --test-threads=1 --nocapture 2>&1 | grep -v '^\[' | cut -c1-400 > $OUT/kernels-test.txt
echo "exit $?" >> $OUT/kernels-test.txt
tail -n 3 $OUT/kernels-test.txt
dec() {  # variants contexts batches kernels
    KNLP_FUSED_MLA_DECODE=1 timeout 150 $K run benchmarks/attention_decode.rhai --variants $1 --contexts $2 --batches $3 --repeats 2 \
        --train_steps 0 --graph on --kernels $4 2>> $OUT/knlp.err | grep --line-buffered '^{' | tee -a $OUT/knlp.jsonl
}
dec mla_decoupled,mha 1024,16384 1 true
dec mla_decoupled 1024,16384 1 false
timeout 90 gpu-bin/attention --nocapture --test-threads=1 cuda_graph 2>&1 | cut -c1-400 > $OUT/gpu-test.txt
echo "exit $?" >> $OUT/gpu-test.txt
tail -n 3 $OUT/gpu-test.txt
dec mla_decoupled,mha 16384 32 true
dec mla_decoupled 16384 32 false
[ -z "${ANCHOR:-}" ] || timeout 200 python3 benchmarks/attention_decode_torch.py --variants hf_loop,mla_decoupled \
    --contexts 1024,16384 --batches 1,32 --repeats 2 --out $OUT/torch.jsonl > /dev/null 2> $OUT/torch.err
tail -n 4 $OUT/*.err
