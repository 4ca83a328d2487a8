"""Differential privacy (clipping, noise, accounting) and update compression."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedit.compression import METHODS, Codec, error_bound
from fedit.config import ConfigError
from fedit.lora import get_adapter
from fedit.protocol import Update
from fedit.recipe import run_federation
from fedit.server.privacy import Accountant, clipped_delta, gaussian_noise
from fedit.server.selection import SELECTORS
from fedit.server.server import Server
from tests.conftest import client_runtime, tiny_config

# ------------------------------------------------------------------ privacy


def test_accountant_matches_opacus_directly() -> None:
    from opacus.accountants import RDPAccountant

    ours = Accountant(noise_multiplier=1.1, sample_rate=0.05, delta=1e-5)
    ref = RDPAccountant()
    for _ in range(20):
        ours.step()
        ref.step(noise_multiplier=1.1, sample_rate=0.05)
    assert ours.epsilon() == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-12)
    # A known setting: more noise or fewer rounds spend less.
    quieter = Accountant(2.2, 0.05, 1e-5)
    for _ in range(20):
        quieter.step()
    assert 0 < quieter.epsilon() < ours.epsilon()
    # The state restores exactly (resume).
    again = Accountant(1.1, 0.05, 1e-5)
    again.load_state_dict(json.loads(json.dumps(ours.state_dict())))
    assert again.epsilon() == ours.epsilon() and again.steps == 20


@given(st.lists(st.floats(-10, 10), min_size=1, max_size=40), st.floats(0.01, 5))
@settings(max_examples=60, deadline=None)
def test_clipping_bounds_every_update(values: list[float], bound: float) -> None:
    delta = {"a": torch.tensor(values[: len(values) // 2 + 1]), "b": torch.tensor(values)}
    zero = {k: torch.zeros_like(v) for k, v in delta.items()}
    clipped, norm = clipped_delta(delta, zero, bound)
    new = math.sqrt(sum(float(v.pow(2).sum()) for v in clipped.values()))
    assert new <= bound * (1 + 1e-6)
    if norm <= bound:  # small updates pass unchanged
        assert all(torch.equal(clipped[k], delta[k].double()) for k in delta)


def test_noise_has_the_configured_scale() -> None:
    like = {"w": torch.zeros(200_000)}
    noise = gaussian_noise(like, 0.3, torch.Generator().manual_seed(0))["w"]
    assert noise.std().item() == pytest.approx(0.3, rel=0.01)
    assert abs(noise.mean().item()) < 0.005
    same = gaussian_noise(like, 0.3, torch.Generator().manual_seed(0))["w"]
    assert torch.equal(noise, same)  # seeded


def test_dp_run_clips_adds_noise_and_reports_epsilon(tmp_path: Path, data_file: Path) -> None:
    base = {"privacy": {"clip_norm": 0.01, "noise_multiplier": 0.0},
            "federation": {"rounds": 1}}  # fmt: skip
    quiet = run_federation(tiny_config(data_file, **base), tmp_path / "a")
    row = quiet.history[-1]["privacy"]
    assert row["clipped"] == len(row["update_norms"]) and all(n > 0.01 for n in row["update_norms"])
    # Without noise the step is the mean of the clipped deltas: norm <= clip.
    init = get_adapter(client_runtime(tiny_config(data_file, **base)).lm.model)
    step = math.sqrt(sum(float((quiet.adapter[k] - init[k]).double().pow(2).sum()) for k in init))
    assert step <= 0.01 * (1 + 1e-5)
    noisy_cfg = tiny_config(
        data_file,
        privacy={"clip_norm": 0.01, "noise_multiplier": 2.0, "epsilon_budget": 50.0},
        federation={"rounds": 3},
    )
    noisy = run_federation(noisy_cfg, tmp_path / "b")
    eps = [h["privacy"]["epsilon"] for h in noisy.history if "privacy" in h]
    assert eps == sorted(eps) and eps[0] > 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(eps[-1])
    # A budget below the next round's epsilon stops the run early, adapter of the last round kept.
    tight = tiny_config(
        data_file,
        privacy={"clip_norm": 0.01, "noise_multiplier": 2.0, "epsilon_budget": eps[0] * 1.01},
        federation={"rounds": 3},
    )
    stopped = run_federation(tight, tmp_path / "c")
    assert [h["round"] for h in stopped.history if h["round"]] == [1]
    with pytest.raises(ConfigError, match="DP-FedAvg"):
        tiny_config(data_file, privacy={"clip_norm": 1.0}, federation={"strategy": "fedprox"})


def test_dp_with_ffa_lora_noises_b_only(tmp_path: Path, data_file: Path) -> None:
    cfg = tiny_config(
        data_file,
        privacy={"clip_norm": 0.01, "noise_multiplier": 1.0},
        strategy={"lora_aggregation": "ffa"},
        compression={"method": "int8"},
    )
    init = get_adapter(client_runtime(cfg).lm.model)
    result = run_federation(cfg, tmp_path / "ffa")
    a_keys = [k for k in init if ".lora_A." in k]
    assert a_keys and all(torch.equal(result.adapter[k], init[k]) for k in a_keys)
    assert all(not torch.equal(result.adapter[k], init[k]) for k in init if k not in a_keys)
    rows = [h["privacy"] for h in result.history if "privacy" in h]
    assert len(rows) == 2 and all(r["clipped"] == len(r["update_norms"]) for r in rows)


# ------------------------------------------------------------------ compression


@pytest.mark.parametrize("method", METHODS)
def test_each_compressor_round_trips_within_its_bound(method: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(37, 29, generator=g) * torch.logspace(-3, 0, 29)
    codec = Codec(method, block_size=16, topk_ratio=0.2)
    wire = codec.encode(x)
    y = codec.decode(wire, tuple(x.shape))
    assert y.shape == x.shape
    assert (y - x).abs().max().item() <= error_bound(codec, x) * (1 + 1e-6)
    nbytes = sum(a.nbytes for a in wire.values())
    expected = {"none": 4 * x.numel(), "fp16": 2 * x.numel(),
                "int8": x.numel() + 2 * math.ceil(x.numel() / 16),
                "int4": math.ceil(x.numel() / 2) + 2 * math.ceil(x.numel() / 16),
                "topk": 6 * math.ceil(0.2 * x.numel())}[method]  # fmt: skip
    assert nbytes == expected


@pytest.mark.parametrize("method", ["int4", "topk"])
def test_error_feedback_preserves_the_sum_over_rounds(method: str) -> None:
    codec = Codec(method, block_size=8, topk_ratio=0.1)
    g = torch.Generator().manual_seed(2)
    residual = None
    sent_sum = torch.zeros(50, dtype=torch.float64)
    true_sum = torch.zeros(50, dtype=torch.float64)
    for _ in range(30):
        delta = {"w": torch.randn(50, generator=g)}
        _, sent, residual, _ = codec.compress(delta, residual)
        sent_sum += sent["w"].double()
        true_sum += delta["w"].double()
    assert residual is not None
    # What was sent plus what the client still holds is exactly everything it had to send.
    torch.testing.assert_close(sent_sum + residual["w"].double(), true_sum, atol=1e-4, rtol=0)
    assert residual["w"].abs().max().item() < 5  # the residual stays bounded, it does not grow


def test_compressed_run_reports_bytes_and_trains(tmp_path: Path, data_file: Path) -> None:
    plain = run_federation(tiny_config(data_file), tmp_path / "plain")
    int8 = run_federation(tiny_config(data_file, compression={"method": "int8"}), tmp_path / "q")
    r_plain, r_q = plain.history[-1], int8.history[-1]
    assert r_plain["bytes_up_per_client"] == r_plain["bytes"]["fp32_adapter"]
    assert r_q["bytes_up_per_client"] < r_plain["bytes_up_per_client"] / 3.5
    assert r_q["bytes"]["full_model"] > 10 * r_q["bytes"]["fp32_adapter"]
    # int8 of a small delta moves the adapter by little: the loss stays within 1% here.
    assert abs(r_q["eval"]["loss"] / r_plain["eval"]["loss"] - 1) < 0.01
    again = run_federation(tiny_config(data_file, compression={"method": "int8"}), None)
    assert all(torch.equal(again.adapter[k], int8.adapter[k]) for k in int8.adapter)  # seeded


# ------------------------------------------------------------------ DP: what the accountant assumes


@pytest.mark.parametrize("q", [0.05, 0.1, 0.2])
@pytest.mark.parametrize("sigma", [0.8, 1.0, 2.0])
@pytest.mark.parametrize("rounds", [20, 200])
def test_epsilon_against_the_pld_accountant(q: float, sigma: float, rounds: int) -> None:
    """Google's dp-accounting PLD accountant gives the tight epsilon of the same mechanism
    (Poisson-subsampled Gaussian): fedit's RDP figure is never below it, and close."""
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import pld_privacy_accountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds
    )
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(event)
    tight = pld.get_epsilon(1e-5)
    ours = Accountant(sigma, q, 1e-5).after(rounds)
    assert tight <= ours <= 1.3 * tight, (tight, ours)


