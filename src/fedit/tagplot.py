"""The per-tag picture of a run (e.g. per language): held-out loss of each tag value, round by
round, and the gap between the worst and the best, written as RUN/per_tag.png."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedit.files import atomic_file


def write_tag_plot(history: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """One panel per tag with more than one value; None (and no file) when there is none."""
    rows = [(h["round"], h["eval"]) for h in history if h.get("eval")]
    tags = sorted({t for _, ev in rows for t, vals in (ev.get("per_tag") or {}).items()
                   if len(vals) > 1 and t != "source"})  # fmt: skip
    if not tags:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tags), figsize=(5.2 * len(tags), 3.6), squeeze=False)
    for ax, tag in zip(axes[0], tags, strict=True):
        values = sorted({v for _, ev in rows for v in (ev.get("per_tag") or {}).get(tag, {})})
        for v in values:
            pts = [(r, ev["per_tag"][tag][v]["loss"]) for r, ev in rows
                   if v in (ev.get("per_tag") or {}).get(tag, {})]  # fmt: skip
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{tag} {v}")
        gaps = [(r, ev["tag_gap"][tag]["gap"]) for r, ev in rows
                if tag in (ev.get("tag_gap") or {})]  # fmt: skip
        if gaps:
            twin = ax.twinx()
            twin.plot([g[0] for g in gaps], [g[1] for g in gaps], color="gray", linestyle="--",
                      label="gap (worst - best)")  # fmt: skip
            twin.set_ylabel("gap", color="gray")
        ax.set_xlabel("round")
        ax.set_ylabel("held-out loss per token")
        ax.set_title(f"held-out loss per {tag}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, binary=True) as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path
