"""Sections of the server's side of a round: client selection and the aggregation strategy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedit.config.fields import check, opt


@dataclass
class SelectionConfig:
    candidates: int = opt(
        0,
        "power_of_choice: candidates d drawn (by size) before the k highest-loss are kept; 0 = 2k.",
    )
    probe_examples: int = opt(
        8, "power_of_choice: examples each candidate scores its current loss on."
    )
    decay: float = opt(
        0.5,
        "coverage: each round's category exposure is multiplied by this before the round's "
        "clients add theirs (0 = only the last round counts).",
    )

    tag: str = opt("", "tag_mix: the data.sources tag whose mix each round holds, e.g. 'language'.")
    shares: dict[str, float] = opt(
        {},
        "tag_mix: target share of the round's clients per tag value, e.g. {en = 0.8, ja = 0.2} "
        "(normalized; empty = each value's share of the clients).",
    )

    def __post_init__(self) -> None:
        check(self.candidates >= 0, "selection.candidates", "must be >= 0")
        for value, x in self.shares.items():
            check(
                isinstance(x, (int, float)) and x >= 0, f"selection.shares.{value}", "must be >= 0"
            )
        check(self.probe_examples >= 1, "selection.probe_examples", "must be >= 1")
        check(0 <= self.decay <= 1, "selection.decay", "must be in [0, 1]")


@dataclass
class StrategyConfig:
    prox_mu: float = opt(
        0.01, "FedProx: weight mu of the client penalty mu/2 * ||w - w_global||^2."
    )
    server_lr: float = opt(1.0, "Server step size for fedavgm, scaffold and fednova.")
    momentum: float = opt(0.9, "FedAvgM: server momentum.")
    adaptive_lr: float = opt(1e-3, "FedAdam / FedYogi / FedAdagrad: server learning rate.")
    beta1: float = opt(
        0.9,
        "FedAdam / FedYogi / FedAdagrad: first-moment decay (fedit's FedAdagrad keeps momentum "
        "too, as Reddi et al.'s Algorithm 2; Flower's fixes it at 0).",
    )
    beta2: float = opt(0.99, "FedAdam / FedYogi: second-moment decay.")
    tau: float = opt(1e-3, "FedAdam / FedYogi / FedAdagrad: adaptivity (epsilon).")
    bias_correction: bool = opt(
        False,
        "FedAdam / FedYogi: scale the server step by sqrt(1 - beta2^t) / (1 - beta1^t) as "
        "Flower's FedAdam does; off = Reddi et al.'s Algorithm 2, without it.",
    )
    weight_by: Literal["examples", "tokens"] = opt(
        "examples",
        "What a client's update is weighted by in aggregation: its number of examples (FedAvg's "
        "data size) or of target tokens (a language its tokenizer splits finely weighs more).",
    )
    lora_aggregation: Literal["naive", "svd", "ffa", "rolora"] = opt(
        "naive",
        "How LoRA factors combine: 'naive' averages A and B apart (FedIT); 'svd' averages the "
        "products B·A exactly and folds them back to rank r by truncated SVD; 'ffa' freezes A "
        "at its shared init and trains and sends only B (exact, half the bytes); 'rolora' "
        "trains B in odd rounds and A in even rounds, the other factor frozen (exact, half "
        "the bytes each round, both factors learn).",
    )
    robust: Literal["mean", "median", "trimmed_mean"] = opt(
        "mean", "Combine client adapters by weighted mean, coordinate-wise median or trimmed mean."
    )
    trim_ratio: float = opt(
        0.1,
        "trimmed_mean: fraction cut from each end per coordinate (floor(ratio x updates) each; "
        "the run warns when that is 0).",
    )
    clip_norm: float = opt(
        0.0, "Clip each client's update (adapter - global) to this L2 norm; 0 = off."
    )
    q: float = opt(
        1.0, "qfedavg: fairness exponent q of q-FFL (0 = the unweighted mean of the clients)."
    )
    qffl_lr: float = opt(
        1.0,
        "qfedavg: the step size 1/L of Li et al. that turns a client's change into its "
        "gradient estimate; large values give the loss^q-weighted mean of the changes.",
    )

    def __post_init__(self) -> None:
        check(self.prox_mu >= 0, "strategy.prox_mu", "must be >= 0")
        check(self.q >= 0, "strategy.q", "must be >= 0")
        check(self.qffl_lr > 0, "strategy.qffl_lr", "must be > 0")
        check(self.server_lr > 0, "strategy.server_lr", "must be > 0")
        check(0 <= self.momentum < 1, "strategy.momentum", "must be in [0, 1)")
        check(self.adaptive_lr > 0, "strategy.adaptive_lr", "must be > 0")
        check(0 <= self.beta1 < 1, "strategy.beta1", "must be in [0, 1)")
        check(0 <= self.beta2 < 1, "strategy.beta2", "must be in [0, 1)")
        check(self.tau > 0, "strategy.tau", "must be > 0")
        check(0 <= self.trim_ratio < 0.5, "strategy.trim_ratio", "must be in [0, 0.5)")
        check(self.clip_norm >= 0, "strategy.clip_norm", "must be >= 0")
