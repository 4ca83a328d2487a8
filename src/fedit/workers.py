"""Parallel client training: a pool of processes that each hold the model for the whole run.

Each worker builds the same `Federation` as the main process (same seed: same partition, same
tokenization, same base model), once per run, and trains the clients it is handed with the
one `train_local`. Only adapters and client plans cross the process boundary.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import torch

from fedit.client import ClientPlan, Update
from fedit.config import Config, config_from_dict
from fedit.lora import AdapterState

_FEDERATION: Any = None


def _init(config: dict[str, Any], threads: int) -> None:
    from fedit.simulation import Federation

    global _FEDERATION
    cfg = config_from_dict(config)
    # A worker trains in its own process with its share of the cores, and starts no pool.
    cfg.federation.workers = 1
    cfg.model.threads = threads
    torch.set_num_threads(threads)
    _FEDERATION = Federation(cfg)


def _train(rnd: int, client: int, adapter: AdapterState, plan: ClientPlan) -> Update:
    return _FEDERATION.train_client(rnd, client, "worker", adapter, plan)


class WorkerPool:
    """`workers` processes sharing the machine's cores evenly (at least one thread each)."""

    def __init__(self, cfg: Config, workers: int) -> None:
        threads = max(1, (cfg.model.threads or torch.get_num_threads()) // workers)
        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init,
            initargs=(cfg.to_dict(), threads),
        )

    def submit(
        self, rnd: int, client: int, adapter: AdapterState, plan: ClientPlan
    ) -> Future[Update]:
        return self.pool.submit(_train, rnd, client, adapter, plan)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
