"""Each strategy against hand-computed numbers, exact LoRA aggregation, and toy problems."""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedit.client.train import _adjust_gradients
from fedit.config import Config, ConfigError, load_config
from fedit.protocol import ClientPlan, Update
from fedit.server.strategies import (
    STRATEGIES,
    FedAvg,
    build_strategy,
    coordinate_median,
    stack_factors,
    svd_average,
    trimmed_mean,
    weighted_average,
)
from fedit.server.strategies.aggregate import clip_update, update_norm

ROOT = Path(__file__).resolve().parents[1]


def cfg(*overrides: str) -> Config:
    return load_config(None, list(overrides))


def up(cid: int, value: float | list[float], n: int = 1, steps: int = 1) -> Update:
    return Update(
        cid, {"w": torch.tensor(value, dtype=torch.float32)}, num_examples=n, num_steps=steps
    )


X0 = {"w": torch.tensor(0.0)}


def test_weighted_average_hand_computed() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    c = {"w": torch.tensor([-1.0, 0.0]), "b": torch.tensor([[8.0]])}
    out = weighted_average([a, b, c], [1, 2, 1])
    # (1*[1,2] + 2*[3,6] + 1*[-1,0]) / 4 = [6/4, 14/4]; (0 + 8 + 8) / 4 = 4
    assert torch.equal(out["w"], torch.tensor([1.5, 3.5]))
    assert torch.equal(out["b"], torch.tensor([[4.0]]))
    assert out["w"].dtype == torch.float32


def test_fedavg_weights_by_examples() -> None:
    ups = [up(0, [1.0, 1.0, 1.0], n=30), up(1, [5.0, -5.0, 0.0], n=10)]
    out = FedAvg(cfg(), 4).aggregate({"w": torch.zeros(3)}, ups)
    assert torch.allclose(out["w"], torch.tensor([2.0, -0.5, 0.75]))
    assert torch.equal(
        FedAvg(cfg(), 4).aggregate({"w": torch.zeros(3)}, ups[:1])["w"], ups[0].state["w"]
    )


def test_median_and_trimmed_mean() -> None:
    states = [{"w": torch.tensor([v, -v])} for v in [1.0, 2.0, 100.0, 3.0, 4.0]]
    assert torch.equal(coordinate_median(states)["w"], torch.tensor([3.0, -3.0]))
    assert torch.equal(trimmed_mean(states, 0.2)["w"], torch.tensor([3.0, -3.0]))  # (2+3+4)/3
    assert torch.equal(coordinate_median(states[:4])["w"], torch.tensor([2.5, -2.5]))
    robust = FedAvg(cfg("strategy.robust='median'"), 5).aggregate(
        {"w": torch.zeros(2)}, [Update(i, s, 1, 1) for i, s in enumerate(states)]
    )
    assert torch.equal(robust["w"], torch.tensor([3.0, -3.0]))


def test_update_norm_clipping() -> None:
    g = {"w": torch.tensor([1.0, 1.0])}
    s = {"w": torch.tensor([4.0, 5.0])}  # delta (3, 4), norm 5
    assert update_norm(s, g) == pytest.approx(5.0)
    clipped = clip_update(s, g, 2.5)
    assert torch.allclose(clipped["w"], torch.tensor([2.5, 3.0]))
    assert clip_update(s, g, 10.0) is s
    out = FedAvg(cfg("strategy.clip_norm=2.5"), 2).aggregate(g, [Update(0, s, 1, 1)])
    assert torch.allclose(out["w"], torch.tensor([2.5, 3.0]))


def test_fedprox_plan_and_penalty_gradient() -> None:
    plan = build_strategy(
        cfg("federation.strategy='fedprox'", "strategy.prox_mu=0.5"), 2
    ).client_plan(0, X0, 1)
    assert plan.prox_mu == 0.5
    p = torch.nn.Parameter(torch.tensor([3.0, -1.0]))
    p.grad = torch.tensor([0.1, 0.2])
    anchor = {"k": torch.tensor([1.0, 1.0])}
    _adjust_gradients({"k": p}, plan, anchor, {})
    # d/dw mu/2 ||w - w0||^2 = mu (w - w0) = 0.5 * (2, -2)
    assert torch.allclose(p.grad, torch.tensor([1.1, -0.8]))


