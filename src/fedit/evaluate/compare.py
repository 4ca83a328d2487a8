"""The paper's comparison on one partition: base, local-only, FedIT, centralized.

Every arm trains through `run_federation` on variants of one config, so all share the
partition, the test split, the training loop and the evaluation:

- base: the model without tuning;
- local: each of `compare.local_clients` sampled clients tunes alone (`partition.only`) for
  `federation.rounds` rounds of its usual local work, the budget of a client that is selected
  every round; mean and spread over those clients are reported;
- fedit: the federation as configured;
- centralized: all clients' data pooled into one client (`partition.pooled`), with the same
  total number of optimizer steps (same batch size) as FedIT spent, spread over the same rounds;
- finetune, ditto, fedsa, feddpa: FedIT with that `personalization.method`, each client's personal
  model scored on its own held-out records.

With `data.client_test_fraction`, every arm is also scored on each client's own held-out
records (`own_data`): the global adapters here, the personal models by their clients, each
local-only client on its own.

Each arm is a run folder under the output folder; a finished arm is reused, an interrupted
one resumes from its last checkpoint. Answers and judgments are cached the same way.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from fedit.config import Config, ConfigError, to_toml, variant
from fedit.data.partition import load_partition
from fedit.evaluate.generation import Embedder
from fedit.evaluate.scoring import generation_subset, score_model
from fedit.files import atomic_json, atomic_text
from fedit.heldout import EvalSet, evaluate_loss, scored_examples
from fedit.inference import load_for_inference, use_adapter
from fedit.lora import get_adapter, load_adapter_state
from fedit.progress import Progress
from fedit.recipe import run_federation
from fedit.seeding import generator

PERSONAL_ARMS = ("finetune", "ditto", "fedsa", "feddpa")


def _finished(folder: Path, rounds: int) -> list[dict[str, Any]] | None:
    summary = folder / "summary.json"
    if summary.is_file() and (folder / "adapter").is_dir():
        data = json.loads(summary.read_text(encoding="utf-8"))
        if data.get("rounds") == rounds:
            return list(data["history"])
    return None


def run_arm(cfg: Config, folder: Path, name: str, progress: Progress) -> list[dict[str, Any]]:
    done = _finished(folder, cfg.federation.rounds)
    if done is not None:
        progress.log(f"{name}: finished earlier, reusing {folder}")
        return done
    progress.log(f"{name}: training ({folder})")
    return run_federation(cfg, folder, resume=True, progress=progress).history


def _steps(history: list[dict[str, Any]]) -> int:
    return int(sum(c["steps"] for h in history for c in h.get("client_metrics", [])))


def _examples_seen(history: list[dict[str, Any]], batch_size: int) -> int:
    return _steps(history) * batch_size


def _final_eval(history: list[dict[str, Any]]) -> dict[str, Any]:
    for h in reversed(history):
        if h.get("eval"):
            return dict(h["eval"])
    raise ConfigError("an arm finished without a held-out evaluation; set eval.every >= 1")


def _loss_curve(history: list[dict[str, Any]]) -> list[list[float]]:
    return [[h["round"], h["eval"]["loss"]] for h in history if h.get("eval")]


def local_clients(cfg: Config, num_clients: int) -> list[int]:
    k = min(cfg.compare.local_clients, num_clients)
    rng = generator(cfg.seed, "compare-local")
    return sorted(int(c) for c in rng.choice(num_clients, k, replace=False))


def run_compare(cfg: Config, out: Path, progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or Progress(enabled=False)
    if cfg.partition.only or cfg.partition.pooled:
        raise ConfigError(
            "compare: partition.only / partition.pooled are set by the arms; unset them"
        )
    if cfg.eval.every == 0:
        raise ConfigError("compare: eval.every=0 leaves the arms without a held-out loss")
    arms = list(dict.fromkeys(cfg.compare.arms))
    from fedit.evaluate.suites import load_suite, recorded_references, suite_answers, suite_label

    suites = {name: load_suite(name, cfg) for name in cfg.eval.suites}  # checked before training
    recorded = {name: recorded_references(name, cfg) for name in cfg.eval.suites}
    out.mkdir(parents=True, exist_ok=True)
    atomic_text(out / "config.toml", to_toml(cfg))
    partition = load_partition(cfg)
    num_clients = len(partition.clients)
    rounds = cfg.federation.rounds
    arm_info: dict[str, dict[str, Any]] = {}
    folders: dict[str, Path] = {}

    if "fedit" in arms:
        h = run_arm(cfg, out / "fedit", "fedit", progress)
        arm_info["fedit"] = {"history": h, "steps": _steps(h)}
        folders["fedit"] = out / "fedit" / "adapter"

    if "centralized" in arms:
        if "fedit" in arm_info:
            total = arm_info["fedit"]["steps"]
        elif cfg.client.max_steps:
            total = cfg.client.max_steps * cfg.federation.clients_this_round(num_clients) * rounds
        else:
            raise ConfigError(
                "compare: the centralized arm matches FedIT's step count; with client.max_steps=0 "
                "it needs the fedit arm"
            )
        per_round = max(1, round(total / rounds))
        c_cfg = variant(
            cfg,
            partition={"pooled": True},
            federation={"clients_per_round": 1, "min_clients": 1},
            client={"max_steps": per_round},
            eval={"at_start": False},  # round 0 is the base arm
        )
        h = run_arm(c_cfg, out / "centralized", "centralized", progress)
        arm_info["centralized"] = {"history": h, "steps": _steps(h)}
        folders["centralized"] = out / "centralized" / "adapter"

    for m in PERSONAL_ARMS:
        if m in arms:
            if not cfg.data.client_test_fraction:
                raise ConfigError(
                    f"compare.arms: the personalized arm {m!r} is scored on each client's own "
                    "held-out data; set data.client_test_fraction > 0"
                )
            h = run_arm(variant(cfg, personalization={"method": m}), out / m, m, progress)
            arm_info[m] = {"history": h, "steps": _steps(h)}
            folders[m] = out / m / "adapter"

    local_ids: list[int] = []
    if "local" in arms:
        local_ids = local_clients(cfg, num_clients)
        runs = []
        for c in local_ids:
            l_cfg = variant(
                cfg,
                partition={"only": [c]},
                federation={"clients_per_round": 1, "min_clients": 1},
                eval={"every": rounds, "at_start": False},  # only the final adapter counts
            )
            folder = out / f"local_client_{c:04d}"
            h = run_arm(l_cfg, folder, f"local client {c}", progress)
            size = len(partition.clients[c])
            runs.append({"client": c, "history": h, "steps": _steps(h), "size": size})
            folders[f"local_client_{c:04d}"] = folder / "adapter"
        arm_info["local"] = {"runs": runs}

    # Evaluation: one model in memory, the adapters swapped in turn.
    progress.log("evaluating the arms")
    loaded = load_for_inference(cfg, None)
    per_category = cfg.generate.per_category
    wants = per_category or suites  # answers to compare with references
    embedder = Embedder(cfg.generate.embedder) if cfg.generate.embedder and wants else None
    base_state = get_adapter(loaded.model)  # LoRA's B is zero here: the base model

    def score(label: str, adapter: Path | None, loss: bool = False) -> dict[str, Any]:
        """Answers and judge (and with `loss` the held-out loss) of one arm's adapter."""
        use_adapter(loaded, load_adapter_state(adapter) if adapter else base_state, adapter)
        s = score_model(
            loaded,
            partition.test,
            loss=loss,
            answers=out / "answers" / f"{label}.jsonl",
            judge_cache=out / "judge_cache.jsonl",
            embedder=embedder,
            progress=progress,
        )
        flat: dict[str, Any] = {**s.get("generation", {})}
        for key in ("eval", "judge"):
            if key in s:
                flat[key] = s[key]
        for name, items in suites.items():  # the same arm on other question sets
            from fedit.evaluate.suite_scoring import score_suite

            path = out / "answers" / f"{label}-{suite_label(name)}.jsonl"
            rows = suite_answers(loaded, name, items, path, progress)
            cache = out / "judge_cache.jsonl"
            flat.setdefault("suites", {})[name] = score_suite(
                cfg, rows, embedder, cache, progress, recorded[name]
            )
        return flat

    results: dict[str, Any] = {
        "rounds": rounds,
        "num_clients": num_clients,
        "clients_per_round": cfg.federation.clients_this_round(num_clients),
        "batch_size": cfg.client.batch_size,
        "generation_items": len(generation_subset(partition.test, per_category, cfg.seed)),
        "arms": {},
    }
    if "base" in arms:
        base_cache = out / "base_eval.json"
        cached = base_cache.is_file()
        base = score("base", None, loss=not cached)
        if cached:
            base_eval = json.loads(base_cache.read_text(encoding="utf-8"))
        else:
            base_eval = base["eval"]
            atomic_json(base_cache, base_eval, indent=None)
        base.pop("eval", None)
        results["arms"]["base"] = {**_loss_view(base_eval), **base, "steps": 0}
    for name in ("fedit", "centralized", *PERSONAL_ARMS):
        if name in arm_info:
            info = arm_info[name]
            results["arms"][name] = {
                **_loss_view(_final_eval(info["history"])),
                **score(name, folders[name]),
                "steps": info["steps"],
                "loss_per_round": _loss_curve(info["history"]),
            }
            curve = results["arms"][name]["loss_per_round"]
            if "base" in results["arms"] and (not curve or curve[0][0] != 0):
                curve.insert(0, [0, results["arms"]["base"]["loss"]])  # LoRA starts as a no-op
    if "local" in arm_info:
        per_client = []
        for run in arm_info["local"]["runs"]:
            label = f"local_client_{run['client']:04d}"
            per_client.append(
                {
                    "client": run["client"],
                    "train_records": run["size"],
                    "steps": run["steps"],
                    **_loss_view(_final_eval(run["history"])),
                    **score(label, folders[label]),
                }
            )
        results["arms"]["local"] = _local_summary(per_client)
    results["arms"] = {a: results["arms"][a] for a in arms if a in results["arms"]}
    if cfg.data.client_test_fraction:
        own = own_data_table(loaded, partition.client_tests, cfg, base_state, folders)
        for name, info in arm_info.items():
            if name in PERSONAL_ARMS:  # scored by the clients, with their personal models
                ev = _final_eval(info["history"])["own_data"]["clients"]
                own[name] = {c: v.get("personal", v["loss"]) for c, v in ev.items()}
        for run in arm_info.get("local", {}).get("runs", []):
            ev = _final_eval(run["history"]).get("own_data", {}).get("clients", {})
            if "0" in ev:  # the local arm's only client is this client
                own.setdefault("local", {})[str(run["client"])] = ev["0"]["loss"]
        results["own_data"] = own
    atomic_json(out / "results.json", results)
    from fedit.evaluate.report import write_report

    write_report(results, out)
    return results


