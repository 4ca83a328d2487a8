"""The Python API and the registries: a researcher extends fedit without editing it."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedit
from fedit.config import Config, PartitionConfig
from fedit.data.records import Record
from fedit.lora import AdapterState
from fedit.protocol import ClientPlan, Update
from tests.conftest import tiny_config


class KeepGlobal:
    """A do-nothing strategy: the global adapter never moves."""

    def __init__(self, cfg: Config, num_clients: int) -> None:
        self.calls = 0

    def client_plan(self, client_id: int, global_state: AdapterState, rnd: int) -> ClientPlan:
        return ClientPlan()

    def aggregate(self, global_state: AdapterState, updates: Sequence[Update]) -> AdapterState:
        return {k: v.clone() for k, v in global_state.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def by_category(
    records: Sequence[Record], cfg: PartitionConfig, rng: np.random.Generator
) -> list[list[int]]:
    cats = sorted({r.category for r in records})
    return [[i for i, r in enumerate(records) if r.category == c] for c in cats]


def first_clients(s: fedit.Selection) -> list[int]:
    return sorted(s.available)[: s.k]


def qa_template(record: Record, tokenizer: Any) -> tuple[str, str]:
    return f"Q: {record.instruction}\nA: ", record.response


fedit.STRATEGIES.register("test-keep", replace=True)(KeepGlobal)
fedit.PARTITIONERS.register("test-by-category", replace=True)(by_category)
fedit.SELECTORS.register("test-first", replace=True)(first_clients)
fedit.TEMPLATES.register("test-qa", replace=True)(qa_template)


def test_registered_extensions_run_from_config(data_file: Path) -> None:
    cfg = tiny_config(
        data_file,
        partition={"method": "test-by-category", "num_clients": 4},
        federation={"strategy": "test-keep", "selection": "test-first", "rounds": 2},
        data={"template": "test-qa"},
    )
    result = fedit.run_federation(cfg)
    assert result.partition_stats["num_clients"] == 4
    assert all(h["clients"] == [0, 1] for h in result.history[1:])
    first = result.history[0]["eval"]["loss"]
    assert all(abs(h["eval"]["loss"] - first) < 1e-6 for h in result.history)  # never moved


def test_api_round_trip(data_file: Path, tmp_path: Path) -> None:
    cfg = fedit.load_config(None, ["model.name=fedit/tiny-llama", f"data.path={data_file}"])
    assert isinstance(cfg, fedit.Config)
    records, _ = fedit.load_records(cfg.data)
    part = fedit.make_partition(records, tiny_config(data_file))
    fedit.write_partition(part, tmp_path / "split")
    assert (tmp_path / "split" / "stats.json").is_file()
