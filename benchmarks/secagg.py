"""What secure aggregation costs: the secure-aggregation table of docs/privacy.md.

    python benchmarks/secagg.py configs/privacy_comm.toml --nodes 4 --out runs/secagg \
        --set client.max_steps=2

Runs the config over real Flower processes on this machine (`fedit federate`, one node per
client, every client every round) four ways: plain FedAvg, FedAvg under Flower's SecAgg+,
DP-FedAvg with the server adding the noise, and DP-FedAvg under SecAgg+ with the clients adding
it in shares. Prints, per variant, the seconds a round takes (training and protocol; the
median over the rounds after the first, which also starts the nodes' workers, and the first
apart), the bytes each client uploads per round, the held-out loss, and for FedAvg under
SecAgg+ how far its adapter is from plain FedAvg's (SecAgg+'s quantization).
Each variant is an ordinary run folder under --out (a finished one is reused).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from fedit.cli import main as fedit
from fedit.lora import load_adapter_state


def _variant(config: str, sets: list[str], nodes: int, out: Path) -> dict[str, Any]:
    args = [a for s in sets for a in ("--set", s)]
    if not (out / "summary.json").exists():
        rc = fedit(["federate", config, "--nodes", str(nodes), "--out", str(out), *args])
        if rc != 0:
            raise SystemExit(f"{out}: fedit federate exited with {rc}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["round"] > 0]
    last = next(r["eval"] for r in reversed(rows) if r.get("eval"))
    return {
        # Round 1 also starts the nodes' workers (model load, tokenizing): the later rounds.
        "seconds": statistics.median(
            r["time"]["train"] + r["time"]["aggregate"] for r in rounds[1:] or rounds
        ),
        "first_round": rounds[0]["time"]["train"],
        "up": statistics.fmean(r["bytes_up_per_client"] for r in rounds),
        "loss": last["loss"],
        "epsilon": (rounds[-1].get("privacy") or {}).get("epsilon"),
        "adapter": load_adapter_state(out / "adapter"),
        # After round 1 both runs aggregated the same client updates: the difference is the
        # quantization alone (later rounds train from slightly different adapters).
        "round1": load_adapter_state(out / "checkpoints" / "round_0001"),
    }


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Largest and mean absolute coordinate difference."""
    diff = torch.cat([(a[k].double() - v.double()).flatten() for k, v in b.items()])
    return diff.abs().max().item(), diff.abs().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--nodes", type=int, default=4, help="clients (one Flower node each)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clip", type=float, default=1.0, help="privacy.clip_norm of the DP runs")
    p.add_argument("--noise", type=float, default=0.5, help="privacy.noise_multiplier")
    p.add_argument("--out", default="runs/secagg")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    out = Path(args.out)
    n = args.nodes
    base = [
        *args.overrides,
        f"partition.num_clients={n}",
        f"federation.clients_per_round={n}",
        f"federation.rounds={args.rounds}",
        f"eval.every={args.rounds}",
    ]
    dp = [f"privacy.clip_norm={args.clip}", f"privacy.noise_multiplier={args.noise}"]
    secure = ["privacy.secure_aggregation=true"]
    variants = [
        ("FedAvg", base, out / "fedavg", None),
        ("FedAvg + SecAgg+", [*base, *secure], out / "fedavg-secagg", "FedAvg"),
        ("DP-FedAvg (server adds noise)", [*base, *dp], out / "dp", None),
        # Its noise is drawn by the clients, not the server: no adapter to compare it with.
        ("DP-FedAvg + SecAgg+ (clients add noise)", [*base, *dp, *secure], out / "dp-secagg", None),
    ]  # fmt: skip
    done: dict[str, dict[str, Any]] = {}
    for name, sets, folder, _ in variants:
        done[name] = _variant(args.config, sets, n, folder)
    print(f"{n} clients on {n} Flower nodes, all {n} every round, {args.rounds} rounds; DP: "
          f"clip {args.clip:g}, noise multiplier {args.noise:g}\n")  # fmt: skip
    print("| run | seconds per round (rounds 2+) | round 1 (with worker start) "
          "| bytes up per client per round | held-out loss "
          "| epsilon | vs plain after round 1: max abs diff | mean abs diff "
          "| after the last round: max abs diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, _, _, plain in variants:
        r = done[name]
        eps = "–" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        diff = "– | – | –"
        if plain is not None:
            mx1, mean1 = _distance(r["round1"], done[plain]["round1"])
            mx, _ = _distance(r["adapter"], done[plain]["adapter"])
            diff = f"{mx1:.2e} | {mean1:.2e} | {mx:.2e}"
        print(f"| {name} | {r['seconds']:.1f} | {r['first_round']:.1f} | {r['up']:,.0f} "
              f"| {r['loss']:.4f} | {eps} | {diff} |")  # fmt: skip


if __name__ == "__main__":
    main()
