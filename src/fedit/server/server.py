"""The server of a run: it picks clients, sends tasks through an engine, screens and aggregates.

It holds the global adapter, the strategy (wrapped by DP-FedAvg when `privacy.clip_norm` is
set, with its accountant), the compression codec it decodes with, and the accounting of bytes
on the wire. It never trains: the engine carries its tasks to client runtimes and their
updates back.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedit.compression import Codec
from fedit.config import Config, ConfigError
from fedit.errors import FeditError
from fedit.fairness import own_by_tag, spread, tag_costs
from fedit.faults import crash_now
from fedit.lora import AdapterState, state_bytes
from fedit.progress import Progress
from fedit.protocol import ClientPlan, Task, Update, secagg_threshold
from fedit.seeding import generator
from fedit.server.privacy import ROUNDS_KEY, DPFedAvg
from fedit.server.screening import inject, screen
from fedit.server.selection import SELECTORS, Selection, category_shares
from fedit.server.strategies import Strategy, build_strategy
from fedit.server.system import Systems

if TYPE_CHECKING:
    from fedit.engines import Engine, Launched


EXPOSURE = "selection/exposure/"  # checkpoint keys of the server's own state
CLOCK = "system/virtual_clock"


class RoundError(FeditError):
    """A round without enough valid updates; the global adapter is left as it was."""


class Server:
    """Selection, screening, the strategy, the accountant and byte accounting, for one run."""

    def __init__(
        self,
        cfg: Config,
        sizes: list[int],
        initial: AdapterState,
        full_model_bytes: int,
        progress: Progress | None = None,
        categories: list[dict[str, int]] | None = None,
        tags: list[dict[str, str]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.sizes = sizes  # selection weighs clients by their record counts
        self.num_clients = len(sizes)
        self.categories = categories or []  # per client: records per category
        self.tags = tags or []  # per client: the tags its records share (e.g. language)
        self.exposure: dict[str, float] = {}  # decayed category shares of past rounds
        self.systems = Systems(cfg, sizes)
        self._outcomes: dict[int, dict[str, Any]] = {}
        self._probed: dict[int, float] = {}
        self._online = self.num_clients
        self.per_round = self.check(cfg, self.num_clients)
        self.global_state = initial
        self.full_model_bytes = full_model_bytes
        self.progress = progress or Progress(enabled=False)
        self.codec = Codec.from_config(cfg.compression)
        self.strategy: Strategy = build_strategy(cfg, self.num_clients)
        trim = cfg.strategy
        if trim.robust == "trimmed_mean" and int(trim.trim_ratio * self.per_round) == 0:
            self.progress.log(
                f"warning: strategy.trim_ratio={trim.trim_ratio:g} cuts floor("
                f"{trim.trim_ratio:g} x {self.per_round}) = 0 updates from each end at "
                f"{self.per_round} clients a round: the trimmed mean is the plain mean"
            )
        self.dp: DPFedAvg | None = None
        if cfg.privacy.clip_norm:
            self.dp = DPFedAvg(
                self.strategy, cfg.privacy, cfg.seed, self.per_round, self.num_clients
            )
            self.strategy = self.dp
            self.progress.log(
                f"privacy: DP-FedAvg; each client sampled on its own with probability "
                f"{self.per_round / self.num_clients:.4g} (Poisson, {self.per_round} a round on "
                "average); the norm screen is off (clipping bounds every update)"
            )

    @staticmethod
    def check(cfg: Config, num_clients: int) -> int:
        """Clients sampled per round from `num_clients`; refused if no round could succeed."""
        per_round = cfg.federation.clients_this_round(num_clients)
        need = cfg.federation.min_clients
        if need > per_round:
            raise ConfigError(
                f"federation.min_clients={need}: more than the {per_round} clients sampled "
                f"per round (federation.clients_per_round={cfg.federation.clients_per_round}); "
                "no round could succeed"
            )
        return per_round

    # ---------------------------------------------------------------- one round

    def select(self, rnd: int, engine: Engine | None = None, run_id: str = "") -> list[int]:
        """The round's clients, by the configured rule among the clients online."""
        # DP-FedAvg's accounting holds for Poisson sampling: each client on its own, rate k/N.
        name = "poisson" if self.dp is not None else self.cfg.federation.selection
        online = self.systems.online(rnd) if self.systems.enabled else list(range(self.num_clients))
        self._online, self._probed = len(online), {}
        if not online:
            return []
        probe = None
        if engine is not None:
            probe = lambda clients: self.probe(rnd, engine, clients, run_id)  # noqa: E731
        sel = self.cfg.selection
        ctx = Selection(
            rnd, self.per_round, self.sizes, generator(self.cfg.seed, "select", rnd), online,
            self.categories, dict(self.exposure), probe, self.systems.predicted,
            self.cfg.system.deadline, sel.candidates, self.tags, sel.tag, dict(sel.shares),
        )  # fmt: skip
        return SELECTORS.get(name)(ctx)

    def probe(self, rnd: int, engine: Engine, clients: list[int], run_id: str) -> dict[int, float]:
        """Each candidate's loss under the global adapter on a few of its own examples (one
        download each, no training); a candidate that fails gets -inf (it is not picked)."""
        g, n = self.global_state, self.cfg.selection.probe_examples
        tasks = [Task(rnd, c, g, ClientPlan(), run_id, probe=n) for c in clients]
        for client, result in engine.launch(tasks):
            try:
                self._probed[client] = float(result().metrics["probe_loss"])
            except FeditError:
                raise
            except Exception as e:
                self.progress.log(f"round {rnd}: probing client {client} failed: {e}")
                self._probed[client] = float("-inf")
        return dict(self._probed)

    def tasks(self, rnd: int, chosen: list[int], run_id: str = "") -> list[Task]:
        g = self.global_state
        out = []
        for c in chosen:
            plan = self.strategy.client_plan(c, g, rnd)
            budget = self.systems.step_budget(c)
            if budget is not None:  # the deadline, in the steps this client finishes by then
                plan = replace(
                    plan, max_steps=budget, partial=self.cfg.system.straggler == "partial"
                )
            out.append(Task(rnd, c, g, plan, run_id))
        return out

    def _straggler(self, client: int, planned: int) -> dict[str, Any]:
        self._outcomes[client] = {"status": "dropped", "steps": 0, "planned_steps": planned}
        took = self.systems.seconds(client, planned)
        return {"client": client, "reason": f"straggler: {planned} steps take {took:.1f} "
                f"virtual s, past system.deadline={self.cfg.system.deadline:g}"}  # fmt: skip

    def _outcome(self, update: Update) -> dict[str, Any]:
        planned = int(update.metrics.get("planned_steps", update.num_steps))
        status = "partial" if update.num_steps < planned else "finished"
        return {"status": status, "steps": update.num_steps, "planned_steps": planned}

    def _note_round(self, chosen: list[int], accepted: list[int]) -> dict[str, Any]:
        """Category exposure for coverage-aware selection, and the round's system record."""
        decay = self.cfg.selection.decay
        exposure = {c: v * decay for c, v in self.exposure.items()}
        for client in accepted:
            counts = self.categories[client] if self.categories else {}
            for cat, w in category_shares(counts).items():
                exposure[cat] = exposure.get(cat, 0.0) + w
        self.exposure = exposure
        extra: dict[str, Any] = {}
        if self._probed:
            extra["probe_losses"] = {str(c): v for c, v in sorted(self._probed.items())}
        if self.systems.enabled:
            extra["system"] = self.systems.round_record(chosen, self._online, self._outcomes)
        return extra

    def collect(self, rnd: int, launched: Launched) -> tuple[list[Update], list[dict[str, Any]]]:
        """The chosen clients' updates, decoded; a client that fails is recorded, not fatal."""
        updates, faults = [], []
        self._outcomes = {}
        for i, (client, result) in enumerate(launched, 1):
            kinds = self.cfg.faults.injected(client, rnd)
            try:
                if "fail" in kinds:
                    raise RuntimeError("injected failure")
                update = result()
                if update.metrics.get("straggler"):
                    faults.append(self._straggler(client, int(update.metrics["planned_steps"])))
                    continue
                self._outcomes[client] = self._outcome(update)
                update = update.decoded(self.codec, self.global_state)
            except FeditError:
                raise  # a configuration or data problem, the same for every client
            except Exception as e:
                self._outcomes[client] = {"status": "failed", "steps": 0}
                faults.append({"client": client, "reason": f"{type(e).__name__}: {e}"})
                continue
            updates.append(inject(update, kinds, self.global_state) if kinds else update)
            if i == 1 and self.cfg.faults.crashes_at("train", rnd):
                crash_now()
        # Under DP every per-client check must depend on that client alone: the norm screen
        # compares clients with each other (clipping bounds every norm anyway).
        ratio = 0.0 if self.dp is not None else self.cfg.federation.max_norm_ratio
        accepted, rejected = screen(updates, self.global_state, ratio)
        faults += rejected
        for f in faults:
            self.progress.log(f"round {rnd}: client {f['client']} excluded: {f['reason']}")
        return accepted, faults

    def evaluate_own(self, rnd: int, engine: Engine, run_id: str = "") -> dict[str, Any]:
        """Every client scores the global adapter, and its personal model, on its own held-out
        records; only those losses come back. The spread over clients, and the share of
        clients whose personal model beats the global one (helped) or loses to it (hurt)."""
        g = self.global_state
        tasks = [Task(rnd, c, g, ClientPlan(), run_id, own_eval=True)
                 for c in range(self.num_clients)]  # fmt: skip
        clients: dict[str, dict[str, float]] = {}
        self.progress.rate(("own-data", rnd), 0, len(tasks), "client")
        for i, (client, result) in enumerate(engine.launch(tasks), 1):
            try:
                m = result().metrics
                rate = self.progress.rate(("own-data", rnd), i, len(tasks), "client")
                if i == len(tasks) or i % 10 == 0:  # a line per ten clients: logs stay short
                    self.progress.log(f"round {rnd}: own-data evaluation {i}/{len(tasks)}{rate}")
            except FeditError:
                raise
            except Exception as e:  # a client that cannot answer is left out, and said so
                self.progress.log(f"round {rnd}: client {client} own-data evaluation failed: {e}")
                continue
            if "own_loss" in m:
                row = {"loss": m["own_loss"], "tokens": m["own_tokens"]}
                if "personal_loss" in m:
                    row["personal"] = m["personal_loss"]
                clients[str(client)] = row
        out: dict[str, Any] = {
            "clients": clients,
            **spread({c: v["loss"] for c, v in clients.items()}),
        }
        mine = {c: v["personal"] for c, v in clients.items() if "personal" in v}
        if mine:
            out["personal"] = spread(mine)
            out["helped"] = sum(mine[c] < clients[c]["loss"] for c in mine) / len(mine)
            out["hurt"] = sum(mine[c] > clients[c]["loss"] for c in mine) / len(mine)
            # personal minus global on the same clients (a client never sampled has no
            # personal model: comparing means over different clients would mislead)
            out["gain"] = sum(mine[c] - clients[c]["loss"] for c in mine) / len(mine)
        if any(self.tags):
            out["by_tag"] = own_by_tag(clients, self.tags)
        return out

    def run_round(self, rnd: int, engine: Engine, run_id: str = "") -> dict[str, Any]:
        if self.cfg.privacy.secure_aggregation:
            return self._secure_round(rnd, engine, run_id)
        t0 = time.perf_counter()
        chosen = self.select(rnd, engine, run_id)
        updates, faults = self.collect(rnd, engine.launch(self.tasks(rnd, chosen, run_id)))
        need = self.cfg.federation.min_clients
        if self.dp is not None:  # a Poisson cohort may be small, or empty: noise alone is DP
            need = min(need, len(chosen))
        if len(updates) < need and self.systems.enabled:
            # Simulated systems: offline clients and stragglers are expected; the round passes
            # with the global adapter unchanged and the run goes on.
            skipped: dict[str, Any] = {
                "round": rnd, "clients": chosen, "accepted": [], "faults": faults,
                "train_loss": None, "client_metrics": [],
                "loss_note": f"{len(updates)} updates in time, fewer than "
                             f"federation.min_clients={need}: adapter unchanged",
                "time": {"train": time.perf_counter() - t0, "aggregate": 0.0}}  # fmt: skip
            skipped.update(self._note_round(chosen, []))
            return skipped
        if len(updates) < need:
            excluded = "; ".join(f"client {f['client']}: {f['reason']}" for f in faults)
            raise RoundError(
                f"round {rnd}: {len(updates)} valid updates, fewer than federation.min_clients="
                f"{need}; the global adapter of round {rnd - 1} is kept"
                + (f". Excluded: {excluded}" if excluded else "")
            )
        t1 = time.perf_counter()
        weighed = updates
        if self.cfg.strategy.weight_by == "tokens":  # each client's data size in target tokens
            weighed = [replace(u, num_examples=int(u.metrics.get("data_tokens", u.num_examples)))
                       for u in updates]  # fmt: skip
        self.global_state = self.strategy.aggregate(self.global_state, weighed)
        t2 = time.perf_counter()
        n = sum(u.num_examples for u in updates)
        up = [u.metrics.get("bytes_up", state_bytes(u.state)) for u in updates] or [0.0]
        down = state_bytes(self.global_state)
        row: dict[str, Any] = {
            "round": rnd,
            "clients": chosen,
            "accepted": [u.client_id for u in updates],
            "faults": faults,
            "train_loss": (
                sum(u.metrics["train_loss"] * u.num_examples for u in updates) / n if n else None
            ),
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
        costs = tag_costs(row["client_metrics"], self.tags, self.cfg.client.batch_size)
        if costs:  # what a round cost each language's (each tag value's) clients
            row["by_tag"] = costs
        report = getattr(self.strategy, "round_metrics", None)
        if report is not None:
            row.update(report())
        row.update(self._note_round(chosen, [u.client_id for u in updates]))
        return row

    def _secure_round(self, rnd: int, engine: Engine, run_id: str) -> dict[str, Any]:
        """A round under secure aggregation: the server learns the survivors' sum only."""
        t0 = time.perf_counter()
        chosen = self.select(rnd, engine, run_id)
        tasks = [replace(t, secure=True) for t in self.tasks(rnd, chosen, run_id)]
        share = 0.0
        if self.dp is not None:  # each client adds its share: the sum has >= sigma*C noise
            p = self.cfg.privacy
            share = p.noise_multiplier * p.clip_norm / secagg_threshold(len(tasks)) ** 0.5
            tasks = [replace(t, clip_norm=p.clip_norm, noise_std=share) for t in tasks]
        row: dict[str, Any] = {"round": rnd, "clients": chosen, "faults": [], "secure": True}
        result = engine.secure_round(tasks, "equal" if self.dp else "examples")  # type: ignore[attr-defined]
        need = max(2, self.cfg.federation.min_clients)
        if result is None or len(result.clients) < need:
            if self.dp is not None and len(tasks) < 2:  # a small Poisson cohort: skip it
                self.dp.skip_round()
                note = "fewer than 2 clients sampled: no secure sum this round"
                row.update(accepted=[], train_loss=None, client_metrics=[], note=note)
                row["time"] = {"train": time.perf_counter() - t0, "aggregate": 0.0}
                row.update(self._note_round(chosen, []))
                return row
            raise RoundError(
                f"round {rnd}: secure aggregation did not complete with clients {chosen} "
                f"(needs {need} survivors); the global adapter of round {rnd - 1} is kept"
            )
        t1 = time.perf_counter()
        g = self.global_state
        delta = {k: torch.from_numpy(np.array(v, dtype=np.float64)) for k, v in result.mean.items()}
        if self.dp is not None:
            total = {k: v * result.weight for k, v in delta.items()}  # equal weights: the sum
            self.global_state = self.dp.aggregate_noised_sum(g, total, len(result.clients), share)
        else:
            state = {k: (g[k].double() + v).to(g[k].dtype) for k, v in delta.items()}
            mean = Update(-1, state, int(result.weight), 0)
            self.global_state = self.strategy.aggregate(g, [mean])
        t2 = time.perf_counter()
        metrics = [
            {"client": int(m["client"]), "examples": int(m.get("num_examples", 0)),
             **{k[len("metric."):]: float(v) for k, v in m.items() if k.startswith("metric.")}}
            for m in result.clients
        ]  # fmt: skip
        n = sum(m["examples"] for m in metrics)
        losses = [m for m in metrics if "train_loss" in m]  # none under DP: not released
        values = sum(v.numel() for v in delta.values())
        row.update(
            accepted=sorted(m["client"] for m in metrics),
            faults=[
                {"client": c, "reason": "lost during secure aggregation"}
                for c in chosen
                if c not in {m["client"] for m in metrics}
            ],
            train_loss=sum(m["train_loss"] * m["examples"] for m in losses) / n if losses else None,
            client_metrics=metrics,
            # The masked vector: one int64 per value (SecAgg+'s modular arithmetic).
            bytes_up_per_client=float(values * 8),
            bytes_down_per_client=state_bytes(self.global_state),
            time={"train": t1 - t0, "aggregate": t2 - t1},
        )
        if self.dp is not None:
            row["privacy"] = self.dp.report
            row["loss_note"] = "not released under DP with secure aggregation"
        row.update(self._note_round(chosen, row["accepted"]))
        return row

    # ---------------------------------------------------------------- privacy

    def epsilon_after_next_round(self) -> float | None:
        return None if self.dp is None else self.dp.epsilon_after_next_round()

    def privacy_summary(self) -> dict[str, Any] | None:
        return None if self.dp is None else self.dp.summary()

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = dict(self.strategy.state_dict())
        out.update({EXPOSURE + c: torch.tensor([v], dtype=torch.float64)
                    for c, v in self.exposure.items()})  # fmt: skip
        out[CLOCK] = torch.tensor([self.systems.clock], dtype=torch.float64)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], rnd: int) -> None:
        """The strategy (and selection, virtual clock) state of round `rnd`'s checkpoint."""
        state = dict(state)
        self.exposure = {k[len(EXPOSURE):]: float(state.pop(k)[0])
                         for k in list(state) if k.startswith(EXPOSURE)}  # fmt: skip
        self.systems.clock = float(state.pop(CLOCK)[0]) if CLOCK in state else 0.0
        if self.dp is not None and ROUNDS_KEY not in state:  # written before DP kept it
            state = {**state, ROUNDS_KEY: torch.tensor([rnd])}
        self.strategy.load_state_dict(state)
