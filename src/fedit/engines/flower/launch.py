"""`fedit federate`: a SuperLink and N SuperNodes on loopback, the fedit app run through them;
the partition's clients are spread over the nodes in contiguous blocks.

Every process it starts lives in its own process group, and every group is stopped on the way
out (normal end, error or Ctrl-C): SuperNodes first, then the SuperLink. The app folder,
Flower's home (config.toml with the federation) and all logs go under the run folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from fedit.config import Config
from fedit.engines.flower.certs import make_pki
from fedit.engines.flower.supernode import poll_interval
from fedit.errors import FeditError
from fedit.files import atomic_json, atomic_text


class FederateError(FeditError, RuntimeError):
    pass


FEDERATION = "fedit-local"
SUPERNODE = "fedit.engines.flower.supernode"


def _bin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_UPDATE_CHECK="1",
        # Otherwise the SuperLink `uv sync`s the app's dependencies (and pulls CUDA torch).
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        TOKENIZERS_PARALLELISM="false",
        # Flower starts its helpers (flower-superexec, flwr-serverapp, ...) by name.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    return env


def write_app(folder: Path, cfg: Config, out_dir: Path) -> Path:
    """A Flower app folder for this config: the FAB carries only this pyproject; the code is
    the fedit installed on every host."""
    folder.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(cfg.to_dict(), sort_keys=True)
    text = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedit-app"
version = "1.0.0"
description = "fedit federated instruction tuning (the code is the installed fedit package)"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedit"

[tool.flwr.app.components]
serverapp = "fedit.engines.flower.app:server_app"
clientapp = "fedit.engines.flower.app:client_app"

[tool.flwr.app.config]
fedit-config = {json.dumps(config_json)}
out-dir = {json.dumps(str(out_dir.resolve()))}
"""
    atomic_text(folder / "pyproject.toml", text)
    return folder


