"""Client-level differential privacy: DP-FedAvg (McMahan et al., 2018).

Each client's update delta is clipped to L2 norm `privacy.clip_norm` (over the whole adapter);
the server averages the clipped deltas with equal weights over the `m` clients of the round
and adds Gaussian noise of standard deviation `noise_multiplier * clip_norm / m` to the
average. Adding or removing one client changes the sum by at most `clip_norm`, so each round is
a Gaussian mechanism with that noise multiplier on a `m / num_clients` sample of the clients.
The privacy loss over rounds is accounted by opacus's RDP accountant (sampled Gaussian
mechanism; it assumes Poisson sampling, fedit samples a fixed number of clients uniformly,
the usual approximation).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedit.lora import AdapterState


def clip(delta: AdapterState, bound: float) -> tuple[AdapterState, float]:
    """`delta` scaled to L2 norm <= bound; also returns the norm before clipping."""
    norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in delta.values()))
    factor = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in delta.items()}, norm


def gaussian_noise(like: AdapterState, std: float, generator: torch.Generator) -> AdapterState:
    return {
        k: torch.randn(v.shape, generator=generator, dtype=torch.float32) * std
        for k, v in like.items()
    }


class Accountant:
    """Epsilon spent so far at `delta`, by opacus's RDP accountant."""

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float) -> None:
        from opacus.accountants import RDPAccountant

        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.acc = RDPAccountant()

    def step(self) -> None:
        self.acc.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.acc.history)

    def epsilon(self) -> float:
        if not self.acc.history:
            return 0.0
        return float(self.acc.get_epsilon(delta=self.delta))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.acc.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.acc.history = [tuple(h) for h in state.get("history", [])]
