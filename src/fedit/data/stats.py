"""What a split looks like: sizes, category histograms, and how far it is from IID."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedit.data.records import Record

__all__ = ["format_stats", "heterogeneity_statement", "iid_reference_tv", "partition_stats"]


def partition_stats(clients: Sequence[Sequence[Record]], test: Sequence[Record]) -> dict[str, Any]:
    """Sizes, category histograms and a heterogeneity summary."""
    cats = sorted({r.category for c in clients for r in c} | {r.category for r in test})
    hists = [Counter(r.category for r in c) for c in clients]
    total = Counter[str]()
    for h in hists:
        total.update(h)
    n = sum(total.values())
    global_p = np.array([total[c] / n for c in cats])
    sizes = np.array([len(c) for c in clients], dtype=float)
    tv = [
        0.5 * float(np.abs(np.array([h[c] / len(cl) for c in cats]) - global_p).sum())
        for h, cl in zip(hists, clients, strict=True)
        if cl
    ]
    iid = iid_reference_tv([r.category for c in clients for r in c], [len(c) for c in clients])
    return {
        "num_clients": len(clients),
        "num_train": n,
        "num_test": len(test),
        "categories": cats,
        "test_per_category": dict(sorted(Counter(r.category for r in test).items())),
        "clients": [
            {"client": i, "size": len(c), "categories": dict(sorted(h.items()))}
            for i, (c, h) in enumerate(zip(clients, hists, strict=True))
        ],
        "heterogeneity": {
            "size_min": int(sizes.min()),
            "size_mean": float(sizes.mean()),
            "size_max": int(sizes.max()),
            "size_cv": float(sizes.std() / sizes.mean()) if sizes.mean() else 0.0,
            "categories_per_client_mean": float(np.mean([len(h) for h in hists])),
            # 0 = every client looks like the pooled data; 1 = disjoint category supports.
            "category_tv_mean": float(np.mean(tv)) if tv else 0.0,
            # The same statistic for random (IID) splits of the same records into the same
            # sizes: what sampling alone gives (mean and std over 20 seeded splits).
            "category_tv_iid_mean": iid[0],
            "category_tv_iid_std": iid[1],
        },
    }


def iid_reference_tv(
    labels: Sequence[str], sizes: Sequence[int], draws: int = 20
) -> tuple[float, float]:
    """Mean category TV distance of clients to the pooled data for IID splits of `labels` into
    clients of `sizes` (seeded): the value a split has by chance alone."""
    if not labels:
        return 0.0, 0.0
    cats = sorted(set(labels))
    codes = np.array([cats.index(x) for x in labels])
    pooled = np.bincount(codes, minlength=len(cats)) / len(codes)
    bounds = np.cumsum([0, *sizes])
    rng = np.random.default_rng(20260)
    means = []
    for _ in range(draws):
        perm = codes[rng.permutation(len(codes))]
        tvs = [0.5 * float(np.abs(np.bincount(perm[a:b], minlength=len(cats)) / (b - a)
                                  - pooled).sum())
               for a, b in itertools.pairwise(bounds) if b > a]  # fmt: skip
        means.append(float(np.mean(tvs)))
    return float(np.mean(means)), float(np.std(means))


def heterogeneity_statement(h: dict[str, Any]) -> str:
    """How far the split is from IID, in words and numbers."""
    tv, iid = h["category_tv_mean"], h.get("category_tv_iid_mean")
    if iid is None:
        return f"category TV distance to pooled {tv:.3f}"
    std = h.get("category_tv_iid_std", 0.0)
    if not iid and tv < 1e-12:  # one category (or none to differ in): nothing to skew
        return f"category TV distance to pooled {tv:.3f}: one category, no category skew"
    ratio = tv / iid if iid else float("inf")
    verdict = ("far from IID" if ratio >= 3 else "moderately non-IID" if ratio >= 1.5
               else "close to IID")  # fmt: skip
    return (f"category TV distance to pooled {tv:.3f}, against {iid:.3f} +- {std:.3f} for IID "
            f"splits of the same sizes ({ratio:.1f}x): {verdict}")  # fmt: skip


def format_stats(stats: dict[str, Any], max_rows: int = 100) -> str:
    """A readable table: one row per client with its category counts."""
    cats: list[str] = stats["categories"]
    heads = [c[:10] for c in cats]
    width = max([6, *(len(h) for h in heads)])
    lines = ["client   size " + " ".join(h.rjust(width) for h in heads)]
    rows = stats["clients"]
    for row in rows[:max_rows]:
        counts = " ".join(str(row["categories"].get(c, 0)).rjust(width) for c in cats)
        lines.append(f"{row['client']:>6} {row['size']:>6} {counts}")
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more clients (see stats.json)")
    test_counts = " ".join(str(stats["test_per_category"].get(c, 0)).rjust(width) for c in cats)
    lines.append(f"{'test':>6} {stats['num_test']:>6} {test_counts}")
    h = stats["heterogeneity"]
    lines.append(
        f"{stats['num_clients']} clients, {stats['num_train']} train / {stats['num_test']} test; "
        f"size min/mean/max {h['size_min']}/{h['size_mean']:.1f}/{h['size_max']} "
        f"(cv {h['size_cv']:.2f}); categories per client {h['categories_per_client_mean']:.2f}; "
        + heterogeneity_statement(h)
    )
    return "\n".join(lines)
