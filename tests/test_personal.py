"""Per-client evaluation: each client's own held-out data, never trained on."""

from __future__ import annotations

import json
from pathlib import Path

from fedit.config import variant
from fedit.data.partition import load_partition
from fedit.recipe import run_federation
from tests.conftest import tiny_config


def test_client_test_fraction_holds_out_each_clients_own_records(data_file: Path) -> None:
    plain = load_partition(tiny_config(data_file))
    cfg = tiny_config(data_file, data={"client_test_fraction": 0.25})
    split = load_partition(cfg)
    assert split.test == plain.test and plain.client_tests == {}
    for c, recs in enumerate(plain.clients):
        own, train = split.client_tests[c], split.clients[c]
        assert len(own) == round(0.25 * len(recs)) and len(train) + len(own) == len(recs)
        assert sorted(map(repr, own + train)) == sorted(map(repr, recs))
        assert not {repr(r) for r in own} & {repr(r) for r in train}  # never trained on
    assert load_partition(cfg).client_tests == split.client_tests  # seeded, stable
    # A local-only arm keeps its client's own test under the client's id; pooled keeps all.
    only = load_partition(variant(cfg, partition={"only": [2]}))
    assert list(only.client_tests) == [2] and only.client_tests[2] == split.client_tests[2]
    pooled = load_partition(variant(cfg, partition={"pooled": True}))
    assert pooled.client_tests == split.client_tests and len(pooled.clients) == 1


def test_own_data_evaluation_in_metrics_and_summary(tmp_path: Path, data_file: Path) -> None:
    cfg = tiny_config(data_file, data={"client_test_fraction": 0.25})
    result = run_federation(cfg, tmp_path / "run")
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    own = rows[-1]["eval"]["own_data"]
    assert set(own["clients"]) == {"0", "1", "2", "3"}
    losses = [v["loss"] for v in own["clients"].values()]
    assert own["worst"] == max(losses) and abs(own["mean"] - sum(losses) / 4) < 1e-12
    assert rows[0]["eval"]["own_data"]["mean"] != own["mean"]  # the base model scored too
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["own_data"] == own == result.history[-1]["eval"]["own_data"]
