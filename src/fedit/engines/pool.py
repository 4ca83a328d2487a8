"""The worker-pool engine: processes that each hold a client runtime for the whole run.

Each worker builds the same client runtime as the main process would (same seed: same
partition, same tokenization, same base model and LoRA init), once per run, and answers the
task payloads it is handed. Only payloads cross the process boundary. A client may train in a
different worker each round, so what it keeps (its personal state) is in its disk-only store
under the run's client-state folder, which every worker reads and writes. With several GPUs,
each worker trains on its own (`worker_device`).
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch

from fedit.client.runtime import ClientRuntime, category_counts, common_tags
from fedit.config import Config, config_from_dict, variant
from fedit.data.partition import load_partition
from fedit.data.records import Record
from fedit.engines import Launched
from fedit.lora import load_lora_model
from fedit.protocol import Payload, Task, Update

_RUNTIME: ClientRuntime | None = None


def worker_device(cfg: Config, index: int, gpus: int) -> str:
    """Where worker `index` trains: with several GPUs and model.device 'auto' or 'cuda', each
    worker on its own (cuda:index mod gpus); otherwise model.device as it is."""
    if gpus > 1 and cfg.model.device in ("auto", "cuda"):
        return f"cuda:{index % gpus}"
    return cfg.model.device


def _init(config: dict[str, Any], threads: int, state_dir: str, counter: Any) -> None:
    global _RUNTIME
    with counter.get_lock():  # each worker its own index, in start order
        index = counter.value
        counter.value += 1
    # A worker trains in its own process with its share of the cores (and its own GPU).
    cfg = config_from_dict(config)
    device = worker_device(cfg, index, torch.cuda.device_count())
    cfg = variant(cfg, model={"threads": threads, "device": device})
    torch.set_num_threads(threads)
    partition = load_partition(cfg)
    clients = dict(enumerate(partition.clients))
    _RUNTIME = ClientRuntime(cfg, load_lora_model(cfg), clients, own=partition.client_tests,
                             state_dir=Path(state_dir))  # fmt: skip


def _handle(payload: Payload) -> Payload:
    assert _RUNTIME is not None, "the worker's initializer did not run"
    return _RUNTIME.handle(payload, "worker")


def _result(future: Future[Payload]) -> Update:
    return Update.from_payload(future.result())


class WorkerPool:
    """`workers` processes sharing the machine's cores evenly (at least one thread each)."""

    def __init__(
        self, cfg: Config, clients: Sequence[Sequence[Record]], state_dir: Path | None = None
    ) -> None:
        workers = cfg.federation.workers
        threads = max(1, (cfg.model.threads or torch.get_num_threads()) // workers)
        self.sizes = [len(c) for c in clients]
        self.categories = [category_counts(c) for c in clients]
        self.tags = [common_tags(c) for c in clients]
        # A run without a folder keeps its clients' state in a folder of its own till it ends.
        self.scratch = None if state_dir else Path(tempfile.mkdtemp(prefix="fedit-clients-"))
        context = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_init,
            initargs=(
                cfg.to_dict(),
                threads,
                str(state_dir or self.scratch),
                context.Value("i", 0),
            ),
        )

    def launch(self, tasks: Sequence[Task]) -> Launched:
        futures = [(t.client, self.pool.submit(_handle, t.to_payload())) for t in tasks]
        return [(c, partial(_result, f)) for c, f in futures]

    def client_state(self, upto: int) -> dict[str, torch.Tensor] | None:
        return None  # error feedback is refused with workers > 1; nothing else is kept

    def load_client_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError("the worker pool keeps no client state; resume with workers=1")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
