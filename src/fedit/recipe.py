"""`run_federation`: the one recipe of a run, top to bottom.

Check the config, find where to resume, read and split the data, load the model, then for each
round: the server selects clients and sends them tasks through the engine, screens and
aggregates their updates; the global adapter is evaluated on the held-out split and
checkpointed. Every engine (in this process, a worker pool, Flower nodes) runs this same recipe.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedit import __version__
from fedit.card import run_facts, write_card
from fedit.checkpoint import (
    Checkpoint,
    interrupts_deferred,
    latest_checkpoint,
    list_rounds,
    remove_partial,
    save_checkpoint,
)
from fedit.client.runtime import ClientRuntime, check_client_data
from fedit.config import Config, ConfigError, config_diff, config_from_dict, to_toml
from fedit.data.partition import PARTITIONERS, Partition, load_partition
from fedit.data.prompts import TEMPLATES
from fedit.data.records import DataError
from fedit.data.stats import format_stats
from fedit.engines import Engine
from fedit.fairness import fairness
from fedit.files import append_line, atomic_json, atomic_lines, atomic_text, writable_folder
from fedit.fingerprint import changed, fingerprints
from fedit.heldout import HeldOut, evaluate_loss, heldout_set, lost_note
from fedit.lora import (
    AdapterState,
    LoraModel,
    get_adapter,
    load_lora_model,
    save_adapter,
    set_adapter,
)
from fedit.progress import Progress, round_line, summary_table
from fedit.registry import Registry
from fedit.server.selection import SELECTORS
from fedit.server.server import Server
from fedit.server.strategies import STRATEGIES, build_strategy
from fedit.server.system import Systems
from fedit.tagplot import write_tag_plot
from fedit.tracking import Board

# Keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"federation.rounds", "federation.workers", "faults.crash"}
# Sections that only steer what happens after training.
RESUMABLE_SECTIONS = ("generate.", "judge.", "compare.", "flower.")


@dataclass
class RunResult:
    adapter: AdapterState
    history: list[dict[str, Any]]
    partition_stats: dict[str, Any]
    out_dir: Path | None = None
    notes: list[str] = field(default_factory=list)


def run_federation(
    cfg: Config,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    engine: Engine | None = None,
) -> RunResult:
    """Run FedIT (or the configured strategy) for `cfg.federation.rounds` rounds.

    With `out_dir`, every round is checkpointed there, metrics go to metrics.jsonl and the
    final global adapter to `adapter/`; `resume=True` continues from the last complete round.
    `engine` carries the tasks to clients elsewhere (Flower); by default they train here.
    """
    progress = progress or Progress(enabled=False)
    out = writable_folder(Path(out_dir), "run folder") if out_dir is not None else None
    prints = fingerprints(cfg) if out is not None else {}
    ckpt = _resume_point(cfg, out, resume, progress, prints)
    run = setup_run(cfg, progress, engine, out / "client-state" if out is not None else None)
    try:
        return _rounds(run, out, ckpt, progress, prints)
    finally:
        run.engine.close()


@dataclass
class Setup:
    """A run's parts once data and model are loaded: what the rounds need."""

    cfg: Config
    partition: Partition
    lm: LoraModel  # the server's model: evaluation and the adapter's PEFT files
    held: HeldOut
    engine: Engine
    server: Server

    def evaluate(self, rnd: int = 0, run_id: str = "") -> dict[str, Any]:
        set_adapter(self.lm.model, self.server.global_state)
        result = evaluate_loss(self.lm.model, self.held.eval_set, self.lm.pad_id)
        result["fairness"] = fairness(result, self.server.categories)
        if self.cfg.data.client_test_fraction:  # each client scores on its own held-out data
            result["own_data"] = self.server.evaluate_own(rnd, self.engine, run_id)
        return result


