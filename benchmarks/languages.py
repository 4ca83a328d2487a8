"""Fairness across languages: English and Japanese dolly in one federation (configs/languages.toml).

    python benchmarks/languages.py --out runs/languages --seeds 1 2 3

Arms, each a run folder (an interrupted sweep resumes, a finished run is reused):
- `en-only`: the English clients alone (the same English data as every arm below), scored
  on the Japanese test examples too;
- `ja-50`, `ja-20`, `ja-5`: Japanese clients added at 50%, 20% and 5% of the clients, each as
  large as an English client (English fixed at 4,000 records); every arm has the same test
  split (`data.sources[].train_records` caps the Japanese training records after it);
- at 20%: `ja-local` (a Japanese client tuning alone, local-only), `centralized` (all
  the data pooled, as many steps as the federation), `qfedavg` (q = 1), `coverage`,
  `tag_mix` (rounds held at 50/50),
  `tokens` (aggregation weighted by target tokens), `finetune` (each client's personal model).
Scaled for 2 CPU cores: 3 rounds of 3 clients x 3 steps at batch 8, cutoff 192, 3 test examples
per language and category. Prints and writes (results.md) the held-out loss per language, the
gap, and the tokens a Japanese example costs against an English one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from fedit.config import load_config, variant
from fedit.files import atomic_json, atomic_text
from fedit.progress import Progress
from fedit.recipe import run_federation

SETTINGS = ["federation.rounds=3", "federation.clients_per_round=3", "client.max_steps=3",
            "data.cutoff_len=192", "data.test_per_category=3", "eval.every=3",
            "eval.at_start=false"]  # fmt: skip
# en clients, ja clients, ja training records (each ja client as large as an English one: 3,976
# English training records after the test split, over 8 or 19 clients)
SHARES = {"ja-50": (8, 8, None), "ja-20": (8, 2, 994), "ja-5": (19, 1, 209)}
AT_20: dict[str, dict[str, Any]] = {
    "ja-local": {"partition": {"only": [8]},
                 "federation": {"clients_per_round": 1, "min_clients": 1}},
    "centralized": {"partition": {"pooled": True},
                    "federation": {"clients_per_round": 1, "min_clients": 1}},
    "qfedavg": {"federation": {"strategy": "qfedavg"}},
    "coverage": {"federation": {"selection": "coverage"}},
    "tag_mix": {"federation": {"selection": "tag_mix"},
                "selection": {"tag": "language", "shares": {"en": 0.5, "ja": 0.5}}},
    "tokens": {"strategy": {"weight_by": "tokens"}},
    "finetune": {"personalization": {"method": "finetune"}, "data": {"client_test_fraction": 0.02}},
}  # fmt: skip
ARMS = ["en-only", *SHARES, *AT_20]


def arm_config(base: Any, arm: str) -> Any:
    """Every arm holds the same 4,000 English and 4,000 Japanese records, so the same test split
    (3 per language and category); arms differ in the Japanese records trained on
    (`train_records`, drawn after the test split; en-only trains on none)."""
    en, ja = base.data.sources
    en = {**en, "max_records": 4000}
    ja = {**ja, "max_records": 4000}
    if arm == "en-only":
        return variant(base, data={"sources": [{**en, "clients": 8},
                                               {**ja, "clients": 0, "train_records": 0}]},
                       partition={"num_clients": 8})  # fmt: skip
    n_en, n_ja, ja_records = SHARES.get(arm, SHARES["ja-20"])
    ja = {**ja, "clients": n_ja, **({"train_records": ja_records} if ja_records else {})}
    cfg = variant(base, data={"sources": [{**en, "clients": n_en}, ja]},
                  partition={"num_clients": n_en + n_ja})  # fmt: skip
    if arm == "centralized":  # the pooled data for as many steps as the federation takes
        steps = base.client.max_steps * base.federation.clients_per_round
        cfg = variant(cfg, client={"max_steps": steps})
    return variant(cfg, **AT_20[arm]) if arm in AT_20 else cfg  # every section at once


def one(config: Path, extra: list[str], out: Path, arm: str, seed: int) -> dict[str, Any]:
    folder = out / f"seed-{seed}" / arm
    if not (folder / "summary.json").is_file():
        base = load_config(config, [*SETTINGS, *extra, f"seed={seed}"])
        run_federation(arm_config(base, arm), folder, resume=folder.exists(), progress=Progress())
    data = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    ev = next(h["eval"] for h in reversed(data["history"]) if h.get("eval"))
    langs = ev["per_tag"]["language"]
    costs: dict[str, list[float]] = {}
    for h in data["history"]:
        for lang, c in (h.get("by_tag") or {}).get("language", {}).items():
            costs.setdefault(lang, []).append(c["tokens_per_example"])
    return {"arm": arm, "seed": seed, "loss": ev["loss"],
            "en": langs.get("en", {}).get("loss"), "ja": langs.get("ja", {}).get("loss"),
            "ja_example": langs.get("ja", {}).get("example_loss"),
            "gap": ev.get("tag_gap", {}).get("language", {}).get("gap"),
            "tokens": {k: statistics.fmean(v) for k, v in costs.items()},
            # each client's own held-out records, per language: the global adapter, the
            # personal models and their paired gain (arms with personalization only)
            "own": (ev.get("own_data") or {}).get("by_tag", {}).get("language", {})}  # fmt: skip


def _ms(xs: list[float | None]) -> str:
    vals = [x for x in xs if x is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.fmean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def markdown(rows: list[dict[str, Any]], seeds: list[int]) -> str:
    lines = [f"Seeds: {', '.join(map(str, seeds))} (mean ± std over seeds).", "",
             "| arm | held-out loss | English | Japanese | gap (ja - en) | Japanese per example "
             "| tokens per example trained (en / ja) |", "|---" * 7 + "|"]  # fmt: skip
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        tok = " / ".join(_ms([r["tokens"].get(lang) for r in rs]) for lang in ("en", "ja"))
        gap = [
            r["ja"] - r["en"] if r["ja"] is not None and r["en"] is not None else None for r in rs
        ]
        lines.append(f"| {arm} | {_ms([r['loss'] for r in rs])} | {_ms([r['en'] for r in rs])} | "
                     f"{_ms([r['ja'] for r in rs])} | {_ms(gap)} | "
                     f"{_ms([r['ja_example'] for r in rs])} | {tok} |")  # fmt: skip
    own = [r for r in rows if r.get("own")]
    if own:
        lines += [
            "",
            "Own held-out records of each client, per language (mean over the "
            "language's clients; gain = personal − global on the same clients):",
            "",
            "| arm | language | clients | global | personal | gain |",
            "|---" * 6 + "|",
        ]
        for arm in ARMS:
            rs = [r for r in own if r["arm"] == arm]
            for lang in sorted({k for r in rs for k in r["own"]}):
                vals = [r["own"][lang] for r in rs if lang in r["own"]]
                lines.append(f"| {arm} | {lang} | {vals[0]['clients']} | "
                             f"{_ms([v['loss'] for v in vals])} | "
                             f"{_ms([v.get('personal') for v in vals])} | "
                             f"{_ms([v.get('gain') for v in vals])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("configs/languages.toml"))
    ap.add_argument("--out", type=Path, default=Path("runs/languages"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--arms", nargs="+", default=ARMS, choices=ARMS)
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="more settings for every arm (e.g. a smaller model)")  # fmt: skip
    args = ap.parse_args()
    rows = [one(args.config, args.extra, args.out, a, s) for s in args.seeds for a in args.arms]
    atomic_json(args.out / "results.json", rows)
    table = markdown(rows, args.seeds)
    atomic_text(args.out / "results.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
