"""Server optimizers on the pseudo-gradient: FedAvgM, FedAdam, FedYogi, FedAdagrad.

Reddi et al., "Adaptive Federated Optimization" (2021): delta = combine(clients) - x;
m = b1 m + (1 - b1) delta; v per optimizer; x += lr * m / (sqrt(v) + tau), as their
Algorithm 2 (no bias correction; `strategy.bias_correction` applies Flower's FedAdam scaling
lr * sqrt(1 - b2^t) / (1 - b1^t) for FedAdam and FedYogi; FedAdagrad keeps b1 momentum, where
Flower fixes b1 = 0). FedAvgM (Hsu et al.
2019): v = momentum * v + delta; x += server_lr * v.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedit.config import Config
from fedit.lora import AdapterState
from fedit.protocol import Update
from fedit.server.strategies.base import STRATEGIES, FedAvg

KINDS = ("avgm", "adam", "yogi", "adagrad")


class ServerOptimizer(FedAvg):
    def __init__(self, cfg: Config, num_clients: int, kind: str) -> None:
        super().__init__(cfg, num_clients)
        if kind not in KINDS:
            raise ValueError(f"unknown server optimizer {kind!r}; known: {KINDS}")
        self.kind = kind
        self._factor_space_only(f"fed{kind}")
        self.m: AdapterState = {}
        self.v: AdapterState = {}
        self.step = 0  # server steps taken (for strategy.bias_correction)

    def aggregate(self, global_state: AdapterState, updates: Sequence[Update]) -> AdapterState:
        combined = self.combine(global_state, updates)
        s = self.s
        self.step += 1
        lr = s.adaptive_lr
        if s.bias_correction and self.kind in ("adam", "yogi"):
            lr *= (1 - s.beta2**self.step) ** 0.5 / (1 - s.beta1**self.step)
        out: AdapterState = {}
        for k, x in global_state.items():
            delta = combined[k].double() - x.double()
            if self.kind == "avgm":
                v = self.v.get(k, torch.zeros_like(delta)) * s.momentum + delta
                self.v[k] = v
                out[k] = (x.double() + s.server_lr * v).to(x.dtype)
                continue
            m = self.m.get(k, torch.zeros_like(delta)) * s.beta1 + (1 - s.beta1) * delta
            v = self.v.get(k, torch.full_like(delta, s.tau**2))
            d2 = delta * delta
            if self.kind == "adagrad":
                v = v + d2
            elif self.kind == "adam":
                v = s.beta2 * v + (1 - s.beta2) * d2
            else:  # yogi
                v = v - (1 - s.beta2) * d2 * torch.sign(v - d2)
            self.m[k], self.v[k] = m, v
            out[k] = (x.double() + lr * m / (v.sqrt() + s.tau)).to(x.dtype)
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{f"m/{k}": t for k, t in self.m.items()},
            **{f"v/{k}": t for k, t in self.v.items()},
            "step": torch.tensor([self.step]),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.m = {k[2:]: t.double() for k, t in state.items() if k.startswith("m/")}
        self.v = {k[2:]: t.double() for k, t in state.items() if k.startswith("v/")}
        # Checkpoints from before the step was kept come from runs without bias correction,
        # which never reads it.
        self.step = int(state["step"][0]) if "step" in state else 0
        if len(self.m) + len(self.v) + ("step" in state) != len(state):
            raise ValueError(f"unexpected keys in fed{self.kind} state")


def _factory(kind: str) -> Callable[[Config, int], ServerOptimizer]:
    return lambda cfg, n: ServerOptimizer(cfg, n, kind)


for _kind in KINDS:
    STRATEGIES.register(f"fed{_kind}")(_factory(_kind))