def setup_run(
    cfg: Config,
    progress: Progress | None = None,
    engine: Engine | None = None,
    state_dir: Path | None = None,
) -> Setup:
    """Read and split the data, load the model, tokenize the held-out split, build the engine
    (clients here unless `engine` is given, their own state under `state_dir`) and the
    server."""
    progress = progress or Progress(enabled=False)
    check_names(cfg)
    if cfg.privacy.secure_aggregation and engine is None:
        raise ConfigError(
            "privacy.secure_aggregation: the clients of `fedit run` live in this process, which "
            "sees every update anyway; secure aggregation runs over Flower (`fedit federate`, "
            "`fedit flower-app`)"
        )
    partition = _partition(cfg, progress, remote=engine is not None)
    if partition.clients:  # what the partition alone decides fails before the model loads
        Server.check(cfg, len(partition.clients))
        Systems(cfg, [len(c) for c in partition.clients])  # a bad profiles file, too
    lm = load_lora_model(cfg)
    held = heldout_set(partition.test, lm.tokenizer, cfg)
    if held.dropped:
        progress.log(
            f"{held.dropped} test examples dropped: their response starts past "
            f"data.cutoff_len={cfg.data.cutoff_len}"
        )
    note = lost_note(held, cfg)
    if note:
        progress.log(note)
    if engine is None:
        check_client_data(dict(enumerate(partition.clients)), lm.tokenizer, cfg)
        engine = local_engine(cfg, lm, partition, progress, state_dir)
    server = Server(
        cfg, engine.sizes, get_adapter(lm.model), lm.full_model_bytes, progress, engine.categories,
        engine.tags,
    )  # fmt: skip
    return Setup(cfg, partition, lm, held, engine, server)


def local_engine(
    cfg: Config,
    lm: LoraModel,
    partition: Partition,
    progress: Progress,
    state_dir: Path | None = None,
) -> Engine:
    """The clients of `partition` on this machine: in this process, or in a worker pool."""
    if cfg.federation.workers > 1:
        from fedit.engines.pool import WorkerPool

        return WorkerPool(cfg, partition.clients, state_dir)
    from fedit.engines.inprocess import InProcess

    clients = dict(enumerate(partition.clients))
    own = partition.client_tests
    return InProcess(ClientRuntime(cfg, lm, clients, progress, own=own, state_dir=state_dir))


def _rounds(
    run: Setup,
    out: Path | None,
    ckpt: Checkpoint | None,
    progress: Progress,
    prints: dict[str, str],
) -> RunResult:
    cfg, engine, server = run.cfg, run.engine, run.server
    stats = run.partition.stats
    if run.partition.clients:
        rows = 20 if len(run.partition.clients) > 20 else 100
        progress.log("partition:\n" + format_stats(stats, max_rows=rows))
    history: list[dict[str, Any]] = []
    metrics = out / "metrics.jsonl" if out else None
    start, run_id = 1, secrets.token_hex(8)
    if out and metrics:
        out.mkdir(parents=True, exist_ok=True)
        atomic_text(out / "config.toml", to_toml(cfg))
        atomic_json(out / "partition_stats.json", stats)
        if ckpt is not None:
            server.global_state = ckpt.adapter
            server.load_state_dict(ckpt.strategy_state, ckpt.round)
            engine.load_client_state(ckpt.client_state)
            run_id = str(ckpt.run_state.get("run_id") or run_id)
            start = ckpt.round + 1
            history = _rewrite_metrics(metrics, ckpt.round, ckpt.run_state.get("metrics"))
            progress.log(f"resuming after round {ckpt.round} from {ckpt.folder}")
        else:
            _rewrite_metrics(metrics, -1)

    board = Board(out / "tensorboard") if out and cfg.eval.tensorboard else None
    try:
        return _loop(run, out, progress, prints, history, start, run_id, board)
    finally:
        if board:
            board.close()


