"""`fedit votes` arithmetic on hand numbers: win rates, bootstrap intervals, Bradley-Terry,
the judge's agreement with people."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fedit.errors import FeditError
from fedit.evaluate.votes import (
    bradley_terry,
    cohen_kappa,
    judge_agreement,
    load_votes,
    summarize,
)
from fedit.serve.votes import VoteStore


def row(a: str, b: str, winner: str) -> dict[str, Any]:
    return {"prompt": "q", "model_a": a, "model_b": b, "answer_a": "x", "answer_b": "y",
            "winner": winner}  # fmt: skip


def test_bradley_terry_and_win_rates_on_hand_numbers() -> None:
    # x beats y 3 times, y beats x once: the MLE strength ratio is 3.
    rows = [row("x", "y", "a")] * 2 + [row("y", "x", "b"), row("y", "x", "a")]
    p = bradley_terry(rows, ["x", "y"])
    assert p["x"] / p["y"] == pytest.approx(3.0, rel=1e-6)
    assert p["x"] * p["y"] == pytest.approx(1.0)  # geometric mean 1
    s = summarize([*rows, row("x", "y", "tie")], draws=200, seed=1)
    top = s["models"][0]
    assert top["model"] == "x" and top["rank"] == 1
    assert (top["wins"], top["ties"], top["losses"]) == (3, 1, 1)
    assert top["win_rate"] == pytest.approx(3.5 / 5)
    lo, hi = top["ci95"]
    assert 0 <= lo <= top["win_rate"] <= hi <= 1
    assert s["winners"] == {"a": 3, "b": 1, "tie": 1, "bad": 0}
    # A three-way cycle of equal records: equal strengths.
    cyc = [row("x", "y", "a"), row("y", "z", "a"), row("z", "x", "a")]
    assert all(v == pytest.approx(1.0) for v in bradley_terry(cyc, ["x", "y", "z"]).values())


def test_cohen_kappa_and_judge_agreement() -> None:
    assert cohen_kappa(["a", "b", "a", "b"], ["a", "b", "a", "b"]) == 1.0
    # Observed 0.5, expected 0.5 (two balanced labels, independent): kappa 0.
    assert cohen_kappa(["a", "a", "b", "b"], ["a", "b", "a", "b"]) == pytest.approx(0.0)
    rows = [row("x", "y", "a"), row("x", "y", "b"), row("x", "y", "bad")]
    scores = iter([(8.0, 2.0), (9.0, 1.0), (5.0, 5.0)])
    got = judge_agreement(rows, lambda q, a, b: next(scores))
    assert got["pairs"] == 3 and got["agreement"] == pytest.approx(2 / 3)  # a, (a vs b), tie


def test_votes_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FeditError, match="no votes.sqlite"):
        load_votes(tmp_path)
    (tmp_path / "votes.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(FeditError, match="not a votes file"):
        load_votes(tmp_path)
    good = tmp_path / "good"
    VoteStore(good / "votes.sqlite")
    with pytest.raises(FeditError, match="no votes yet"):
        summarize(load_votes(good))
    assert sqlite3.connect(good / "votes.sqlite").execute("PRAGMA journal_mode").fetchone() == (
        "wal",
    )


def test_fedit_votes_asks_the_judge_about_the_same_pairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedit.cli import main
    from fedit.config import load_config
    from tests.test_evaluation import Scripted

    store = VoteStore(tmp_path / "votes.sqlite")
    for i, winner in enumerate(("a", "tie", "b", "bad")):
        bid = store.new_battle(f"Name river {i}.", ["x", "y"])
        store.answered(bid, "a", f"Nile {i}")
        store.answered(bid, "b", f"Rome {i}")
        store.vote(bid, winner, "tester")
    # A judge that always prefers the first answer: asked in both orders, every pair is a tie.
    judge = Scripted([])
    try:
        args = ["votes", str(tmp_path), "--judge", "--set", f"judge.base_url={judge.url}",
                "--set", "judge.model=scripted", "--out", str(tmp_path / "report.json")]  # fmt: skip
        assert main(args) == 0
    finally:
        judge.close()
    out = capsys.readouterr().out
    assert "4 votes: A 1, B 1, tie 1, both bad 1" in out
    assert "Judge scripted at" in out and "agreement with the votes 0.500" in out
    repeats = load_config().judge.repeats
    assert len(judge.seen) == 4 * 2 * repeats  # both orders of each pair, judge.repeats times
    assert main(args) == 0  # judged once: the rerun asks nothing
    assert len(judge.seen) == 4 * 2 * repeats
