"""The node worker: one long-lived process per node and run that holds the base model.

Flower's deployment engine starts a fresh `flwr-clientapp` process for every message, so a
ClientApp that loaded the model itself would load it again every round. fedit's ClientApp is a
thin shim instead: it hands each task over a local, authenticated Unix socket to this worker,
which the first message of a run starts and which keeps the model, the tokenized local data and
a client runtime (hence `train_local`) like the simulation's for the whole run. A node holds any
number of clients (node config `partition-ids`, or a `data-dir` of client files): it trains
those the server samples one after another on the one model.
The worker exits when the server says the run is over, when the SuperNode that started it is
gone, or after `flower.worker_idle_timeout` idle seconds.

This module is imported by the shim: torch and the model stay out of its top level.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from fedit.files import atomic_bytes

SPAWN_TIMEOUT = 600.0
# The process whose end ends the worker: the SuperNode's SuperExec (the parent of each
# flwr-clientapp process), or the SuperNode itself where its ClientApps run in it.
WATCH_PID: int | None = None


def state_root(node_config: dict[str, Any]) -> Path:
    """The node's own folder: node config `state-dir`, else `work-dir`, else the temp folder."""
    where = node_config.get("state-dir") or node_config.get("work-dir")
    return Path(str(where)) if where else Path(tempfile.gettempdir())


def socket_path(node_id: int, run_id: int, node_config: dict[str, Any]) -> Path:
    """The worker's socket, in an owner-only folder of the node's own (key, lock, log beside)."""
    base = state_root(node_config) / "fedit-node"
    base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o700)
    tag = hashlib.sha256(f"{base.resolve()}:{node_id}:{run_id}".encode()).hexdigest()[:16]
    return base / f"fedit-node-{tag}.sock"


def address(sock: Path) -> str:
    """Where the worker listens. On Linux an abstract socket named after `sock` (no file, no
    path-length limit; the authkey in the owner-only key file guards it), elsewhere `sock`."""
    if sys.platform.startswith("linux"):
        return "\0" + sock.name
    return str(sock)


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)
    return state != "Z"


def _lock_file(sock: Path) -> Any:
    """The spawn lock beside the socket (a worker of another run may just have removed the
    empty folder: make it again)."""
    for _ in range(3):
        sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            return open(sock.with_suffix(".lock"), "w")
        except FileNotFoundError:
            continue
    return open(sock.with_suffix(".lock"), "w")


def connect(
    node_id: int, run_id: int, node_config: dict[str, Any], idle_timeout: float
) -> Connection:
    """A connection to this node's worker for the run, starting the worker if needed."""
    sock = socket_path(node_id, run_id, node_config)
    key_file = sock.with_suffix(".key")
    with _lock_file(sock) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one spawner per node at a time
        if key_file.exists():
            try:
                return Client(address(sock), family="AF_UNIX", authkey=key_file.read_bytes())
            except (ConnectionRefusedError, FileNotFoundError, OSError):
                sock.unlink(missing_ok=True)  # a worker that died left its socket behind
        key = secrets.token_bytes(32)
        atomic_bytes(key_file, key, private=True)
        log = sock.with_suffix(".log")
        # The SuperNode's SuperExec outlives each flwr-clientapp: the worker watches it.
        watch = WATCH_PID or os.getppid()
        cmd = [sys.executable, "-m", "fedit.engines.flower.node", "--socket", str(sock),
               "--watch-pid", str(watch), "--idle-timeout", str(idle_timeout)]  # fmt: skip
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + SPAWN_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"fedit node worker exited ({proc.returncode}): {tail}")
            try:
                return Client(address(sock), family="AF_UNIX", authkey=key)
            except (ConnectionRefusedError, FileNotFoundError):
                pass
            time.sleep(0.1)
        proc.kill()
        raise RuntimeError(f"fedit node worker did not start within {SPAWN_TIMEOUT:.0f}s")


def call(conn: Connection, kind: str, payload: dict[str, Any]) -> Any:
    try:
        conn.send((kind, payload))
        status, reply = conn.recv()
    finally:
        conn.close()
    if status != "ok":
        raise RuntimeError(reply)
    return reply


# ---------------------------------------------------------------- the worker process


