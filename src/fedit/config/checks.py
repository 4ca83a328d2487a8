"""Checks that span sections."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedit.config.fields import ConfigError

if TYPE_CHECKING:
    from fedit.config.tree import Config


def check_sections(cfg: Config) -> None:
    """Combinations of keys that cannot work together, named by their keys."""
    s = cfg.strategy
    if cfg.lora.client_ranks and s.lora_aggregation != "svd":
        raise ConfigError(
            "lora.client_ranks: heterogeneous ranks need strategy.lora_aggregation='svd' "
            f"(got {s.lora_aggregation!r})"
        )
    lossy = cfg.compression.method not in ("none", "fp16")
    if lossy and cfg.compression.error_feedback and cfg.federation.workers > 1:
        raise ConfigError(
            "compression.error_feedback keeps each client's residual in the process that "
            "trains it; with federation.workers > 1 a client moves between processes: "
            "set federation.workers=1 or compression.error_feedback=false"
        )
    if cfg.compression.method != "none" and cfg.lora.client_ranks:
        raise ConfigError("compression.method: not supported with lora.client_ranks")
    if cfg.privacy.clip_norm and (
        cfg.federation.strategy != "fedavg" or s.lora_aggregation == "svd"
    ):
        raise ConfigError(
            "privacy.clip_norm: DP-FedAvg replaces the aggregation; it needs "
            "federation.strategy='fedavg' with strategy.lora_aggregation 'naive' or 'ffa' "
            f"(got {cfg.federation.strategy!r}, {s.lora_aggregation!r})"
        )
    if s.lora_aggregation == "svd" and s.robust != "mean":
        raise ConfigError(
            f"strategy.robust={s.robust!r} works on adapter coordinates; it cannot combine "
            "with strategy.lora_aggregation='svd' (use 'naive' or 'ffa')"
        )