def own_data_table(
    loaded: Any,
    own: dict[int, list[Any]],
    cfg: Config,
    base_state: Any,
    folders: dict[str, Path],
) -> dict[str, dict[str, float]]:
    """arm -> client -> loss of the arm's global adapter on the client's own held-out data."""
    sets = {}
    for c, records in own.items():
        examples, _ = scored_examples(records, loaded.tokenizer, cfg)
        if examples:
            sets[str(c)] = EvalSet.build(examples, cfg.eval.micro_batch_size)
    states = {
        "base": base_state,
        **{
            a: load_adapter_state(f)
            for a, f in folders.items()
            if not a.startswith("local_client_")
        },
    }
    table: dict[str, dict[str, float]] = {}
    for arm, state in states.items():
        if arm in PERSONAL_ARMS:
            arm = f"{arm} (global)"
        use_adapter(loaded, state, None)
        table[arm] = {
            c: evaluate_loss(loaded.model, s, loaded.tokenizer.pad_token_id)["loss"]
            for c, s in sets.items()
        }
    return table


def _loss_view(ev: dict[str, Any]) -> dict[str, Any]:
    per = {c: v["loss"] for c, v in ev["per_category"].items()}
    view = {
        "loss": ev["loss"],
        "ppl": ev["ppl"],
        "loss_per_category": per,
        "category_loss_max": max(per.values()) if per else None,
        "category_loss_min": min(per.values()) if per else None,
    }
    if ev.get("per_tag"):  # data.sources: per language (or any tag value), and its gap
        view["loss_per_tag"] = {t: {v: x["loss"] for v, x in vals.items()}
                                for t, vals in ev["per_tag"].items()}  # fmt: skip
        view["tag_gap"] = ev.get("tag_gap", {})
    return view


