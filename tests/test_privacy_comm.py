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
from fedit.recipe import run_federation
from fedit.server.privacy import Accountant, clipped_delta, gaussian_noise
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
    assert row["clipped"] == 2 and all(n > 0.01 for n in row["update_norms"])
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
    assert len(rows) == 2 and all(r["clipped"] == 2 for r in rows)


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
