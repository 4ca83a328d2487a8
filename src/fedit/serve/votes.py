"""People's votes: blind pairwise battles between two served models, kept in SQLite.

A battle is one prompt put to two models the server picks at random; the page sees them only
as sides A and B (which model is on which side is drawn by the server, and its answers come
from routes that name the battle and the side, never the model) until the vote is cast, when
the names are shown. Battles and votes live in one SQLite file (WAL mode, one connection per
request, so concurrent voters neither block each other's reads nor lose a write); a battle
takes one vote.

Routes: `POST /fedit/battles` {prompt} -> {id}; `POST /fedit/battles/{id}/{a|b}` streams that
side's answer (server-sent events of {"text": delta}, then {"done": true}); `POST
/fedit/battles/{id}/vote` {winner: a | b | tie | bad} -> {model_a, model_b}; `GET
/fedit/votes` -> the counts.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from fedit.serve.requests import ApiError, read_body

if TYPE_CHECKING:
    from fedit.serve.api import Api

WINNERS = ("a", "b", "tie", "bad")
SCHEMA = """
CREATE TABLE IF NOT EXISTS battles (
    id TEXT PRIMARY KEY, created REAL NOT NULL, prompt TEXT NOT NULL,
    model_a TEXT NOT NULL, model_b TEXT NOT NULL, answer_a TEXT, answer_b TEXT);
CREATE TABLE IF NOT EXISTS votes (
    battle TEXT PRIMARY KEY REFERENCES battles(id),
    winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie', 'bad')),
    voter TEXT NOT NULL, voted REAL NOT NULL);
"""


class VoteStore:
    """Battles and votes in the SQLite file `path` (created on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    def new_battle(self, prompt: str, models: list[str]) -> str:
        if len(models) < 2:
            raise ApiError(400, "a battle needs two served models; serve at least two", "models")
        pick = secrets.SystemRandom().sample(models, 2)  # the sides: drawn here, shown after
        bid = uuid.uuid4().hex
        with self._db() as db:
            db.execute(
                "INSERT INTO battles (id, created, prompt, model_a, model_b) VALUES (?,?,?,?,?)",
                (bid, time.time(), prompt, pick[0], pick[1]),
            )
        return bid

    def battle(self, bid: str) -> dict[str, Any]:
        with self._db() as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM battles WHERE id = ?", (bid,)).fetchone()
            vote = db.execute("SELECT winner FROM votes WHERE battle = ?", (bid,)).fetchone()
        if row is None:
            raise ApiError(404, f"no battle {bid!r}", "not_found", "id")
        return {**dict(row), "winner": vote["winner"] if vote else None}

    def answered(self, bid: str, side: str, text: str) -> None:
        with self._db() as db:
            db.execute(f"UPDATE battles SET answer_{side} = ? WHERE id = ?", (text, bid))

    def vote(self, bid: str, winner: str, voter: str) -> dict[str, Any]:
        if winner not in WINNERS:
            raise ApiError(
                400, f"winner must be one of {list(WINNERS)}, got {winner!r}", param="winner"
            )
        b = self.battle(bid)
        if b["answer_a"] is None or b["answer_b"] is None:
            raise ApiError(409, "vote after both answers are in", "not_ready")
        try:
            with self._db() as db:
                db.execute("INSERT INTO votes (battle, winner, voter, voted) VALUES (?,?,?,?)",
                           (bid, winner, voter, time.time()))  # fmt: skip
        except sqlite3.IntegrityError:
            raise ApiError(409, "this battle has its vote already", "voted") from None
        return {"id": bid, "winner": winner, "model_a": b["model_a"], "model_b": b["model_b"]}

    def rows(self) -> list[dict[str, Any]]:
        """Every voted battle: prompt, the two models and answers, the winner."""
        with self._db() as db:
            db.row_factory = sqlite3.Row
            got = db.execute(
                "SELECT b.*, v.winner, v.voter, v.voted FROM battles b JOIN votes v "
                "ON v.battle = b.id ORDER BY v.voted"
            ).fetchall()
        return [dict(r) for r in got]


def add_routes(app: FastAPI, api: Api, store: VoteStore) -> None:
    @app.post("/fedit/battles")
    async def new_battle(request: Request) -> dict[str, Any]:
        body = await read_body(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ApiError(400, "prompt must be a non-empty string", param="prompt")
        return {"id": store.new_battle(prompt, [n for n in api.models.names])}

    @app.post("/fedit/battles/{bid}/{side}")
    async def answer(bid: str, side: str, request: Request) -> Any:
        if side == "vote":
            body = await read_body(request)
            voter = request.client.host if request.client else ""
            return store.vote(bid, str(body.get("winner")), str(body.get("voter") or voter))
        if side not in ("a", "b"):
            raise ApiError(404, f"a battle has sides a and b, not {side!r}", "not_found")
        b = store.battle(bid)
        turn = [{"role": "user", "content": b["prompt"]}]
        p = api.parse({"model": b[f"model_{side}"], "stream": True, "messages": turn}, chat=True)
        jobs = api.jobs(p)

        def chunk(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
            return {"text": text or ""} if finish is None else {"finish_reason": finish}

        def done(answers: list[Any]) -> dict[str, Any]:
            store.answered(bid, side, answers[0].text)
            return {"done": True}

        stats = request.scope.setdefault("fedit.stats", {})
        stats["model"] = f"battle {bid[:8]} side {side}"  # the log names no model either
        events = api.stream(jobs, chunk, done, stats)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip

    @app.get("/fedit/votes")
    async def votes() -> dict[str, Any]:
        counts: dict[str, int] = {w: 0 for w in WINNERS}
        for r in store.rows():
            counts[r["winner"]] += 1
        return {"file": str(store.path), "votes": sum(counts.values()), "winners": counts}
