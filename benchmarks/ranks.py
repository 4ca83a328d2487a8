"""FedIT across LoRA ranks: adapter size and held-out loss side by side.

    python benchmarks/ranks.py configs/ranks.toml --ranks 4 8 16 32 [--out runs/ranks]

Each rank is an ordinary run folder (resumable); lora.alpha is set to 2 x rank so the LoRA
scale stays the same. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedit.config import load_config
from fedit.progress import Progress
from fedit.recipe import run_federation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--out", default="runs/ranks")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    rows = []
    for r in args.ranks:
        cfg = load_config(args.config, [*args.overrides, f"lora.r={r}", f"lora.alpha={2 * r}"])
        result = run_federation(cfg, Path(args.out) / f"r{r}", resume=True, progress=Progress())
        first = next(h["eval"] for h in result.history if h.get("eval"))
        last = next(h["eval"] for h in reversed(result.history) if h.get("eval"))
        up = result.history[-1]["bytes_up_per_client"]
        params = sum(v.numel() for v in result.adapter.values())
        rows.append((r, params, up, first["loss"], last["loss"], last["category_loss_max"]))
    print(
        "| rank | adapter params | bytes up per client per round | held-out loss before "
        "| after | worst category after |"
    )
    print("|---|---|---|---|---|---|")
    for r, params, up, before, after, worst in rows:
        print(f"| {r} | {params:,} | {up:,.0f} | {before:.4f} | {after:.4f} | {worst:.4f} |")


if __name__ == "__main__":
    main()
