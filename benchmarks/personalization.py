"""Personalized FedIT: each client's own held-out loss under the global adapter, under each
personalization method, and tuning alone.

    python benchmarks/personalization.py --out runs/personalization --seeds 1 2 3
    python benchmarks/personalization.py --experiment domains --seeds 1 2 3

`categories` (the default): dolly's category shards as the paper splits it (configs/quickstart.toml
at 6 clients, 3 a round). `domains`: configs/domains.toml, 4 dolly clients beside 2 code and
2 roleplay clients (3 a round), with the per-domain view. One run per method and seed (a run
folder each: an interrupted sweep resumes, a finished run is reused); `local` is one run per
client, tuning alone for the same rounds and steps. Then a table per experiment: mean ± std
over seeds. Sized for 2 CPU cores (a few minutes a run): 3 rounds of 3 steps, cutoff 128, the
global test split capped at 24 examples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from fedit.config import load_config
from fedit.data.partition import load_partition
from fedit.files import atomic_json, atomic_text
from fedit.progress import Progress
from fedit.recipe import run_federation

METHODS = ["none", "finetune", "ditto", "fedsa", "feddpa", "local"]
COMMON = [
    "federation.rounds=3",
    "client.max_steps=3",
    "data.cutoff_len=128",
    "eval.every=3",
    "eval.at_start=false",
    "eval.max_examples=24",
    "personalization.finetune_steps=3",
]
EXPERIMENTS: dict[str, tuple[str, list[str]]] = {
    "categories": (
        "configs/quickstart.toml",
        [
            "partition.num_clients=6",
            "federation.clients_per_round=3",
            "data.client_test_fraction=0.01",
            *COMMON,
        ],
    ),
    "domains": ("configs/domains.toml", ["federation.clients_per_round=3", *COMMON]),
}


def _last_eval(folder: Path) -> dict[str, Any]:
    summary = folder / "summary.json"
    data = json.loads(summary.read_text(encoding="utf-8"))
    return next(h["eval"] for h in reversed(data["history"]) if h.get("eval"))


def _run(config: Path, settings: list[str], folder: Path) -> dict[str, Any]:
    if not (folder / "summary.json").is_file():
        cfg = load_config(config, settings)
        run_federation(cfg, folder, resume=folder.exists(), progress=Progress())
    return _last_eval(folder)


def one(config: Path, settings: list[str], out: Path, method: str, seed: int) -> dict[str, Any]:
    base = [*settings, f"seed={seed}"]
    if method == "local":  # each client alone, for the same rounds and steps
        n = len(load_partition(load_config(config, base)).clients)
        clients: dict[str, Any] = {}
        tests, per_tag = [], []
        for c in range(n):
            ev = _run(config, [*base, f"partition.only=[{c}]", "federation.clients_per_round=1",
                               "federation.min_clients=1"],
                      out / f"seed-{seed}" / "local" / f"client_{c}")  # fmt: skip
            mine = ev.get("own_data", {}).get("clients", {}).get("0")
            if mine is not None:  # (none when all its held-out records exceed the cutoff)
                clients[str(c)] = {"personal": mine["loss"]}
            tests.append(ev["loss"])
            per_tag.append(ev.get("per_tag", {}))
        losses = [v["personal"] for v in clients.values()]
        return {"method": method, "seed": seed, "test_loss": statistics.fmean(tests),
                "personal_mean": statistics.fmean(losses), "personal_worst": max(losses),
                "clients": clients, "per_tag": _mean_tags(per_tag)}  # fmt: skip
    ev = _run(config, [*base, f"personalization.method={method}"], out / f"seed-{seed}" / method)
    own = ev["own_data"]
    row = {
        "method": method,
        "seed": seed,
        "test_loss": ev["loss"],
        "global_mean": own["mean"],
        "global_worst": own["worst"],
        "clients": own["clients"],
        "per_tag": ev.get("per_tag", {}),
    }
    if "personal" in own:
        row.update(
            personal_mean=own["personal"]["mean"],
            personal_worst=own["personal"]["worst"],
            helped=own["helped"],
            hurt=own["hurt"],
        )
    return row


def _mean_tags(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in rows[0] if rows else {}:
        out[tag] = {v: statistics.fmean(r[tag][v] for r in rows) for v in rows[0][tag]}
    return out


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.fmean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def markdown(rows: list[dict[str, Any]], seeds: list[int], domains: dict[str, str]) -> str:
    lines = [
        f"Seeds: {', '.join(map(str, seeds))} (mean ± std over seeds; each seed draws its own "
        "split, training order and LoRA init).",
        "",
        "| method | global test loss | own-data loss, global adapter (mean / worst client) "
        "| own-data loss, personal model (mean / worst client) | clients helped / hurt "
        "| personal − FedIT, paired by seed (mean / worst client) |",
        "|---|---|---|---|---|---|",
    ]
    base = {r["seed"]: r for r in rows if r["method"] == "none"}
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        g = [r for r in rs if "global_mean" in r]
        cells = [
            m,
            _ms([r["test_loss"] for r in rs]),
            f"{_ms([r['global_mean'] for r in g])} / {_ms([r['global_worst'] for r in g])}"
            if g
            else "(no global adapter)",
        ]
        if "personal_mean" in rs[0]:
            cells.append(
                f"{_ms([r['personal_mean'] for r in rs])} / "
                f"{_ms([r['personal_worst'] for r in rs])}"
            )
            if "helped" in rs[0]:
                helped = statistics.fmean(r["helped"] for r in rs)
                hurt = statistics.fmean(r["hurt"] for r in rs)
                cells.append(f"{100 * helped:.0f}% / {100 * hurt:.0f}%")
            else:
                cells.append("-")
        else:
            cells += ["(the global adapter)", "-"]
        paired = [r for r in rs if "personal_mean" in r and r["seed"] in base]
        if paired and m != "none":
            d_mean = [r["personal_mean"] - base[r["seed"]]["global_mean"] for r in paired]
            d_worst = [r["personal_worst"] - base[r["seed"]]["global_worst"] for r in paired]
            cells.append(f"{_ms(d_mean)} / {_ms(d_worst)}")
        else:
            cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    # A seed draws its own split too: client c of one seed is not client c of another, so
    # the per-client view is of the first seed alone.
    first = [r for r in rows if r["seed"] == seeds[0]]
    clients = sorted({c for r in first for c in r["clients"]}, key=int)
    fedit = [r for r in first if r["method"] == "none"]
    lines += [
        "",
        f"Per client (seed {seeds[0]}; each seed draws its own split), own-data loss: FedIT's "
        "global adapter, then each client's personal model (local: the client tuned alone):",
        "",
        "| client | " + ("domain | " if domains else "") + "FedIT | "
        + " | ".join(m for m in methods if m != "none") + " |",
        "|---|" + ("---|" if domains else "") + "---|" * len(methods),
    ]  # fmt: skip
    for c in clients:
        cells = [c, *([domains.get(c, "?")] if domains else [])]
        cells.append(_ms([r["clients"][c]["loss"] for r in fedit if c in r["clients"]]))
        for m in methods[1:]:
            vs = [r["clients"][c]["personal"] for r in first
                  if r["method"] == m and "personal" in r["clients"].get(c, {})]  # fmt: skip
            cells.append(_ms(vs) if vs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if domains:
        lines += _domain_table(rows, methods, domains)
    return "\n".join(lines) + "\n"


def _domain_table(
    rows: list[dict[str, Any]], methods: list[str], domains: dict[str, str]
) -> list[str]:
    names = sorted(set(domains.values()))
    lines = [
        "",
        "Per domain, mean over its clients and seeds: own-data loss of the personal model "
        "(FedIT: its global adapter), and the global test loss on that domain's test "
        "examples of each method's global adapter (local: of the clients' own adapters):",
        "",
        "| method | " + " | ".join(f"own data, {d}" for d in names) + " | "
        + " | ".join(f"global test, {d}" for d in names) + " |",
        "|---|" + "---|" * (2 * len(names)),
    ]  # fmt: skip
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        key = "loss" if m == "none" else "personal"
        cells = [m]
        for d in names:
            vs = []
            for r in rs:
                mine = [v[key] for c, v in r["clients"].items() if domains.get(c) == d and key in v]
                if mine:
                    vs.append(statistics.fmean(mine))
            cells.append(_ms(vs))
        for d in names:
            cells.append(_ms([r["per_tag"]["domain"][d] for r in rs
                              if d in r.get("per_tag", {}).get("domain", {})]))  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", choices=sorted(EXPERIMENTS), default="categories")
    ap.add_argument("--config", type=Path, help="default: the experiment's config")
    ap.add_argument("--out", type=Path, help="default: runs/personalization[-domains]")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    args = ap.parse_args()
    default_config, settings = EXPERIMENTS[args.experiment]
    config = args.config or Path(default_config)
    suffix = "" if args.experiment == "categories" else f"-{args.experiment}"
    out = args.out or Path(f"runs/personalization{suffix}")
    rows = [one(config, settings, out, m, s) for s in args.seeds for m in args.methods]
    domains: dict[str, str] = {}
    if args.experiment == "domains":
        split = load_partition(load_config(config, [*settings, f"seed={args.seeds[0]}"]))
        domains = {str(c): recs[0].tags.get("domain", "?") for c, recs in enumerate(split.clients)}
    atomic_json(out / "results.json", {"rows": rows, "domains": domains})
    table = markdown(rows, args.seeds, domains)
    atomic_text(out / "results.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