def _dp_server(data_file: Path, **privacy: float) -> tuple[Server, dict[str, torch.Tensor]]:
    cfg = tiny_config(
        data_file,
        partition={"num_clients": 20, "method": "iid", "min_client_size": 1},
        client={"batch_size": 1, "micro_batch_size": 1},
        federation={"clients_per_round": 4, "max_norm_ratio": 10.0},
        privacy={"clip_norm": 1.0, **privacy},
    )
    g = {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(3, 2)}
    return Server(cfg, [10] * 20, g, 0), g


def _update(c: int, g: dict[str, torch.Tensor], scale: float, seed: int) -> Update:
    gen = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in g.items()}
    return Update(c, state, 10, 1, {"train_loss": 1.0})


@given(
    scales=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=6),
    extra=st.floats(0.0, 50.0),
)
@settings(max_examples=100, deadline=None)
def test_one_client_moves_the_dp_aggregate_by_at_most_the_clip(
    scales: list[float], extra: float
) -> None:
    """With the norm screen configured, one client more or less changes the sum the server
    noises by at most clip_norm: no per-client check compares clients under DP."""
    data_file = Path("never-read.jsonl")  # the server alone: no data, no model
    sums = []
    for with_extra in (False, True):
        server, g = _dp_server(data_file)
        ups = [_update(c, g, s, c) for c, s in enumerate(scales)]
        if with_extra:
            ups.append(_update(len(scales), g, extra, 99))
        accepted, _ = server.collect(1, [(u.client_id, lambda u=u: u) for u in ups])
        new = server.strategy.aggregate(g, accepted)
        sums.append({k: (new[k] - g[k]).double() * server.per_round for k in g})
    moved = math.sqrt(sum(float((sums[1][k] - sums[0][k]).pow(2).sum()) for k in g))
    assert moved <= 1.0 * (1 + 1e-6)


