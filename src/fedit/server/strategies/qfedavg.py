"""q-FedAvg (Li, Sanjabi, Beirami and Smith, "Fair Resource Allocation in Federated Learning",
ICLR 2020): the server step of q-FFL, which weighs clients with a higher loss more.

For each client k with loss F_k at the global adapter w and local result w_k:
    dw_k  = L (w - w_k)
    D_k   = F_k^q dw_k
    h_k   = q F_k^(q-1) ||dw_k||^2 + L F_k^q
    w'    = w - sum_k D_k / sum_k h_k
with L = 1 / strategy.qffl_lr. q = 0 gives the unweighted mean of the client adapters. F_k is
the client's loss on its first local batch, measured at the global adapter before its first
step (`first_step_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedit.config import Config, ConfigError
from fedit.lora import AdapterState
from fedit.protocol import Update
from fedit.server.strategies.base import STRATEGIES, FedAvg


class QFedAvg(FedAvg):
    def __init__(self, cfg: Config, num_clients: int) -> None:
        super().__init__(cfg, num_clients)
        self._factor_space_only("qfedavg")
        self._mean_only("qfedavg")

    def aggregate(self, global_state: AdapterState, updates: Sequence[Update]) -> AdapterState:
        states = self.clipped(global_state, updates)
        q, lip = self.s.q, 1.0 / self.s.qffl_lr
        num: dict[str, torch.Tensor] = {
            k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()
        }
        h_total = 0.0
        for u, s in zip(updates, states, strict=True):
            loss = float(u.metrics.get("first_step_loss", float("nan")))
            if not loss > 0:
                raise ConfigError(
                    f"federation.strategy='qfedavg': client {u.client_id} reported no positive "
                    f"first_step_loss ({loss}); q-FFL weighs clients by their loss"
                )
            dw = {k: lip * (x.double() - s[k].double()) for k, x in global_state.items()}
            sq = sum(float((d * d).sum()) for d in dw.values())
            for k, d in dw.items():
                num[k] += loss**q * d
            h_total += q * loss ** (q - 1) * sq + lip * loss**q
        return {k: (x.double() - num[k] / h_total).to(x.dtype) for k, x in global_state.items()}


STRATEGIES.register("qfedavg")(QFedAvg)
