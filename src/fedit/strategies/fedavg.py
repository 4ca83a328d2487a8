"""FedAvg weighted by client example counts: the paper's FedIT aggregation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedit.client import Update
from fedit.config import Config
from fedit.lora import AdapterState
from fedit.strategies.base import STRATEGIES


def weighted_average(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """sum_i w_i * state_i / sum_i w_i, key by key; accumulated in float64."""
    if not states:
        raise ValueError("nothing to average: no client updates")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError("client updates have different adapter keys")
    out: AdapterState = {}
    for k in keys:
        acc = torch.zeros_like(states[0][k], dtype=torch.float64)
        for s, w in zip(states, weights, strict=True):
            acc += s[k].to(torch.float64) * (w / total)
        out[k] = acc.to(states[0][k].dtype)
    return out


class FedAvg:
    """The new global adapter is the example-weighted mean of the client adapters.

    A and B are averaged separately, as in FedIT and Shepherd.
    """

    def __init__(self, cfg: Config | None = None) -> None:
        pass

    def aggregate(self, global_state: AdapterState, updates: Sequence[Update]) -> AdapterState:
        return weighted_average([u.state for u in updates], [u.num_examples for u in updates])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"FedAvg keeps no state, got keys {sorted(state)[:3]}")


STRATEGIES.register("fedavg")(FedAvg)