def test_correction_and_rank_mask_on_gradients() -> None:
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.ones(2, 3)
    plan = ClientPlan(correction={"x.lora_A.weight": torch.full((2, 3), 0.5)})
    mask = {"x.lora_A.weight": torch.tensor([[1.0] * 3, [0.0] * 3])}
    _adjust_gradients({"x.lora_A.weight": p}, plan, {}, mask)
    assert torch.equal(p.grad, torch.tensor([[1.5] * 3, [0.0] * 3]))


def test_fednova_hand_computed() -> None:
    s = build_strategy(cfg("federation.strategy='fednova'"), 2)
    out = s.aggregate(X0, [up(0, -2.0, steps=2), up(1, -8.0, steps=4)])
    # d = .5 * 2/2 + .5 * 8/4 = 1.5; tau_eff = 3; x = 0 - 3 * 1.5
    assert float(out["w"]) == pytest.approx(-4.5)
    assert float(FedAvg(cfg(), 2).aggregate(X0, [up(0, -2.0), up(1, -8.0)])["w"]) == -5.0


def test_fedavgm_hand_computed() -> None:
    s = build_strategy(cfg("federation.strategy='fedavgm'", "strategy.momentum=0.9"), 1)
    x = s.aggregate({"w": torch.tensor(1.0)}, [up(0, 3.0)])  # delta 2, v 2, x 3
    assert float(x["w"]) == pytest.approx(3.0)
    x = s.aggregate(x, [up(0, 4.0)])  # delta 1, v 0.9*2 + 1 = 2.8, x 5.8
    assert float(x["w"]) == pytest.approx(5.8)


@pytest.mark.parametrize(
    ("name", "v1"),
    [
        ("fedadam", 0.99 * 1e-6 + 0.01 * 4.0),
        ("fedyogi", 1e-6 + 0.01 * 4.0),  # v - (1-b2) d^2 sign(v - d^2), v < d^2
        ("fedadagrad", 1e-6 + 4.0),
    ],
)
def test_adaptive_server_optimizers_hand_computed(name: str, v1: float) -> None:
    s = build_strategy(cfg(f"federation.strategy='{name}'", "strategy.adaptive_lr=0.1"), 1)
    out = s.aggregate(X0, [up(0, 2.0)])  # delta 2, m = 0.1 * 2 = 0.2
    assert float(out["w"]) == pytest.approx(0.1 * 0.2 / (v1**0.5 + 1e-3), rel=1e-6)
    assert float(s.state_dict()["v/w"]) == pytest.approx(v1, rel=1e-9)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_bias_correction_scales_the_step_as_flower_does(name: str) -> None:
    """Flower's FedAdam: eta * sqrt(1 - beta2^t) / (1 - beta1^t); off by default (Reddi et al.)."""
    opts = [f"federation.strategy='{name}'", "strategy.adaptive_lr=0.1"]
    plain = build_strategy(cfg(*opts), 1)
    corrected = build_strategy(cfg(*opts, "strategy.bias_correction=true"), 1)
    for t in (1, 2, 3):  # the same global and update each round: the same moments in both
        step = float(plain.aggregate(X0, [up(0, 2.0)])["w"])
        scaled = float(corrected.aggregate(X0, [up(0, 2.0)])["w"])
        assert scaled == pytest.approx(step * (1 - 0.99**t) ** 0.5 / (1 - 0.9**t), rel=1e-6)
    again = build_strategy(cfg(*opts, "strategy.bias_correction=true"), 1)
    again.load_state_dict(corrected.state_dict())
    assert again.step == 3  # type: ignore[attr-defined]


