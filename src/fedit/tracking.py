"""Per-round metrics as TensorBoard event files (`tensorboard --logdir runs/`).

The same numbers as metrics.jsonl, under the run folder's `tensorboard/`: train loss,
held-out loss and perplexity overall and per category, the category spread, bytes sent,
epsilon, the round's seconds. Written through tensorboardX (no TensorFlow, no torch hooks);
a round costs a few small writes, so it is on by default (`eval.tensorboard`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Board:
    """A SummaryWriter over one run folder, fed one metrics row per round."""

    def __init__(self, folder: Path) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(folder), flush_secs=10)

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        add = self.writer.add_scalar

        def scalar(tag: str, value: Any) -> None:
            if isinstance(value, int | float) and not isinstance(value, bool):
                add(tag, float(value), step)

        scalar("train/loss", row.get("train_loss"))
        scalar("train/clients", len(row.get("clients") or []))
        ev = row.get("eval") or {}
        scalar("heldout/loss", ev.get("loss"))
        scalar("heldout/ppl", ev.get("ppl"))
        for cat, v in (ev.get("per_category") or {}).items():
            scalar(f"heldout_category/{cat}", v.get("loss"))
        for tag, values in (ev.get("per_tag") or {}).items():
            for value, v in values.items():
                scalar(f"heldout_{tag}/{value}", v.get("loss"))
                scalar(f"heldout_{tag}_per_example/{value}", v.get("example_loss"))
        for tag, gap in (ev.get("tag_gap") or {}).items():
            scalar(f"heldout_{tag}/gap", gap.get("gap"))
        for key, value in ((ev.get("fairness") or {}).get("clients") or {}).items():
            scalar(f"fairness_clients/{key}", value)
        own = ev.get("own_data") or {}
        for key in ("mean", "worst", "std"):
            scalar(f"own_data/{key}", own.get(key))
        for client, v in (own.get("clients") or {}).items():
            scalar(f"own_data_client/{client}", v.get("loss"))
        for key in ("up_total", "down_total"):
            scalar(f"bytes/{key}", (row.get("bytes") or {}).get(key))
        scalar("privacy/epsilon", (row.get("privacy") or {}).get("epsilon"))
        scalar("time/seconds", row.get("seconds"))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
