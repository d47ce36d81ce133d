#!/usr/bin/env bash
# `make bench`: knlp against PyTorch on this machine's CPU, same command, same
# thread count, alternating runs; appends JSON lines to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="benchmarks/results/cpu-$(date -u +%Y-%m-%d).jsonl"
mkdir -p benchmarks/results
threads=${THREADS:-$(nproc)}
host="$(hostname) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x$(nproc)"
for round in 1 2; do
  for impl in knlp pytorch; do
    if [ $impl = knlp ]; then
      line=$(target/release/knlp run benchmarks/lenet5.rhai --threads "$threads" | tail -1)
    else
      line=$(.venv/bin/python benchmarks/lenet5_torch.py --threads "$threads" 2>/dev/null | tail -1)
    fi
    echo "$line"
    echo "$line" | .venv/bin/python -c "import json,sys; d=json.loads(sys.stdin.read()); d.update(date='$(date -u +%FT%TZ)', machine='$host', round=$round); print(json.dumps(d))" >> "$out"
  done
done
.venv/bin/python - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])][-4:]
k = sorted(r["seconds_per_epoch"] for r in rows if r["impl"] == "knlp")[0]
t = sorted(r["seconds_per_epoch"] for r in rows if r["impl"] == "pytorch")[0]
print(f"LeNet-5, 2 epochs, batch 64, CPU: knlp {k:.2f} s/epoch, PyTorch {t:.2f} s/epoch, ratio knlp/PyTorch {k / t:.2f} (best of 2 each)")
PY
# Script-defined LeNet-5 against the built-in one (issue 16's 5% budget).
target/release/knlp run benchmarks/script_model.rhai --threads "$threads" --rounds "${ROUNDS:-5}" | tee /dev/stderr \
  | .venv/bin/python -c "
import json, sys
for l in sys.stdin:
    l = l.strip()
    if l.startswith('{'):
        d = json.loads(l); d.update(date='$(date -u +%FT%TZ)', machine='$host'); print(json.dumps(d))
" >> "$out"
benchmarks/kconfig_linux.sh
