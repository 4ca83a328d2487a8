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


def tag_costs(
    metrics: Sequence[Mapping[str, Any]], tags: Sequence[Mapping[str, str]], batch_size: int
) -> dict[str, dict[str, dict[str, float]]]:
    """What a round's training cost the clients of each tag value (e.g. each language): per
    example trained, the tokens it held and the seconds it took (`metrics`: the round's
    client metrics, each with its `client`)."""
    acc: dict[tuple[str, str], list[float]] = {}
    for m in metrics:
        c = int(m["client"])
        seen = float(m.get("steps", 0)) * batch_size
        if c >= len(tags) or not seen:
            continue
        for name, value in tags[c].items():
            a = acc.setdefault((name, value), [0.0, 0.0, 0.0, 0.0])
            a[0] += 1
            a[1] += seen
            a[2] += float(m.get("real_tokens", 0.0))
            a[3] += float(m.get("seconds", 0.0))
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (name, value), (n, seen, tokens, seconds) in sorted(acc.items()):
        cost = {"clients": n, "tokens_per_example": tokens / seen}
        out.setdefault(name, {})[value] = {**cost, "seconds_per_example": seconds / seen}
    return out


def own_by_tag(
    clients: Mapping[str, Mapping[str, float]], tags: Sequence[Mapping[str, str]]
) -> dict[str, dict[str, dict[str, float]]]:
    """The own-data evaluation per tag value (e.g. per language): the mean loss of the global
    adapter over the value's clients and, where clients hold a personal model, the mean
    personal loss and the mean gain (personal minus global) over those same clients."""
    acc: dict[tuple[str, str], list[Mapping[str, float]]] = {}
    for c, row in clients.items():
        if int(c) < len(tags):
            for name, value in tags[int(c)].items():
                acc.setdefault((name, value), []).append(row)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (name, value), rows in sorted(acc.items()):
        entry = {"clients": len(rows), "loss": statistics.fmean(r["loss"] for r in rows)}
        mine = [r for r in rows if "personal" in r]
        if mine:
            entry["personal"] = statistics.fmean(r["personal"] for r in mine)
            entry["gain"] = statistics.fmean(r["personal"] - r["loss"] for r in mine)
            entry["personal_clients"] = len(mine)
        out.setdefault(name, {})[value] = entry
    return out
