"""FedAvg (FedIT), FedProx and FedNova."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from fedit.config import Config
from fedit.lora import AdapterState
from fedit.protocol import ClientPlan, Update
from fedit.server.strategies.base import STRATEGIES, FedAvg


class FedProx(FedAvg):
    """FedAvg whose clients add mu/2 * ||w - w_global||^2 over the LoRA weights to their loss."""

    def client_plan(self, client_id: int, global_state: AdapterState, rnd: int) -> ClientPlan:
        return replace(super().client_plan(client_id, global_state, rnd), prox_mu=self.s.prox_mu)


class FedNova(FedAvg):
    """Normalized averaging (Wang et al. 2020): each client's change is divided by its number of
    local steps tau_i, the average is rescaled by tau_eff = sum_i p_i tau_i, so clients that ran
    more steps do not pull the model further than their data weight."""

    def __init__(self, cfg: Config, num_clients: int) -> None:
        super().__init__(cfg, num_clients)
        self._factor_space_only("fednova")
        self._mean_only("fednova")

    def aggregate(self, global_state: AdapterState, updates: Sequence[Update]) -> AdapterState:
        states = self.clipped(global_state, updates)
        total = float(sum(u.num_examples for u in updates))
        p = [u.num_examples / total for u in updates]
        tau_eff = sum(pi * u.num_steps for pi, u in zip(p, updates, strict=True))
        out: AdapterState = {}
        for k, x in global_state.items():
            d = torch.zeros_like(x, dtype=torch.float64)
            for pi, u, s in zip(p, updates, states, strict=True):
                d += (x.double() - s[k].double()) * (pi / u.num_steps)
            out[k] = (x.double() - self.s.server_lr * tau_eff * d).to(x.dtype)
        return out


STRATEGIES.register("fedavg")(FedAvg)
STRATEGIES.register("fedprox")(FedProx)
STRATEGIES.register("fednova")(FedNova)
