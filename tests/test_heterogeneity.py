"""Client selection, simulated client systems (speed, availability, deadline) and fairness."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedit.config import ConfigError, load_config, to_toml
from fedit.fairness import client_losses, fairness, jain, spread
from fedit.protocol import Update
from fedit.recipe import run_federation
from fedit.server.selection import SELECTORS, Selection
from fedit.server.strategies import STRATEGIES
from fedit.server.system import Systems, read_profiles
from tests.conftest import tiny_config


def _sel(**kw: object) -> Selection:
    base: dict = {"round": 1, "k": 2, "sizes": [10, 10, 10, 10], "rng": np.random.default_rng(0)}
    return Selection(**{**base, **kw})


# ---------------------------------------------------------------- selection rules


def test_power_of_choice_keeps_the_highest_loss_candidates() -> None:
    asked: list[list[int]] = []
    losses = {0: 1.0, 1: 3.0, 2: 2.0, 3: 3.0}

    def probe(cands: list[int]) -> dict[int, float]:
        asked.append(cands)
        return {c: losses[c] for c in cands}

    # d = N: every client is a candidate; ties (1 and 3 at 3.0) both fit in k = 2.
    assert SELECTORS.get("power_of_choice")(_sel(probe=probe, candidates=4)) == [1, 3]
    assert asked == [[0, 1, 2, 3]]
    # k = 1 of a tie: the lower id.
    assert SELECTORS.get("power_of_choice")(_sel(k=1, probe=probe, candidates=4)) == [1]
    # d = 2k by default, drawn among the online clients only.
    asked.clear()
    got = SELECTORS.get("power_of_choice")(_sel(k=1, probe=probe, available=[0, 2, 3]))
    assert len(asked[0]) == 2 and set(asked[0]) <= {0, 2, 3}
    assert got == [max(asked[0], key=lambda c: (losses[c], -c))]


def test_coverage_picks_the_least_recently_trained_categories() -> None:
    cats = [{"a": 10}, {"a": 5, "b": 5}, {"b": 10}, {"c": 10}]
    exposure = {"a": 1.0, "b": 0.5}  # weights: a 1/2, b 2/3, c 1
    # scores: 0.5, 0.583, 0.667, 1 -> client 3; then c weighs 1/2 -> client 2 (0.667);
    # then b weighs 1/(1 + 1.5) = 0.4: client 0 (0.5) beats client 1 (0.45).
    rule = SELECTORS.get("coverage")
    assert rule(_sel(k=2, categories=cats, exposure=exposure)) == [2, 3]
    assert rule(_sel(k=3, categories=cats, exposure=exposure)) == [0, 2, 3]
    assert rule(_sel(k=1, categories=cats, exposure=exposure, available=[0, 1])) == [1]


def test_resource_aware_prefers_clients_that_meet_the_deadline() -> None:
    times = {0: 1.0, 1: 5.0, 2: 2.0, 3: 10.0}
    rule = SELECTORS.get("resource")
    assert rule(_sel(k=2, finish_time=times.__getitem__, deadline=3.0)) == [0, 2]
    # Only two fit: the fastest of the rest fills the third place.
    assert rule(_sel(k=3, finish_time=times.__getitem__, deadline=3.0)) == [0, 1, 2]


def test_uniform_and_size_draw_among_online_clients_only() -> None:
    for name in ("uniform", "size"):
        for seed in range(20):
            got = SELECTORS.get(name)(_sel(rng=np.random.default_rng(seed), available=[1, 3, 0]))
            assert len(got) == 2 and set(got) <= {0, 1, 3}
    assert SELECTORS.get("all")(_sel(available=[2, 0])) == [0, 2]


# ---------------------------------------------------------------- q-FedAvg and FedNova


def _strategy(name: str, data_file: Path, **strategy: object):
    cfg = tiny_config(data_file, federation={"strategy": name}, strategy=strategy)
    return STRATEGIES.get(name)(cfg, 2)


def test_qfedavg_matches_hand_numbers(data_file: Path) -> None:
    g = {"x": torch.zeros(2, dtype=torch.float64)}
    ups = [
        Update(0, {"x": torch.tensor([1.0, 0.0], dtype=torch.float64)}, 5, 3,
               {"first_step_loss": 1.0}),
        Update(1, {"x": torch.tensor([0.0, 2.0], dtype=torch.float64)}, 50, 3,
               {"first_step_loss": 4.0}),
    ]  # fmt: skip
    # q = 1, L = 1: dw = [-1, 0], [0, -2]; D = [-1, 0], [0, -8]; h = 1 + 1, 4 + 4 -> w' = [.1, .8]
    got = _strategy("qfedavg", data_file, q=1.0, qffl_lr=1.0).aggregate(g, ups)
    torch.testing.assert_close(got["x"], torch.tensor([0.1, 0.8], dtype=torch.float64))
    # q = 0: the unweighted mean of the clients, whatever their sizes.
    got = _strategy("qfedavg", data_file, q=0.0, qffl_lr=1.0).aggregate(g, ups)
    torch.testing.assert_close(got["x"], torch.tensor([0.5, 1.0], dtype=torch.float64))
    # q = 2, L = 2 (qffl_lr 0.5): dw = [-2, 0], [0, -4]; D = [-2, 0], [0, -64];
    # h = 2*1*4 + 2*1 = 10 and 2*4*16 + 2*16 = 160 -> w' = [2/170, 64/170]
    got = _strategy("qfedavg", data_file, q=2.0, qffl_lr=0.5).aggregate(g, ups)
    torch.testing.assert_close(got["x"], torch.tensor([2 / 170, 64 / 170], dtype=torch.float64))


def test_a_partial_update_is_weighed_by_its_steps(data_file: Path) -> None:
    """Client 1 ran 1 of its steps before the deadline. FedAvg: the plain mean 2.5. FedNova:
    p = 1/2 each, tau_eff = 1.5, d = (1/2)(-2)/2 + (1/2)(-3)/1 = -2 -> w' = 1.5 * 2 = 3."""
    g = {"x": torch.zeros(1, dtype=torch.float64)}
    ups = [Update(0, {"x": torch.tensor([2.0], dtype=torch.float64)}, 10, 2),
           Update(1, {"x": torch.tensor([3.0], dtype=torch.float64)}, 10, 1)]  # fmt: skip
    assert _strategy("fedavg", data_file).aggregate(g, ups)["x"].item() == pytest.approx(2.5)
    assert _strategy("fednova", data_file).aggregate(g, ups)["x"].item() == pytest.approx(3.0)


