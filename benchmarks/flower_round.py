"""What a round costs over real Flower processes, against the same round in one process.

    python benchmarks/flower_round.py configs/tiny.toml --nodes 2 --rounds 6
    python benchmarks/flower_round.py configs/quickstart.toml --nodes 2 --rounds 4

Runs the config three ways with the same seed (so the same clients train the same steps):
in-process (`fedit run`), `fedit federate` with fedit's SuperNodes (ClientApps in one
long-lived process per node, short waits) and with Flower's stock `flower-supernode` (a
`flwr-clientapp` process per message). Prints per way: the first round, the median later
round, their overhead over in-process and the ratio, the model loads per node in the run,
and the wall time of the whole run; checks that the three give the same adapter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedit.config import load_config
from fedit.engines.flower.launch import federate
from fedit.lora import load_adapter_state
from fedit.recipe import run_federation


def _rounds(folder: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["round"] >= 1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cfg = load_config(args.config, [f"federation.rounds={args.rounds}", *args.extra])
    results: dict[str, dict[str, Any]] = {}
    adapters = {}
    with tempfile.TemporaryDirectory() as tmp:
        for way in ("in-process", "fedit supernode", "flower-supernode"):
            out = Path(tmp) / way.replace(" ", "-")
            t0 = time.perf_counter()
            if way == "in-process":
                run_federation(cfg, out)
            else:
                quiet = lambda line: None  # noqa: E731
                federate(cfg, out, args.nodes, echo=quiet, plain_nodes=way == "flower-supernode")
            wall = time.perf_counter() - t0
            rows = _rounds(out)
            seconds = [float(r["seconds"]) for r in rows]
            loads = [m.get("model_loads", 1.0) for r in rows for m in r["client_metrics"]]
            results[way] = {"first": seconds[0], "later": statistics.median(seconds[1:]),
                            "rounds": seconds, "wall": wall,
                            "model_loads": max(loads)}  # fmt: skip
            adapters[way] = load_adapter_state(out / "adapter")
            print(f"{way}: first {seconds[0]:.2f} s, later {results[way]['later']:.2f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    base = results["in-process"]
    ref = adapters["in-process"]
    same = all(
        all(torch.allclose(a[k], ref[k], rtol=1e-5, atol=1e-6) for k in ref)
        for a in adapters.values()
    )
    print(f"\n{args.config}: {cfg.partition.num_clients} clients on {args.nodes} nodes, "
          f"{cfg.federation.clients_per_round} a round, {args.rounds} rounds; same adapter "
          f"all three ways: {same}\n")  # fmt: skip
    print("| way | first round | later round (median) | overhead | ratio | model loads per "
          "node | whole run |")  # fmt: skip
    print("|---" * 7 + "|")
    for way, r in results.items():
        extra = r["later"] - base["later"]
        print(f"| {way} | {r['first']:.2f} s | {r['later']:.2f} s | "
              f"{'-' if way == 'in-process' else f'{extra:+.2f} s'} | "
              f"{r['later'] / base['later']:.2f}x | "
              f"{'-' if way == 'in-process' else int(r['model_loads'])} | "
              f"{r['wall']:.1f} s |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"config": args.config, "nodes": args.nodes,
                                         "same_adapter": same, **results}, indent=2))  # fmt: skip
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
