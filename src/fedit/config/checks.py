"""Checks that span sections."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedit.config.fields import ConfigError
from fedit.faults import SERVER_KINDS

if TYPE_CHECKING:
    from fedit.config.tree import Config


def _clients(cfg: Config) -> int | None:
    """How many clients the partition will have, when the config alone says."""
    if cfg.partition.pooled:
        return 1
    if cfg.partition.only:
        return len(cfg.partition.only)
    return cfg.partition.num_clients or None  # 'natural' with 0: one per distinct value


def _check_faults(cfg: Config) -> None:
    """A fault that could never happen is a mistake in the spec, not a no-op."""
    rounds, clients = cfg.federation.rounds, _clients(cfg)
    for i, spec in enumerate(cfg.faults.inject):
        kind, client, rnd = spec.split(":")
        secure = cfg.privacy.secure_aggregation
        if secure and kind in SERVER_KINDS:
            raise ConfigError(
                f"faults.inject[{i}]: {kind!r} corrupts one update as the server receives it; "
                "under privacy.secure_aggregation the server receives only the sum (the fault "
                "of a secure round is 'leave')"
            )
        if kind == "leave" and not secure:
            raise ConfigError(
                f"faults.inject[{i}]: 'leave' (a node exits after sending its masked update) is "
                "a fault of the secure-aggregation protocol; it needs "
                "privacy.secure_aggregation = true on `fedit federate`"
            )
        if rnd != "*" and not 1 <= int(rnd) <= rounds:
            raise ConfigError(
                f"faults.inject[{i}]: {spec!r} names round {rnd}; the run has rounds 1.."
                f"{rounds} (federation.rounds)"
            )
        if client != "*" and clients is not None and int(client) >= clients:
            raise ConfigError(
                f"faults.inject[{i}]: {spec!r} names client {client}; the partition has clients "
                f"0..{clients - 1}"
            )
    if cfg.faults.crash:
        at = int(cfg.faults.crash.split(":")[1])
        if not 1 <= at <= rounds:
            raise ConfigError(
                f"faults.crash: {cfg.faults.crash!r} names round {at}; the run has rounds 1.."
                f"{rounds} (federation.rounds)"
            )


# Server rules that need only the weighted sum of the round's updates.
SUM_BASED = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


def _check_secure(cfg: Config) -> None:
    """Secure aggregation hides each update: refuse what needs one on the server."""
    s = cfg.strategy
    needs_each = [
        (cfg.federation.strategy not in SUM_BASED, "federation.strategy",
         f"{cfg.federation.strategy!r} (use one of {', '.join(SUM_BASED)})"),
        (s.lora_aggregation == "svd", "strategy.lora_aggregation", "'svd' (folds each update)"),
        (s.robust != "mean", "strategy.robust", f"{s.robust!r}"),
        (bool(s.clip_norm), "strategy.clip_norm", f"{s.clip_norm:g} (clips each update)"),
        (bool(cfg.lora.client_ranks), "lora.client_ranks", "heterogeneous ranks"),
        (cfg.compression.method != "none", "compression.method",
         f"{cfg.compression.method!r} (SecAgg+ quantizes the masked vector itself)"),
    ]  # fmt: skip
    k = cfg.federation.clients_per_round
    if not cfg.privacy.clip_norm and isinstance(k, int) and k < 2:
        raise ConfigError(
            "federation.clients_per_round: secure aggregation hides one update only among "
            f"others; it needs at least 2 clients a round (got {k})"
        )
    for bad, key, what in needs_each:
        if bad:
            raise ConfigError(
                f"{key}: {what} needs each client's own update on the server, which "
                "privacy.secure_aggregation=true hides; the server sees only the sum"
            )


def _check_personal(cfg: Config) -> None:
    method = cfg.personalization.method
    if cfg.data.client_test_fraction and cfg.privacy.clip_norm:
        raise ConfigError(
            "data.client_test_fraction: each client's own-data loss would leave the client "
            "outside the DP guarantee (privacy.clip_norm); evaluate on the global test split"
        )
    if method == "none":
        return
    if method == "fedsa":
        s = cfg.strategy
        if s.lora_aggregation != "naive" or cfg.lora.client_ranks:
            raise ConfigError(
                "personalization.method='fedsa' shares A and keeps B: it needs "
                f"strategy.lora_aggregation='naive' and no lora.client_ranks (got "
                f"{s.lora_aggregation!r})"
            )
        if cfg.privacy.secure_aggregation or cfg.privacy.clip_norm:
            raise ConfigError(
                "personalization.method='fedsa': not with secure aggregation or DP yet "
                "(both would have to cover A alone)"
            )


def _check_tags(cfg: Config) -> None:
    """tag_mix selection and token weighting: what they need to be there."""
    if cfg.federation.selection == "tag_mix":
        tag = cfg.selection.tag
        if not tag:
            raise ConfigError("selection.tag: federation.selection='tag_mix' needs the tag to mix")
        if not cfg.data.sources:
            raise ConfigError(
                "federation.selection='tag_mix': needs data.sources, whose tags the clients carry"
            )
        for i, src in enumerate(cfg.data.sources):
            if tag not in src.get("tags", {}) and tag != "source":
                raise ConfigError(
                    f"data.sources[{i}].tags.{tag}: missing; federation.selection='tag_mix' "
                    f"mixes the clients by their {tag!r}"
                )
    if cfg.strategy.weight_by == "tokens" and (
        cfg.privacy.secure_aggregation or cfg.privacy.clip_norm
    ):
        raise ConfigError(
            "strategy.weight_by='tokens': not with secure aggregation or DP, which fix each "
            "client's weight themselves (by examples, or equal)"
        )


def check_sections(cfg: Config) -> None:
    """Combinations of keys that cannot work together, named by their keys."""
    _check_faults(cfg)
    _check_personal(cfg)
    _check_tags(cfg)
    k = cfg.federation.clients_per_round
    if isinstance(k, int) and cfg.federation.min_clients > k:
        raise ConfigError(
            f"federation.min_clients={cfg.federation.min_clients}: more than the {k} clients "
            "sampled per round (federation.clients_per_round); no round could succeed"
        )
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
        cfg.federation.strategy != "fedavg" or s.lora_aggregation not in ("naive", "ffa")
    ):
        raise ConfigError(
            "privacy.clip_norm: DP-FedAvg replaces the aggregation; it needs "
            "federation.strategy='fedavg' with strategy.lora_aggregation 'naive' or 'ffa' "
            f"(got {cfg.federation.strategy!r}, {s.lora_aggregation!r})"
        )
    if cfg.privacy.clip_norm and (s.robust != "mean" or s.clip_norm):
        raise ConfigError(
            "privacy.clip_norm: DP-FedAvg clips and sums every update itself; "
            f"strategy.robust={s.robust!r} and strategy.clip_norm={s.clip_norm:g} would be "
            "ignored: leave them at 'mean' and 0"
        )
    if cfg.privacy.clip_norm and cfg.federation.selection not in ("uniform", "poisson"):
        raise ConfigError(
            f"federation.selection={cfg.federation.selection!r}: DP-FedAvg's accountant bounds "
            "the privacy loss only when every client is sampled on its own with the same "
            "probability (Poisson sampling, which DP runs use); this rule's inclusion "
            "probabilities it cannot bound: use 'uniform' or 'poisson'"
        )
    sysc = cfg.system
    if cfg.privacy.clip_norm and (sysc.availability or sysc.diurnal or sysc.profiles):
        raise ConfigError(
            "system.availability: a client that is offline cannot be sampled, so its inclusion "
            "probability is not the rate DP-FedAvg's accountant assumes; under privacy.clip_norm "
            "leave system.availability, system.diurnal and system.profiles unset"
        )
    if cfg.privacy.secure_aggregation and sysc.enabled:
        raise ConfigError(
            "system: simulated client systems (speed, availability, deadline) are not modelled "
            "under privacy.secure_aggregation, where a late node is a protocol dropout; unset "
            "the system section"
        )
    if sysc.straggler == "partial" and not sysc.deadline:
        raise ConfigError("system.straggler='partial' needs system.deadline > 0")
    if cfg.privacy.secure_aggregation:
        _check_secure(cfg)
    if s.lora_aggregation == "svd" and s.robust != "mean":
        raise ConfigError(
            f"strategy.robust={s.robust!r} works on adapter coordinates; it cannot combine "
            "with strategy.lora_aggregation='svd' (use 'naive' or 'ffa')"
        )
