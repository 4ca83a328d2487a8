"""FedIT across LoRA ranks: adapter size and held-out loss side by side.

    python benchmarks/ranks.py configs/ranks.toml --ranks 4 8 16 32 [--out runs/ranks]
        [--seeds 1 2 3]

Each rank is an ordinary run folder (resumable); lora.alpha is set to 2 x rank so the LoRA
scale stays the same. Prints a Markdown table; with several --seeds, mean ± std over them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedit.config import load_config
from fedit.evaluate.seeds import mean_std
from fedit.progress import Progress
from fedit.recipe import run_federation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--out", default="runs/ranks")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--seeds", type=int, nargs="+", default=[], help="default: the config's seed")
    args = p.parse_args()
    rows = []
    for r in args.ranks:
        per_seed = []
        for seed in args.seeds or [None]:
            sets = [*args.overrides, f"lora.r={r}", f"lora.alpha={2 * r}"]
            folder = Path(args.out) / f"r{r}"
            if seed is not None:
                sets.append(f"seed={seed}")
                folder = folder / f"seed-{seed}"
            result = run_federation(load_config(args.config, sets), folder, resume=True,
                                    progress=Progress())  # fmt: skip
            first = next(h["eval"] for h in result.history if h.get("eval"))
            last = next(h["eval"] for h in reversed(result.history) if h.get("eval"))
            per_seed.append((first["loss"], last["loss"], last["category_loss_max"]))
        up = result.history[-1]["bytes_up_per_client"]
        params = sum(v.numel() for v in result.adapter.values())
        rows.append((r, params, up, *(mean_std([x[i] for x in per_seed]) for i in range(3))))
    print(
        "| rank | adapter params | bytes up per client per round | held-out loss before "
        "| after | worst category after |"
    )
    print("|---|---|---|---|---|---|")
    for r, params, up, before, after, worst in rows:
        print(f"| {r} | {params:,} | {up:,.0f} | {before} | {after} | {worst} |")


if __name__ == "__main__":
    main()
