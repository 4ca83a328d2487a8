"""Tables for docs/communication.md and docs/privacy.md: held-out loss against bytes on the
wire for each update compressor, and against epsilon for a few DP noise levels.

    python benchmarks/privacy_comm.py configs/privacy_comm.toml --out runs/privacy-comm
        [--seeds 1 2 3]

Every variant is an ordinary run folder under --out (resumable; a finished one is reused).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from fedit.config import load_config
from fedit.evaluate.seeds import mean_std
from fedit.progress import Progress
from fedit.recipe import run_federation

COMPRESSORS = [
    ("fp32 (none)", ["compression.method='none'"]),
    ("fp16", ["compression.method='fp16'"]),
    ("int8 + EF", ["compression.method='int8'"]),
    ("int4 + EF", ["compression.method='int4'"]),
    ("top-10% + EF", ["compression.method='topk'", "compression.topk_ratio=0.1"]),
]


def _run(config: str, overrides: list[str], out: Path) -> dict[str, Any]:
    cfg = load_config(config, overrides)
    result = run_federation(cfg, out, resume=True, progress=Progress())
    rows = [h for h in result.history if h["round"] > 0]
    last = next(h["eval"] for h in reversed(result.history) if h.get("eval"))
    return {
        "loss": last["loss"],
        "up": statistics.fmean(r["bytes_up_per_client"] for r in rows),
        "down": rows[-1]["bytes_down_per_client"],
        "up_total": sum(r["bytes"]["up_total"] for r in rows),
        "fp32": rows[-1]["bytes"]["fp32_adapter"],
        "full": rows[-1]["bytes"]["full_model"],
        "privacy": rows[-1].get("privacy"),
        "cohorts": [len(r["clients"]) for r in rows],
        "norms": [n for r in rows for n in r.get("privacy", {}).get("update_norms", [])],
        # Coordinates that receive noise (FFA-LoRA leaves A alone).
        "noised": sum(
            v.numel()
            for k, v in result.adapter.items()
            if not (cfg.strategy.lora_aggregation == "ffa" and "lora_A" in k)
        ),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--out", default="runs/privacy-comm")
    p.add_argument("--table", choices=["compression", "privacy", "both"], default="both")
    p.add_argument("--noise", type=float, nargs="+", default=[0.01, 0.03, 0.1, 1.0])
    p.add_argument("--clip", type=float, default=1.0, help="privacy.clip_norm")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[],
        help="run the tables once per seed (OUT/seed-N) and add mean ± std of the losses",
    )  # fmt: skip
    args = p.parse_args()
    if not args.seeds:
        tables(args, Path(args.out), args.overrides)
        return
    losses: dict[str, list[float]] = {}
    for seed in args.seeds:
        print(f"\n## seed {seed}\n")
        got = tables(args, Path(args.out) / f"seed-{seed}", [*args.overrides, f"seed={seed}"])
        for name, loss in got.items():
            losses.setdefault(name, []).append(loss)
    print(f"\n## over {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))})\n")
    print("| run | held-out loss: mean ± std (min–max) |\n|---|---|")
    for name, xs in losses.items():
        print(f"| {name} | {mean_std(xs, span=True)} |")


def tables(args: argparse.Namespace, out: Path, overrides: list[str]) -> dict[str, float]:
    """The tables for one seed; returns each run's held-out loss by name."""
    losses: dict[str, float] = {}
    base = _run(args.config, [*overrides, "compression.method='none'"], out / "none")
    losses["fp32 (none)" if args.table != "privacy" else "no DP"] = base["loss"]
    if args.table in ("compression", "both"):
        print(
            "| upload | bytes up per client per round | vs fp32 adapter | vs full model "
            "| held-out loss | vs fp32 |"
        )
        print("|---|---|---|---|---|---|")
        for name, sets in COMPRESSORS:
            tag = sets[0].split("=")[1].strip("'")
            r = base if tag == "none" else _run(args.config, [*overrides, *sets], out / tag)
            losses[name] = r["loss"]
            print(
                f"| {name} | {r['up']:,.0f} | {r['fp32'] / r['up']:.2f}x fewer "
                f"| {100 * (1 - r['up'] / r['full']):.2f}% saved | {r['loss']:.4f} "
                f"| {100 * (r['loss'] / base['loss'] - 1):+.2f}% |"
            )
        print(
            f"\nfull model (fp32): {base['full']:,} bytes; fp32 adapter: {base['fp32']:,} bytes; "
            f"download per client per round (fp32 global adapter): {base['down']:,} bytes\n"
        )
    if args.table in ("privacy", "both"):
        print(
            "| noise multiplier | clip norm "
            f"| epsilon (delta {load_config(args.config, overrides).privacy.delta:g}) "
            "| clients per round (Poisson) | updates clipped "
            "| noise norm on the mean | held-out loss | vs no DP |"
        )
        print("|---|---|---|---|---|---|---|---|")
        print(f"| no DP | – | ∞ | {', '.join(map(str, base['cohorts']))} | – | – "
              f"| {base['loss']:.4f} | – |")  # fmt: skip
        for sigma in args.noise:
            sets = [f"privacy.clip_norm={args.clip}", f"privacy.noise_multiplier={sigma}"]
            r = _run(args.config, [*overrides, *sets], out / f"dp-{sigma:g}-clip{args.clip:g}")
            losses[f"DP sigma {sigma:g}, clip {args.clip:g}"] = r["loss"]
            clipped = sum(n > args.clip for n in r["norms"]) / max(len(r["norms"]), 1)
            norm = statistics.median(r["norms"]) if r["norms"] else float("nan")
            print(
                f"| {sigma:g} | {args.clip:g} | {r['privacy']['epsilon']:.2f} "
                f"| {', '.join(map(str, r['cohorts']))} "
                f"| {100 * clipped:.0f}% (median norm {norm:.3f}) "
                f"| {r['privacy']['noise_std_of_mean'] * r['noised'] ** 0.5:.3g} | {r['loss']:.4f} "
                f"| {100 * (r['loss'] / base['loss'] - 1):+.2f}% |"
            )

    return losses


if __name__ == "__main__":
    main()
