"""`fedit votes`: what people's blind votes (the page's Vote tab) say about the served models.

Per model: battles, wins, losses, ties (a tie and "both bad" count half to each side), the win
rate with a bootstrap 95% interval (battles resampled, seeded), and a Bradley-Terry ranking
(Hunter's MM iterations, ties as half a win each way). With a judge endpoint, the same pairs go
to the LLM judge (both orders, `judge.repeats` times) and its verdicts are set against the
people's: agreement and Cohen's kappa over a / b / tie.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedit.errors import FeditError

QUERY = (
    "SELECT b.id, b.prompt, b.model_a, b.model_b, b.answer_a, b.answer_b, v.winner, v.voter, "
    "v.voted FROM battles b JOIN votes v ON v.battle = b.id ORDER BY v.voted"
)


def votes_file(where: Path) -> Path:
    path = where / "votes.sqlite" if where.is_dir() else where
    if not path.is_file():
        raise FeditError(
            f"{where}: no votes.sqlite here (fedit serve keeps the page's votes there)"
        )
    return path


def load_votes(where: Path) -> list[dict[str, Any]]:
    """Every voted battle of the votes file in (or at) `where`, oldest first."""
    path = votes_file(where)
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        try:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(QUERY).fetchall()]
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise FeditError(f"{path}: not a votes file of fedit serve ({e})") from None


def _points(rows: Sequence[dict[str, Any]], model: str) -> list[float]:
    """1 / 0.5 / 0 per battle `model` fought: won, tied (or both bad), lost."""
    out = []
    for r in rows:
        if model not in (r["model_a"], r["model_b"]):
            continue
        side = "a" if r["model_a"] == model else "b"
        out.append(1.0 if r["winner"] == side else 0.5 if r["winner"] in ("tie", "bad") else 0.0)
    return out


def bradley_terry(
    rows: Sequence[dict[str, Any]], models: list[str], iters: int = 500
) -> dict[str, float]:
    """Strengths p (geometric mean 1) maximizing the Bradley-Terry likelihood of the votes."""
    idx = {m: i for i, m in enumerate(models)}
    k = len(models)
    wins = np.zeros((k, k))
    for r in rows:
        a, b = idx[r["model_a"]], idx[r["model_b"]]
        if r["winner"] == "a":
            wins[a, b] += 1
        elif r["winner"] == "b":
            wins[b, a] += 1
        else:
            wins[a, b] += 0.5
            wins[b, a] += 0.5
    games = wins + wins.T
    p = np.ones(k)
    for _ in range(iters):
        denom = np.array([sum(games[i, j] / (p[i] + p[j]) for j in range(k) if j != i)
                          for i in range(k)])  # fmt: skip
        won = wins.sum(axis=1)
        new = np.where(denom > 0, np.maximum(won, 1e-9) / np.where(denom > 0, denom, 1), p)
        new /= math.exp(float(np.mean(np.log(new))))
        if np.max(np.abs(new - p)) < 1e-10:
            p = new
            break
        p = new
    return {m: float(p[idx[m]]) for m in models}


def summarize(rows: Sequence[dict[str, Any]], draws: int = 1000, seed: int = 0) -> dict[str, Any]:
    if not rows:
        raise FeditError("no votes yet: cast some on the page's Vote tab")
    models = sorted({r["model_a"] for r in rows} | {r["model_b"] for r in rows})
    rng = np.random.default_rng(seed)
    boot: dict[str, list[float]] = {m: [] for m in models}
    for _ in range(draws):
        sample = [rows[int(i)] for i in rng.integers(0, len(rows), len(rows))]
        for m in models:
            pts = _points(sample, m)
            if pts:
                boot[m].append(float(np.mean(pts)))
    strength = bradley_terry(rows, models)
    table = []
    for m in models:
        pts = _points(rows, m)
        lo, hi = np.percentile(boot[m], [2.5, 97.5]) if boot[m] else (math.nan, math.nan)
        table.append({
            "model": m, "battles": len(pts), "wins": pts.count(1.0), "ties": pts.count(0.5),
            "losses": pts.count(0.0), "win_rate": float(np.mean(pts)),
            "ci95": [float(lo), float(hi)], "bt_strength": strength[m],
        })  # fmt: skip
    table.sort(key=lambda t: -t["bt_strength"])
    for rank, t in enumerate(table, start=1):
        t["rank"] = rank
    counts = {w: sum(1 for r in rows if r["winner"] == w) for w in ("a", "b", "tie", "bad")}
    return {"votes": len(rows), "winners": counts, "models": table, "bootstrap_draws": draws}


def judge_agreement(
    rows: Sequence[dict[str, Any]],
    verdict: Callable[[str, str, str], tuple[float | None, float | None]],
) -> dict[str, Any]:
    """The judge's a / b / tie on each voted pair against the people's (both bad = tie)."""
    people, judge, skipped = [], [], 0
    for r in rows:
        a, b = verdict(r["prompt"], r["answer_a"] or "", r["answer_b"] or "")
        if a is None or b is None:
            skipped += 1
            continue
        judge.append("a" if a > b else "b" if b > a else "tie")
        people.append("tie" if r["winner"] == "bad" else r["winner"])
    if not people:
        raise FeditError("the judge scored none of the voted pairs")
    return {"pairs": len(people), "unparsed": skipped,
            "agreement": sum(p == j for p, j in zip(people, judge, strict=True)) / len(people),
            "kappa": cohen_kappa(people, judge)}  # fmt: skip


def cohen_kappa(x: Sequence[str], y: Sequence[str]) -> float:
    labels = sorted(set(x) | set(y))
    n = len(x)
    observed = sum(a == b for a, b in zip(x, y, strict=True)) / n
    expected = sum((list(x).count(c) / n) * (list(y).count(c) / n) for c in labels)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def markdown(summary: dict[str, Any], agreement: dict[str, Any] | None, judge: str) -> str:
    w = summary["winners"]
    lines = [
        f"{summary['votes']} votes: A {w['a']}, B {w['b']}, tie {w['tie']}, both bad {w['bad']}",
        "",
        "| rank | model | battles | wins | ties | losses | win rate (95% CI) | Bradley-Terry |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in summary["models"]:
        lo, hi = t["ci95"]
        lines.append(f"| {t['rank']} | {t['model']} | {t['battles']} | {t['wins']} | {t['ties']} | "
                     f"{t['losses']} | {t['win_rate']:.3f} ({lo:.3f}-{hi:.3f}) | "
                     f"{t['bt_strength']:.3f} |")  # fmt: skip
    lines.append(f"\n(win-rate intervals: {summary['bootstrap_draws']} bootstrap draws of battles)")
    if agreement is not None:
        lines += [
            "",
            f"Judge {judge} on the same {agreement['pairs']} pairs: agreement with the votes "
            f"{agreement['agreement']:.3f}, Cohen's kappa {agreement['kappa']:.3f}"
            + (f" ({agreement['unparsed']} pairs unparsed)" if agreement["unparsed"] else ""),
        ]
    return "\n".join(lines) + "\n"
