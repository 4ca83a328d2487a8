"""Faulty clients: screening updates, injected faults for tests and demos, crash points."""

from __future__ import annotations

import math
import os
import signal
import statistics
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from fedit.client import Update
from fedit.errors import FeditError
from fedit.lora import AdapterState

HUGE = 1e6


class RoundError(FeditError):
    """A round without enough valid updates; the global adapter is left as it was."""


def _like(reference: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`reference` cut to `value`'s shape (a client of lower LoRA rank sends a leading slice)."""
    if reference.shape == value.shape:
        return reference
    return reference[tuple(slice(0, n) for n in value.shape)]


def delta_norm(update: Update, global_state: AdapterState) -> float:
    sq = 0.0
    for k, v in update.state.items():
        sq += float((v.double() - _like(global_state[k], v).double()).pow(2).sum())
    return math.sqrt(sq)


def inject(update: Update, kinds: Sequence[str], global_state: AdapterState) -> Update:
    """Corrupt an update as asked: 'nan' poisons it, 'huge' scales its change by 1e6."""
    state = update.state
    if "huge" in kinds:
        state = {
            k: _like(global_state[k], v) + (v - _like(global_state[k], v)) * HUGE
            for k, v in state.items()
        }
    if "nan" in kinds:
        state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    return replace(update, state=state)


def screen(
    updates: Sequence[Update], global_state: AdapterState, max_norm_ratio: float
) -> tuple[list[Update], list[dict[str, Any]]]:
    """Split updates into accepted and rejected (with the reason).

    Rejected: any non-finite value; a change whose norm exceeds `max_norm_ratio` times the
    median norm of the round's other finite updates (leave-one-out, so one attacker cannot
    drag the reference up with it).
    """
    finite, rejected = [], []
    for u in updates:
        if all(bool(torch.isfinite(v).all()) for v in u.state.values()):
            finite.append(u)
        else:
            rejected.append({"client": u.client_id, "reason": "non-finite values in the update"})
    norms = [delta_norm(u, global_state) for u in finite]
    accepted = []
    for i, u in enumerate(finite):
        others = norms[:i] + norms[i + 1 :]
        ref = statistics.median(others) if others else 0.0
        if max_norm_ratio and ref > 0 and norms[i] > max_norm_ratio * ref:
            rejected.append(
                {
                    "client": u.client_id,
                    "reason": f"update norm {norms[i]:.3g} is {norms[i] / ref:.3g}x the median "
                    f"of the others ({ref:.3g}); limit federation.max_norm_ratio={max_norm_ratio}",
                }
            )
        else:
            accepted.append(u)
    return accepted, rejected


def crash_now() -> None:
    """SIGKILL this process: no cleanup handler runs, exactly like a power cut or OOM kill."""
    os.kill(os.getpid(), signal.SIGKILL)
