"""Aggregation strategies: pure tensor math over adapter states, cross-round state explicit."""

from fedit.strategies.base import STRATEGIES, Strategy, build_strategy
from fedit.strategies.fedavg import FedAvg, weighted_average

__all__ = ["STRATEGIES", "FedAvg", "Strategy", "build_strategy", "weighted_average"]