def node_clients(node_config: dict[str, Any], num_clients: int) -> list[int] | None:
    """The partition's clients a node holds, from its node config: `partition-id` (one) or
    `partition-ids` (several: "0,3,7" or "0-9"); None where the node holds its own files."""
    if "partition-ids" in node_config:
        text = str(node_config["partition-ids"])
        ids: list[int] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            try:
                ids += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
            except ValueError:
                raise RuntimeError(
                    f"node config partition-ids={text!r}: not a list of client ids "
                    f'(e.g. "0,3,7" or "0-9")'
                ) from None
        given = f"partition-ids={text!r}"
    elif "partition-id" in node_config:
        ids = [int(node_config["partition-id"])]
        given = f"partition-id={ids[0]}"
    else:
        return None
    bad = [c for c in ids if not 0 <= c < num_clients]
    if bad or not ids or len(set(ids)) != len(ids):
        raise RuntimeError(
            f"node config {given}: clients {ids}, each must be a distinct client of the "
            f"partition (0..{num_clients - 1})" + (f"; not clients: {bad}" if bad else "")
        )
    return sorted(ids)


def _own_files(cfg: Any, node_config: dict[str, Any]) -> tuple[dict[int, Any], dict[int, Any]]:
    """A node with files of its own: `data-path` (one client, id `client-id`) or `data-dir`
    (a folder of client_NNNN.jsonl, as `fedit partition` writes; NNNN is the client id).
    A client's own held-out records: its client_NNNN.own.jsonl (`own-data-path` for
    `data-path`), else `data.client_test_fraction` of its records, as in a simulation."""
    from fedit.config import variant
    from fedit.data.partition import hold_out
    from fedit.data.records import load_records

    if node_config.get("data-dir"):
        folder = Path(str(node_config["data-dir"]))
        files = {
            int(f.name[7:11]): f for f in sorted(folder.glob("client_[0-9][0-9][0-9][0-9].jsonl"))
        }
        if not files:
            raise RuntimeError(f"node config data-dir={folder}: no client_NNNN.jsonl file there")
        owns = {c: f.with_name(f"client_{c:04d}.own.jsonl") for c, f in files.items()}
    else:
        c = int(node_config.get("client-id", node_config.get("partition-id", 0)))
        files = {c: Path(str(node_config["data-path"]))}
        own_path = node_config.get("own-data-path")
        owns = {c: Path(str(own_path))} if own_path else {}
    data, own = {}, {}
    for c, path in files.items():
        mine = {"path": str(path), "max_records": 0, "sources": [], "test_split_by": []}
        records, _ = load_records(variant(cfg, data=mine).data)
        if c in owns and owns[c].is_file():
            own[c] = load_records(variant(cfg, data={**mine, "path": str(owns[c])}).data)[0]
        elif cfg.data.client_test_fraction:
            records, own[c] = hold_out(records, cfg.data.client_test_fraction, cfg.seed, c)
        data[c] = records
    return data, own


