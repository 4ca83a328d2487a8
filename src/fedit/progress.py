"""Progress lines on stderr and the final summary table."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO


class Progress:
    """Round / client / step / loss as the run goes. On a terminal the step line redraws in
    place; otherwise a step line is printed every `every` steps so logs stay short."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, every: int = 10):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self._t0 = time.perf_counter()
        self._seen: dict[Any, tuple[float, int]] = {}

    def _elapsed(self) -> str:
        s = int(time.perf_counter() - self._t0)
        return f"{s // 60:02d}:{s % 60:02d}"

    def rate(self, key: Any, done: int, total: int, unit: str) -> str:
        """' (R unit/s, ETA mm:ss)' for work `key` at `done` of `total`, measured from when
        `key` was first reported; '' until there are two reports to measure between."""
        now = time.perf_counter()
        t0, d0 = self._seen.setdefault(key, (now, done))
        if done <= d0 or now <= t0:
            return ""
        per_s = (done - d0) / (now - t0)
        left = int(max(total - done, 0) / per_s)
        shown = f"{per_s:.2f} {unit}/s" if per_s >= 1 else f"{1 / per_s:.1f} s/{unit}"
        return f" ({shown}, ETA {left // 60:02d}:{left % 60:02d})"

    def log(self, text: str) -> None:
        if self.enabled:
            prefix = "\r\033[K" if self.tty else ""
            print(f"{prefix}[{self._elapsed()}] {text}", file=self.stream, flush=True)

    def step(
        self, rnd: int, rounds: int, slot: str, client: int, step: int, total: int, loss: float
    ) -> None:
        if not self.enabled:
            return
        text = f"round {rnd}/{rounds} client {client} ({slot}) step {step}/{total} loss {loss:.4f}"
        text += self.rate(("step", rnd, slot, client), step, total, "step")
        if self.tty:
            print(f"\r\033[K[{self._elapsed()}] {text}", end="", file=self.stream, flush=True)
        elif step == total or step % self.every == 0:
            self.log(text)


def summary_table(history: Sequence[dict[str, Any]]) -> str:
    """One row per round: train loss, held-out loss/perplexity and the category spread."""
    lines = [
        "round  clients  train_loss  eval_loss  eval_ppl  cat_loss_min  cat_loss_max  seconds",
    ]
    for h in history:
        ev = h.get("eval") or {}

        def f(v: Any, width: int, fmt: str = ".4f") -> str:
            return (format(v, fmt) if isinstance(v, float) else "-").rjust(width)

        lines.append(
            f"{h['round']:>5}  {len(h.get('clients', [])):>7}  {f(h.get('train_loss'), 10)}  "
            f"{f(ev.get('loss'), 9)}  {f(ev.get('ppl'), 8, '.2f')}  "
            f"{f(ev.get('category_loss_min'), 12)}  {f(ev.get('category_loss_max'), 12)}  "
            f"{f(h.get('seconds'), 7, '.1f')}"
        )
    return "\n".join(lines)


def _system_note(system: dict[str, Any] | None) -> str:
    if not system:
        return ""
    status = [c["status"] for c in system["clients"]]
    cut = ", ".join(f"{status.count(k)} {k}" for k in ("partial", "dropped") if k in status)
    return (
        f"; {system['online']} online, virtual {system['virtual_s']:.1f}s (clock "
        f"{system['virtual_clock_s']:.1f}s)" + (f", {cut}" if cut else "")
    )


def _tag_note(ev: dict[str, Any] | None) -> str:
    """Per language (the `language` tag of data.sources): each one's loss and the gap."""
    langs = ((ev or {}).get("per_tag") or {}).get("language")
    if not langs or len(langs) < 2:
        return ""
    each = " ".join(f"{v} {x['loss']:.4f}" for v, x in sorted(langs.items()))
    gap = (ev or {}).get("tag_gap", {}).get("language", {}).get("gap")
    return f" [{each}" + (f", gap {gap:.4f}" if gap is not None else "") + "]"


def round_line(row: dict[str, Any], rounds: int) -> str:
    """The progress line of a finished round (one metrics row)."""
    ev = row.get("eval")
    eps = row.get("privacy", {}).get("epsilon")
    loss = row["train_loss"]
    return (
        f"round {row['round']}/{rounds} done: clients {row['clients']} train loss "
        + (
            f"{loss:.4f}"
            if loss is not None
            else "- (" + row.get("loss_note", "no client this round") + ")"
        )
        + (f", held-out loss {ev['loss']:.4f}" if ev else "")
        + _tag_note(ev)
        + (f", epsilon {eps:.3f}" if eps is not None else "")
        + _system_note(row.get("system"))
        + f" ({row['seconds']:.1f}s)"
    )
