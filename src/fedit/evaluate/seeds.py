"""Several seeds of one comparison: each seed a full `fedit compare` in its own folder, then
mean, standard deviation and range per arm and figure, so a difference can be told from noise.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from fedit.config import Config, config_from_dict
from fedit.evaluate.report import ARM_NAMES
from fedit.files import atomic_json, atomic_text
from fedit.progress import Progress

FIGURES = [
    ("loss", "held-out loss"),
    ("category_loss_max", "worst category"),
    ("rougeL", "ROUGE-L"),
]


def with_seed(cfg: Config, seed: int) -> Config:
    data = cfg.to_dict()
    data["seed"] = seed
    return config_from_dict(data)


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def mean_std(values: list[float], digits: int = 4, sign: bool = False, span: bool = False) -> str:
    """'mean ± std' over seeds ('–' when one is missing; one value alone as it is), with
    `span` also '(min–max)'; `sign` writes a leading + (differences)."""
    if not values or any(v is None for v in values):
        return "–"
    f = f"{'+' if sign else ''}.{digits}f"
    if len(values) == 1:
        return format(values[0], f)
    s = spread(values)
    text = f"{format(s['mean'], f)} ± {s['std']:.{digits}f}"
    return text + (f" ({s['min']:.{digits}f}–{s['max']:.{digits}f})" if span else "")


def summarize(by_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """arm -> figure -> mean/std/min/max/n over the seeds that have it."""
    arms: dict[str, dict[str, Any]] = {}
    for results in by_seed.values():
        for arm, figs in results["arms"].items():
            for key, _ in FIGURES:
                if figs.get(key) is not None:
                    arms.setdefault(arm, {}).setdefault(key, []).append(float(figs[key]))
    return {
        "seeds": sorted(by_seed),
        "arms": {
            a: {k: {**spread(v), "values": v} for k, v in figs.items()} for a, figs in arms.items()
        },
    }


def markdown(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    lines = [
        f"Over {len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± std (min–max).",
        "",
        "| arm | " + " | ".join(name for _, name in FIGURES) + " |",
        "|---|" + "---|" * len(FIGURES),
    ]
    for arm, figs in summary["arms"].items():
        cells = [mean_std(figs[key]["values"], span=True) if key in figs else "–"
                 for key, _ in FIGURES]  # fmt: skip
        lines.append(f"| {ARM_NAMES.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_seeds(
    cfg: Config, out: Path, seeds: list[int], progress: Progress | None = None
) -> dict[str, Any]:
    """`fedit compare` once per seed (out/seed-N, resumable each), then the summary."""
    from fedit.evaluate.compare import run_compare

    progress = progress or Progress(enabled=False)
    by_seed = {}
    for s in seeds:
        progress.log(f"seed {s} ({seeds.index(s) + 1}/{len(seeds)})")
        by_seed[s] = run_compare(with_seed(cfg, s), out / f"seed-{s}", progress)
    summary = summarize(by_seed)
    atomic_json(out / "seeds.json", summary)
    atomic_text(out / "seeds.md", markdown(summary))
    return summary
