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
        return {"method": method, "seed": seed, "test_loss": statistics.fmean(tests),
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
        row.update(helped=own["helped"], hurt=own["hurt"])
    return row


def _mean_tags(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in rows[0] if rows else {}:
        out[tag] = {v: {"loss": statistics.fmean(r[tag][v]["loss"] for r in rows)}
                    for v in rows[0][tag]}  # fmt: skip
    return out


def _ms(xs: list[float], sign: bool = False) -> str:
    if not xs:
        return "-"
    f = "+.4f" if sign else ".4f"
    if len(xs) == 1:
        return format(xs[0], f)
    return f"{format(statistics.fmean(xs), f)} ± {statistics.stdev(xs):.4f}"


def _paired(r: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, float] | None:
    """A method's personal models against FedIT's global adapter on the same clients (those
    with a personal model: a client never sampled has none) of the same seed."""
    mine = {c: v["personal"] for c, v in r["clients"].items() if "personal" in v}
    if not mine:
        return None
    everyone = len(ref["clients"]) if ref else len(r["clients"])
    out = {"mean": statistics.fmean(mine.values()), "worst": max(mine.values()),
           "coverage": len(mine) / max(1, everyone)}  # fmt: skip
    if ref is not None and all(c in ref["clients"] for c in mine):
        fedit = [ref["clients"][c]["loss"] for c in mine]
        out["d_mean"] = out["mean"] - statistics.fmean(fedit)
        out["d_worst"] = out["worst"] - max(fedit)
    return out


def markdown(rows: list[dict[str, Any]], seeds: list[int], domains: dict[str, str]) -> str:
    lines = [
        f"Seeds: {', '.join(map(str, seeds))} (mean ± std over seeds; each seed draws its own "
        "split, training order and LoRA init).",
        "",
        "| method | global test loss | own-data loss, global adapter (mean / worst client) "
        "| own-data loss, personal model (mean / worst, clients with one) | clients with one "
        "| clients helped / hurt | personal − FedIT, same clients and seed (mean / worst) |",
        "|---|---|---|---|---|---|---|",
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
        ps = [p for p in (_paired(r, base.get(r["seed"])) for r in rs) if p] if m != "none" else []
        if ps:
            cells.append(f"{_ms([p['mean'] for p in ps])} / {_ms([p['worst'] for p in ps])}")
            cells.append(f"{100 * statistics.fmean(p['coverage'] for p in ps):.0f}%")
            if "helped" in rs[0]:
                helped = statistics.fmean(r["helped"] for r in rs)
                hurt = statistics.fmean(r["hurt"] for r in rs)
                cells.append(f"{100 * helped:.0f}% / {100 * hurt:.0f}%")
            else:
                cells.append("-")
        else:
            cells += ["(the global adapter)", "-", "-"]
        d = [p for p in ps if "d_mean" in p]
        if d:
            d_mean = _ms([p["d_mean"] for p in d], True)
            cells.append(f"{d_mean} / {_ms([p['d_worst'] for p in d], True)}")
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
        "Per domain, mean over seeds: own-data loss of FedIT's global adapter (none) and, for "
        "each method, its personal models minus FedIT on the same clients (those with a "
        "personal model); then the global test loss on that domain's test examples of each "
        "method's global adapter (local: of the clients' own adapters):",
        "",
        "| method | " + " | ".join(f"own data, {d}" for d in names) + " | "
        + " | ".join(f"global test, {d}" for d in names) + " |",
        "|---|" + "---|" * (2 * len(names)),
    ]  # fmt: skip
    base = {r["seed"]: r for r in rows if r["method"] == "none"}
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        cells = [m]
        for d in names:
            vs = []
            for r in rs:
                ref = base.get(r["seed"])
                mine = [c for c, v in r["clients"].items() if domains.get(c) == d
                        and ("personal" in v or m == "none")]  # fmt: skip
                if not mine:
                    continue
                if m == "none":
                    vs.append(statistics.fmean(r["clients"][c]["loss"] for c in mine))
                elif ref is not None:
                    own, fedit = r["clients"], ref["clients"]
                    vs.append(statistics.fmean(own[c]["personal"] - fedit[c]["loss"] for c in mine))
            cells.append(_ms(vs, sign=m != "none"))
        for d in names:
            cells.append(_ms([r["per_tag"]["domain"][d]["loss"] for r in rs
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
