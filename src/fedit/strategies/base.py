"""The strategy interface and its registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from fedit.client import Update
from fedit.config import Config
from fedit.lora import AdapterState
from fedit.registry import Registry


class Strategy(Protocol):
    """Turns the global adapter and this round's client updates into the next global adapter.

    Any state carried across rounds (momentum, control variates) lives in `state_dict()` so that
    checkpoints capture it and `--resume` restores it exactly.
    """

    def aggregate(self, global_state: AdapterState, updates: Sequence[Update]) -> AdapterState: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


STRATEGIES: Registry[Callable[[Config], Strategy]] = Registry("strategy")


def build_strategy(cfg: Config) -> Strategy:
    return STRATEGIES.get(cfg.federation.strategy)(cfg)
