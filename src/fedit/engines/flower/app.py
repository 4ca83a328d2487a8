"""fedit as a Flower app: a ServerApp that runs fedit's round loop and a ClientApp shim.

ServerApp: the same `run_federation` as the simulation (selection, strategies, screening,
checkpoints, resume, metrics); only "train these clients" goes over Flower: the global
adapter and the strategy's client plan travel as ArrayRecord / ConfigRecord messages to the
nodes holding the chosen clients, and their updates come back the same way.

ClientApp: a shim that forwards each task to the node's long-lived worker
(fedit.engines.flower.node), whose client runtime holds the base model for the whole run and
trains with `train_local`.

Run config keys (set by `fedit federate` / `fedit flower-app`): `fedit-config` (the fedit
config as JSON) and `out-dir` (run folder on the server host).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedit.engines.flower import node, secagg
from fedit.protocol import Payload, Task, Update
from fedit.seeding import derive_seed

if TYPE_CHECKING:
    import torch


# Flower's SecAgg+ client mod handles the messages of secure rounds (`secagg.py`).
client_app = ClientApp(mods=[secagg.secure_mod])
server_app = ServerApp()


# Task keys the shim uses itself; the rest of a message's record is the payloads' scalars.
SHIM_KEYS = ("config", "worker_idle_timeout", "kind")
# Flower moves every record and Array of a message as an object of its own, with an HTTP
# request per object on each hop (ServerApp -> SuperLink -> SuperNode and back). So a message
# is one ConfigRecord: the task, each payload's scalars, the order of its arrays, and each of
# its array groups packed in one safetensors blob, inline as bytes up to INLINE_MAX; a larger
# blob travels as one Array of its own ArrayRecord (which Flower cuts in chunks of 5 MB).
PACKED = "safetensors"
INLINE_MAX = 4 << 20
LAYOUT, BLOB, ERROR = "_layout", "_blob/", "_error"  # beside scalars' own keys


def _fields(payload: Payload, prefix: str, values: dict[str, Any], big: dict[str, Any]) -> None:
    """A payload into a message's one ConfigRecord (`values`, keys under `prefix`), with
    blobs over INLINE_MAX into ArrayRecords of their own (`big`)."""
    from safetensors.numpy import save

    values.update({prefix + k: v for k, v in payload.values.items()})
    values[prefix + LAYOUT] = json.dumps({g: list(a) for g, a in payload.arrays.items()})
    for group, arrays in payload.arrays.items():
        blob = save({k: np.ascontiguousarray(a) for k, a in arrays.items()})
        if len(blob) <= INLINE_MAX:
            values[prefix + BLOB + group] = blob
        else:
            big[prefix + group] = ArrayRecord({PACKED: Array(np.frombuffer(blob, np.uint8))})


def _payload(content: Any, prefix: str) -> Payload:
    from safetensors.numpy import load

    record = content["task"]
    arrays = {}
    for group, keys in json.loads(str(record[prefix + LAYOUT])).items():
        if prefix + BLOB + group in record:
            blob = bytes(record[prefix + BLOB + group])
        else:
            blob = content[prefix + group][PACKED].numpy().tobytes()
        got = load(blob)
        arrays[group] = {k: got[k] for k in keys}
    values = {k[len(prefix):]: v for k, v in record.items()
              if k.startswith(prefix) and k[len(prefix):] not in (LAYOUT, ERROR, *SHIM_KEYS)
              and not k[len(prefix):].startswith(BLOB)}  # fmt: skip
    return Payload(arrays, values)


def _bundle(items: Sequence[Payload | str], task: dict[str, Any]) -> RecordDict:
    """Several clients' payloads in one message (item i's keys under "i/"); a str item is the
    reason that client has none (its training failed on the node)."""
    values: dict[str, Any] = {**task, "clients": len(items)}
    big: dict[str, Any] = {}
    for i, item in enumerate(items):
        if isinstance(item, str):
            values[f"{i}/{ERROR}"] = item
        else:
            _fields(item, f"{i}/", values, big)
    return RecordDict({"task": ConfigRecord(values), **big})


def _unbundle(content: Any) -> list[Payload | str]:
    task = content["task"]
    n = int(task["clients"])
    return [str(task[f"{i}/{ERROR}"]) if f"{i}/{ERROR}" in task else _payload(content, f"{i}/")
            for i in range(n)]  # fmt: skip


# ---------------------------------------------------------------- ClientApp (the shim)


def _worker(context: Context, msg: Message, task: Any = None) -> Any:
    task = msg.content["task"] if task is None else task
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
    """A round's tasks for the clients of this node: trained one after another by its worker
    (a training error is that client's, reported in the reply; the others still train)."""
    if secagg.is_fitins(msg.content):  # the 'collect' stage of a secure round: one client
        task: Any = msg.content.config_records["fitins.config"]
        request = {"config": task["config"], "node_config": dict(context.node_config),
                   "payload": secagg.payload_of_fitins(msg.content, SHIM_KEYS)}  # fmt: skip
        reply = node.call(_worker(context, msg, task), "train", request)
        return Message(secagg.fitres_content(reply, str(task[secagg.WEIGHT])), reply_to=msg)
    task = msg.content["task"]
    replies: list[Payload | str] = []
    for payload in _unbundle(msg.content):
        request = {"config": task["config"], "node_config": dict(context.node_config),
                   "payload": payload, "training_nodes": task["training_nodes"]}  # fmt: skip
        try:
            replies.append(node.call(_worker(context, msg, task), "train", request))
        except RuntimeError as e:  # the worker's error for this client
            replies.append(str(e))
    return Message(_bundle(replies, {}), reply_to=msg)


# ---------------------------------------------------------------- ServerApp


def _ranges(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out: list[str] = []
    for c in ids:
        if out and c == int(out[-1].rsplit("-", 1)[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ", ".join(out)


class FlowerClients:
    """fedit's `Remote`: clients live on Flower nodes; each node announces the clients it holds
    (one or many). Selection stays over clients; a task goes to its client's node."""

    def __init__(
        self, grid: Grid, cfg: Any, config_json: str, progress: Any, context: Context
    ) -> None:
        self.grid = grid
        self.context = context
        self.cfg = cfg
        self.config_json = config_json
        self.progress = progress
        self.node_of: dict[int, int] = {}
        self.first_reply: dict[str, float] = {}  # by exchange kind, the last one's
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
        self, messages: list[Message], timeout: float, kind: str = ""
    ) -> tuple[dict[int, Message], dict[int, str]]:
        """Replies by message (its index in `messages`), and why the others have none (error,
        lost, late). Each poll is requests on the SuperLink that compete for the CPU with the
        training they wait for: an exchange of a `kind` done before waits half the time its
        first reply took then (the next round's is about as long) before it polls."""
        quiet = self.first_reply.get(kind, 0.0) / 2 if kind else 0.0
        first: float | None = None
        ids = list(self.grid.push_messages(messages))
        index = {mid: i for i, mid in enumerate(ids)}
        replies: dict[int, Message] = {}
        missing: dict[int, str] = {}
        start = time.monotonic()
        deadline = start + timeout
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                first = time.monotonic() - start if first is None else first
                mid = reply.metadata.reply_to_message_id
                pending.discard(mid)
                if reply.has_error():
                    missing[index[mid]] = f"node error: {reply.error.reason}"
                else:
                    replies[index[mid]] = reply
            if pending:  # a twentieth of the wait so far: ~5% late at most, few polls
                waited = time.monotonic() - start
                time.sleep(max(quiet - waited, min(0.25, max(0.02, waited / 20))))
        if kind and first is not None:
            self.first_reply[kind] = first
        for mid in pending:
            missing[index[mid]] = f"no reply within flower.round_timeout={timeout:g}s"
        return replies, missing

    def _discover(self) -> list[int]:
        """Ask each connecting node which clients it holds, until every client of the
        partition is held (a node holds one or many) or flower.connect_timeout passes."""
        want = self.cfg.partition.num_clients
        timeout = self.cfg.flower.connect_timeout
        deadline = time.monotonic() + timeout
        replies: dict[int, Message] = {}
        missing: dict[int, str] = {}
        asked: set[int] = set()
        held = 0
        while time.monotonic() < deadline:
            new = [n for n in self.grid.get_node_ids() if n not in asked]
            if new:
                self.progress.log(f"{len(new)} nodes connected; asking which clients they hold")
                messages = [self._message({"task": self._task(kind="hello")}, "query", n,
                                          "hello") for n in new]  # fmt: skip
                got, lost = self._exchange(messages, max(1.0, deadline - time.monotonic()))
                replies.update({new[i]: r for i, r in got.items()})
                missing.update({new[i]: why for i, why in lost.items()})
                asked.update(new)
                held = sum(len(json.loads(str(r.content["info"]["clients"])))
                           for r in replies.values())  # fmt: skip
            if held >= want:
                break
            time.sleep(0.5)
        if not asked:
            raise RuntimeError(f"no SuperNode connected within flower.connect_timeout={timeout:g}s")
        for n, why in missing.items():
            self.progress.log(f"node {n} did not answer hello: {why}")
        sizes: dict[int, int] = {}
        counts: dict[int, dict[str, int]] = {}
        tags: dict[int, dict[str, str]] = {}
        for n, reply in replies.items():
            info: Any = reply.content["info"]
            for one in json.loads(str(info["clients"])):
                client = int(one["client"])
                if client in self.node_of:
                    raise RuntimeError(
                        f"nodes {self.node_of[client]} and {n} both hold client {client}"
                    )
                self.node_of[client] = n
                sizes[client] = int(one["records"])
                counts[client] = one["categories"]
                tags[client] = one["tags"]
        absent = sorted(set(range(want)) - set(sizes))
        extra = sorted(set(sizes) - set(range(want)))
        if absent or extra:
            why = "; ".join(f"node {n}: {r}" for n, r in missing.items())
            raise RuntimeError(
                (f"no node holds clients {absent}" if absent else f"nodes hold clients {extra}")
                + f" of partition.num_clients={want}; connected clients: {sorted(sizes)}"
                + (f" ({why})" if why else "")
            )
        held_by: dict[int, list[int]] = {}
        for c, n in sorted(self.node_of.items()):
            held_by.setdefault(n, []).append(c)
        self.progress.log(
            "clients on nodes: "
            + "; ".join(f"node {n}: {_ranges(cs)}" for n, cs in sorted(held_by.items()))
        )
        self.categories = [counts[c] for c in range(want)]
        self.tags = [tags[c] for c in range(want)]
        return [sizes[c] for c in range(want)]

    def launch(self, tasks: Sequence[Task]) -> list[tuple[int, Callable[[], Update]]]:
        """One message per node, carrying the tasks of all its clients in the round: the node
        trains them one after another on its one model."""
        online = set(self.grid.get_node_ids())
        by_node: dict[int, list[Task]] = {}
        reasons: dict[int, str] = {}
        rnd = tasks[0].round if tasks else 0
        for t in tasks:
            n = self.node_of[t.client]
            if n in online:
                by_node.setdefault(n, []).append(t)
            else:
                reasons[t.client] = f"node {n} is not connected"
        nodes = list(by_node)
        messages = [
            Message(_bundle([t.to_payload() for t in by_node[n]],
                            dict(self._task(training_nodes=len(by_node)))),
                    dst_node_id=n, message_type="train", group_id=str(rnd))
            for n in nodes
        ]  # fmt: skip
        replies, missing = self._exchange(messages, self.cfg.flower.round_timeout, "train")
        got: dict[int, Payload] = {}
        for i, n in enumerate(nodes):
            clients = [t.client for t in by_node[n]]
            if i in missing:
                reasons.update({c: missing[i] for c in clients})
                continue
            for c, item in zip(clients, _unbundle(replies[i].content), strict=True):
                if isinstance(item, str):
                    reasons[c] = f"node error: {item}"
                else:
                    got[c] = item
        for c, why in reasons.items():
            self.lost.append({"round": rnd, "client": c, "node": self.node_of[c], "reason": why})

        def result(c: int) -> Callable[[], Update]:
            def get() -> Update:
                if c in reasons:
                    raise RuntimeError(reasons[c])
                return Update.from_payload(got[c])

            return get

        return [(t.client, result(t.client)) for t in tasks]

    def secure_round(self, tasks: Sequence[Task], weight: str) -> secagg.SecureSum | None:
        """One round of Flower's SecAgg+ over the tasks' nodes: only the sum comes back."""
        online = set(self.grid.get_node_ids())
        live = [t for t in tasks if self.node_of[t.client] in online]
        for t in tasks:
            if t not in live:
                reason = f"node {self.node_of[t.client]} is not connected"
                self.lost.append({"round": t.round, "client": t.client,
                                  "node": self.node_of[t.client], "reason": reason})  # fmt: skip
        if len({self.node_of[t.client] for t in live}) < len(live):
            raise RuntimeError(
                "privacy.secure_aggregation: Flower's SecAgg+ masks one update per node, and a "
                "node here holds several of this round's clients; serve one client per node"
            )
        if len(live) < 2:
            return None
        seed = int(self.cfg.seed)
        shim = dict(self._task())
        fitins = {
            self.node_of[t.client]: secagg.fitins_of(
                t.to_payload(),
                weight,
                derive_seed(seed, "secagg-rounding", t.round, t.client),
                shim,
                leave="leave" in self.cfg.faults.injected(t.client, t.round),
            )
            for t in live
        }
        keys = sorted(k for k in live[0].adapter if live[0].plan.trains(k))
        max_weight = 1.0 if weight == "equal" else float(max(self.sizes))
        return secagg.secure_round(
            self.grid, self.context, live[0].round, fitins, keys, max_weight,
            self.cfg.privacy.secagg_clipping_range, self.cfg.flower.round_timeout,
        )  # fmt: skip

    def client_state(self, upto: int) -> dict[str, torch.Tensor] | None:
        return None  # each node keeps its client's state on its own disk

    def load_client_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise RuntimeError(
                "the checkpoint holds client state of clients trained in the server's process; "
                "Flower nodes keep their own: resume it with `fedit run`"
            )

    def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Tell every node's worker the run is over (it would also time out on its own)."""
        online = set(self.grid.get_node_ids())
        messages = [self._message({"task": self._task(kind="stop")}, "query", n, "stop")
                    for n in sorted(set(self.node_of.values())) if n in online]  # fmt: skip
        if messages:
            self._exchange(messages, 30.0)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from pathlib import Path

    from fedit.config import config_from_dict
    from fedit.engines.flower.supernode import fast_pulls, local_wait, poll_interval
    from fedit.progress import Progress
    from fedit.recipe import run_federation

    fast_pulls(local_wait(poll_interval()))  # no 1 s first retry
    config_json = str(context.run_config["fedit-config"])
    cfg = config_from_dict(json.loads(config_json))
    out = Path(str(context.run_config["out-dir"]))
    progress = Progress()
    clients = FlowerClients(grid, cfg, config_json, progress, context)
    result = run_federation(cfg, out, resume=True, progress=progress, engine=clients)
    last = next((h["eval"] for h in reversed(result.history) if h.get("eval")), None)
    progress.log(
        f"done: {cfg.federation.rounds} rounds, global adapter in {out / 'adapter'}"
        + (f", held-out loss {last['loss']:.4f}" if last else "")
    )