def test_scaffold_hand_computed() -> None:
    s = build_strategy(cfg("federation.strategy='scaffold'", "client.lr=0.5"), 4)
    out = s.aggregate(X0, [up(0, -1.0, steps=2), up(1, -3.0, steps=1)])
    # c_0 = (0 - -1) / (2 * .5) = 1; c_1 = 3 / .5 = 6; x = mean(-1, -3); c = (1 + 6) / 4
    assert float(out["w"]) == pytest.approx(-2.0)
    state = s.state_dict()
    assert float(state["c/w"]) == pytest.approx(1.75)
    assert float(state["ci/0/w"]) == pytest.approx(1.0) and float(state["ci/1/w"]) == pytest.approx(
        6.0
    )
    plan = s.client_plan(0, out, 1)
    assert plan.correction is not None and float(plan.correction["w"]) == pytest.approx(0.75)
    assert float(s.client_plan(3, out, 1).correction["w"]) == pytest.approx(1.75)  # type: ignore[index]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm", "scaffold"])
def test_state_round_trips_exactly(name: str) -> None:
    c = cfg(f"federation.strategy='{name}'", "strategy.adaptive_lr=0.1", "client.lr=0.5")
    a = build_strategy(c, 3)
    x = a.aggregate(X0, [up(0, 1.0, steps=2), up(1, 2.0, steps=3)])
    b = build_strategy(c, 3)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    ups = [up(1, 0.5, steps=2), up(2, -1.0, steps=1)]
    assert torch.equal(a.aggregate(x, ups)["w"], b.aggregate(x, ups)["w"])


def test_strategy_config_conflicts_are_named() -> None:
    with pytest.raises(ConfigError, match="lora_aggregation"):
        build_strategy(cfg("federation.strategy='fedadam'", "strategy.lora_aggregation='svd'"), 2)
    with pytest.raises(ConfigError, match="strategy.robust"):
        build_strategy(cfg("federation.strategy='scaffold'", "strategy.robust='median'"), 2)
    with pytest.raises(ConfigError, match="lora.client_ranks"):
        cfg("lora.client_ranks=[2, 4]")
    with pytest.raises(ConfigError, match=r"lora.client_ranks\[1\]"):
        cfg("lora.client_ranks=[2, 40]", "strategy.lora_aggregation='svd'")
    with pytest.raises(LookupError, match="fedavg, fedavgm, fednova"):
        STRATEGIES.get("fedavgg")


# ---------------------------------------------------------------- exact LoRA aggregation


def lora_state(b: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"m.lora_A.weight": a, "m.lora_B.weight": b}


@settings(max_examples=30, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    d=st.integers(3, 9),
    k=st.integers(3, 9),
    seed=st.integers(0, 1000),
)
def test_stacking_is_exact_and_naive_is_not(ranks: list[int], d: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    r = max(ranks)
    states = [
        lora_state(
            torch.randn(d, r, generator=g, dtype=torch.float64),
            torch.randn(r, k, generator=g, dtype=torch.float64),
        )
        for _ in ranks
    ]
    weights = [float(i + 1) for i in range(len(ranks))]
    p = [w / sum(weights) for w in weights]
    target = sum(
        pi * s["m.lora_B.weight"] @ s["m.lora_A.weight"] for pi, s in zip(p, states, strict=True)
    )
    bs, as_ = stack_factors(states, weights)["m"]
    assert torch.allclose(bs @ as_, target, atol=1e-10)
    naive = weighted_average(states, weights)
    assert not torch.allclose(
        naive["m.lora_B.weight"] @ naive["m.lora_A.weight"], target, atol=1e-3
    )
    # folding back: exact when the global rank holds the stacked rank, Eckart-Young otherwise
    full = svd_average(states, weights, rank=len(ranks) * r, dtype=torch.float64)
    assert torch.allclose(full["m.lora_B.weight"] @ full["m.lora_A.weight"], target, atol=1e-9)
    folded = svd_average(states, weights, rank=r, dtype=torch.float64)
    err = torch.linalg.norm(folded["m.lora_B.weight"] @ folded["m.lora_A.weight"] - target)
    tail = torch.linalg.svdvals(target)[r:]
    assert float(err) == pytest.approx(float(tail.norm()), abs=1e-8)


def test_heterogeneous_ranks_aggregate_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    small = lora_state(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g))
    large = lora_state(torch.randn(6, 4, generator=g), torch.randn(4, 5, generator=g))
    target = (
        0.25 * small["m.lora_B.weight"] @ small["m.lora_A.weight"]
        + 0.75 * large["m.lora_B.weight"] @ large["m.lora_A.weight"]
    )
    c = cfg("lora.r=8", "lora.client_ranks=[2, 4]", "strategy.lora_aggregation='svd'")
    s = build_strategy(c, 2)
    assert s.client_plan(0, {}, 1).rank == 2 and s.client_plan(1, {}, 1).rank == 4
    glob = {"m.lora_A.weight": torch.zeros(8, 5), "m.lora_B.weight": torch.zeros(6, 8)}
    out = s.aggregate(glob, [Update(0, small, 1, 1), Update(1, large, 3, 1)])
    assert out["m.lora_A.weight"].shape == (8, 5) and out["m.lora_B.weight"].shape == (6, 8)
    assert torch.allclose(out["m.lora_B.weight"] @ out["m.lora_A.weight"], target, atol=1e-5)


