"""Per-round checkpoints: the global adapter (PEFT format), strategy state and run state.

A round folder is assembled under a temporary name and renamed into place, so a folder named
`round_NNNN` is always complete; its run_state.json records a sha256 for every file, checked on
load, so a damaged checkpoint is detected and skipped rather than loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedit.errors import FeditError
from fedit.files import atomic_dir
from fedit.lora import ADAPTER_FILE, AdapterState, write_adapter_files

STRATEGY_FILE = "strategy_state.safetensors"
# The state of clients that live in the server's process (error-feedback residuals).
CLIENT_FILE = "client_state.safetensors"
STATE_FILE = "run_state.json"
PREFIX = "round_"


class CheckpointError(FeditError, RuntimeError):
    """A checkpoint that cannot be used; the message names the folder."""


@dataclass
class Checkpoint:
    round: int
    folder: Path
    adapter: AdapterState
    strategy_state: dict[str, torch.Tensor]
    run_state: dict[str, Any]
    client_state: dict[str, torch.Tensor] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def round_dir(root: Path, rnd: int) -> Path:
    return root / f"{PREFIX}{rnd:04d}"


def save_checkpoint(
    root: Path,
    rnd: int,
    model: Any,
    adapter: AdapterState,
    strategy_state: dict[str, torch.Tensor],
    run_state: dict[str, Any],
    client_state: dict[str, torch.Tensor] | None = None,
    on_written: Callable[[], None] | None = None,
) -> Path:
    """Write round `rnd` under a temporary name, then rename it into place.

    A failure (disk full, a kill) leaves earlier rounds untouched and no `round_NNNN` folder
    for this one. `on_written` runs after the files are written, before the rename.
    """
    final = round_dir(root, rnd)
    try:
        tensors = {STRATEGY_FILE: strategy_state}
        if client_state:
            tensors[CLIENT_FILE] = client_state
        return _save(root, final, rnd, model, adapter, tensors, run_state, on_written)
    except OSError as e:
        raise CheckpointError(
            f"could not write the checkpoint of round {rnd} to {final}: {e}; "
            f"the checkpoints of earlier rounds in {root} are intact"
        ) from e


def _save(
    root: Path,
    final: Path,
    rnd: int,
    model: Any,
    adapter: AdapterState,
    tensors: dict[str, dict[str, torch.Tensor]],
    run_state: dict[str, Any],
    on_written: Callable[[], None] | None,
) -> Path:
    def fill(folder: Path) -> None:
        write_adapter_files(model, adapter, folder)
        for name, named in tensors.items():
            tensors_cpu = {k: v.detach().cpu().contiguous() for k, v in named.items()}
            save_file(tensors_cpu, str(folder / name))
        files = {p.name: _sha256(p) for p in sorted(folder.iterdir())}
        with (folder / STATE_FILE).open("w", encoding="utf-8") as f:
            json.dump({**run_state, "round": rnd, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if on_written is not None:
            on_written()

    # A re-run of this round after a resume replaces its folder.
    return atomic_dir(final, fill)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT until the block ends, so Ctrl-C never cuts a checkpoint short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def load_checkpoint(folder: Path) -> Checkpoint:
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{state_path}: unreadable run state: {e}") from e
    for name, digest in state.get("files", {}).items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise CheckpointError(f"{path}: missing or corrupt (checksum mismatch)")
    try:
        adapter = load_file(str(folder / ADAPTER_FILE))
        strategy_state = load_file(str(folder / STRATEGY_FILE))
        clients = folder / CLIENT_FILE
        client_state = load_file(str(clients)) if clients.is_file() else {}
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot read tensors: {e}") from e
    return Checkpoint(int(state["round"]), folder, adapter, strategy_state, state, client_state)


def remove_partial(root: Path) -> list[str]:
    """Delete the temporary folders of checkpoints that a crash cut short."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(f".{PREFIX}"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return sorted(removed)


def list_rounds(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    rounds = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit():
            rounds.append(int(p.name[len(PREFIX) :]))
    return sorted(rounds)


def latest_checkpoint(root: Path) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint that verifies, and a note for each newer one that did not."""
    problems: list[str] = []
    for rnd in reversed(list_rounds(root)):
        try:
            return load_checkpoint(round_dir(root, rnd)), problems
        except CheckpointError as e:
            problems.append(str(e))
    return None, problems
