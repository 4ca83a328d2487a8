"""The server's screen against faulty clients: non-finite updates and updates of absurd norm.

Also the faults `faults.inject` simulates: corruptions applied to an update as the server
receives it, so that the screen sees exactly what a faulty client would have sent.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from fedit.lora import AdapterState
from fedit.protocol import Update
from fedit.server.strategies.aggregate import like, update_norm

HUGE = 1e6


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
    norms = [update_norm(u.state, global_state) for u in finite]
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


def inject(update: Update, kinds: Sequence[str], global_state: AdapterState) -> Update:
    """Corrupt an update as received: 'nan' poisons it, 'huge' scales its change by 1e6."""
    state = update.state
    if "huge" in kinds:
        state = {
            k: like(global_state[k], v) + (v - like(global_state[k], v)) * HUGE
            for k, v in state.items()
        }
    if "nan" in kinds:
        state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
    return replace(update, state=state)
