#!/usr/bin/env bash
# The fault-injection run of docs/reliability.md: injected client faults, a SIGKILL in the middle
# of a checkpoint, resume, and a comparison with an uninterrupted run of the same config.
#   FEDIT_DATA_DIR=../shared/data bash benchmarks/fault_injection.sh [OUT]
set -uo pipefail
OUT=${1:-runs/fault-injection}
FEDIT=${FEDIT:-.venv/bin/fedit}
rm -rf "$OUT"
COMMON=(configs/tiny.toml --quiet --set federation.rounds=4 --set federation.clients_per_round=4
  --set 'faults.inject=["fail:1:1", "nan:2:2", "huge:0:3", "fail:3:4", "nan:2:4"]')

"$FEDIT" run "${COMMON[@]}" --out "$OUT/clean" > /dev/null
"$FEDIT" run "${COMMON[@]}" --out "$OUT/crashed" --set faults.crash=checkpoint:3 > /dev/null 2>&1
echo "first attempt exit status: $? (137 = killed by SIGKILL mid-checkpoint of round 3)"
echo "checkpoints left: $(ls "$OUT/crashed/checkpoints" | tr '\n' ' ')"
"$FEDIT" run "${COMMON[@]}" --out "$OUT/crashed" --resume > /dev/null
echo "resume exit status: $?"
"$(dirname "$FEDIT")/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import torch
from fedit.lora import load_adapter_state
out = Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "crashed" / "metrics.jsonl").read_text().splitlines()]
rounds = [r for r in rows if r["round"] > 0]
faults = [f for r in rounds for f in r["faults"]]
print(f"rounds completed: {len(rounds)}")
print(f"client updates expected: {sum(len(r['clients']) for r in rounds)}, "
      f"accepted: {sum(len(r['accepted']) for r in rounds)}, excluded: {len(faults)}")
for r in rounds:
    for f in r["faults"]:
        print(f"  round {r['round']} client {f['client']}: {f['reason']}")
a = load_adapter_state(out / "clean" / "adapter")
b = load_adapter_state(out / "crashed" / "adapter")
same = all(torch.equal(a[k], b[k]) for k in a)
print(f"final adapter after kill -9 + resume equals the uninterrupted run: {same}")
print(f"held-out loss round 0 -> {rounds[-1]['round']}: {rows[0]['eval']['loss']:.4f} -> "
      f"{rounds[-1]['eval']['loss']:.4f}")
PY