def test_rolora_alternates_the_trained_factor_and_averages_exactly() -> None:
    s = build_strategy(cfg("strategy.lora_aggregation='rolora'"), 2)
    plans = [s.client_plan(0, {}, rnd) for rnd in (1, 2, 3, 4)]
    assert [(p.train_lora_A, p.train_lora_B) for p in plans] == [(False, True), (True, False)] * 2
    assert plans[0].trains("m.lora_B.weight") and not plans[0].trains("m.lora_A.weight")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, generator=g), torch.randn(4, 2, generator=g)
    glob = lora_state(b, a)
    # A B-round: the clients share A, so the mean of B_i A is (mean B_i) A, exactly.
    bs = [torch.randn(4, 2, generator=g) for _ in range(2)]
    out = s.aggregate(
        glob, [Update(i, {"m.lora_B.weight": bs[i]}, n, 1) for i, n in ((0, 1), (1, 3))]
    )
    exact = 0.25 * bs[0] @ a + 0.75 * bs[1] @ a
    assert torch.equal(out["m.lora_A.weight"], a)
    assert torch.allclose(out["m.lora_B.weight"] @ out["m.lora_A.weight"], exact, atol=1e-6)
    # An A-round: B shared, the mean of B A_i is B (mean A_i).
    As = [torch.randn(2, 3, generator=g) for _ in range(2)]
    out = s.aggregate(glob, [Update(i, {"m.lora_A.weight": As[i]}, 1, 1) for i in (0, 1)])
    assert torch.equal(out["m.lora_B.weight"], b)
    assert torch.allclose(b @ out["m.lora_A.weight"], 0.5 * (b @ As[0] + b @ As[1]), atol=1e-6)


def test_ffa_plan_freezes_a_and_fills_it_from_global() -> None:
    s = build_strategy(cfg("strategy.lora_aggregation='ffa'"), 2)
    assert s.client_plan(0, {}, 1).train_lora_A is False
    a = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    glob = lora_state(torch.zeros(4, 2), a)
    ups = [Update(i, {"m.lora_B.weight": torch.full((4, 2), float(i))}, 1, 1) for i in (1, 3)]
    out = s.aggregate(glob, ups)
    assert torch.equal(out["m.lora_A.weight"], a)
    assert torch.equal(out["m.lora_B.weight"], torch.full((4, 2), 2.0))
    # with A shared, averaging B is the exact average of the products
    target = sum(0.5 * u.state["m.lora_B.weight"] @ a for u in ups)
    assert torch.allclose(out["m.lora_B.weight"] @ a, target, atol=1e-6)


# ---------------------------------------------------------------- toy problems


def run_toy(
    name: str, a: list[float], b: list[float], steps: list[int], lr: float, rounds: int
) -> float:
    """Quadratic clients f_i(x) = a_i/2 (x - b_i)^2, local SGD with the strategy's plan."""
    s = build_strategy(cfg(f"federation.strategy='{name}'", f"client.lr={lr}"), len(a))
    x = {"w": torch.tensor(0.0)}
    for _ in range(rounds):
        ups = []
        for i in range(len(a)):
            plan = s.client_plan(i, x, 1)
            corr = 0.0 if plan.correction is None else float(plan.correction["w"])
            y = float(x["w"])
            for _ in range(steps[i]):
                y -= lr * (a[i] * (y - b[i]) + corr)
            ups.append(up(i, y, n=1, steps=steps[i]))
        x = s.aggregate(x, ups)
    return float(x["w"])


