"""Secure aggregation on Flower with Flower's own SecAgg+ (no cryptography of fedit's own).

Flower 1.41 ships SecAgg+ as `SecAggPlusWorkflow` (server) and `secaggplus_mod` (client). The
workflow expects Flower's legacy strategy interface inside a `LegacyContext`; fedit drives it
round by round from its own round loop: a small legacy strategy hands the workflow one `FitIns`
per sampled node (the global adapter and fedit's task) and receives, in `aggregate_fit`, only
what the protocol reveals: the weighted mean of the survivors' vectors, and each survivor's
metrics. On the node, `secure_mod` runs Flower's mod for the protocol's messages; its
"collect masked vectors" stage calls fedit's train function, which answers with the client's
update *delta* (clipped and noised on the client under DP) as a legacy `FitRes`; the mod
weights, quantizes and masks it before anything leaves the node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedit.faults import crash_group
from fedit.protocol import Payload, secagg_threshold

KEYS = "fedit.keys"  # the adapter keys, in the order of the legacy parameter list
WEIGHT = "fedit.weight"  # 'examples' (FedAvg) or 'equal' (DP-FedAvg)
SEED = "fedit.seed"  # seeds the mod's stochastic rounding
LEAVE = "fedit.leave"  # the injected fault 'leave': exit after sending the masked update


# ---------------------------------------------------------------- the node's side


def secure_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for the messages of the SecAgg+ protocol; others pass."""
    from flwr.client.mod import secaggplus_mod

    configs = msg.content.config_records
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in configs:
        return call_next(msg, ctxt)
    stage = str(configs[RECORD_KEY_CONFIGS].get(Key.STAGE, ""))
    task = configs.get("fitins.config")
    if stage == Stage.UNMASK and ctxt.state.config_records.get(LEAVE) is not None:
        crash_group()  # the node leaves after its masked update, before its shares
    if task is not None:
        # The mod rounds stochastically with numpy's global generator; this process serves
        # this one message, so seeding it here makes the rounding (hence the adapter) repeat.
        np.random.seed(int(str(task.get(SEED, 0))) % 2**32)
        if task.get(LEAVE):
            ctxt.state.config_records[LEAVE] = ConfigRecord({"round": int(str(task["round"]))})
        else:
            ctxt.state.config_records.pop(LEAVE, None)
    return secaggplus_mod(msg, ctxt, call_next)


def is_fitins(content: RecordDict) -> bool:
    return "fitins.parameters" in content.array_records


def payload_of_fitins(content: RecordDict, shim_keys: tuple[str, ...]) -> Payload:
    """The fedit task a legacy FitIns carries (without the shim's own keys)."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    keys = json.loads(str(fitins.config[KEYS]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    skip = (KEYS, WEIGHT, SEED, LEAVE, *shim_keys)
    values = {k: v for k, v in fitins.config.items() if k not in skip}
    return Payload({"adapter": dict(zip(keys, arrays, strict=True))}, values)  # type: ignore[arg-type]


def fitres_content(update: Payload, weight: str) -> RecordDict:
    """A client's (secure-mode) update payload as the legacy FitRes the mod masks."""
    delta = update.arrays["state"]
    n = int(update.values["num_examples"])
    metrics: dict[str, Any] = {"client": int(update.values["client"])}
    if weight != "equal":  # FedAvg: the server sees each client's size and training metrics
        metrics.update({k: v for k, v in update.values.items() if k.startswith("metric.")})
        metrics.update(num_examples=n, num_steps=int(update.values["num_steps"]))
    # Under DP (equal weights) nothing data-dependent leaves the node outside the noised sum:
    # no loss, no size, no "was clipped".
    parameters = ndarrays_to_parameters([delta[k].astype(np.float32) for k in sorted(delta)])
    fitres = FitRes(Status(Code.OK, ""), parameters, 1 if weight == "equal" else n, metrics)
    return compat.fitres_to_recorddict(fitres, keep_input=True)


# ---------------------------------------------------------------- the server's side


@dataclass
class SecureSum:
    """What one secure round reveals to the server."""

    mean: dict[str, np.ndarray]  # weighted mean of the survivors' deltas
    weight: float  # their total weight (examples, or clients under DP)
    clients: list[dict[str, Any]] = field(default_factory=list)  # each survivor's metrics


def _legacy_strategy(instructions: list[tuple[Any, FitIns]]) -> Any:
    from flwr.server.strategy import Strategy

    class Collect(Strategy):
        """Hands the workflow fedit's instructions and keeps what `aggregate_fit` reveals."""

        def __init__(self) -> None:
            self.results: list[tuple[Any, FitRes]] | None = None

        def initialize_parameters(self, client_manager: Any) -> Parameters | None:
            return None

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            return instructions

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            self.results = list(results)
            return None, {}

        def configure_evaluate(self, *args: Any) -> list[Any]:
            return []

        def aggregate_evaluate(self, *args: Any) -> Any:
            return None, {}

        def evaluate(self, *args: Any) -> Any:
            return None

    return Collect()


def secure_round(
    grid: Any,
    context: Context,
    rnd: int,
    fitins: dict[int, FitIns],
    keys: list[str],
    max_weight: float,
    clipping_range: float,
    timeout: float,
) -> SecureSum | None:
    """One round of SecAgg+ over the nodes in `fitins`; None when the protocol halted."""
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD

    proxies = [(GridClientProxy(n, grid, context.run_id), f) for n, f in fitins.items()]
    collect = _legacy_strategy(proxies)
    legacy = LegacyContext(context, strategy=collect)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({"current_round": rnd})
    first = next(iter(fitins.values()))
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        first.parameters, keep_input=True
    )
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every node shares its secrets with every other (small cohorts)
        reconstruction_threshold=secagg_threshold(len(fitins)),
        max_weight=max_weight,
        clipping_range=clipping_range,
        timeout=timeout,
    )
    workflow(grid, legacy)
    if not collect.results:
        return None
    mean = parameters_to_ndarrays(collect.results[0][1].parameters)
    clients = [dict(res.metrics) for _, res in collect.results]
    total = float(sum(res.num_examples for _, res in collect.results))
    return SecureSum(dict(zip(keys, mean, strict=True)), total, clients)


def fitins_of(
    payload: Payload, weight: str, seed: int, shim: dict[str, Any], leave: bool = False
) -> FitIns:
    """A fedit task as the legacy FitIns the workflow sends in its 'collect' stage (`shim`:
    what the ClientApp shim needs to reach the node worker; `leave`: the injected fault)."""
    arrays = payload.arrays["adapter"]
    order = sorted(arrays)
    config: dict[str, Any] = {**payload.values, **shim, KEYS: json.dumps(order), WEIGHT: weight}
    config[SEED] = seed
    config[LEAVE] = leave
    return FitIns(ndarrays_to_parameters([arrays[k] for k in order]), config)