# ---------------------------------------------------------------- simulated systems


def _profiles(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profiles.csv"
    path.write_text(text)
    return path


def test_profiles_file_errors_name_the_line(tmp_path: Path) -> None:
    ok = _profiles(tmp_path, "client,speed,availability\n0,2,0.5\n3,0.25,\n")
    assert read_profiles(ok) == {0: {"speed": 2.0, "availability": 0.5}, 3: {"speed": 0.25}}
    bad = _profiles(tmp_path, "client,speed\n0,2\n1,fast\n")
    with pytest.raises(ConfigError, match=r"profiles.csv:3: "):
        read_profiles(bad)
    with pytest.raises(ConfigError, match=r"profiles.csv:2: speed must be > 0"):
        read_profiles(_profiles(tmp_path, "client,speed\n0,0\n"))
    with pytest.raises(ConfigError, match=r"profiles.csv:1: the header"):
        read_profiles(_profiles(tmp_path, "id,speed\n0,1\n"))


def test_system_config_is_checked(tmp_path: Path, data_file: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(to_toml(tiny_config(data_file)))
    for sets, match in [
        (["system.speed='normal:1:2'"], r"system.speed: 'normal:1:2': expected one of"),
        (["system.availability='const:1.5'"], r"system.availability: .* in \[0, 1\]"),
        (["system.straggler='partial'"], r"system.straggler='partial' needs system.deadline"),
        (["system.availability='const:0.5'", "privacy.clip_norm=1"], r"system.availability: a "),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(path, sets)


def test_availability_follows_profiles_and_the_daily_cycle(tmp_path: Path, data_file: Path) -> None:
    cfg = tiny_config(data_file, system={"availability": "const:0.5", "diurnal": 1.0, "period": 4})
    sys_ = Systems(cfg, [10] * 400)
    # At phase 0 the cycle is at its high at rounds 0, 4, ... and at its low at rounds 2, 6, ...
    p = sys_.profiles[0]
    assert sys_.availability(0, 0) == pytest.approx(
        0.5 * (1 - (1 - np.cos(2 * np.pi * p.phase)) / 2)
    )
    online = [len(sys_.online(r)) / 400 for r in range(8)]
    assert 0.15 < np.mean(online) < 0.35  # mean availability 0.5 * 0.5 = 0.25
    assert sys_.online(3) == Systems(cfg, [10] * 400).online(3)  # seeded


def test_deadline_run_records_each_client_and_weighs_partial_work(
    tmp_path: Path, data_file: Path
) -> None:
    """Speeds 1, 0.5, 1, 2 and a deadline of 2.5 virtual s at 1 s a step: the clients can do
    2, 1, 2 and 5 of their 3 planned steps."""
    profiles = _profiles(tmp_path, "client,speed\n0,1\n1,0.5\n2,1\n3,2\n")
    common = {"profiles": str(profiles), "deadline": 2.5, "step_seconds": 1.0}
    cfg = tiny_config(
        data_file,
        federation={"rounds": 2, "clients_per_round": 4, "strategy": "fednova"},
        system={**common, "straggler": "partial"},
        eval={"every": 2},
    )
    res = run_federation(cfg, tmp_path / "partial")
    row = res.history[-1]
    by_client = {c["client"]: c for c in row["system"]["clients"]}
    assert [by_client[c]["status"] for c in range(4)] == ["partial"] * 3 + ["finished"]
    assert [by_client[c]["steps"] for c in range(4)] == [2, 1, 2, 3]
    assert [by_client[c]["virtual_s"] for c in range(4)] == [2.0, 2.0, 2.0, 1.5]
    assert row["system"]["virtual_s"] == 2.5 and row["system"]["virtual_clock_s"] == 5.0
    assert [m["steps"] for m in sorted(row["client_metrics"], key=lambda m: m["client"])] == [
        2, 1, 2, 3
    ]  # fmt: skip
    assert "fairness" in row["eval"] and row["eval"]["fairness"]["categories"]["n"] == 4
    # Resumed after round 1: the same clock and the same adapter.
    half = tiny_config(data_file, **{**_sections(cfg), "federation": {
        "rounds": 1, "clients_per_round": 4, "strategy": "fednova"}})  # fmt: skip
    run_federation(half, tmp_path / "resumed")
    again = run_federation(cfg, tmp_path / "resumed", resume=True)
    assert again.history[-1]["system"]["virtual_clock_s"] == 5.0
    for k, v in res.adapter.items():
        torch.testing.assert_close(again.adapter[k], v)

    drop = tiny_config(
        data_file,
        federation={"rounds": 1, "clients_per_round": 4},
        system={**common, "straggler": "drop"},
        eval={"every": 0},
    )
    row = run_federation(drop, tmp_path / "drop").history[-1]
    assert row["accepted"] == [3]
    statuses = {c["client"]: c["status"] for c in row["system"]["clients"]}
    assert statuses == {0: "dropped", 1: "dropped", 2: "dropped", 3: "finished"}
    assert all("straggler: 3 steps take" in f["reason"] for f in row["faults"])


def _sections(cfg: object) -> dict:
    d = cfg.to_dict()  # type: ignore[attr-defined]
    return {k: v for k, v in d.items() if isinstance(v, dict)}


def test_power_of_choice_run_probes_and_is_reproducible(tmp_path: Path, data_file: Path) -> None:
    cfg = tiny_config(
        data_file,
        federation={"rounds": 2, "clients_per_round": 1, "selection": "power_of_choice"},
        selection={"candidates": 3, "probe_examples": 4},
        eval={"every": 0},
    )
    a = run_federation(cfg, tmp_path / "a")
    b = run_federation(cfg, tmp_path / "b")
    for row in a.history:
        probed = {int(c): v for c, v in row["probe_losses"].items()}
        assert len(probed) == 3 and row["clients"] == [max(probed, key=lambda c: (probed[c], -c))]
    assert [r["clients"] for r in a.history] == [r["clients"] for r in b.history]
    for k, v in a.adapter.items():
        torch.testing.assert_close(b.adapter[k], v)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("probe_losses" in r for r in rows if r["round"] > 0)


def test_coverage_run_spreads_categories(tmp_path: Path, data_file: Path) -> None:
    """4 single-category clients, 1 a round: coverage never repeats one before all had a turn."""
    cfg = tiny_config(
        data_file,
        partition={"method": "shards", "num_clients": 4, "shards_per_client": 1},
        federation={"rounds": 4, "clients_per_round": 1, "selection": "coverage"},
        selection={"decay": 1.0},
        eval={"every": 0},
    )
    rows = run_federation(cfg, tmp_path / "cov").history
    assert sorted(r["clients"][0] for r in rows) == [0, 1, 2, 3]


# ---------------------------------------------------------------- fairness


def test_fairness_numbers_by_hand() -> None:
    assert jain([1.0, 1.0, 1.0]) == 1.0
    assert jain([3.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    s = spread({"a": 1.0, "b": 3.0})
    assert (s["worst"], s["worst_name"], s["mean"], s["std"]) == (3.0, "b", 2.0, 1.0)
    assert s["jain"] == pytest.approx(16 / (2 * 10))
    per_cat = {"a": {"loss": 1.0}, "b": {"loss": 3.0}}
    # client 0: 3 a + 1 b -> 1.5; client 1: b only -> 3; client 2: only a category not tested.
    assert client_losses(per_cat, [{"a": 3, "b": 1}, {"b": 2}, {"z": 5}]) == {"0": 1.5, "1": 3.0}
    f = fairness({"per_category": per_cat}, [{"a": 3, "b": 1}, {"b": 2}])
    assert f["clients"]["worst_name"] == "1" and f["categories"]["worst"] == 3.0


# ---------------------------------------------------------------- seeds


def test_summary_over_seeds_by_hand() -> None:
    from fedit.evaluate.seeds import markdown, summarize

    by_seed = {1: {"arms": {"fedit": {"loss": 2.0, "rougeL": None}}},
               2: {"arms": {"fedit": {"loss": 3.0, "rougeL": 0.5}}}}  # fmt: skip
    s = summarize(by_seed)
    loss = s["arms"]["fedit"]["loss"]
    assert (loss["mean"], loss["min"], loss["max"], loss["n"]) == (2.5, 2.0, 3.0, 2)
    assert loss["std"] == pytest.approx(0.5**0.5)
    assert s["arms"]["fedit"]["rougeL"]["n"] == 1
    assert "| FedIT | 2.5000 ± 0.7071 (2.0000–3.0000)" in markdown(s)


def test_compare_over_seeds(tmp_path: Path, data_file: Path) -> None:
    from fedit.cli import main

    path = tmp_path / "c.toml"
    cfg = tiny_config(
        data_file,
        federation={"rounds": 1},
        compare={"arms": ["base", "fedit"]},
        generate={"max_new_tokens": 4, "per_category": 1},
    )
    path.write_text(to_toml(cfg))
    out = tmp_path / "cmp"
    assert main(["compare", str(path), "--out", str(out), "--seeds", "5", "6", "--quiet"]) == 0
    per_seed = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (5, 6)]
    losses = [r["arms"]["fedit"]["loss"] for r in per_seed]
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [5, 6]
    assert summary["arms"]["fedit"]["loss"]["mean"] == pytest.approx(sum(losses) / 2)
    assert losses[0] != losses[1]  # the seed reaches the run
    assert "Over 2 seeds (5, 6)" in (out / "seeds.md").read_text()
    assert main(["compare", str(path), "--out", str(out), "--seeds", "5", "5"]) == 2