def test_scaffold_removes_client_drift() -> None:
    a, b = [1.0, 10.0], [0.0, 10.0]
    optimum = sum(ai * bi for ai, bi in zip(a, b, strict=True)) / sum(a)  # 9.09
    fedavg = run_toy("fedavg", a, b, [10, 10], 0.05, 200)
    scaffold = run_toy("scaffold", a, b, [10, 10], 0.05, 200)
    assert abs(scaffold - optimum) < 1e-3
    assert abs(fedavg - optimum) > 0.5


def test_fednova_removes_step_count_bias() -> None:
    a, b, steps = [1.0, 1.0], [0.0, 10.0], [1, 10]
    fedavg = run_toy("fedavg", a, b, steps, 0.01, 3000)
    fednova = run_toy("fednova", a, b, steps, 0.01, 3000)
    assert abs(fednova - 5.0) < 0.5
    assert abs(fedavg - 5.0) > 3.0


# ---------------------------------------------------------------- end to end, tiny model

VARIANTS = [
    ["federation.strategy=fedavg"],
    ["federation.strategy=fedprox", "strategy.prox_mu=0.1"],
    ["federation.strategy=scaffold"],
    ["federation.strategy=fednova"],
    ["federation.strategy=fedavgm"],
    ["federation.strategy=fedadam"],
    ["federation.strategy=fedyogi"],
    ["federation.strategy=fedadagrad"],
    ["strategy.lora_aggregation=svd"],
    ["strategy.lora_aggregation=ffa"],
    ["strategy.lora_aggregation=rolora"],
    ["strategy.lora_aggregation=svd", "lora.client_ranks=[1, 2, 4]"],
    ["strategy.robust=median", "strategy.clip_norm=0.5"],
    ["strategy.robust=trimmed_mean", "strategy.trim_ratio=0.25"],
]


@pytest.mark.parametrize("overrides", VARIANTS, ids=[" ".join(v) for v in VARIANTS])
def test_every_strategy_runs_through_the_cli(
    overrides: list[str], tmp_path: Path, data_file: Path
) -> None:
    from fedit.cli import main
    from fedit.lora import load_adapter_state

    args = [
        f"--set={o}"
        for o in [f"data.path={data_file}", "federation.clients_per_round=3", *overrides]
    ]
    out = tmp_path / "out"
    assert (
        main(["run", str(ROOT / "configs" / "tiny.toml"), "--out", str(out), "--quiet", *args]) == 0
    )
    state = load_adapter_state(out / "adapter")
    assert all(torch.isfinite(v).all() for v in state.values())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 2 and rows[-1]["eval"]["loss"] == rows[-1]["eval"]["loss"]
    if "strategy.lora_aggregation=ffa" in overrides:  # B only goes up
        b_bytes = sum(v.numel() * v.element_size() for k, v in state.items() if ".lora_B." in k)
        assert rows[-1]["bytes_up_per_client"] == b_bytes
    if "lora.client_ranks=[1, 2, 4]" in overrides:
        assert rows[-1]["bytes_up_per_client"] < rows[-1]["bytes_down_per_client"]
    if "strategy.lora_aggregation=rolora" in overrides:  # half goes up: B, then A
        half = {f: sum(v.numel() * v.element_size() for k, v in state.items() if f in k)
                for f in (".lora_A.", ".lora_B.")}  # fmt: skip
        assert [r["bytes_up_per_client"] for r in rows[1:]] == [half[".lora_B."], half[".lora_A."]]
    # resume continues the strategy state exactly
    resumed = tmp_path / "resumed"
    assert (
        main(
            [
                "run",
                str(ROOT / "configs" / "tiny.toml"),
                "--out",
                str(resumed),
                "--quiet",
                *args,
                "--set=federation.rounds=1",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "run",
                str(ROOT / "configs" / "tiny.toml"),
                "--out",
                str(resumed),
                "--quiet",
                *args,
                "--resume",
            ]
        )
        == 0
    )
    again = load_adapter_state(resumed / "adapter")
    assert all(torch.equal(state[k], again[k]) for k in state)
