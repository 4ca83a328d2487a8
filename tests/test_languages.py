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
    assert (tmp_path / "whole" / "per_tag.png").stat().st_size > 10_000  # loss per language
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["history"][-1]["eval"]["tag_gap"] == rows[-1]["eval"]["tag_gap"]
    # Interrupted after round 1 and resumed: the same adapter, to the bit.
    run_federation(_tiny(1), tmp_path / "cut")
    resumed = run_federation(cfg, tmp_path / "cut", resume=True)
    assert all(torch.equal(resumed.adapter[k], result.adapter[k]) for k in result.adapter)


def test_train_records_leave_the_test_split_in_place() -> None:
    """`train_records` caps a source's training records after the test split: the test split is
    the same for every cap, smaller caps keep subsets, and 0 makes the source test-only."""
    base = _tiny(1)
    en, ja = base.data.sources

    def split(ja_src: dict[str, Any], clients: int) -> Any:
        return load_partition(variant(base, data={"sources": [en, ja_src]},
                                      partition={"num_clients": 2 + clients}))  # fmt: skip

    def key(r: Any) -> tuple[str, str]:
        return (r.instruction, r.response)

    runs = {n: split({**ja, "train_records": n}, 1) for n in (40, 20)}
    runs[0] = split({**ja, "train_records": 0, "clients": 0}, 0)
    tests = [sorted(map(key, p.test)) for p in runs.values()]
    assert tests[0] == tests[1] == tests[2]  # the same held-out set, Japanese included
    assert {r.tags["language"] for r in runs[0].test} == {"en", "ja"}
    ja_train = {n: {key(r) for c in p.clients for r in c if r.tags["language"] == "ja"}
                for n, p in runs.items()}  # fmt: skip
    assert len(ja_train[40]) == 40 and len(ja_train[20]) == 20 and not ja_train[0]
    assert ja_train[20] < ja_train[40]  # nested
    assert not ja_train[40] & set(tests[0])  # never a test record
    assert len(runs[0].clients) == 2  # the English clients only
    with pytest.raises(ConfigError, match=r"data.sources\[1\].clients"):
        variant(base, data={"sources": [en, {**ja, "train_records": 0}]})


def test_a_missing_language_tag_is_refused_before_loading(data_file: Path) -> None:
    sources = [{"path": str(data_file), "tags": {"language": "en"}}, {"path": str(data_file),
               "tags": {"source": "again"}}]  # fmt: skip
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.tags\.language"):
        tiny_config(data_file, data={"sources": sources, "test_split_by": ["language"]})
    with pytest.raises(ConfigError, match="needs data.sources"):
        tiny_config(data_file, data={"test_split_by": ["language"]})


def test_tag_mix_holds_the_language_mix_on_hand_numbers() -> None:
    import numpy as np

    from fedit.server.selection import Selection, tag_mix

    tags = [{"language": "en"}] * 8 + [{"language": "ja"}] * 2
    for rnd in range(20):
        s = Selection(rnd, 5, [10] * 10, np.random.default_rng(rnd), tags=tags, tag="language",
                      shares={"en": 0.6, "ja": 0.4})  # fmt: skip
        got = tag_mix(s)
        assert len(got) == 5 and sum(c >= 8 for c in got) == 2  # 5 x 0.4 = 2 Japanese
    # Without shares: each language's share of the clients (8:2 of 5 -> 4 and 1).
    s = Selection(0, 5, [10] * 10, np.random.default_rng(0), tags=tags, tag="language")
    assert sum(c >= 8 for c in tag_mix(s)) == 1
    # A language short of online clients leaves its places to the others.
    s = Selection(0, 4, [10] * 10, np.random.default_rng(0), available=[0, 1, 2, 3, 4, 8],
                  tags=tags, tag="language", shares={"en": 0.25, "ja": 0.75})  # fmt: skip
    got = tag_mix(s)
    assert len(got) == 4 and 8 in got


def test_own_data_per_language_on_hand_numbers() -> None:
    from fedit.fairness import own_by_tag

    tags = [{"language": "en"}, {"language": "en"}, {"language": "ja"}]
    clients = {"0": {"loss": 2.0, "personal": 1.5}, "1": {"loss": 3.0},
               "2": {"loss": 1.0, "personal": 1.25}}  # fmt: skip
    got = own_by_tag(clients, tags)["language"]
    # en: global over both clients; personal and gain over client 0 only (1 has none)
    assert got["en"] == {"clients": 2, "loss": 2.5, "personal": 1.5, "gain": -0.5,
                         "personal_clients": 1}  # fmt: skip
    assert got["ja"] == {"clients": 1, "loss": 1.0, "personal": 1.25, "gain": 0.25,
                         "personal_clients": 1}  # fmt: skip