def write_federation(home: Path, address: str, root_certificates: Path | None = None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    lines = [f"[superlink.{FEDERATION}]", f'address = "{address}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_certificates.resolve()}"')
    atomic_text(home / "config.toml", "\n".join(lines) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Started processes, each in its own group; `stop` ends them in reverse order."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.files: list[IO[bytes]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        self.files.append(log)
        proc = subprocess.Popen(
            list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, chars: int = 1500) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace")[-chars:] if p.exists() else ""

    def record(self, path: Path) -> None:
        """pids.json: which processes this launch started (to find them, or stop them)."""
        data = {name: proc.pid for name, proc in self.procs}
        atomic_json(path, data)

    def stop(self, timeout: float = 15.0) -> None:
        # Flower starts helpers in sessions of their own (SuperExec, ServerApp): find the
        # whole tree first, then end it top-down.
        tree = {p.pid: descendants(p.pid) for _, p in self.procs}
        for _, proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
            _signal_pids(tree[proc.pid], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)  # whatever is left of the group
            _signal_pids(tree[proc.pid] + descendants(proc.pid), signal.SIGKILL)
            proc.wait()
        for f in self.files:
            f.close()


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (Linux /proc; elsewhere, none are found)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal_pids(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def wait_health(
    port: int, proc: subprocess.Popen[bytes], ca: Path | None = None, timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    scheme = "https" if ca else "http"
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FederateError(f"the SuperLink exited ({proc.returncode}) while starting")
        try:
            url = f"{scheme}://127.0.0.1:{port}/health"
            with urllib.request.urlopen(url, timeout=2, context=context):
                return
        except OSError:
            time.sleep(0.3)
    raise FederateError(f"the SuperLink did not answer /health on port {port} in {timeout:.0f}s")


def superlink_cmd(port: int, tls: dict[str, Path] | None = None, auth: bool = False) -> list[str]:
    cmd = [_bin("flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
           "--disable-runtime-dependency-installation"]  # fmt: skip
    if tls:
        cmd += ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"]),
                "--ssl-keyfile", str(tls["key"])]  # fmt: skip
    else:
        cmd.append("--insecure")
    if auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def supernode_cmd(
    superlink: str,
    port: int,
    node_config: str,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    plain: bool = False,
) -> list[str]:
    # fedit's SuperNode: Flower's, with its ClientApps run in one long-lived process
    head = [_bin("flower-supernode")] if plain else [sys.executable, "-m", SUPERNODE]
    cmd = [*head, "--superlink", superlink, "--port", str(port), "--node-config", node_config,
           "--max-retries", "3"]  # fmt: skip
    if root_certificates:
        cmd += ["--root-certificates", str(root_certificates)]
    else:
        cmd.append("--insecure")
    if auth_key:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


def register_node(public_key: Path, env: dict[str, str]) -> None:
    """`flwr supernode register`: the SuperLink will accept the node holding this key."""
    proc = subprocess.run(
        [_bin("flwr"), "supernode", "register", str(public_key), FEDERATION],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if proc.returncode != 0:
        raise FederateError(f"registering {public_key} failed: {proc.stdout}{proc.stderr}")


def host_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def spread_clients(num_clients: int, nodes: int) -> list[list[int]]:
    """Clients 0..num_clients-1 over `nodes` nodes in contiguous blocks, sizes differing by
    at most one (10 over 3: 0-3, 4-6, 7-9)."""
    size, extra = divmod(num_clients, nodes)
    out, start = [], 0
    for i in range(nodes):
        n = size + (i < extra)
        out.append(list(range(start, start + n)))
        start += n
    return out


def federate(
    cfg: Config,
    out: Path,
    nodes: int | None = None,
    secure: bool = False,
    echo: Any = None,
    plain_nodes: bool = False,
) -> dict[str, Any]:
    """Run the config through real Flower processes on loopback; returns the run summary.

    secure: TLS with a fresh test CA and SuperNode authentication, every node's key
    registered with the SuperLink before it starts. plain_nodes: Flower's stock
    `flower-supernode` (a ClientApp process per message) instead of `fedit supernode`."""
    want = cfg.partition.num_clients
    nodes = want if nodes is None else nodes
    if not 1 <= nodes <= want:
        raise FederateError(
            f"--nodes {nodes}: between 1 and partition.num_clients={want} (each node holds "
            "one or more of the partition's clients)"
        )
    if cfg.privacy.secure_aggregation and nodes < want:
        raise FederateError(
            f"--nodes {nodes} with privacy.secure_aggregation: Flower's SecAgg+ masks one "
            f"update per node, so each node must hold one client (--nodes {want})"
        )
    try:
        poll_interval()  # read by every node and the ServerApp: refused here, before any starts
    except ValueError as e:
        raise FederateError(str(e)) from None
    if cfg.federation.workers > 1:
        raise FederateError("federation.workers: the nodes train in parallel already; use 1")
    out = out.resolve()
    flower = out / "flower"
    home = flower / "home"
    app = write_app(flower / "app", cfg, out)
    env = flower_env(home)
    port = free_port()
    pki = make_pki(flower / "pki", nodes) if secure else None
    write_federation(home, f"127.0.0.1:{port}", pki["ca"] if pki else None)
    procs = Processes(flower / "logs")
    cores = cfg.model.threads or host_cores()  # shared by the nodes training in a round
    started = time.time()
    say = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        link = procs.start("superlink", superlink_cmd(port, pki, auth=secure), env)
        wait_health(port, link, pki["ca"] if pki else None)
        say(f"SuperLink on 127.0.0.1:{port}{' (TLS, node auth)' if pki else ''}, logs in "
            f"{flower / 'logs'}")  # fmt: skip
        for i, held in enumerate(spread_clients(want, nodes)):
            # Each node keeps its clients' state (error feedback) in a folder of its own.
            state = flower / "nodes" / f"node-{i}"
            ids = f"{held[0]}-{held[-1]}" if len(held) > 1 else str(held[0])
            cfg_text = (f'partition-ids="{ids}" num-partitions={want} state-dir="{state}" '
                        f"shared-cores={cores}")  # fmt: skip
            if pki:
                register_node(pki[f"node-{i}.pub"], env)
            cmd = supernode_cmd(
                f"127.0.0.1:{port}", free_port(), cfg_text,
                pki["ca"] if pki else None, pki[f"node-{i}"] if pki else None, plain_nodes,
            )  # fmt: skip
            procs.start(f"supernode-{i}", cmd, env)
        procs.record(flower / "pids.json")
        say(f"{nodes} SuperNodes started; running the app")
        run = subprocess.Popen(
            [_bin("flwr"), "run", str(app), FEDERATION, "--stream"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        procs.procs.insert(0, ("flwr-run", run))  # type: ignore[arg-type]
        procs.record(flower / "pids.json")
        assert run.stdout is not None
        with (flower / "logs" / "serverapp.log").open("a", encoding="utf-8") as log:
            for line in run.stdout:  # the ServerApp's log, as `flwr run --stream` relays it
                log.write(line)
                log.flush()
                say(line.rstrip())
        run.wait()
    finally:
        procs.stop()
    summary = out / "summary.json"
    if not summary.is_file() or summary.stat().st_mtime < started:
        raise FederateError(
            f"the run did not finish (no {summary}; the ServerApp's log is "
            f"{flower / 'logs' / 'serverapp.log'}); SuperLink log tail:\n"
            + procs.log_tail("superlink")
        )
    data: dict[str, Any] = json.loads(summary.read_text(encoding="utf-8"))
    if data.get("rounds") != cfg.federation.rounds:
        raise FederateError(f"{summary}: finished {data.get('rounds')} rounds, not the config's")
    return data
