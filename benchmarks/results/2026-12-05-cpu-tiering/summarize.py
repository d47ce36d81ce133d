"""Usage: python3 summarize.py /tmp/bench-tiering-2 (the --out folder).
Per arm: best (minimum) 10-step window of step_ms after the assignment
(steps 20..60) over all rounds, and the emulated delay per step. The build VM
was shared with other builds (load 2 to 4 on 2 cores): minima, not means."""
import json, sys, glob, os, collections
root = sys.argv[1]
best = collections.defaultdict(lambda: float("inf"))
delay = collections.defaultdict(list)
for d in sorted(glob.glob(os.path.join(root, "*-*"))):
    arm = os.path.basename(d).rsplit("-", 1)[0]
    for line in open(os.path.join(d, "metrics.jsonl")):
        r = json.loads(line)
        if "step_ms" in r and r["step"] >= 20:
            best[arm] = min(best[arm], r["step_ms"])
            if "tier_delay_ms" in r:
                delay[arm].append((r["tier_delay_ms"], r["tier_slept_ms"]))
base = best.get("plain")
for arm, ms in best.items():
    d = delay.get(arm)
    extra = ""
    if d:
        extra = " delay_ms/step requested %.3f slept %.3f" % (sum(x for x, _ in d) / len(d), sum(y for _, y in d) / len(d))
    print("%-18s best step_ms %8.1f  ratio to plain %.3f%s" % (arm, ms, ms / base, extra))
