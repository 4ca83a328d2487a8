import pytest
import torch

from fedit.client import Update
from fedit.strategies import STRATEGIES, FedAvg, weighted_average


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
    g = {"x": torch.zeros(3)}
    ups = [
        Update(0, {"x": torch.tensor([1.0, 1.0, 1.0])}, num_examples=30, num_steps=5),
        Update(1, {"x": torch.tensor([5.0, -5.0, 0.0])}, num_examples=10, num_steps=5),
    ]
    out = FedAvg().aggregate(g, ups)
    assert torch.allclose(out["x"], torch.tensor([2.0, -0.5, 0.75]))
    single = FedAvg().aggregate(g, ups[:1])
    assert torch.equal(single["x"], ups[0].state["x"])


def test_errors() -> None:
    with pytest.raises(ValueError, match="no client updates"):
        weighted_average([], [])
    with pytest.raises(ValueError, match="different adapter keys"):
        weighted_average([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average([{"a": torch.zeros(1)}], [0])


def test_unknown_strategy_lists_known() -> None:
    with pytest.raises(LookupError, match="fedavg"):
        STRATEGIES.get("fedavgg")
