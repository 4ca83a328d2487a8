"""The tables and plot of docs/heterogeneity.md: client selection, stragglers, q-FedAvg.

    python benchmarks/heterogeneity.py configs/heterogeneity.toml --seeds 1 2 3

Every arm runs once per seed as an ordinary run folder under --out (OUT/ARM/seed-N,
resumable; a finished one is reused). Figures are mean ± std over the seeds of the final
held-out evaluation: the loss, the worst category's loss, the spread over the categories,
the worst client's loss (on its own category mix), plus, for the straggler arms, the
virtual time the rounds took and the updates lost or cut.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from fedit.config import load_config
from fedit.evaluate.seeds import mean_std
from fedit.progress import Progress
from fedit.recipe import run_federation

DEADLINE = ["system.deadline=4.0"]
ARMS: dict[str, tuple[str, list[str]]] = {
    "uniform": ("uniform (FedIT)", []),
    "coverage": ("coverage-aware", ["federation.selection='coverage'"]),
    "power_of_choice": ("Power-of-Choice (d = 4)",
                        ["federation.selection='power_of_choice'", "selection.candidates=4"]),
    "drop": ("deadline, drop stragglers", [*DEADLINE, "system.straggler='drop'"]),
    "partial": ("deadline, partial work, FedAvg", [*DEADLINE, "system.straggler='partial'"]),
    "partial_nova": ("deadline, partial work, FedNova",
                     [*DEADLINE, "system.straggler='partial'", "federation.strategy='fednova'"]),
    "qfedavg": ("q-FedAvg (q = 1)",
                ["federation.strategy='qfedavg'", "strategy.q=1", "strategy.qffl_lr=10"]),
}  # fmt: skip
TABLES = {
    "selection": ["uniform", "coverage", "power_of_choice"],
    "stragglers": ["uniform", "drop", "partial", "partial_nova"],
    "fairness": ["uniform", "qfedavg"],
}


def _one(config: str, sets: list[str], seed: int, out: Path) -> dict[str, Any]:
    cfg = load_config(config, [*sets, f"seed={seed}"])
    res = run_federation(cfg, out, resume=True, progress=Progress())
    rounds = [r for r in res.history if r["round"] > 0]
    ev = next(r["eval"] for r in reversed(res.history) if r.get("eval"))
    fair = ev["fairness"]
    system = [r.get("system") or {} for r in rounds]
    status = [c["status"] for s in system for c in s.get("clients", [])]
    cats = {c for r in rounds for client in r["accepted"]
            for c in res.partition_stats["clients"][client]["categories"]}  # fmt: skip
    return {
        "loss": ev["loss"],
        "worst_category": fair["categories"]["worst"],
        "jain": fair["categories"]["jain"],
        "category_std": fair["categories"]["std"],
        "worst_client": fair["clients"]["worst"],
        "virtual_s": system[-1].get("virtual_clock_s") if system else None,
        "dropped": status.count("dropped"),
        "partial": status.count("partial"),
        "updates": sum(len(r["accepted"]) for r in rounds),
        "categories_trained": len(cats),
    }


def _ms(values: list[float], digits: int = 4) -> str:
    return mean_std(values, digits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--out", default="runs/heterogeneity")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--plot", default="docs/img/heterogeneity.png")
    p.add_argument(
        "--from-results", action="store_true", help="print the tables from OUT/results.json"
    )
    args = p.parse_args()
    out = Path(args.out)
    got: dict[str, list[dict[str, Any]]] = {}
    if args.from_results:
        got = json.loads((out / "results.json").read_text())
    else:
        for arm in args.arms:
            got[arm] = [_one(args.config, ARMS[arm][1], s, out / arm / f"seed-{s}")
                        for s in args.seeds]  # fmt: skip
        (out / "results.json").write_text(json.dumps(got, indent=1))
    print(f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}); mean ± std\n")
    head = ("| arm | held-out loss | worst category | std over categories | worst client "
            "| categories trained on |")  # fmt: skip
    for table, arms in TABLES.items():
        arms = [a for a in arms if a in got]
        if not arms:
            continue
        print(f"### {table}\n")
        extra = table == "stragglers"
        print(
            head + (" virtual seconds | updates kept | cut to partial | dropped |" if extra else "")
        )
        print("|---" * (6 + 4 * extra) + "|")
        for a in arms:
            r = got[a]
            keys = ("loss", "worst_category", "category_std", "worst_client")
            cells = [_ms([x[k] for x in r]) for k in keys]
            cells.append(_ms([x["categories_trained"] for x in r], 1))
            row = f"| {ARMS[a][0]} | " + " | ".join(cells) + " |"
            if extra:
                cells = [_ms([x[k] for x in r], 1)
                         for k in ("virtual_s", "updates", "partial", "dropped")]  # fmt: skip
                row += " " + " | ".join(cells) + " |"
            print(row)
        print()
    if "uniform" in got:
        _paired(got)
    _plot(got, Path(args.plot))


def _paired(got: dict[str, list[dict[str, Any]]]) -> None:
    """Each arm minus uniform on the same seed (the seed also draws the split and the test
    set, so differences within a seed are what the arm changed)."""
    keys = [("loss", "held-out loss"), ("worst_category", "worst category"),
            ("worst_client", "worst client")]  # fmt: skip
    print("### against uniform, paired by seed (arm - uniform)\n")
    print("| arm | " + " | ".join(f"{name}: mean ± std (per seed)" for _, name in keys) + " |")
    print("|---" * (1 + len(keys)) + "|")
    base = got["uniform"]
    for arm, runs in got.items():
        if arm == "uniform":
            continue
        cells = []
        for k, _ in keys:
            d = [x[k] - b[k] for x, b in zip(runs, base, strict=True)]
            per = ", ".join(f"{v:+.4f}" for v in d)
            cells.append(f"{mean_std(d, sign=True)} ({per})")
        print(f"| {ARMS[arm][0]} | " + " | ".join(cells) + " |")
    print()


def _plot(got: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Each arm minus uniform on the same seed: bars the mean, dots the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedit.files import atomic_file

    if "uniform" not in got:
        return
    arms = [a for a in got if a != "uniform"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(arms)), 4))
    for off, key, label in (
        (-0.2, "loss", "held-out loss"),
        (0.2, "worst_category", "worst category"),
    ):
        diffs = [
            [x[key] - b[key] for x, b in zip(got[a], got["uniform"], strict=True)] for a in arms
        ]
        ax.bar([i + off for i in range(len(arms))], [statistics.fmean(d) for d in diffs], 0.4,
               label=label, alpha=0.8)  # fmt: skip
        for i, d in enumerate(diffs):
            ax.plot([i + off] * len(d), d, "k.", ms=4)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels([ARMS[a][0] for a in arms], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("loss minus uniform's, same seed")
    ax.set_title(
        f"against uniform selection ({len(got['uniform'])} seeds; dots: each seed)", fontsize=9
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, binary=True) as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