def test_dp_samples_clients_by_poisson_seeded_and_resumable(
    tmp_path: Path, data_file: Path
) -> None:
    server, _ = _dp_server(data_file)
    cohorts = [server.select(r) for r in range(1, 2001)]
    rate = sum(len(c) for c in cohorts) / (2000 * 20)
    assert rate == pytest.approx(4 / 20, abs=0.01)  # each client on its own at q = k / N
    assert len({len(c) for c in cohorts}) > 3 and any(not c for c in cohorts)  # sizes vary
    again, _ = _dp_server(data_file)
    assert [again.select(r) for r in range(1, 50)] == cohorts[:49]  # seeded by (seed, round)
    sections = {"privacy": {"clip_norm": 0.01, "noise_multiplier": 1.0},
                "federation": {"rounds": 3}, "eval": {"every": 0}}  # fmt: skip
    full = run_federation(tiny_config(data_file, **sections), tmp_path / "full")
    two = {**sections, "federation": {"rounds": 2}}
    run_federation(tiny_config(data_file, **two), tmp_path / "part")
    part = run_federation(tiny_config(data_file, **sections), tmp_path / "part", resume=True)
    assert all(torch.equal(full.adapter[k], part.adapter[k]) for k in full.adapter)
    assert [h["clients"] for h in full.history] == [h["clients"] for h in part.history]
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["privacy"]["sampling"] == "poisson"
    assert summary["privacy"]["sample_rate"] == pytest.approx(2 / 4)


@pytest.mark.parametrize("rule", ["all", "size", "test-loss-driven"])
def test_selection_rules_the_accountant_cannot_bound_are_refused(
    data_file: Path, rule: str
) -> None:
    SELECTORS.register("test-loss-driven", replace=True)(lambda s: list(range(s.k)))
    with pytest.raises(ConfigError, match=rf"federation.selection='{rule}': DP-FedAvg"):
        tiny_config(data_file, privacy={"clip_norm": 1.0}, federation={"selection": rule})


def test_secure_client_noise_comes_from_its_own_secret(tmp_path: Path, data_file: Path) -> None:
    """Under DP with secure aggregation the client's noise share is not a function of the run's
    seed (which the server knows): a client folder's secret repeats it, another folder's does
    not. A non-finite update is refused, not sent into the sum."""
    from dataclasses import replace

    from fedit.client.runtime import ClientStore
    from fedit.protocol import Task

    cfg = tiny_config(data_file, privacy={"clip_norm": 0.05, "noise_multiplier": 1.0})
    rt = client_runtime(cfg)
    start = get_adapter(rt.lm.model)
    task = Task(1, 0, start, run_id="r", secure=True, clip_norm=0.05, noise_std=0.5)

    def delta(folder: Path) -> dict[str, torch.Tensor]:
        rt.store = ClientStore(folder)
        return rt.train(replace(task, adapter=dict(start))).state

    a, again, other = delta(tmp_path / "a"), delta(tmp_path / "a"), delta(tmp_path / "b")
    key = tmp_path / "a" / "client_0000" / "noise.key"
    assert key.stat().st_size == 32 and key.stat().st_mode & 0o077 == 0
    for k in a:
        torch.testing.assert_close(a[k], again[k])  # the same node repeats its adapter
        assert (a[k] - other[k]).abs().max() > 0.1  # noise std 0.5: a different secret differs
    bad = {k: torch.full_like(v, float("inf")) for k, v in start.items()}
    with pytest.raises(FloatingPointError, match="not finite; not sent"):
        rt._secure(replace(task, clip_norm=0.0), Update(0, bad, 4, 1))