def _local_summary(per_client: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over the local-only clients, with their spread."""

    def mean_of(key: str) -> float | None:
        vals = [p[key] for p in per_client if p.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    losses = [p["loss"] for p in per_client]
    cats = sorted({c for p in per_client for c in p["loss_per_category"]})
    per_cat = {
        c: statistics.fmean(
            p["loss_per_category"][c] for p in per_client if c in p["loss_per_category"]
        )
        for c in cats
    }
    out: dict[str, Any] = {
        "clients": [p["client"] for p in per_client],
        "loss": statistics.fmean(losses),
        "loss_std": statistics.pstdev(losses),
        "loss_min": min(losses),
        "loss_max": max(losses),
        "ppl": mean_of("ppl"),
        "loss_per_category": per_cat,
        "category_loss_max": max(per_cat.values()) if per_cat else None,
        "category_loss_min": min(per_cat.values()) if per_cat else None,
        "steps": mean_of("steps"),
        "per_client": per_client,
    }
    for key in ("rougeL", "similarity"):
        if any(key in p for p in per_client):
            out[key] = mean_of(key)
            vals = [p[key] for p in per_client if p.get(key) is not None]
            out[f"{key}_std"] = statistics.pstdev(vals) if vals else None
    suites: dict[str, Any] = {}
    for name in per_client[0].get("suites", {}):  # each suite: the mean over the clients
        got = [p["suites"][name] for p in per_client]
        one: dict[str, Any] = {"answers": got[0].get("answers", 0)}
        refs = [g["reference"]["rougeL"] for g in got if g.get("reference")]
        if refs:
            one["reference"] = {"rougeL": statistics.fmean(refs)}
        marks = [(g.get("judge") or {}).get("score") for g in got]
        grades = [m for m in marks if m is not None]
        if grades:
            one["judge"] = {"score": statistics.fmean(grades)}
        suites[name] = one
    if suites:
        out["suites"] = suites
    judged = [p["judge"] for p in per_client if "judge" in p]
    if judged:
        out["judge"] = {
            m: {
                "score": statistics.fmean(
                    j[m]["score"] for j in judged if j[m]["score"] is not None
                )
                if any(j[m]["score"] is not None for j in judged)
                else None,
                "relative": statistics.fmean(
                    j[m]["relative"] for j in judged if j[m].get("relative") is not None
                )
                if any(j[m].get("relative") is not None for j in judged)
                else None,
                "unparsed_replies": sum(j[m]["unparsed_replies"] for j in judged),
            }
            for m in ("pairwise", "single")
            if m in judged[0]
        }
    return out
