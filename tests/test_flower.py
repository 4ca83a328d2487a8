"""Real Flower processes on loopback: SuperLink, SuperNodes, the fedit app (tiny model)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedit.cli import main
from fedit.config import ConfigError, load_config, to_toml
from fedit.engines.flower.launch import descendants, free_port, wait_health
from fedit.lora import load_adapter_state
from fedit.recipe import run_federation
from tests.conftest import make_rows, tiny_config, write_jsonl

BIN = Path(sys.executable).parent


def _config(tmp_path: Path, **sections: dict) -> tuple[Path, object]:
    data = write_jsonl(tmp_path / "data.jsonl", make_rows(16))
    cfg = tiny_config(data, **sections)
    path = tmp_path / "fed.toml"
    path.write_text(to_toml(cfg))
    return path, cfg


def _alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def _started_here() -> list[int]:
    return [p for p in descendants(os.getpid())]


def _same_personal_state(out: Path, sim: Path, summary: dict, want: dict) -> None:
    """The nodes' personal states (newest per client) and own-data scores are the simulation's."""
    own = summary["own_data"]
    assert (
        set(own["clients"]) == set(want["clients"]) == {str(c) for c in range(len(want["clients"]))}
    )
    for c, v in want["clients"].items():  # a client never sampled holds no personal model
        assert ("personal" in v) == ("personal" in own["clients"][c])
        if "personal" in v:
            assert abs(own["clients"][c]["personal"] - v["personal"]) < 1e-5

    def newest(files: list[Path]) -> dict[str, Path]:
        return {f.parent.name: f for f in sorted(files, key=lambda f: f.name)}

    nodes = newest(list((out / "flower" / "nodes").rglob("personal/client_*/round_*.safetensors")))
    sims = newest(list((sim / "client-state").rglob("personal/client_*/round_*.safetensors")))
    assert {c: f.name for c, f in nodes.items()} == {c: f.name for c, f in sims.items()}
    assert nodes
    for c, f in sims.items():
        for k, v in load_file(str(f)).items():
            torch.testing.assert_close(load_file(str(nodes[c]))[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "personal", "clients"), [("none", "fedsa", 4), ("int8", "finetune", 2)]
)
def test_federate_two_nodes_equals_simulation(
    tmp_path: Path, method: str, personal: str, clients: int
) -> None:
    """Also with compression: the encoded delta travels and the server decodes it; and with a
    personalization method, each node's clients keep their state home (FedSA-LoRA: its B).
    With 4 clients each node holds two, and trains the round's sampled ones on one model."""
    path, cfg = _config(
        tmp_path,
        data={"client_test_fraction": 0.25},
        partition={"num_clients": clients},
        federation={"rounds": 2, "clients_per_round": min(clients, 3)},
        compression={"method": method},
        personalization={"method": personal, "finetune_steps": 2},
    )
    out = tmp_path / "flower-run"
    before = set(_started_here())
    temp_before = set(Path(tempfile.gettempdir()).glob("fedit-node*"))
    assert main(["federate", str(path), "--nodes", "2", "--out", str(out)]) == 0
    sim = run_federation(cfg, tmp_path / "sim")  # type: ignore[arg-type]
    got = load_adapter_state(out / "adapter")
    assert set(got) == set(sim.adapter)
    for k, v in sim.adapter.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    # The base model is loaded once per node per run, however many rounds and clients the
    # node trains.
    loads = [c["model_loads"] for r in rows[1:] for c in r["client_metrics"]]
    assert loads and all(n == 1.0 for n in loads)
    assert sorted(c["client"] for r in rows[1:] for c in r["client_metrics"]) == sorted(
        c["client"] for r in sim.history[1:] for c in r["client_metrics"]
    )
    sim_rows = [
        json.loads(line) for line in (tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["bytes_up_per_client"] for r in rows[1:]] == [
        r["bytes_up_per_client"] for r in sim_rows[1:]
    ]
    summary = json.loads((out / "summary.json").read_text())
    _same_personal_state(out, tmp_path / "sim", summary, sim.history[-1]["eval"]["own_data"])
    pids = json.loads((out / "flower" / "pids.json").read_text())
    assert {"superlink", "supernode-0", "supernode-1", "flwr-run"} <= set(pids)
    # The ServerApp's log stays with the run (what `flwr run --stream` relayed).
    assert "round 1/" in (out / "flower" / "logs" / "serverapp.log").read_text()
    time.sleep(1.0)
    assert not _alive(list(pids.values()))
    assert set(_alive(_started_here())) <= before  # no helper, node worker or app left over
    # The node workers' socket, key, lock and log went with them.
    assert not list((out / "flower" / "nodes").rglob("fedit-node*"))
    assert set(Path(tempfile.gettempdir()).glob("fedit-node*")) <= temp_before


@pytest.mark.parametrize("method", ["ditto", "feddpa"])
def test_federate_resume_keeps_the_nodes_personal_state(tmp_path: Path, method: str) -> None:
    """Each node keeps its client's residual and its personal state on its own disk: a server
    restart (new Flower run, new node workers) continues exactly where an uninterrupted run
    would be, and each client scores both models on its own held-out data."""
    path, cfg = _config(
        tmp_path,
        data={"client_test_fraction": 0.25},
        partition={"num_clients": 2},
        federation={"rounds": 3},
        compression={"method": "topk", "topk_ratio": 0.2},
        personalization={"method": method},
        eval={"every": 3, "at_start": False},
    )
    out = tmp_path / "flower-run"
    two = ["--set", "federation.rounds=2"]
    assert main(["federate", str(path), "--nodes", "2", "--out", str(out), *two]) == 0
    assert main(["federate", str(path), "--nodes", "2", "--out", str(out)]) == 0
    sim = run_federation(cfg, tmp_path / "sim")  # type: ignore[arg-type]
    got = load_adapter_state(out / "adapter")
    for k, v in sim.adapter.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (out / "flower" / "nodes").iterdir()) == ["node-0", "node-1"]
    summary = json.loads((out / "summary.json").read_text())
    _same_personal_state(out, tmp_path / "sim", summary, sim.history[-1]["eval"]["own_data"])


