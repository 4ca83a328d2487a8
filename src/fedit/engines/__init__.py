"""Engines carry the server's tasks to client runtimes and their updates back; nothing more.

- `inprocess.py`: the clients train in turn in this process, on the model the server
  evaluates with;
- `pool.py`: a pool of processes, each with a client runtime of its own;
- `flower/`: Flower SuperNodes, each with a long-lived node worker holding a client runtime.

An engine holds no training and no aggregation logic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from fedit.protocol import Task, Update

# (client, call that returns its update or raises why it has none)
Launched = list[tuple[int, "Callable[[], Update]"]]


class Engine(Protocol):
    """Where the clients are: their record and category counts, and a way to hand them tasks."""

    sizes: list[int]
    categories: list[dict[str, int]]  # per client: records per category ([] if unknown)
    tags: list[dict[str, str]]  # per client: the tags all its records share ([] if unknown)

    def launch(self, tasks: Sequence[Task]) -> Launched: ...

    def client_state(self, upto: int) -> dict[str, torch.Tensor] | None:
        """The clients' state for the server's checkpoint of round `upto`, when the clients
        live in this process (None: they keep it themselves)."""
        ...

    def load_client_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...