def test_personal_models_scored_per_language(tmp_path: Path) -> None:
    cfg = variant(_tiny(1), personalization={"method": "finetune"},
                  data={"client_test_fraction": 0.1}, federation={"clients_per_round": 3})  # fmt: skip
    run_federation(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    own = summary["own_data"]
    by = own["by_tag"]["language"]
    assert by["en"]["clients"] == 2 and by["ja"]["clients"] == 1
    ja = own["clients"]["2"]  # the Japanese client: its own loss, personal and paired gain
    assert by["ja"]["loss"] == pytest.approx(ja["loss"])
    assert by["ja"]["gain"] == pytest.approx(ja["personal"] - ja["loss"])


def test_weight_by_tokens_and_tag_mix_end_to_end(tmp_path: Path, data_file: Path) -> None:
    cfg = variant(_tiny(2), federation={"selection": "tag_mix", "clients_per_round": 2},
                  selection={"tag": "language", "shares": {"en": 0.5, "ja": 0.5}},
                  strategy={"weight_by": "tokens"})  # fmt: skip
    result = run_federation(cfg, tmp_path / "run")
    for h in result.history[1:]:
        assert h["clients"][-1] == 2 and len(h["clients"]) == 2  # one English, one Japanese
        tokens = [m["data_tokens"] for m in h["client_metrics"]]
        assert all(t > 0 for t in tokens)
        cost = h["by_tag"]["language"]  # what the round cost each language, per example
        assert set(cost) == {"en", "ja"} and all(c["clients"] == 1 for c in cost.values())
        assert all(
            c["tokens_per_example"] > 0 and c["seconds_per_example"] > 0 for c in cost.values()
        )
    # FedAvg by tokens: the round's adapter is the token-weighted mean of the clients' own.
    from fedit.client.runtime import ClientRuntime
    from fedit.engines.inprocess import InProcess
    from fedit.lora import load_lora_model
    from fedit.protocol import Update
    from tests.test_personal import Recording

    one = variant(cfg, federation={"rounds": 1}, eval={"every": 0})
    split = load_partition(one)
    engine = Recording(
        InProcess(ClientRuntime(one, load_lora_model(one), dict(enumerate(split.clients))))
    )
    got = run_federation(one, engine=engine).adapter
    ups = [Update.from_payload(p) for p in engine.received]
    t = [u.metrics["data_tokens"] for u in ups]
    assert t[0] != t[1] and all(u.num_examples for u in ups)
    for k, v in got.items():
        want = sum(ti * u.state[k].double() for ti, u in zip(t, ups, strict=True)) / sum(t)
        assert torch.allclose(v.double(), want, atol=1e-6), k

    with pytest.raises(ConfigError, match=r"selection\.tag"):
        variant(cfg, selection={"tag": ""})
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.tags\.topic"):
        variant(cfg, selection={"tag": "topic"})
    with pytest.raises(ConfigError, match="weight_by='tokens'"):
        variant(cfg, privacy={"clip_norm": 1.0, "noise_multiplier": 0.5})


def test_the_round_line_shows_each_language_and_the_gap() -> None:
    from fedit.progress import round_line

    ev = {"loss": 2.5, "per_tag": {"language": {"en": {"loss": 2.4}, "ja": {"loss": 2.9}}},
          "tag_gap": {"language": {"gap": 0.5, "worst": "ja", "best": "en"}}}  # fmt: skip
    line = round_line({"round": 1, "clients": [0, 2], "train_loss": 2.0, "seconds": 3.0,
                       "eval": ev}, 5)  # fmt: skip
    assert "held-out loss 2.5000 [en 2.4000 ja 2.9000, gap 0.5000]" in line


def test_compare_reports_each_language(tmp_path: Path) -> None:
    from fedit.cli import main
    from fedit.config import to_toml

    cfg = variant(_tiny(1), compare={"arms": ["base", "fedit"]}, generate={"per_category": 0})
    path = tmp_path / "cmp.toml"
    path.write_text(to_toml(cfg))
    assert main(["compare", str(path), "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    arms = json.loads((tmp_path / "cmp" / "results.json").read_text())["arms"]
    assert set(arms["fedit"]["loss_per_tag"]["language"]) == {"en", "ja"}
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "Held-out loss per language (and the gap, worst - best):" in table
    assert "| ja | " in table and "| **gap** | " in table
