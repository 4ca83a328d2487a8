"""Faults on purpose, for tests and demos: the `faults.*` specs and the crash points.

Injected corrupt updates and the server's defence against faulty clients (screening) live in
`fedit.server.screening`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

FAULT_KINDS = ("fail", "nan", "huge", "leave")
# Kinds the server applies to an update as it receives it (impossible under secure aggregation,
# where it receives only the sum); 'leave' happens on the node: it exits after sending its
# masked update, before the unmask stage of a secure round.
SERVER_KINDS = ("fail", "nan", "huge")
CRASH_POINTS = ("train", "checkpoint")


def injection_problem(spec: str) -> str | None:
    """What is wrong with a 'KIND:CLIENT:ROUND' spec (CLIENT and ROUND a number or '*')."""
    parts = spec.split(":")
    ok = len(parts) == 3 and parts[0] in FAULT_KINDS
    if not (ok and all(p == "*" or p.isdigit() for p in parts[1:])):
        return f"expected KIND:CLIENT:ROUND with KIND in {FAULT_KINDS}"
    return None


def crash_problem(spec: str) -> str | None:
    """What is wrong with a 'POINT:ROUND' spec."""
    point, _, rnd = spec.partition(":")
    if not (point in CRASH_POINTS and rnd.isdigit()):
        return f"expected POINT:ROUND with POINT in {CRASH_POINTS}"
    return None


def injected_kinds(specs: Sequence[str], client: int, rnd: int) -> list[str]:
    """The fault kinds `specs` inject for this client in this round."""
    kinds = []
    for spec in specs:
        kind, c, r = spec.split(":")
        if c in ("*", str(client)) and r in ("*", str(rnd)):
            kinds.append(kind)
    return kinds


def crashes_at(spec: str, point: str, rnd: int) -> bool:
    return spec == f"{point}:{rnd}"


def crash_now() -> None:
    """SIGKILL this process: no cleanup handler runs, exactly like a power cut or OOM kill."""
    os.kill(os.getpid(), signal.SIGKILL)


def crash_group() -> None:
    """SIGKILL this process's whole process group (a Flower node and the processes it started)."""
    os.killpg(os.getpgid(0), signal.SIGKILL)
