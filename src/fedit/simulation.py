"""The round loop in one process: one base model in memory, client adapters swapped in and out."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fedit import __version__
from fedit.checkpoint import (
    interrupts_deferred,
    latest_checkpoint,
    list_rounds,
    remove_partial,
    save_checkpoint,
)
from fedit.client import ClientPlan, Update, train_local
from fedit.compression import Codec
from fedit.config import Config, ConfigError, config_from_dict, to_toml
from fedit.data.partition import PARTITIONERS, Partition, format_stats, make_partition
from fedit.data.prompts import TEMPLATES, Example, tokenize_records
from fedit.data.records import DataError, load_records
from fedit.errors import FeditError
from fedit.evaluate.loss import EvalSet, evaluate_loss
from fedit.faults import RoundError, crash_now, inject, screen
from fedit.lora import (
    AdapterState,
    attach_lora,
    get_adapter,
    save_adapter,
    set_adapter,
    state_bytes,
)
from fedit.models import autocast_dtype, load_model, model_config, pick_device
from fedit.privacy import Accountant, clip, gaussian_noise
from fedit.progress import Progress, summary_table
from fedit.registry import Registry
from fedit.resources import check_memory
from fedit.seeding import derive_seed, generator
from fedit.selection import SELECTORS
from fedit.strategies import STRATEGIES, build_strategy
from fedit.strategies.base import full_states

if TYPE_CHECKING:
    from fedit.workers import WorkerPool

# (client, call that returns its update or raises why it has none)
Launched = list[tuple[int, Callable[[], Update]]]


class Remote(Protocol):
    """Clients that train elsewhere (Flower nodes): their data sizes and a way to train them."""

    sizes: list[int]

    def launch(
        self, rnd: int, chosen: list[int], adapter: AdapterState, plans: dict[int, ClientPlan]
    ) -> Launched: ...


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


def eval_subset(examples: list[Example], cfg: Config) -> list[Example]:
    """`eval.max_examples` test examples, the same ones every round and in `fedit eval`."""
    if cfg.eval.max_examples and len(examples) > cfg.eval.max_examples:
        keep = generator(cfg.seed, "eval-subset").permutation(len(examples))
        return [examples[i] for i in sorted(keep[: cfg.eval.max_examples])]
    return examples


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


class Federation:
    """What lives for the whole run: partition, tokenized data, the model, the strategy."""

    def __init__(
        self, cfg: Config, progress: Progress | None = None, remote: Remote | None = None
    ) -> None:
        check_names(cfg)
        self.cfg = cfg
        self.progress = progress or Progress(enabled=False)
        self.remote = remote
        self.partition: Partition = self._partition()
        # Selection weighs clients by their record counts, wherever the records live.
        self.sizes = remote.sizes if remote else [len(c) for c in self.partition.clients]
        self.num_clients = len(self.sizes)
        self.per_round = cfg.federation.clients_this_round(self.num_clients)
        self.device = pick_device(cfg.model)
        self.memory = check_memory(model_config(cfg.model), cfg, self.device)
        self.tokenizer, base = load_model(cfg.model, seed=derive_seed(cfg.seed, "base-init"))
        # LoRA is initialized on the CPU, so the same seed gives the same adapter on any device.
        self.model = attach_lora(base, cfg.lora, derive_seed(cfg.seed, "lora-init"), cfg.model.name)
        self.model.to(self.device)
        self.model.fedit_autocast = autocast_dtype(cfg.model, self.device)
        self.global_state: AdapterState = get_adapter(self.model)
        self.strategy = build_strategy(cfg, self.num_clients)
        self.codec = Codec.from_config(cfg.compression)
        self._residuals: dict[int, AdapterState] = {}  # error feedback, held for each client
        self.full_model_bytes = sum(p.numel() * 4 for p in self.model.parameters())
        self.accountant: Accountant | None = None
        if cfg.privacy.clip_norm and cfg.privacy.noise_multiplier:
            self.accountant = Accountant(
                cfg.privacy.noise_multiplier, self.per_round / self.num_clients, cfg.privacy.delta
            )
        self.pad_id = int(self.tokenizer.pad_token_id)
        self._examples: dict[int, list[Example]] = {}
        test, dropped = self._tokenize(self.partition.test)
        if dropped:
            self.progress.log(
                f"{dropped} test examples dropped: their response starts past "
                f"data.cutoff_len={cfg.data.cutoff_len}"
            )
        self.eval_set = EvalSet.build(eval_subset(test, cfg), cfg.eval.micro_batch_size)
        self.pool: WorkerPool | None = None
        if cfg.federation.workers > 1:
            from fedit.workers import WorkerPool

            self.pool = WorkerPool(cfg, cfg.federation.workers)

    def _partition(self) -> Partition:
        """The partition, or with remote clients and no data here: no clients, no test split."""
        try:
            records, report = load_records(self.cfg.data)
        except DataError as e:
            if self.remote is None:
                raise
            self.progress.log(f"no data on this host ({e}); held-out evaluation is off")
            empty = {"heterogeneity": {}, "num_test": 0}
            return Partition(clients=[], test=[], stats=empty)
        if report.skipped:
            self.progress.log(
                f"skipped {len(report.skipped)} bad records; first: {report.skipped[0]}"
            )
        return make_partition(records, self.cfg)

    def _tokenize(self, records: Any) -> tuple[list[Example], int]:
        d = self.cfg.data
        return tokenize_records(
            records, self.tokenizer, d.template, d.cutoff_len, d.train_on_inputs
        )

    def client_examples(self, client: int) -> list[Example]:
        """Tokenized once per client, on first use, then kept for the run."""
        if client not in self._examples:
            examples, dropped = self._tokenize(self.partition.clients[client])
            if not examples:
                raise DataError(
                    f"client {client}: all {dropped} examples lose their response at "
                    f"data.cutoff_len={self.cfg.data.cutoff_len}; raise it"
                )
            if dropped:
                self.progress.log(
                    f"client {client}: {dropped} of {dropped + len(examples)} examples dropped "
                    f"(response starts past data.cutoff_len={self.cfg.data.cutoff_len})"
                )
            self._examples[client] = examples
        return self._examples[client]

    def evaluate(self) -> dict[str, Any] | None:
        if not self.eval_set.examples:
            return None
        set_adapter(self.model, self.global_state)
        return evaluate_loss(self.model, self.eval_set, self.pad_id)

    def select(self, rnd: int) -> list[int]:
        rule = SELECTORS.get(self.cfg.federation.selection)
        return rule(self.sizes, self.per_round, generator(self.cfg.seed, "select", rnd))

    def train_client(
        self,
        rnd: int,
        client: int,
        slot: str,
        adapter: AdapterState | None = None,
        plan: ClientPlan | None = None,
        data_index: int | None = None,
    ) -> Update:
        """One client's local training from the global adapter (or `adapter`, as a worker
        process receives it) under the strategy's plan (or `plan`). `data_index` picks the
        partition entry holding the client's data when it differs from the client id (a node
        that holds only its own records)."""
        rounds = self.cfg.federation.rounds
        adapter = self.global_state if adapter is None else adapter

        def on_step(step: int, total: int, loss: float) -> None:
            self.progress.step(rnd, rounds, slot, client, step, total, loss)

        update = train_local(
            self.model,
            adapter,
            self.client_examples(client if data_index is None else data_index),
            self.cfg.client,
            client_id=client,
            seed=derive_seed(self.cfg.seed, "client", rnd, client),
            pad_token_id=self.pad_id,
            on_step=on_step,
            plan=plan or self.strategy.client_plan(client, adapter),
        )
        return self._compress(update, adapter)

    def _compress(self, update: Update, adapter: AdapterState) -> Update:
        """The client side of compression: what the server receives is global + decoded delta."""
        if self.codec.method == "none":
            update.metrics["bytes_up"] = float(state_bytes(update.state))
            return update
        delta = {k: v.float() - adapter[k].float() for k, v in update.state.items()}
        keep = self.cfg.compression.error_feedback
        residual = self._residuals.get(update.client_id) if keep else None
        wires, sent, left, nbytes = self.codec.compress(delta, residual)
        update.wire = wires
        if keep:
            self._residuals[update.client_id] = left
        update.state = {
            k: (adapter[k].float() + sent[k]).to(v.dtype) for k, v in update.state.items()
        }
        update.metrics["bytes_up"] = float(nbytes)
        return update

    def _dp_aggregate(self, rnd: int, updates: list[Update]) -> dict[str, Any]:
        """DP-FedAvg: clipped deltas, equal weights over the round's sample, Gaussian noise."""
        p = self.cfg.privacy
        g = self.global_state
        total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in g.items()}
        norms = []
        for state in full_states(g, updates):  # FFA-LoRA's clients send no A: its delta is 0
            clipped, norm = clip({k: state[k].double() - g[k].double() for k in g}, p.clip_norm)
            norms.append(norm)
            for k, v in clipped.items():
                total[k] += v
        std = p.noise_multiplier * p.clip_norm
        if std:
            # Noise on what clients can change: FFA-LoRA's clients send no A, so A gets none.
            noisy = [k for k in g if any(k in u.state for u in updates)]
            gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "dp-noise", rnd))
            for k, v in gaussian_noise({k: g[k] for k in noisy}, std, gen).items():
                total[k] += v.double()
        m = self.per_round  # fixed denominator: one client changes the mean by <= clip/m
        self.global_state = {k: (g[k].double() + total[k] / m).to(g[k].dtype) for k in g}
        row: dict[str, Any] = {
            "clip_norm": p.clip_norm,
            "update_norms": norms,
            "clipped": sum(n > p.clip_norm for n in norms),
            "noise_std_of_mean": std / m,
        }
        if self.accountant is not None:
            self.accountant.step()
            row.update(epsilon=self.accountant.epsilon(), delta=p.delta)
        return row

    def epsilon_after_next_round(self) -> float | None:
        if self.accountant is None:
            return None
        probe = Accountant(self.accountant.noise_multiplier, self.accountant.sample_rate,
                           self.accountant.delta)  # fmt: skip
        probe.load_state_dict(self.accountant.state_dict())
        probe.step()
        return probe.epsilon()

    def _launch(self, rnd: int, chosen: list[int]) -> Launched:
        """(client, call that returns its update): in turn here, all at once in the pool, or
        on the remote nodes."""
        if self.remote is not None:
            plans = {c: self.strategy.client_plan(c, self.global_state) for c in chosen}
            return self.remote.launch(rnd, chosen, self.global_state, plans)
        if self.pool is None:
            n = len(chosen)
            return [
                (c, partial(self.train_client, rnd, c, f"{i}/{n}")) for i, c in enumerate(chosen, 1)
            ]
        futures = [
            (
                c,
                self.pool.submit(
                    rnd, c, self.global_state, self.strategy.client_plan(c, self.global_state)
                ),
            )
            for c in chosen
        ]
        return [(c, f.result) for c, f in futures]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def collect(self, rnd: int, chosen: list[int]) -> tuple[list[Update], list[dict[str, Any]]]:
        """Train the chosen clients; a client that fails is recorded, not fatal."""
        updates, faults = [], []
        for i, (client, result) in enumerate(self._launch(rnd, chosen), 1):
            kinds = self.cfg.faults.injected(client, rnd)
            try:
                if "fail" in kinds:
                    raise RuntimeError("injected failure")
                update = result()
            except FeditError:
                raise  # a configuration or data problem, the same for every client
            except Exception as e:
                faults.append({"client": client, "reason": f"{type(e).__name__}: {e}"})
                continue
            updates.append(inject(update, kinds, self.global_state) if kinds else update)
            if i == 1 and self.cfg.faults.crashes_at("train", rnd):
                crash_now()
        accepted, rejected = screen(updates, self.global_state, self.cfg.federation.max_norm_ratio)
        faults += rejected
        for f in faults:
            self.progress.log(f"round {rnd}: client {f['client']} excluded: {f['reason']}")
        return accepted, faults

    def run_round(self, rnd: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        chosen = self.select(rnd)
        updates, faults = self.collect(rnd, chosen)
        need = self.cfg.federation.min_clients
        if len(updates) < need:
            raise RoundError(
                f"round {rnd}: {len(updates)} valid updates, fewer than federation.min_clients="
                f"{need}; the global adapter of round {rnd - 1} is kept. Excluded: "
                + "; ".join(f"client {f['client']}: {f['reason']}" for f in faults)
            )
        t1 = time.perf_counter()
        privacy = None
        if self.cfg.privacy.clip_norm:
            privacy = self._dp_aggregate(rnd, updates)
        else:
            self.global_state = self.strategy.aggregate(self.global_state, updates)
        t2 = time.perf_counter()
        n = sum(u.num_examples for u in updates)
        up = [u.metrics.get("bytes_up", state_bytes(u.state)) for u in updates]
        down = state_bytes(self.global_state)
        row = {
            "round": rnd,
            "clients": chosen,
            "accepted": [u.client_id for u in updates],
            "faults": faults,
            "train_loss": sum(u.metrics["train_loss"] * u.num_examples for u in updates) / n,
            "client_metrics": [
                {"client": u.client_id, "examples": u.num_examples, **u.metrics} for u in updates
            ],
            "bytes_up_per_client": sum(up) / len(up),
            "bytes_down_per_client": down,
            # What a round costs on the wire, against sending fp32 adapters or the full model.
            "bytes": {
                "up_total": sum(up),
                "down_total": down * len(chosen),
                "fp32_adapter": sum(v.numel() * 4 for v in self.global_state.values()),
                "full_model": self.full_model_bytes,
            },
            "time": {"train": t1 - t0, "aggregate": t2 - t1},
        }
        if privacy is not None:
            row["privacy"] = privacy
        return row


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return rows


def _config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != "fields":
            keys += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def run_federation(
    cfg: Config,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    remote: Remote | None = None,
) -> RunResult:
    """Run FedIT (or the configured strategy) for `cfg.federation.rounds` rounds.

    With `out_dir`, every round is checkpointed there, metrics go to metrics.jsonl and the
    final global adapter to `adapter/`; `resume=True` continues from the last complete round.
    """
    progress = progress or Progress(enabled=False)
    out = Path(out_dir) if out_dir is not None else None
    ckpt_root = out / "checkpoints" if out else None
    ckpt = None
    if out and ckpt_root:
        if list_rounds(ckpt_root) and not resume:
            raise ConfigError(
                f"{out} already holds a run; pass --resume to continue it or choose another --out"
            )
        if resume:
            for name in remove_partial(ckpt_root):
                progress.log(f"removed {name}, a checkpoint a crash cut short")
            ckpt, problems = latest_checkpoint(ckpt_root)
            for p in problems:
                progress.log(f"skipping damaged checkpoint: {p}")
            if ckpt is not None:
                saved = config_from_dict(ckpt.run_state["config"])
                diff = {
                    k
                    for k in _config_diff(saved.to_dict(), cfg.to_dict())
                    if k not in RESUMABLE_CHANGES and not k.startswith(RESUMABLE_SECTIONS)
                }
                if diff:
                    raise ConfigError(
                        f"--resume: the config differs from the checkpointed run in "
                        f"{sorted(diff)}; only {sorted(RESUMABLE_CHANGES)} may change"
                    )
    fed = Federation(cfg, progress, remote)
    try:
        stats = fed.partition.stats
        if fed.partition.clients:
            rows = 20 if fed.num_clients > 20 else 100
            progress.log("partition:\n" + format_stats(stats, max_rows=rows))
        history: list[dict[str, Any]] = []
        metrics_path = out / "metrics.jsonl" if out else None
        start = 1
        if out and metrics_path:
            out.mkdir(parents=True, exist_ok=True)
            atomic_text(out / "config.toml", to_toml(cfg))
            atomic_text(out / "partition_stats.json", json.dumps(stats, indent=1) + "\n")
            if ckpt is not None:
                fed.global_state = ckpt.adapter
                fed.strategy.load_state_dict(ckpt.strategy_state)
                if fed.accountant is not None:  # one Gaussian-mechanism step per round
                    a = fed.accountant
                    a.load_state_dict(
                        {"history": [(a.noise_multiplier, a.sample_rate, ckpt.round)]}
                    )
                start = ckpt.round + 1
                history = _rewrite_metrics(metrics_path, ckpt.round, ckpt.run_state.get("metrics"))
                progress.log(f"resuming after round {ckpt.round} from {ckpt.folder}")
            else:
                _rewrite_metrics(metrics_path, -1)
        rounds = cfg.federation.rounds
        evaluating = bool(cfg.eval.every and fed.eval_set.examples)
        if start == 1 and evaluating and cfg.eval.at_start:
            row: dict[str, Any] = {"round": 0, "clients": [], "eval": fed.evaluate()}
            progress.log(f"round 0 (base): held-out loss {row['eval']['loss']:.4f}")
            history.append(row)
            if metrics_path:
                _append_jsonl(metrics_path, row)
        stopped_at = None
        for rnd in range(start, rounds + 1):
            budget = cfg.privacy.epsilon_budget
            eps_next = fed.epsilon_after_next_round()
            if budget and eps_next is not None and eps_next > budget:
                note = (
                    f"round {rnd} would spend epsilon {eps_next:.3f} > "
                    f"privacy.epsilon_budget={budget:g} (delta {cfg.privacy.delta:g})"
                )
                if cfg.privacy.on_budget == "stop":
                    progress.log(f"stopping: {note}; the adapter of round {rnd - 1} is final")
                    stopped_at = rnd - 1
                    break
                progress.log(f"warning: {note}")
            t0 = time.perf_counter()
            row = fed.run_round(rnd)
            if evaluating and (rnd % cfg.eval.every == 0 or rnd == rounds):
                t = time.perf_counter()
                row["eval"] = fed.evaluate()
                row["time"]["eval"] = time.perf_counter() - t
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            if out and ckpt_root and metrics_path:
                t = time.perf_counter()
                with interrupts_deferred():  # Ctrl-C lets the round's files finish first
                    save_checkpoint(
                        ckpt_root,
                        rnd,
                        fed.model,
                        fed.global_state,
                        fed.strategy.state_dict(),
                        {
                            "seed": cfg.seed,
                            # Every generator derives from (seed, purpose, round, client): the round
                            # number is the whole RNG state needed to continue.
                            "rng": "derived: seed, purpose, round, client",
                            "config": cfg.to_dict(),
                            "fedit_version": __version__,
                            "metrics": row,
                        },
                        on_written=crash_now if cfg.faults.crashes_at("checkpoint", rnd) else None,
                    )
                    _append_jsonl(metrics_path, row)
                row["time"]["checkpoint"] = time.perf_counter() - t
            ev = row.get("eval")
            progress.log(
                f"round {rnd}/{rounds} done: clients {row['clients']} train loss "
                f"{row['train_loss']:.4f}"
                + (f", held-out loss {ev['loss']:.4f}" if ev else "")
                + (
                    f", epsilon {row['privacy']['epsilon']:.3f}"
                    if "epsilon" in row.get("privacy", {})
                    else ""
                )
                + f" ({row['seconds']:.1f}s)"
            )
        if out:
            save_adapter(fed.model, fed.global_state, out / "adapter")
            summary: dict[str, Any] = {
                "rounds": rounds,
                "history": history,
                "partition": stats["heterogeneity"],
            }
            if fed.accountant is not None:
                summary["privacy"] = {
                    "epsilon": fed.accountant.epsilon(), "delta": cfg.privacy.delta,
                    "noise_multiplier": cfg.privacy.noise_multiplier,
                    "clip_norm": cfg.privacy.clip_norm, "stopped_after_round": stopped_at,
                }  # fmt: skip
                progress.log(f"privacy: epsilon {summary['privacy']['epsilon']:.3f} at delta "
                             f"{cfg.privacy.delta:g}")  # fmt: skip
            atomic_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
        return RunResult(fed.global_state, history, stats, out)
    finally:
        fed.close()


def atomic_text(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["Federation", "RunResult", "run_federation", "summary_table"]
