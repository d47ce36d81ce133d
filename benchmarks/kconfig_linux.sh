#!/usr/bin/env bash
# Load Linux 6.1's Kconfig tree and write alldefconfig: knlp's `conf` front
# end against Linux's own scripts/kconfig/conf, alternating runs in the same
# environment (docs/config.md). Part of `make bench`; appends JSON lines to
# benchmarks/results/kconfig-linux-<date>.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
export KNLP_LINUX_SRC=$PWD/.deps/linux-6.1/src
src=$PWD/.deps/linux-6.1/src conf=$PWD/.deps/linux-6.1/conf/conf knlp=$PWD/target/release/knlp
[ -x "$conf" ] || { echo "kconfig_linux: run make setup first (no $conf)" >&2; exit 1; }
out="$PWD/benchmarks/results/kconfig-linux-$(date -u +%Y-%m-%d).jsonl"
host="$(hostname) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) x$(nproc)"
rounds=${ROUNDS:-7}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
for arch in x86_64 arm64; do
  srcarch=$arch; [ $arch = x86_64 ] && srcarch=x86
  for r in $(seq "$rounds"); do
    for impl in conf knlp; do
      rm -rf "$work/$impl" && mkdir -p "$work/$impl" && cd "$work/$impl"
      cmd=("$conf"); [ $impl = knlp ] && cmd=("$knlp" conf --allow-shell)
      t0=$(date +%s.%N)
      env -i PATH="$PATH" srctree="$src" SRCARCH=$srcarch ARCH=$arch SUBARCH=x86 KERNELVERSION=6.1 CC=gcc LD=ld \
          CC_VERSION_TEXT="$(gcc --version | head -1)" "${cmd[@]}" --alldefconfig Kconfig > /dev/null
      t1=$(date +%s.%N)
      echo "{\"what\": \"kconfig_linux_alldefconfig\", \"impl\": \"$impl\", \"arch\": \"$arch\", \"round\": $r, \"seconds\": $(awk "BEGIN{print $t1 - $t0}"), \"lines\": $(wc -l < .config), \"date\": \"$(date -u +%FT%TZ)\", \"machine\": \"$host\"}" >> "$out"
      cd - > /dev/null
    done
  done
  cmp -s "$work/conf/.config" "$work/knlp/.config" || { echo "kconfig_linux: $arch .config differs from conf's" >&2; exit 1; }
done
.venv/bin/python - "$out" "$rounds" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
n = 2 * 2 * int(sys.argv[2])
rows = rows[-n:]
for arch in ("x86_64", "arm64"):
    med = {i: statistics.median(r["seconds"] for r in rows if r["arch"] == arch and r["impl"] == i) for i in ("conf", "knlp")}
    print(f"Linux 6.1 {arch} alldefconfig, load + write: knlp {med['knlp']:.3f} s, conf {med['conf']:.3f} s, "
          f"ratio knlp/conf {med['knlp'] / med['conf']:.2f} (median of {sys.argv[2]})")
PY
# menuconfig on the x86 tree: load, a search keystroke, a redraw, the jump,
# the help view and a cursor move (tests.rs perf_linux_tree).
cargo test --release --locked -q -p knlp-menuconfig --lib perf_linux_tree -- --ignored --nocapture 2>/dev/null \
  | grep '^{' | .venv/bin/python -c "
import json, sys
for l in sys.stdin:
    d = json.loads(l); d.update(date='$(date -u +%FT%TZ)', machine='$host'); print(json.dumps(d)); print(d, file=sys.stderr)
" >> "$out"