def test_secure_aggregation_equals_plain_fedavg_within_quantization(tmp_path: Path) -> None:
    """Flower's SecAgg+ over 4 nodes: the server learns only the sum, and the adapter is the
    plain run's up to SecAgg+'s quantization (2^22 levels over +-8)."""
    path, cfg = _config(
        tmp_path, partition={"num_clients": 4}, federation={"rounds": 2, "clients_per_round": 4}
    )
    out = tmp_path / "secure"
    args = ["--nodes", "4", "--out", str(out), "--set", "privacy.secure_aggregation=true"]
    assert main(["federate", str(path), *args]) == 0
    plain = run_federation(cfg, tmp_path / "plain")  # type: ignore[arg-type]
    got = load_adapter_state(out / "adapter")
    worst = max((got[k] - v).abs().max().item() for k, v in plain.adapter.items())
    assert 0 < worst < 1e-4, worst
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("secure") for r in rows[1:]) and rows[-1]["accepted"] == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match=r"strategy.robust: 'median' needs each client's own"):
        load_config(path, ["privacy.secure_aggregation=true", "strategy.robust='median'"])
    with pytest.raises(ConfigError, match=r"privacy.secure_aggregation: the clients of `fedit"):
        run_federation(load_config(path, ["privacy.secure_aggregation=true"]))


