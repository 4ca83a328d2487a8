"""The strategy interface, its registry, and FedAvg's shared combining step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from fedit.config import Config, ConfigError
from fedit.lora import AdapterState
from fedit.protocol import ClientPlan, Update
from fedit.registry import Registry
from fedit.server.strategies.aggregate import (
    clip_update,
    coordinate_median,
    svd_average,
    trimmed_mean,
    weighted_average,
)


class Strategy(Protocol):
    """Turns the global adapter and this round's client updates into the next global adapter.

    Cross-round state (momentum, optimizer moments, control variates) lives in `state_dict()` so
    that checkpoints capture it and `--resume` restores it exactly.
    """

    def client_plan(self, client_id: int, global_state: AdapterState, rnd: int) -> ClientPlan: ...

    def aggregate(self, global_state: AdapterState, updates: Sequence[Update]) -> AdapterState: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


# name -> factory(config, number of clients in the partition)
STRATEGIES: Registry[Callable[[Config, int], Strategy]] = Registry("strategy")


def build_strategy(cfg: Config, num_clients: int) -> Strategy:
    return STRATEGIES.get(cfg.federation.strategy)(cfg, num_clients)


def full_states(global_state: AdapterState, updates: Sequence[Update]) -> list[AdapterState]:
    """Client states with keys a client did not send (FFA-LoRA's frozen A) taken from global."""
    return [{**global_state, **u.state} for u in updates]


class FedAvg:
    """FedIT's aggregation: the example-weighted mean of the client adapters.

    The combining step honours `strategy.clip_norm`, `strategy.robust` and
    `strategy.lora_aggregation`; the other strategies reuse it.
    """

    def __init__(self, cfg: Config, num_clients: int) -> None:
        self.cfg = cfg
        self.s = cfg.strategy
        self.num_clients = num_clients

    def _factor_space_only(self, name: str) -> None:
        if self.s.lora_aggregation == "svd":
            raise ConfigError(
                f"federation.strategy={name!r} steps in LoRA factor space; it cannot combine with "
                "strategy.lora_aggregation='svd', which changes the factor basis every round"
            )

    def _mean_only(self, name: str) -> None:
        if self.s.robust != "mean":
            raise ConfigError(f"federation.strategy={name!r} needs strategy.robust='mean'")

    def client_plan(self, client_id: int, global_state: AdapterState, rnd: int) -> ClientPlan:
        ranks = self.cfg.lora.client_ranks
        how = self.s.lora_aggregation
        # RoLoRA starts with B: LoRA's B is zero at init, so A's gradient is zero until B moves.
        b_round = rnd % 2 == 1
        return ClientPlan(
            train_lora_A=how not in ("ffa", "rolora") or (how == "rolora" and not b_round),
            train_lora_B=how != "rolora" or b_round,
            rank=ranks[client_id % len(ranks)] if ranks else None,
        )

    def clipped(self, global_state: AdapterState, updates: Sequence[Update]) -> list[AdapterState]:
        states = (
            full_states(global_state, updates)
            if self.s.lora_aggregation != "svd"
            else [u.state for u in updates]
        )
        if self.s.clip_norm and self.s.lora_aggregation != "svd":
            states = [clip_update(s, global_state, self.s.clip_norm) for s in states]
        return states

    def combine(self, global_state: AdapterState, updates: Sequence[Update]) -> AdapterState:
        states = self.clipped(global_state, updates)
        weights = [float(u.num_examples) for u in updates]
        if self.s.lora_aggregation == "svd":
            dtype = next(iter(global_state.values())).dtype
            return svd_average(states, weights, self.cfg.lora.r, dtype)
        if self.s.robust == "median":
            return coordinate_median(states)
        if self.s.robust == "trimmed_mean":
            return trimmed_mean(states, self.s.trim_ratio)
        return weighted_average(states, weights)

    def aggregate(self, global_state: AdapterState, updates: Sequence[Update]) -> AdapterState:
        return self.combine(global_state, updates)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)[:3]}")