def _loop(
    run: Setup,
    out: Path | None,
    progress: Progress,
    prints: dict[str, str],
    history: list[dict[str, Any]],
    start: int,
    run_id: str,
    board: Board | None,
) -> RunResult:
    cfg, engine, server, held, lm = run.cfg, run.engine, run.server, run.held, run.lm
    stats = run.partition.stats
    metrics = out / "metrics.jsonl" if out else None
    rounds = cfg.federation.rounds
    evaluating = bool(cfg.eval.every and held.examples)
    if start == 1 and evaluating and cfg.eval.at_start:
        row: dict[str, Any] = {"round": 0, "clients": [], "eval": run.evaluate(0, run_id)}
        progress.log(f"round 0 (base): held-out loss {row['eval']['loss']:.4f}")
        history.append(row)
        if metrics:
            append_line(metrics, row)
        if board:
            board.write(row)
    stopped_at = None
    progress.rate("rounds", start - 1, rounds, "round")  # the ETA counts from here
    for rnd in range(start, rounds + 1):
        if _over_budget(cfg, server, rnd, progress):
            stopped_at = rnd - 1
            break
        t0 = time.perf_counter()
        row = server.run_round(rnd, engine, run_id)
        if evaluating and (rnd % cfg.eval.every == 0 or rnd == rounds):
            t = time.perf_counter()
            row["eval"] = run.evaluate(rnd, run_id)
            row["time"]["eval"] = time.perf_counter() - t
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if out and metrics:
            t = time.perf_counter()
            with interrupts_deferred():  # Ctrl-C lets the round's files finish first
                save_checkpoint(
                    out / "checkpoints",
                    rnd,
                    lm.model,
                    server.global_state,
                    server.state_dict(),
                    {
                        "seed": cfg.seed,
                        # Every generator derives from (seed, purpose, round, client): the round
                        # number is the whole RNG state needed to continue.
                        "rng": "derived: seed, purpose, round, client",
                        "run_id": run_id,
                        # What the rounds trained on: --resume refuses anything else.
                        "fingerprints": prints,
                        "config": cfg.to_dict(),
                        "fedit_version": __version__,
                        "metrics": row,
                    },
                    client_state=engine.client_state(rnd),
                    on_written=_crash_hook(cfg, rnd),
                )
                row["time"]["checkpoint"] = time.perf_counter() - t
                append_line(metrics, row)
            if board:
                board.write(row)
        progress.log(round_line(row, rounds) + progress.rate("rounds", rnd, rounds, "round"))
    if out:
        privacy = server.privacy_summary()
        facts = run_facts(cfg, history, privacy)
        save_adapter(
            lm.model,
            server.global_state,
            out / "adapter",
            lambda folder: write_card(folder, cfg, lm.tokenizer, facts),
        )
        summary: dict[str, Any] = {"rounds": rounds, "history": history}
        summary["partition"] = stats["heterogeneity"]
        last: dict[str, Any] = next((h["eval"] for h in reversed(history) if h.get("eval")), {})
        if "own_data" in last:  # how the final global adapter serves each client's own data
            summary["own_data"] = last["own_data"]
        if privacy is not None:
            summary["privacy"] = {**privacy, "stopped_after_round": stopped_at}
            progress.log(
                f"privacy: epsilon {privacy['epsilon']:.3f} at delta {cfg.privacy.delta:g}"
            )
        atomic_json(out / "summary.json", summary)
        write_tag_plot(history, out / "per_tag.png")  # per language (any tag), if there are any
    return RunResult(server.global_state, history, stats, out)


def check_names(cfg: Config) -> None:
    """Every registered name in the config resolves, before any data or model is loaded."""
    checks: list[tuple[str, Registry[Any], str]] = [
        ("partition.method", PARTITIONERS, cfg.partition.method),
        ("federation.strategy", STRATEGIES, cfg.federation.strategy),
        ("federation.selection", SELECTORS, cfg.federation.selection),
        ("data.template", TEMPLATES, cfg.data.template),
    ]
    for key, registry, name in checks:
        if name not in registry:
            raise ConfigError(f"{key}: unknown name {name!r}; known: {', '.join(registry.names())}")
    build_strategy(cfg, max(cfg.partition.num_clients, 1))  # option conflicts surface now