def thread_share(node_config: dict[str, Any], training_nodes: int) -> int | None:
    """Torch threads for a round's training on a node whose host runs several of the
    federation's nodes (node config `shared-cores`, as `fedit federate` sets): its share of
    those cores among the round's `training_nodes` (nodes that each take all cores train
    many times slower than one; one node training alone takes them all). None where the
    node's threads are fixed (node config `threads`) or it has a host of its own."""
    if "shared-cores" not in node_config or int(node_config.get("threads", 0)):
        return None
    return max(1, int(node_config["shared-cores"]) // max(1, training_nodes))


class NodeState:
    """What the worker keeps for the run: one client runtime (the base model, loaded once)
    for every client this node holds."""

    def __init__(self) -> None:
        self.runtime: Any = None
        self.config_json = ""
        self.clients: list[int] = []
        self.model_loads = 0
        self.state_root = Path(tempfile.gettempdir())
        self.run_id: str | None = None

    def setup(self, config_json: str, node_config: dict[str, Any]) -> None:
        if self.runtime is not None:
            if config_json != self.config_json:
                raise RuntimeError("the run's config changed under a running node worker")
            return
        import torch

        from fedit.client.runtime import ClientRuntime, check_client_data
        from fedit.config import config_from_dict
        from fedit.data.partition import load_partition
        from fedit.lora import load_lora_model

        cfg = config_from_dict(json.loads(config_json))
        if node_config.get("data-path") or node_config.get("data-dir"):
            data, own = _own_files(cfg, node_config)
        else:
            partition = load_partition(cfg)
            ids = node_clients(node_config, len(partition.clients))
            if ids is None:
                raise RuntimeError(
                    "node config needs 'partition-id' or 'partition-ids' (clients of the "
                    "config's partition), 'data-path' (this node's own records, with "
                    "'client-id') or 'data-dir' (a folder of client_NNNN.jsonl)"
                )
            data = {c: partition.clients[c] for c in ids}
            own = {c: r for c, r in partition.client_tests.items() if c in data}
        threads = int(node_config.get("threads", 0)) or cfg.model.threads
        if threads:
            torch.set_num_threads(threads)
        lm = load_lora_model(cfg)
        check_client_data(data, lm.tokenizer, cfg)  # at hello: before round 1
        self.runtime = ClientRuntime(cfg, lm, data, own=own)
        self.model_loads += 1
        self.config_json = config_json
        self.clients = sorted(data)
        self.state_root = state_root(node_config)

    def hello(self, p: dict[str, Any]) -> dict[str, Any]:
        self.setup(p["config"], p["node_config"])
        from fedit.client.runtime import category_counts, common_tags

        data = self.runtime.data
        held = [{"client": c, "records": len(data[c]), "categories": category_counts(data[c]),
                 "tags": common_tags(data[c])} for c in self.clients]  # fmt: skip
        return {"clients": json.dumps(held), "model_loads": self.model_loads, "pid": os.getpid()}

    def train(self, p: dict[str, Any]) -> Any:
        self.setup(p["config"], p["node_config"])
        threads = thread_share(p["node_config"], int(p.get("training_nodes", 1)))
        if threads:
            import torch

            torch.set_num_threads(threads)
        payload = p["payload"]
        client = int(payload.values["client"])
        if client not in self.clients:
            raise RuntimeError(f"task for client {client} reached a node holding {self.clients}")
        run_id = str(payload.values.get("run_id", ""))
        if run_id != self.run_id:  # the clients' own state, on this node's disk, per run
            folder = self.state_root / "fedit-client-state" / (run_id or "unnamed")
            self.runtime.use_store_folder(folder)
            self.run_id = run_id
        reply = self.runtime.handle(payload, "node")
        reply.values["metric.model_loads"] = float(self.model_loads)
        return reply


def serve(sock: Path, watch_pid: int, idle_timeout: float) -> None:
    key = sock.with_suffix(".key").read_bytes()
    state = NodeState()
    listener = Listener(address(sock), family="AF_UNIX", authkey=key)
    last = time.monotonic()
    try:
        while True:
            # Poll with a short accept timeout so a vanished SuperNode or idleness ends us.
            listener._listener._socket.settimeout(1.0)  # type: ignore[attr-defined]
            try:
                conn = listener.accept()
            except TimeoutError:
                if not _alive(watch_pid) or time.monotonic() - last > idle_timeout:
                    return
                continue
            except Exception:  # a peer without the key, or one that hung up mid-handshake
                continue
            last = time.monotonic()
            with conn:
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    continue
                if kind == "stop":
                    conn.send(("ok", {"model_loads": state.model_loads}))
                    return
                try:
                    handler = {"hello": state.hello, "train": state.train}[kind]
                    conn.send(("ok", handler(payload)))
                except Exception as e:
                    conn.send(("error", f"{type(e).__name__}: {e}"))
            last = time.monotonic()
    finally:
        listener.close()
        for suffix in (".sock", ".key", ".lock", ".log"):  # nothing of the run stays behind
            sock.with_suffix(suffix).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            sock.parent.rmdir()  # when no other run's worker uses it


def main() -> None:
    p = argparse.ArgumentParser(description="fedit node worker (started by the ClientApp)")
    p.add_argument("--socket", required=True)
    p.add_argument("--watch-pid", type=int, required=True)
    p.add_argument("--idle-timeout", type=float, default=1800.0)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    serve(Path(args.socket), args.watch_pid, args.idle_timeout)


if __name__ == "__main__":
    main()
