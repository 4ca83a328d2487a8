"""Run one config under every strategy variant and print held-out loss and bytes per round.

    python benchmarks/compare_strategies.py configs/strategies.toml [--out runs/strategies]
        [--only fedavg,ffa] [--seeds 1 2 3] [--set KEY=VALUE ...]

Each variant is the config plus a few `--set` overrides; results go to OUT/results.json and a
Markdown table on stdout. Finished variants are reused from OUT/results.json. With several
`--seeds` each variant runs once per seed and the table shows mean ± std over them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from fedit.config import load_config
from fedit.evaluate.seeds import mean_std
from fedit.recipe import run_federation

VARIANTS: dict[str, list[str]] = {
    "fedavg (FedIT, naive)": ["federation.strategy=fedavg"],
    "fedprox mu=0.01": ["federation.strategy=fedprox", "strategy.prox_mu=0.01"],
    "scaffold": ["federation.strategy=scaffold"],
    "fednova": ["federation.strategy=fednova"],
    "fedavgm m=0.5": ["federation.strategy=fedavgm", "strategy.momentum=0.5"],
    "fedadam lr=1e-3": ["federation.strategy=fedadam", "strategy.adaptive_lr=1e-3"],
    "fedyogi lr=1e-3": ["federation.strategy=fedyogi", "strategy.adaptive_lr=1e-3"],
    "fedadagrad lr=1e-3": ["federation.strategy=fedadagrad", "strategy.adaptive_lr=1e-3"],
    "fedavg + svd (exact products)": ["strategy.lora_aggregation=svd"],
    "fedavg + ffa (frozen A)": ["strategy.lora_aggregation=ffa"],
    "fedavg + svd, ranks 2/4/8": ["strategy.lora_aggregation=svd", "lora.client_ranks=[2, 4, 8]"],
    "median": ["strategy.robust=median"],
    "trimmed mean 0.25 + clip 1.0": [
        "strategy.robust=trimmed_mean",
        "strategy.trim_ratio=0.25",
        "strategy.clip_norm=1.0",
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--out", default="runs/strategies")
    ap.add_argument("--only", default="", help="comma-separated variant name prefixes")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=[], help="default: the config's seed")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    wanted = [p for p in args.only.split(",") if p]
    seeds = args.seeds or [None]
    runs = [(name, o, s) for name, o in VARIANTS.items() for s in seeds
            if not wanted or any(name.startswith(p) for p in wanted)]  # fmt: skip
    for variant, overrides, seed in runs:
        name = variant if seed is None else f"{variant} @ seed {seed}"
        if name in results:
            continue
        seed_set = [] if seed is None else [f"seed={seed}"]
        cfg = load_config(args.config, [*args.overrides, *overrides, *seed_set])
        t0 = time.perf_counter()
        result = run_federation(cfg)
        rounds = [h for h in result.history if h["round"] > 0]
        results[name] = {
            "overrides": overrides,
            "loss_round0": result.history[0]["eval"]["loss"],
            "loss_final": result.history[-1]["eval"]["loss"],
            "category_loss_max": result.history[-1]["eval"]["category_loss_max"],
            "bytes_up_per_client": sum(h["bytes_up_per_client"] for h in rounds) / len(rounds),
            "bytes_down_per_client": rounds[-1]["bytes_down_per_client"],
            "seconds": time.perf_counter() - t0,
        }
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, results_path)
        print(f"{name}: {results[name]['loss_final']:.4f}", flush=True)
    print(
        "\n| variant | held-out loss (round 0 → last) | worst category "
        "| bytes up / client / round | bytes down |"
    )
    print("|---|---|---|---|---|")
    for variant in dict.fromkeys(v for v, _, _ in runs):
        rs = [results[variant if s is None else f"{variant} @ seed {s}"] for s in seeds]

        def ms(key: str, rs: list = rs) -> str:
            return mean_std([r[key] for r in rs])

        label = variant + (f" ({len(rs)} seeds)" if len(rs) > 1 else "")
        r = rs[0]
        print(
            f"| {label} | {ms('loss_round0')} → {ms('loss_final')} | "
            f"{ms('category_loss_max')} | {r['bytes_up_per_client']:,.0f} | "
            f"{r['bytes_down_per_client']:,.0f} |"
        )


if __name__ == "__main__":
    main()
