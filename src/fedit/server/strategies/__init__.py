"""Aggregation strategies: pure tensor math over adapter states, cross-round state explicit."""

from fedit.server.strategies import fedavg, qfedavg, scaffold, serveropt
from fedit.server.strategies.aggregate import (
    coordinate_median,
    fold_svd,
    stack_factors,
    svd_average,
    trimmed_mean,
    weighted_average,
)
from fedit.server.strategies.base import STRATEGIES, FedAvg, Strategy, build_strategy

__all__ = [
    "STRATEGIES",
    "FedAvg",
    "Strategy",
    "build_strategy",
    "coordinate_median",
    "fedavg",
    "fold_svd",
    "qfedavg",
    "scaffold",
    "serveropt",
    "stack_factors",
    "svd_average",
    "trimmed_mean",
    "weighted_average",
]
