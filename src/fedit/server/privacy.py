"""Client-level differential privacy: DP-FedAvg (McMahan et al., 2018) as a strategy wrapper.

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

from collections.abc import Sequence
from typing import Any

import torch

from fedit.config import PrivacyConfig
from fedit.deltas import clipped_delta, gaussian_noise
from fedit.lora import AdapterState
from fedit.protocol import ClientPlan, Update
from fedit.seeding import derive_seed
from fedit.server.strategies.base import Strategy, full_states

ROUNDS_KEY = "dp.rounds"

__all__ = ["Accountant", "DPFedAvg", "clipped_delta", "gaussian_noise"]


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

    def after(self, rounds: int) -> float:
        """Epsilon after `rounds` rounds in all (this accountant is left as it is)."""
        probe = Accountant(self.noise_multiplier, self.sample_rate, self.delta)
        if rounds:
            probe.acc.history = [(self.noise_multiplier, self.sample_rate, rounds)]
        return probe.epsilon()

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.acc.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.acc.history = [tuple(h) for h in state.get("history", [])]


class DPFedAvg:
    """DP-FedAvg around a FedAvg-family strategy: its client plans, its own aggregation.

    The strategy's cross-round state is the number of rounds aggregated, which fixes both the
    accountant and the round's noise seed, so a resumed run noises and accounts as an
    uninterrupted one.
    """

    def __init__(
        self, inner: Strategy, cfg: PrivacyConfig, seed: int, per_round: int, num_clients: int
    ) -> None:
        self.inner = inner
        self.p = cfg
        self.seed = seed
        self.per_round = per_round
        self.rounds = 0
        self.accountant: Accountant | None = None
        if cfg.noise_multiplier:
            self.accountant = Accountant(cfg.noise_multiplier, per_round / num_clients, cfg.delta)
        self.report: dict[str, Any] = {}

    def client_plan(self, client_id: int, global_state: AdapterState, rnd: int) -> ClientPlan:
        return self.inner.client_plan(client_id, global_state, rnd)

    def aggregate(self, global_state: AdapterState, updates: Sequence[Update]) -> AdapterState:
        p, g = self.p, global_state
        total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in g.items()}
        norms = []
        for state in full_states(g, updates):  # FFA-LoRA's clients send no A: its delta is 0
            clipped, norm = clipped_delta({k: state[k] for k in g}, g, p.clip_norm)
            norms.append(norm)
            for k, v in clipped.items():
                total[k] += v
        std = p.noise_multiplier * p.clip_norm
        if std:
            # Noise on what clients can change: FFA-LoRA's clients train no A, so A gets none.
            train_a = self.inner.client_plan(0, g, 1).train_lora_A  # known in an empty round
            noisy = [k for k in g if train_a or ".lora_A." not in k]
            rnd = self.rounds + 1
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "dp-noise", rnd))
            for k, v in gaussian_noise({k: g[k] for k in noisy}, std, gen).items():
                total[k] += v.double()
        m = self.per_round  # fixed denominator: one client changes the mean by <= clip/m
        self._release({
            "clip_norm": p.clip_norm,
            "update_norms": norms,
            "clipped": sum(n > p.clip_norm for n in norms),
            "noise_std_of_mean": std / m,
        })  # fmt: skip
        return {k: (g[k].double() + total[k] / m).to(g[k].dtype) for k in g}

    def _release(self, report: dict[str, Any]) -> None:
        """One round counted and accounted, whatever it released; its report."""
        self.rounds += 1
        if self.accountant is not None:
            self.accountant.step()
            report.update(epsilon=self.accountant.epsilon(), delta=self.p.delta)
        self.report = report

    def skip_round(self) -> None:
        """A round that releases nothing (no secure sum could be formed) still counts, for the
        accountant too: conservative."""
        self._release({"clip_norm": self.p.clip_norm, "clients": 0})

    def aggregate_noised_sum(
        self, global_state: AdapterState, total: AdapterState, clients: int, noise_std: float
    ) -> AdapterState:
        """Secure aggregation: the clients clipped their deltas and added the noise in shares
        (`noise_std` each); the server only divides the sum it unmasked by the fixed m."""
        g, m = global_state, self.per_round
        self._release({
            "clip_norm": self.p.clip_norm,
            "clients": clients,
            "noise_std_of_mean": noise_std * clients**0.5 / m,
            "noise_added_by": "clients (secure aggregation)",
        })  # fmt: skip
        return {
            k: (g[k].double() + total[k].double() / m).to(g[k].dtype) if k in total else g[k]
            for k in g
        }

    def round_metrics(self) -> dict[str, Any]:
        return {"privacy": self.report}

    def epsilon_after_next_round(self) -> float | None:
        return None if self.accountant is None else self.accountant.after(self.rounds + 1)

    def summary(self) -> dict[str, Any] | None:
        if self.accountant is None:
            return None
        p, a = self.p, self.accountant
        return {"epsilon": a.epsilon(), "delta": p.delta, "noise_multiplier": p.noise_multiplier,
                "clip_norm": p.clip_norm, "sampling": "poisson", "sample_rate": a.sample_rate,
                "accountant": "opacus RDP (Poisson-subsampled Gaussian)"}  # fmt: skip

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.inner.state_dict(), ROUNDS_KEY: torch.tensor([self.rounds])}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        rest = dict(state)
        self.rounds = int(rest.pop(ROUNDS_KEY)[0]) if ROUNDS_KEY in rest else 0
        if self.accountant is not None:  # one Gaussian-mechanism step per round
            a = self.accountant
            a.load_state_dict({"history": [(a.noise_multiplier, a.sample_rate, self.rounds)]})
            if not self.rounds:
                a.load_state_dict({})
        self.inner.load_state_dict(rest)
