"""Simulated client systems: speed, availability (with a daily cycle), a round deadline, and
the virtual clock that says how long a round would take on those devices.

Each client gets a profile, drawn from the `system` section's distributions with a generator
seeded by (run seed, client) or read from a CSV file. In round r a client is online with
probability `availability x (1 - diurnal x (1 - cos(2 pi (r / period + phase))) / 2)`, drawn
from a generator seeded by (run seed, round). A client running s local steps takes
`s x step_seconds / speed` virtual seconds. With a deadline D, a client that would take longer
is dropped (`straggler = "drop"`) or sends the steps it finished by D (`"partial"`); a round
lasts as long as its slowest accepted client, or D when someone was cut.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedit.config import Config, ConfigError
from fedit.seeding import generator


@dataclass(frozen=True)
class Profile:
    speed: float = 1.0
    availability: float = 1.0
    phase: float = 0.0  # of the daily cycle, in [0, 1)


def _draw(spec: str, rng: np.random.Generator, default: float) -> float:
    if not spec:
        return default
    kind, *args = spec.split(":")
    a = [float(x) for x in args]
    if kind == "const":
        return a[0]
    if kind == "uniform":
        return float(rng.uniform(a[0], a[1]))
    if kind == "lognormal":
        return float(rng.lognormal(a[0], a[1]))
    return float(rng.beta(a[0], a[1]))  # beta


def read_profiles(path: Path) -> dict[int, dict[str, float]]:
    """client -> the values its CSV row sets; errors name the file and line."""
    if not path.is_file():
        raise ConfigError(f"system.profiles: {path} is not a file")
    rows: dict[int, dict[str, float]] = {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        if "client" not in fields or not fields & {"speed", "availability", "phase"}:
            raise ConfigError(
                f"system.profiles: {path}:1: the header must name 'client' and at least one of "
                "speed, availability, phase"
            )
        for line, row in enumerate(reader, start=2):
            try:
                client = int(row["client"])
                values = {k: float(row[k]) for k in ("speed", "availability", "phase")
                          if k in row and row[k] not in (None, "")}  # fmt: skip
            except (TypeError, ValueError) as e:
                raise ConfigError(f"system.profiles: {path}:{line}: {e}") from None
            if "speed" in values and not values["speed"] > 0:
                raise ConfigError(f"system.profiles: {path}:{line}: speed must be > 0")
            if not 0 <= values.get("availability", 1.0) <= 1:
                raise ConfigError(f"system.profiles: {path}:{line}: availability not in [0, 1]")
            if client in rows:
                raise ConfigError(f"system.profiles: {path}:{line}: client {client} again")
            rows[client] = values
    return rows


def planned_steps(size: int, cfg: Config) -> int:
    """Local steps a client of `size` records is expected to run (the server's estimate)."""
    c = cfg.client
    if c.max_steps:
        return c.max_steps
    return max(1, math.ceil(c.local_epochs * math.ceil(size / c.batch_size)))


class Systems:
    """The clients' simulated devices for one run, and the virtual clock."""

    def __init__(self, cfg: Config, sizes: list[int]) -> None:
        self.cfg = cfg
        self.s = cfg.system
        self.sizes = sizes
        self.enabled = self.s.enabled
        given = read_profiles(Path(self.s.profiles)) if self.s.profiles else {}
        bad = sorted(c for c in given if not 0 <= c < len(sizes))
        if bad:
            raise ConfigError(
                f"system.profiles: {self.s.profiles} names clients {bad}; the partition has "
                f"clients 0..{len(sizes) - 1}"
            )
        self.profiles = []
        for c in range(len(sizes)):
            rng = generator(cfg.seed, "profile", c)
            drawn = Profile(
                speed=_draw(self.s.speed, rng, 1.0),
                availability=_draw(self.s.availability, rng, 1.0),
                phase=float(rng.random()),
            )
            self.profiles.append(Profile(**{**drawn.__dict__, **given.get(c, {})}))
        self.clock = 0.0  # virtual seconds of the rounds so far

    def availability(self, client: int, rnd: int) -> float:
        p = self.profiles[client]
        cycle = (1 - math.cos(2 * math.pi * (rnd / self.s.period + p.phase))) / 2
        return p.availability * (1 - self.s.diurnal * cycle)

    def online(self, rnd: int) -> list[int]:
        draws = generator(self.cfg.seed, "online", rnd).random(len(self.sizes))
        return [c for c in range(len(self.sizes)) if draws[c] < self.availability(c, rnd)]

    def seconds(self, client: int, steps: int) -> float:
        return steps * self.s.step_seconds / self.profiles[client].speed

    def predicted(self, client: int) -> float:
        """Virtual seconds the client's round should take (from its record count)."""
        return self.seconds(client, planned_steps(self.sizes[client], self.cfg))

    def step_budget(self, client: int) -> int | None:
        """The steps the client can finish by the deadline (None: no deadline)."""
        if not self.s.deadline:
            return None
        return int(self.s.deadline * self.profiles[client].speed / self.s.step_seconds + 1e-9)

    def round_record(
        self, chosen: list[int], online: int, outcomes: dict[int, dict[str, Any]]
    ) -> dict[str, Any]:
        """The round's `system` row: each sampled client's status, steps and virtual seconds;
        the round's virtual length and the clock after it."""
        clients = []
        cut = False
        longest = 0.0
        for c in chosen:
            o = outcomes.get(c, {"status": "failed", "steps": 0})
            steps = int(o.get("steps", 0))
            secs = self.seconds(c, steps)
            if o["status"] in ("dropped", "partial"):
                cut = True
                secs = float(self.s.deadline) if o["status"] == "dropped" else secs
            longest = max(longest, secs)
            clients.append({"client": c, "speed": round(self.profiles[c].speed, 4),
                            "virtual_s": secs, **o})  # fmt: skip
        length = max(longest, float(self.s.deadline)) if cut else longest
        self.clock += length
        return {"online": online, "clients": clients, "virtual_s": length,
                "virtual_clock_s": self.clock}  # fmt: skip
