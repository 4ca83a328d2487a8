"""SCAFFOLD (Karimireddy et al. 2020) with control variates kept by the server.

Client i corrects every local gradient by (c - c_i). After K_i local steps with learning rate
eta, its control becomes c_i+ = c_i - c + (x - y_i) / (K_i eta) (the paper's option II). The
server moves x by server_lr times the weighted mean change and c by (1/N) sum of the control
changes, N being all clients of the partition. The per-client controls live here, so they are
checkpointed with the strategy state; with an adaptive local optimizer (AdamW) option II is an
approximation of the drift, as in other LLM ports of SCAFFOLD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from fedit.config import Config
from fedit.lora import AdapterState
from fedit.protocol import ClientPlan, Update
from fedit.server.strategies.base import STRATEGIES, FedAvg


class Scaffold(FedAvg):
    def __init__(self, cfg: Config, num_clients: int) -> None:
        super().__init__(cfg, num_clients)
        self._factor_space_only("scaffold")
        self._mean_only("scaffold")
        self.c: AdapterState = {}
        self.c_i: dict[int, AdapterState] = {}

    def _zeros(self, like: AdapterState) -> AdapterState:
        return {k: torch.zeros_like(v, dtype=torch.float32) for k, v in like.items()}

    def client_plan(self, client_id: int, global_state: AdapterState, rnd: int) -> ClientPlan:
        c = self.c or self._zeros(global_state)
        ci = self.c_i.get(client_id) or self._zeros(global_state)
        correction = {k: (c[k] - ci[k]).to(global_state[k].dtype) for k in global_state}
        return replace(super().client_plan(client_id, global_state, rnd), correction=correction)

    def aggregate(self, global_state: AdapterState, updates: Sequence[Update]) -> AdapterState:
        states = self.clipped(global_state, updates)
        c = self.c or self._zeros(global_state)
        total = float(sum(u.num_examples for u in updates))
        lr = self.cfg.client.lr
        out: AdapterState = {}
        dc: AdapterState = {k: torch.zeros_like(v) for k, v in c.items()}
        for u, s in zip(updates, states, strict=True):
            ci = self.c_i.get(u.client_id) or self._zeros(global_state)
            new_ci = {}
            for k, x in global_state.items():
                new_ci[k] = ci[k] - c[k] + (x.float() - s[k].float()) / (u.num_steps * lr)
                dc[k] += new_ci[k] - ci[k]
            self.c_i[u.client_id] = new_ci
        for k, x in global_state.items():
            step = sum(
                (s[k].double() - x.double()) * (u.num_examples / total)
                for u, s in zip(updates, states, strict=True)
            )
            out[k] = (x.double() + self.s.server_lr * step).to(x.dtype)
        self.c = {k: c[k] + dc[k] / self.num_clients for k in c}
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"c/{k}": v for k, v in self.c.items()}
        for cid, ci in self.c_i.items():
            out.update({f"ci/{cid}/{k}": v for k, v in ci.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.c, self.c_i = {}, {}
        for key, v in state.items():
            kind, rest = key.split("/", 1)
            if kind == "c":
                self.c[rest] = v
            elif kind == "ci":
                cid, k = rest.split("/", 1)
                self.c_i.setdefault(int(cid), {})[k] = v
            else:
                raise ValueError(f"unexpected key {key!r} in scaffold state")


STRATEGIES.register("scaffold")(Scaffold)
