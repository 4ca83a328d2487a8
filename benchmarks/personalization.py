"""Personalized FedIT on dolly's category shards: each client's own held-out loss under the
global adapter and under each personalization method.

    python benchmarks/personalization.py --out runs/personalization --seeds 1 2 3

One run per method and seed (a run folder each: an interrupted sweep resumes, a finished run is
reused), then a table per seed and the mean ± std over seeds. Sized for 2 CPU cores (a few
minutes a run): 6 clients, 3 per round, 3 rounds of 3 steps, cutoff 128, 1% of each client's
records held out, the global test split capped at 24 examples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from fedit.config import load_config
from fedit.files import atomic_json, atomic_text
from fedit.progress import Progress
from fedit.recipe import run_federation

METHODS = ["none", "finetune", "ditto", "fedsa"]
SETTINGS = [
    "partition.num_clients=6",
    "federation.clients_per_round=3",
    "federation.rounds=3",
    "client.max_steps=3",
    "data.cutoff_len=128",
    "data.client_test_fraction=0.01",
    "eval.every=3",
    "eval.at_start=false",
    "eval.max_examples=24",
    "personalization.finetune_steps=3",
]


def one(config: Path, out: Path, method: str, seed: int) -> dict[str, Any]:
    folder = out / f"seed-{seed}" / method
    summary = folder / "summary.json"
    if not summary.is_file():
        cfg = load_config(config, [*SETTINGS, f"personalization.method={method}", f"seed={seed}"])
        run_federation(cfg, folder, resume=folder.exists(), progress=Progress())
    data = json.loads(summary.read_text(encoding="utf-8"))
    last = next(h["eval"] for h in reversed(data["history"]) if h.get("eval"))
    own = last["own_data"]
    row = {
        "method": method,
        "seed": seed,
        "test_loss": last["loss"],
        "global_mean": own["mean"],
        "global_worst": own["worst"],
        "clients": own["clients"],
    }
    if "personal" in own:
        row.update(
            personal_mean=own["personal"]["mean"],
            personal_worst=own["personal"]["worst"],
            helped=own["helped"],
            hurt=own["hurt"],
        )
    return row


def _ms(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.fmean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def markdown(rows: list[dict[str, Any]], seeds: list[int]) -> str:
    lines = [
        f"Seeds: {', '.join(map(str, seeds))} (mean ± std over seeds where more than one).",
        "",
        "| method | global test loss | own-data loss, global adapter (mean / worst client) "
        "| own-data loss, personal model (mean / worst client) | clients helped / hurt |",
        "|---|---|---|---|---|",
    ]
    for m in METHODS:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        cells = [
            m,
            _ms([r["test_loss"] for r in rs]),
            f"{_ms([r['global_mean'] for r in rs])} / {_ms([r['global_worst'] for r in rs])}",
        ]
        if "personal_mean" in rs[0]:
            cells.append(
                f"{_ms([r['personal_mean'] for r in rs])} / "
                f"{_ms([r['personal_worst'] for r in rs])}"
            )
            helped = statistics.fmean(r["helped"] for r in rs)
            hurt = statistics.fmean(r["hurt"] for r in rs)
            cells.append(f"{100 * helped:.0f}% / {100 * hurt:.0f}%")
        else:
            cells += ["(the global adapter)", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    clients = sorted({c for r in rows for c in r["clients"]}, key=int)
    lines += [
        "",
        "Per client (first seed), own-data loss: global adapter → personal model:",
        "",
        "| client | " + " | ".join(m for m in METHODS if m != "none") + " |",
        "|---|" + "---|" * (len(METHODS) - 1),
    ]
    first = seeds[0]
    for c in clients:
        cells = [c]
        for m in METHODS[1:]:
            r = next((r for r in rows if r["method"] == m and r["seed"] == first), None)
            v = (r or {}).get("clients", {}).get(c, {})
            cells.append(f"{v['loss']:.3f} → {v['personal']:.3f}" if "personal" in v else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/quickstart.toml"))
    ap.add_argument("--out", type=Path, default=Path("runs/personalization"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = ap.parse_args()
    rows = [one(args.config, args.out, m, s) for s in args.seeds for m in args.methods]
    atomic_json(args.out / "results.json", rows)
    table = markdown(rows, args.seeds)
    atomic_text(args.out / "results.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
