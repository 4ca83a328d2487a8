"""fedit as a Flower app: a ServerApp that runs fedit's round loop and a ClientApp shim.

ServerApp: the same `run_federation` as the simulation (selection, strategies, screening,
checkpoints, resume, metrics); only "train these clients" goes over Flower: the global
adapter and the strategy's client plan travel as ArrayRecord / ConfigRecord messages to the
nodes holding the chosen clients, and their updates come back the same way.

ClientApp: a shim that forwards each task to the node's long-lived worker (fedit.flower.node),
which holds the base model for the whole run and trains with `train_local`.

Run config keys (set by `fedit federate` / `fedit flower-app`): `fedit-config` (the fedit
config as JSON) and `out-dir` (run folder on the server host).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedit.flower import node

client_app = ClientApp()
server_app = ServerApp()


def _arrays(state: dict[str, Any]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _numpy(record: Any) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


# ---------------------------------------------------------------- ClientApp (the shim)


def _worker(context: Context, msg: Message) -> Any:
    task: Any = msg.content["task"]
    return node.connect(
        context.node_id,
        msg.metadata.run_id,
        dict(context.node_config),
        float(task["worker_idle_timeout"]),
    )


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    task: Any = msg.content["task"]
    kind = str(task["kind"])
    payload = {"config": task["config"], "node_config": dict(context.node_config)}
    reply = node.call(_worker(context, msg), kind, payload)
    return Message(RecordDict({"info": ConfigRecord(reply)}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    task: Any = msg.content["task"]
    payload: dict[str, Any] = {
        "config": task["config"],
        "node_config": dict(context.node_config),
        "round": int(task["round"]),
        "client": int(task["client"]),
        "prox_mu": float(task["prox_mu"]),
        "train_lora_A": bool(task["train_lora_A"]),
        "rank": int(task["rank"]) if int(task["rank"]) >= 0 else None,
        "adapter": _numpy(msg.content["adapter"]),
    }
    if "correction" in msg.content:
        payload["correction"] = _numpy(msg.content["correction"])
    reply = node.call(_worker(context, msg), "train", payload)
    metrics: dict[str, Any] = {k: float(v) for k, v in reply["metrics"].items()}
    metrics.update(num_examples=float(reply["num_examples"]), num_steps=float(reply["num_steps"]))
    key = "wire" if "wire" in reply else "adapter"
    content = RecordDict({key: _arrays(reply[key]), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


# ---------------------------------------------------------------- ServerApp


class FlowerClients:
    """fedit's `Remote`: clients are Flower nodes; each node announces which client it holds."""

    def __init__(self, grid: Grid, cfg: Any, config_json: str, progress: Any) -> None:
        self.grid = grid
        self.cfg = cfg
        self.config_json = config_json
        self.progress = progress
        self.node_of: dict[int, int] = {}
        self.lost: list[dict[str, Any]] = []
        self.sizes = self._discover()

    def _task(self, **values: Any) -> ConfigRecord:
        return ConfigRecord(
            {
                "config": self.config_json,
                "worker_idle_timeout": float(self.cfg.flower.worker_idle_timeout),
                **values,
            }
        )

    @staticmethod
    def _message(records: dict[str, Any], kind: str, node: int, group: str) -> Message:
        return Message(RecordDict(records), dst_node_id=node, message_type=kind, group_id=group)

    def _exchange(
        self, messages: list[Message], timeout: float
    ) -> tuple[dict[int, Message], dict[int, str]]:
        """Replies by destination node, and why the others have none (error, lost, late)."""
        ids = list(self.grid.push_messages(messages))
        dst = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages, strict=True)}
        replies: dict[int, Message] = {}
        missing: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                pending.discard(mid)
                if reply.has_error():
                    missing[dst[mid]] = f"node error: {reply.error.reason}"
                else:
                    replies[dst[mid]] = reply
            if pending:
                time.sleep(0.2)
        for mid in pending:
            missing[dst[mid]] = f"no reply within flower.round_timeout={timeout:g}s"
        return replies, missing

    def _discover(self) -> list[int]:
        want = self.cfg.partition.num_clients
        deadline = time.monotonic() + self.cfg.flower.connect_timeout
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < want and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        if not nodes:
            raise RuntimeError(
                f"no SuperNode connected within flower.connect_timeout="
                f"{self.cfg.flower.connect_timeout:g}s"
            )
        self.progress.log(f"{len(nodes)} nodes connected; asking which clients they hold")
        messages = [self._message({"task": self._task(kind="hello")}, "query", n, "hello")
                    for n in nodes]  # fmt: skip
        replies, missing = self._exchange(messages, self.cfg.flower.connect_timeout)
        for n, why in missing.items():
            self.progress.log(f"node {n} did not answer hello: {why}")
        sizes: dict[int, int] = {}
        for n, reply in replies.items():
            info: Any = reply.content["info"]
            client = int(info["client"])
            if client in self.node_of:
                raise RuntimeError(
                    f"nodes {self.node_of[client]} and {n} both hold client {client}"
                )
            self.node_of[client] = n
            sizes[client] = int(info["records"])
        absent = sorted(set(range(want)) - set(sizes))
        if absent:
            why = "; ".join(f"node {n}: {r}" for n, r in missing.items())
            raise RuntimeError(
                f"no node holds clients {absent} of partition.num_clients={want}; "
                f"connected clients: {sorted(sizes)}" + (f" ({why})" if why else "")
            )
        self.progress.log(f"clients on nodes: {dict(sorted(self.node_of.items()))}")
        return [sizes[c] for c in range(want)]

    def launch(
        self, rnd: int, chosen: list[int], adapter: Any, plans: dict[int, Any]
    ) -> list[tuple[int, Callable[[], Any]]]:
        import torch

        from fedit.client import Update
        from fedit.compression import Codec

        codec = Codec.from_config(self.cfg.compression)

        online = set(self.grid.get_node_ids())
        messages, reasons = [], {}
        for c in chosen:
            n = self.node_of[c]
            if n not in online:
                reasons[c] = f"node {n} is not connected"
                continue
            plan = plans[c]
            content = RecordDict(
                {
                    "adapter": _arrays({k: v.numpy() for k, v in adapter.items()}),
                    "task": self._task(
                        round=rnd,
                        client=c,
                        prox_mu=float(plan.prox_mu),
                        train_lora_A=bool(plan.train_lora_A),
                        rank=-1 if plan.rank is None else int(plan.rank),
                    ),
                }
            )
            if plan.correction is not None:
                content["correction"] = _arrays({k: v.numpy() for k, v in plan.correction.items()})
            messages.append(
                Message(content, dst_node_id=n, message_type="train", group_id=str(rnd))
            )
        replies, missing = self._exchange(messages, self.cfg.flower.round_timeout)
        client_of = {n: c for c, n in self.node_of.items()}
        for n, why in missing.items():
            reasons[client_of[n]] = why
        for c, why in reasons.items():
            self.lost.append({"round": rnd, "client": c, "node": self.node_of[c], "reason": why})

        def result(c: int) -> Callable[[], Update]:
            def get() -> Update:
                if c in reasons:
                    raise RuntimeError(reasons[c])
                reply = replies[self.node_of[c]]
                m: dict[str, Any] = dict(reply.content["metrics"])
                if "wire" in reply.content:  # an encoded delta: decode onto the global adapter
                    parts: dict[str, dict[str, np.ndarray]] = {}
                    for name, arr in _numpy(reply.content["wire"]).items():
                        k, part = name.rsplit("::", 1)
                        parts.setdefault(k, {})[part] = arr
                    state = {
                        k: (adapter[k].float() + codec.decode(w, tuple(adapter[k].shape))).to(
                            adapter[k].dtype
                        )
                        for k, w in parts.items()
                    }
                else:
                    arrays = _numpy(reply.content["adapter"])
                    state = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
                return Update(
                    client_id=c,
                    state=state,
                    num_examples=int(m.pop("num_examples")),
                    num_steps=int(m.pop("num_steps")),
                    metrics={k: float(v) for k, v in m.items()},
                )

            return get

        return [(c, result(c)) for c in chosen]

    def stop(self) -> None:
        """Tell every node's worker the run is over (it would also time out on its own)."""
        online = set(self.grid.get_node_ids())
        messages = [self._message({"task": self._task(kind="stop")}, "query", n, "stop")
                    for n in self.node_of.values() if n in online]  # fmt: skip
        if messages:
            self._exchange(messages, 30.0)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from pathlib import Path

    from fedit.config import config_from_dict
    from fedit.progress import Progress
    from fedit.simulation import run_federation

    config_json = str(context.run_config["fedit-config"])
    cfg = config_from_dict(json.loads(config_json))
    out = Path(str(context.run_config["out-dir"]))
    progress = Progress()
    clients = FlowerClients(grid, cfg, config_json, progress)
    try:
        result = run_federation(cfg, out, resume=True, progress=progress, remote=clients)
        last = next((h["eval"] for h in reversed(result.history) if h.get("eval")), None)
        progress.log(
            f"done: {cfg.federation.rounds} rounds, global adapter in {out / 'adapter'}"
            + (f", held-out loss {last['loss']:.4f}" if last else "")
        )
    finally:
        clients.stop()
