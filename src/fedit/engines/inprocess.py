"""The in-process engine: one client runtime in this process trains the chosen clients in turn."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from fedit.client.runtime import ClientRuntime
from fedit.engines import Launched
from fedit.protocol import Task, Update


class InProcess:
    """Tasks go to `runtime` as payloads, exactly as they would cross a process boundary."""

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime
        self.sizes = runtime.sizes()
        self.categories = runtime.categories()
        self.tags = runtime.tags()

    def _run(self, task: Task, slot: str) -> Update:
        return Update.from_payload(self.runtime.handle(task.to_payload(), slot))

    def launch(self, tasks: Sequence[Task]) -> Launched:
        n = len(tasks)
        return [(t.client, partial(self._run, t, f"{i}/{n}")) for i, t in enumerate(tasks, 1)]

    def client_state(self, upto: int) -> dict[str, torch.Tensor] | None:
        return self.runtime.state_dict(upto)

    def load_client_state(self, state: dict[str, torch.Tensor]) -> None:
        self.runtime.load_state_dict(state)

    def close(self) -> None:
        pass
