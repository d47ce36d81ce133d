#!/usr/bin/env bash
# Memory tiering on one GPU (docs/tiering.md): tests/tiering.rs's
# real_mode_on_cuda, then the two presets through make for STEPS steps
# (tiers assigned after the 100 warm-up steps) against the same run with
# tiering off. From the repository root on the device machine, with
# gpu-bin (knlp.xz, tiering-test.xz) and .deps/cache/brown carried.
set -u
. benchmarks/gpu/common.sh
[ -x gpu-bin/tiering-test ] || { xz -d -c gpu-bin/tiering-test.xz > gpu-bin/tiering-test && chmod +x gpu-bin/tiering-test; }
gpu-bin/tiering-test real_mode_on_cuda --nocapture --test-threads=1 2>&1 | tee $OUT/tiering-test.log
MAKE="make -o build KNLP=$K"
for arm in plain emulated offload; do
    case $arm in
        plain) $MAKE defconfig-gpt2-adam-tier-emulated > /dev/null; $K config set ENABLE_HIERARCHICAL_TIERING n ;;
        emulated) $MAKE defconfig-gpt2-adam-tier-emulated > /dev/null ;;
        offload) $MAKE defconfig-gpt2-adam-tier-offload > /dev/null ;;
    esac
    timeout -s INT -k 30 ${BUDGET:-120} $MAKE PROJECT=tier-$arm STEPS=${STEPS:-200} TRACKER=local 2>&1 | grep -v '^step' | tail -4 | tee -a $OUT/tiering-make.log
done
for arm in plain emulated offload; do
    for r in runs/tier-$arm/*/; do
        python3 - "$r" "$arm" <<'PY' | tee -a $OUT/tiering-summary.txt
import json, sys
r, arm = sys.argv[1], sys.argv[2]
s = json.load(open(r + "summary.json"))
m = [json.loads(l) for l in open(r + "metrics.jsonl") if l.strip()]
late = [x for x in m if x.get("step", 0) > 120 and "tokens_per_s" in x]
tps = sorted(x["tokens_per_s"] for x in late)
keys = ["tier_delay_ms", "tier_slept_ms", "tier_moved_mb", "tier_refreshed_mb", "tier_staged"]
tier = {k: round(sum(x.get(k, 0) for x in late) / max(len(late), 1), 3) for k in keys}
print(arm, s["status"], "steps", s["steps"], "median tokens/s after step 120:", tps[len(tps) // 2] if tps else None,
      "windows", len(tps), "mean per window:", tier, "extra.tiering:", json.dumps(s.get("extra", {}).get("tiering", {}))[:400])
PY
    done
    cp runs/tier-$arm/*/tier_hints.json $OUT/tier_hints-$arm.json 2>/dev/null || true
done
tar -C runs -cJf $OUT/tiering-runs.tar.xz --exclude='*.safetensors' --exclude='*.pt' --exclude='*.ckpt' tier-plain tier-emulated tier-offload
