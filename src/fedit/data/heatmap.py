"""The client x category heat map `fedit partition` writes beside its table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedit.files import atomic_file

MAX_ROWS = 100


def write_heatmap(stats: dict[str, Any], path: Path) -> Path:
    """Each client's share of its records per category (a row per client, at most 100)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cats: list[str] = stats["categories"]
    rows = stats["clients"][:MAX_ROWS]
    counts = np.array([[r["categories"].get(c, 0) for c in cats] for r in rows], dtype=float)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cats), 1.6 + 0.16 * len(rows)))
    im = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=40, ha="right", fontsize=8)
    step = max(1, len(rows) // 25)
    ax.set_yticks(range(0, len(rows), step))
    ax.set_yticklabels([str(r["client"]) for r in rows][::step], fontsize=7)
    ax.set_ylabel("client")
    if len(rows) <= 20 and len(cats) <= 12:
        for i in range(len(rows)):
            for j in range(len(cats)):
                if counts[i, j]:
                    ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=6,
                            color="white" if shares[i, j] < 0.6 else "black")  # fmt: skip
    h = stats["heterogeneity"]
    title = f"share of each client's records per category\nTV to pooled {h['category_tv_mean']:.2f}"
    if "category_tv_iid_mean" in h:
        title += f" (IID split: {h['category_tv_iid_mean']:.2f})"
    if len(stats["clients"]) > MAX_ROWS:
        title += f"; first {MAX_ROWS} of {len(stats['clients'])} clients"
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    with atomic_file(path, binary=True) as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path