def _resume_point(
    cfg: Config, out: Path | None, resume: bool, progress: Progress, prints: dict[str, str]
) -> Checkpoint | None:
    """The checkpoint to continue from; a config that differs in more than may change is
    refused before anything is loaded."""
    if out is None:
        return None
    root = out / "checkpoints"
    if list_rounds(root) and not resume:
        raise ConfigError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    if not resume:
        return None
    for name in remove_partial(root):
        progress.log(f"removed {name}, a checkpoint a crash cut short")
    ckpt, problems = latest_checkpoint(root)
    for p in problems:
        progress.log(f"skipping damaged checkpoint: {p}")
    if ckpt is not None:
        saved = config_from_dict(ckpt.run_state["config"])
        diff = {
            k
            for k in config_diff(saved.to_dict(), cfg.to_dict())
            if k not in RESUMABLE_CHANGES and not k.startswith(RESUMABLE_SECTIONS)
        }
        if diff:
            raise ConfigError(
                f"--resume: the config differs from the checkpointed run in "
                f"{sorted(diff)}; only {sorted(RESUMABLE_CHANGES)} may change"
            )
        moved = changed(ckpt.run_state.get("fingerprints", {}), prints)
        if moved:
            what = {
                "data": f"the data file (data.path={cfg.data.path!r})",
                "model": f"the model weights (model.name={cfg.model.name!r})",
                "tokenizer": "the tokenizer",
            }
            raise ConfigError(
                f"--resume: {', '.join(what[k] for k in moved)} changed since round "
                f"{ckpt.round} was checkpointed in {ckpt.folder}; the remaining rounds would "
                "train on something else. Restore it, or start a new run in another --out"
            )
    return ckpt


def _partition(cfg: Config, progress: Progress, remote: bool) -> Partition:
    """The partition, or with remote clients and no data here: no clients, no test split."""
    try:
        return load_partition(cfg, progress.log)
    except DataError as e:
        if not remote:
            raise
        progress.log(f"no data on this host ({e}); held-out evaluation is off")
        return Partition(clients=[], test=[], stats={"heterogeneity": {}, "num_test": 0})


def _over_budget(cfg: Config, server: Server, rnd: int, progress: Progress) -> bool:
    """True when round `rnd` would spend more than `privacy.epsilon_budget` and that stops."""
    budget = cfg.privacy.epsilon_budget
    eps_next = server.epsilon_after_next_round()
    if not budget or eps_next is None or eps_next <= budget:
        return False
    note = (
        f"round {rnd} would spend epsilon {eps_next:.3f} > "
        f"privacy.epsilon_budget={budget:g} (delta {cfg.privacy.delta:g})"
    )
    if cfg.privacy.on_budget == "stop":
        progress.log(f"stopping: {note}; the adapter of round {rnd - 1} is final")
        return True
    progress.log(f"warning: {note}")
    return False


def _crash_hook(cfg: Config, rnd: int) -> Any:
    from fedit.faults import crash_now

    return crash_now if cfg.faults.crashes_at("checkpoint", rnd) else None


def _rewrite_metrics(
    path: Path, upto: int, last: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Keep only rounds <= `upto` (a resumed run re-does later rounds); atomic.

    `last`, the row saved inside round `upto`'s checkpoint, fills in a row that a crash
    between the checkpoint and the metrics append left out.
    """
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a crash: everything after it is redone
    rows = [r for r in rows if r["round"] <= upto]
    if last is not None and not any(r["round"] == upto for r in rows):
        rows.append(last)
    atomic_lines(path, rows)
    return rows


__all__ = ["RunResult", "Setup", "local_engine", "run_federation", "setup_run", "summary_table"]