def test_secure_aggregation_under_dp_noises_on_the_clients_and_survives_a_node_leaving(
    tmp_path: Path,
) -> None:
    """DP with SecAgg+: each client clips and adds a secret noise share, so the sum the server
    unmasks already carries the mechanism's noise. Client 3's node exits after sending its
    masked update (before the unmask stage): its update still counts, its mask is rebuilt
    from the other nodes' shares."""
    path, _ = _config(
        tmp_path,
        partition={"num_clients": 4},
        federation={"rounds": 1, "clients_per_round": 4},
        privacy={"clip_norm": 0.05, "noise_multiplier": 0.5, "secure_aggregation": True},
        faults={"inject": ["leave:3:1"]},
        flower={"round_timeout": 45.0},
        eval={"every": 0},
    )
    out = tmp_path / "secure-dp"
    assert main(["federate", str(path), "--nodes", "4", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r["round"] == 1]
    assert row["secure"] and row["accepted"] == [0, 1, 2, 3] and not row["faults"]
    assert row["privacy"]["noise_added_by"] == "clients (secure aggregation)"
    # Nothing data-dependent in the clear under DP: no per-client loss, size or clip flag.
    assert row["train_loss"] is None
    assert all(
        set(m) == {"client", "examples"} and not m["examples"] for m in row["client_metrics"]
    )
    pids = json.loads((out / "flower" / "pids.json").read_text())
    assert not _alive([pids["supernode-3"]])  # it did leave
    # The noiseless reference: the same clipped clients, aggregated in one process.
    sets = ["privacy.secure_aggregation=false", "privacy.noise_multiplier=0", "faults.inject=[]"]
    ref = run_federation(load_config(path, sets), tmp_path / "ref").adapter
    got = load_adapter_state(out / "adapter")
    noise = torch.cat([(got[k].double() - v.double()).flatten() for k, v in ref.items()])
    # Each of the 4 clients adds N(0, (sigma C)^2 / t), t = 2 survivors needed to unmask; the
    # mean divides by m = 4: per-coordinate std sigma C / m * sqrt(4 / t).
    want = 0.5 * 0.05 / 4 * 2**0.5
    assert noise.numel() > 1000 and abs(noise.std().item() / want - 1) < 0.1, noise.std()
    assert abs(noise.mean().item()) < 4 * want / noise.numel() ** 0.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(ref_epsilon(0.5, 1.0, 1), rel=1e-9)
    keys = list((out / "flower" / "nodes").glob("node-*/**/noise.key"))
    assert len(keys) == 4 and all(k.stat().st_mode & 0o077 == 0 for k in keys)


def ref_epsilon(sigma: float, q: float, rounds: int) -> float:
    from fedit.server.privacy import Accountant

    acc = Accountant(sigma, q, 1e-5)
    for _ in range(rounds):
        acc.step()
    return acc.epsilon()


def test_node_killed_mid_run_is_recorded_and_run_finishes(tmp_path: Path) -> None:
    path, _ = _config(
        tmp_path,
        partition={"num_clients": 3},
        federation={"rounds": 3, "clients_per_round": 3, "min_clients": 1},
        flower={"round_timeout": 90.0},
    )
    out = tmp_path / "run"
    killed: list[int] = []

    def kill_after_round_one() -> None:
        metrics, pids_file = out / "metrics.jsonl", out / "flower" / "pids.json"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rounds = [json.loads(x)["round"] for x in
                      (metrics.read_text().splitlines() if metrics.exists() else [])]  # fmt: skip
            if 1 in rounds and pids_file.exists():
                pid = json.loads(pids_file.read_text())["supernode-2"]
                os.killpg(pid, signal.SIGKILL)  # the node and everything it started
                killed.append(pid)
                return
            time.sleep(0.3)

    watcher = threading.Thread(target=kill_after_round_one)
    watcher.start()
    assert main(["federate", str(path), "--out", str(out)]) == 0
    watcher.join()
    assert killed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["accepted"] == [0, 1, 2]
    for r in rows[2:]:
        assert r["accepted"] == [0, 1]
        (fault,) = r["faults"]
        assert fault["client"] == 2 and fault["reason"]


def test_tls_auth_deployment_as_documented(tmp_path: Path) -> None:
    """The README's multi-host steps on loopback: an unregistered node is refused, a
    registered one (serving its own partition file) trains."""
    path, _ = _config(
        tmp_path, partition={"num_clients": 1}, federation={"rounds": 1, "clients_per_round": 1}
    )
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    pki, parts, app, out = (tmp_path / n for n in ("pki", "parts", "app", "run"))
    assert main(["flower-certs", str(pki), "--nodes", "2"]) == 0
    assert main(["partition", str(path), "--out", str(parts)]) == 0
    port = free_port()
    assert main(["flower-app", str(path), "--app", str(app), "--out", str(out),
                 "--superlink", f"127.0.0.1:{port}", "--root-certificates", str(pki / "ca.crt")]) == 0  # fmt: skip
    env["FLWR_HOME"] = str(app / "flwr-home")
    procs: list[subprocess.Popen[bytes]] = []

    def start(cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        f = (tmp_path / log).open("wb")
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
        procs.append(p)
        return p

    try:
        link = start([str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port),
                      "--ssl-ca-certfile", str(pki / "ca.crt"), "--ssl-certfile", str(pki / "server.crt"),
                      "--ssl-keyfile", str(pki / "server.key"), "--enable-supernode-auth",
                      "--disable-runtime-dependency-installation"], "superlink.log")  # fmt: skip
        wait_health(port, link, pki / "ca.crt")
        reg = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(pki / "node-0.pub"),
                              "fedit-local"], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert reg.returncode == 0, reg.stdout + reg.stderr

        def node(key: str, log: str) -> subprocess.Popen[bytes]:
            node_cfg = f'data-path="{parts / "clients" / "client_0000.jsonl"}" client-id=0'
            return start([str(BIN / "fedit"), "supernode", "--superlink", f"127.0.0.1:{port}",
                          "--root-certificates", str(pki / "ca.crt"),
                          "--auth-supernode-private-key", str(pki / key),
                          "--port", str(free_port()), "--node-config", node_cfg, "--max-retries", "2"],
                         log)  # fmt: skip

        stranger = node("node-1", "stranger.log")  # key never registered
        assert stranger.wait(timeout=120) != 0
        node("node-0", "node0.log")
        run = subprocess.run([str(BIN / "flwr"), "run", str(app), "fedit-local", "--stream"],
                             env=env, capture_output=True, text=True, timeout=400)  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds"] == 1 and summary["history"][-1]["accepted"] == [0]
    finally:
        for p in reversed(procs):
            tree = descendants(p.pid)
            for pid in [p.pid, *tree]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.wait()
    assert "Failed to activate SuperNode" in (tmp_path / "stranger.log").read_text(errors="replace")
    link_log = (tmp_path / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in link_log  # refused: unregistered


def test_node_config_names_the_clients_a_node_holds(tmp_path: Path) -> None:
    """No Flower processes: how a node reads its clients, how federate spreads them."""
    from fedit.engines.flower.app import _ranges
    from fedit.engines.flower.launch import spread_clients
    from fedit.engines.flower.node import _own_files, node_clients

    assert node_clients({"partition-id": 3}, 10) == [3]
    assert node_clients({"partition-ids": "0-2,7"}, 10) == [0, 1, 2, 7]
    assert node_clients({"partition-ids": 5}, 10) == [5]
    assert node_clients({"data-path": "x.jsonl"}, 10) is None
    with pytest.raises(RuntimeError, match="not clients: \\[10\\]"):
        node_clients({"partition-ids": "8-10"}, 10)
    with pytest.raises(RuntimeError, match="not a list of client ids"):
        node_clients({"partition-ids": "a-b"}, 10)
    with pytest.raises(RuntimeError, match="distinct"):
        node_clients({"partition-ids": "1,1"}, 10)
    with pytest.raises(RuntimeError, match="partition-ids='5-2': clients \\[\\]"):
        node_clients({"partition-ids": "5-2"}, 10)  # an empty range names what was given
    assert spread_clients(10, 3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert spread_clients(4, 4) == [[0], [1], [2], [3]]
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    # A folder of client files, as `fedit partition` writes them: ids from the names, own
    # held-out records from client_NNNN.own.jsonl.
    folder = tmp_path / "clients"
    folder.mkdir()
    rows = make_rows(3)[:12]
    write_jsonl(folder / "client_0003.jsonl", rows[:6])
    write_jsonl(folder / "client_0007.jsonl", rows[6:10])
    write_jsonl(folder / "client_0007.own.jsonl", rows[10:])
    _, cfg = _config(tmp_path)
    data, own = _own_files(cfg, {"data-dir": str(folder)})
    assert {c: len(r) for c, r in data.items()} == {3: 6, 7: 4}
    assert {c: len(r) for c, r in own.items()} == {7: 2}
    with pytest.raises(RuntimeError, match="no client_NNNN.jsonl"):
        _own_files(cfg, {"data-dir": str(tmp_path / "empty")})


def test_a_round_message_carries_a_nodes_clients_packed(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Flower processes: one message holds all of a node's clients of a round in one
    ConfigRecord, each array group packed in one blob (Flower moves each record and Array as
    an object with a request of its own per hop), inline when small and as an Array of its
    own when large; the arrays come back with their names, order, dtypes and values; a client
    whose training failed comes back as its reason."""
    import numpy as np
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedit.engines.flower import app
    from fedit.engines.flower.app import _bundle, _unbundle
    from fedit.engines.flower.node import thread_share
    from fedit.protocol import Payload

    rng = np.random.default_rng(0)
    adapter = {f"layer.{i}.{m}": rng.standard_normal((8, 16)).astype(np.float32)
               for i in reversed(range(30)) for m in ("B", "A")}  # fmt: skip
    wire = {"q": rng.integers(-127, 127, 50).astype(np.int8), "s": np.float16([0.5]),
            "mask": np.array([True, False])}  # fmt: skip
    one = Payload({"adapter": adapter, "wire": wire, "none": {}}, {"client": 3, "round": 2})
    two = Payload({"adapter": {"x": np.arange(6.0).reshape(2, 3)}}, {"client": 5, "error": 0.5})
    content = _bundle([one, "DataError: client 4: no data", two], {"config": "{}"})
    assert (
        len(get_all_nested_objects(content)) == 2
    )  # RecordDict, ConfigRecord (unpacked: over 120)
    monkeypatch.setattr(app, "INLINE_MAX", 1000)  # the 30-layer adapter over it, the rest not
    large = _bundle([one, "DataError: client 4: no data", two], {"config": "{}"})
    assert sorted(large) == ["0/adapter", "task"]
    for back in (_unbundle(content), _unbundle(large)):
        assert back[1] == "DataError: client 4: no data"
        for got, want in ((back[0], one), (back[2], two)):
            assert isinstance(got, Payload)
            assert got.values == want.values  # the shim's own keys stay out
            assert list(got.arrays) == list(want.arrays)
            for group, arrays in want.arrays.items():
                assert list(got.arrays[group]) == list(arrays)
                for k, a in arrays.items():
                    assert got.arrays[group][k].dtype == a.dtype
                    np.testing.assert_array_equal(got.arrays[group][k], a)
    # Nodes on one host share its cores among those training in the round.
    assert thread_share({"shared-cores": 8}, 3) == 2
    assert thread_share({"shared-cores": 8}, 1) == 8
    assert thread_share({"shared-cores": 2}, 5) == 1
    assert thread_share({"partition-id": 0}, 2) is None  # a node on a host of its own
    assert thread_share({"shared-cores": 8, "threads": 3}, 2) is None  # fixed: setup's 3


def test_a_fedit_node_waits_on_events_and_polls_less_when_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No Flower processes: the waits `fedit supernode` puts in Flower's SuperNode loop."""
    import types

    from fedit.engines.flower import supernode as sn

    slept: list[float] = []
    clock = [1000.0]
    monkeypatch.setattr(sn, "time", types.SimpleNamespace(monotonic=lambda: clock[0],
                                                          sleep=slept.append))  # fmt: skip
    waits = sn.Waits(0.1)
    waits.sleep(3)  # Flower's wait after an empty pull; the node has just answered
    assert slept[-1] == 0.1
    clock[0] += 10
    waits.sleep(3)  # idle 10 s: a twentieth of it
    assert slept[-1] == pytest.approx(0.5)
    clock[0] += 100
    waits.sleep(3)
    assert slept[-1] == sn.IDLE_POLL_MAX
    assert waits.pulled(None) is None and not waits.task_ready.is_set()
    assert waits.pulled(7) == 7 and waits.task_ready.is_set()  # wakes the executor
    waits.sleep(3)  # a message came: back to the short poll
    assert slept[-1] == 0.1
    waits.reply_ready.set()  # the executor pushed the reply: the reply wait ends at once
    waits.sleep(0.5)
    assert not waits.reply_ready.is_set() and len(slept) == 4
    monkeypatch.delenv(sn.POLL_ENV, raising=False)
    assert sn.poll_interval() == sn.DEFAULT_POLL
    monkeypatch.setenv(sn.POLL_ENV, "0.2")
    assert sn.poll_interval() == 0.2
    for bad in ("fast", "0", "-1", "5"):  # named, with what it wants, before the node starts
        monkeypatch.setenv(sn.POLL_ENV, bad)
        with pytest.raises(ValueError, match=f"FEDIT_NODE_POLL_INTERVAL='{bad}': want seconds"):
            sn.poll_interval()


def test_fedit_supernode_passes_flower_supernodes_own_options_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`fedit supernode --superlink ...` as docs/deployment.md writes it: the options are
    flower-supernode's, not fedit's (the TLS test runs the node this way)."""
    import fedit.cli as cli

    got: list[list[str]] = []
    monkeypatch.setattr(cli, "supernode_main", lambda argv: got.append(argv) or 0)
    assert main(["supernode", "--superlink", "h:9092", "--insecure", "--port", "9095"]) == 0
    assert got == [["--superlink", "h:9092", "--insecure", "--port", "9095"]]


def test_federate_refuses_more_nodes_than_clients(tmp_path: Path) -> None:
    path, _ = _config(tmp_path, partition={"num_clients": 2})
    assert main(["federate", str(path), "--nodes", "3", "--out", str(tmp_path / "o")]) == 2
