"""Shared fixtures: small synthetic instruction data and the tiny model (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedit.client.runtime import ClientRuntime
from fedit.config import Config, config_from_dict
from fedit.data.partition import load_partition
from fedit.lora import load_lora_model

# Tests never reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CATEGORIES = ["open_qa", "brainstorming", "summarization", "classification"]
WORDS = [
    "river", "city", "music", "garden", "planet", "history", "science", "bread", "ocean", "light"
]  # fmt: skip


def make_rows(n_per_category: int = 12, users: int = 0) -> list[dict[str, str]]:
    rows = []
    for c, cat in enumerate(CATEGORIES):
        for i in range(n_per_category):
            w = WORDS[(i + c) % len(WORDS)]
            row = {
                "instruction": f"Tell me about the {w} number {i}.",
                "context": f"The {w} is item {i} of {cat}." if i % 2 else "",
                "response": f"The {w} {i} is a fine example of {cat.replace('_', ' ')}.",
                "category": cat,
            }
            if users:
                row["user"] = f"u{(i + c) % users}"
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", make_rows())


def tiny_config(data_path: Path, **sections: dict) -> Config:
    """The tiny federation used across tests; `sections` override keys per section."""
    base: dict = {
        "seed": 3,
        "model": {"name": "fedit/tiny-llama"},
        "data": {"path": str(data_path), "test_per_category": 2, "cutoff_len": 96},
        "partition": {"method": "shards", "num_clients": 4},
        "federation": {"rounds": 2, "clients_per_round": 2},
        "client": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "eval": {"micro_batch_size": 8},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(name, {}).update(values)
        else:
            base[name] = values
    return config_from_dict(base)


def client_runtime(cfg: Config) -> ClientRuntime:
    """The client side of `cfg`'s run in this process: every client of its partition."""
    clients = load_partition(cfg).clients
    return ClientRuntime(cfg, load_lora_model(cfg), dict(enumerate(clients)))
