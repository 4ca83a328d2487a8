"""Fairness of a held-out evaluation: across categories, and across clients.

A client's held-out loss is the loss on its own mix of categories: the per-category held-out
losses weighted by the client's category shares (categories absent from the test split are
left out and the rest renormalized). Over categories and over clients: the worst, the mean,
the standard deviation and Jain's index (sum x)^2 / (n sum x^2), 1 when all are equal and 1/n
when one carries everything (here of losses: lower spread, higher index).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any


def jain(values: Sequence[float]) -> float:
    squares = sum(v * v for v in values)
    return sum(values) ** 2 / (len(values) * squares) if squares else 1.0


def spread(values: Mapping[str, float]) -> dict[str, Any]:
    """Worst (highest loss), mean, std (population) and Jain's index of named losses."""
    xs = [v for v in values.values() if math.isfinite(v)]
    if not xs:
        return {}
    worst = max((k for k in values if math.isfinite(values[k])), key=lambda k: values[k])
    return {"worst": values[worst], "worst_name": worst, "mean": statistics.fmean(xs),
            "std": statistics.pstdev(xs), "jain": jain(xs), "n": len(xs)}  # fmt: skip


def client_losses(
    per_category: Mapping[str, Mapping[str, float]], categories: Sequence[Mapping[str, int]]
) -> dict[str, float]:
    """client id -> the held-out loss on its own category mix."""
    out: dict[str, float] = {}
    for client, counts in enumerate(categories):
        known = {c: n for c, n in counts.items() if c in per_category}
        total = sum(known.values())
        if total:
            out[str(client)] = sum(n * per_category[c]["loss"] for c, n in known.items()) / total
    return out


def fairness(result: Mapping[str, Any], categories: Sequence[Mapping[str, int]]) -> dict[str, Any]:
    """The `fairness` entry of an evaluation row."""
    cats = result.get("per_category", {})
    out: dict[str, Any] = {"categories": spread({c: v["loss"] for c, v in cats.items()})}
    if categories:
        per_client = client_losses(cats, categories)
        out["clients"] = spread(per_client)
        out["client_loss"] = per_client
    return out
