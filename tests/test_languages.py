"""An English and Japanese federation (configs/languages.toml) on the tiny model: a test split
per language, per-language held-out loss (per token and per example, per category, the gap)
every round, seeded and resumable tensor-equal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedit.config import ConfigError, load_config, variant
from fedit.data.partition import load_partition
from fedit.data.records import DataError, resolve_data_path
from fedit.recipe import run_federation
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def _tiny(rounds: int) -> Any:
    try:
        resolve_data_path("databricks-dolly-15k-ja.jsonl")
    except DataError as e:
        pytest.skip(f"the Japanese dolly file is not here: {e}")
    cfg = load_config(ROOT / "configs" / "languages.toml", [
        "model.name=fedit/tiny-llama", "lora.r=4", "lora.alpha=8", f"federation.rounds={rounds}",
        "client.max_steps=2", "data.cutoff_len=96", "data.test_per_category=1",
        "partition.num_clients=3", "eval.max_examples=0"])  # fmt: skip
    small = [{**s, "max_records": 160 if s["tags"]["language"] == "en" else 80,
              "clients": 2 if s["tags"]["language"] == "en" else 1} for s in cfg.data.sources]  # fmt: skip
    return variant(cfg, data={"sources": small})


def test_english_and_japanese_clients_and_per_language_loss(tmp_path: Path) -> None:
    cfg = _tiny(2)
    split = load_partition(cfg)
    assert [{r.tags["language"] for r in c} for c in split.clients] == [{"en"}, {"en"}, {"ja"}]
    test_langs = sorted((r.tags["language"], r.category) for r in split.test)
    cats = sorted({r.category for r in split.test})
    assert test_langs == sorted([(lang, c) for lang in ("en", "ja") for c in cats])  # per language
    result = run_federation(cfg, tmp_path / "whole")
    rows = [
        json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    ]
    for row in rows:
        ev = row["eval"]
        langs = ev["per_tag"]["language"]
        assert set(langs) == {"en", "ja"}
        for v in langs.values():
            assert v["loss"] > 0 and v["example_loss"] > 0 and 0 < v["examples"] <= len(cats)
        assert set(ev["per_tag_category"]["language"]["ja"]) <= set(cats)
        gap = ev["tag_gap"]["language"]
        assert gap["gap"] == pytest.approx(abs(langs["en"]["loss"] - langs["ja"]["loss"]))
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["history"][-1]["eval"]["tag_gap"] == rows[-1]["eval"]["tag_gap"]
    # Interrupted after round 1 and resumed: the same adapter, to the bit.
    run_federation(_tiny(1), tmp_path / "cut")
    resumed = run_federation(cfg, tmp_path / "cut", resume=True)
    assert all(torch.equal(resumed.adapter[k], result.adapter[k]) for k in result.adapter)


def test_a_missing_language_tag_is_refused_before_loading(data_file: Path) -> None:
    sources = [{"path": str(data_file), "tags": {"language": "en"}}, {"path": str(data_file),
               "tags": {"source": "again"}}]  # fmt: skip
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.tags\.language"):
        tiny_config(data_file, data={"sources": sources, "test_split_by": ["language"]})
    with pytest.raises(ConfigError, match="needs data.sources"):
        tiny_config(data_file, data={"test_split_by": ["language"]})
