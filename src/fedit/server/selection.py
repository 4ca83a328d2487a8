"""Which clients train in a round: registered selection rules, seeded per round.

A rule maps a `Selection` (the round, how many to pick, the clients online this round, their
record counts and category counts, the recent category exposure, a seeded generator, and the
means to ask candidates for their current loss or to predict their training time) to the
sorted ids of the clients it picks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedit.registry import Registry


@dataclass
class Selection:
    """What a selection rule may look at in round `round`."""

    round: int
    k: int  # how many to pick
    sizes: Sequence[int]  # record count of every client of the partition
    rng: np.random.Generator
    available: Sequence[int] = ()  # the clients online this round (default: all)
    categories: Sequence[dict[str, int]] = ()  # per client: records per category
    exposure: dict[str, float] = field(default_factory=dict)  # recent training per category
    # candidates -> their current local loss on a few of their own examples (one message each)
    probe: Callable[[list[int]], dict[int, float]] | None = None
    # client -> predicted seconds for its round under its system profile; and the deadline
    finish_time: Callable[[int], float] | None = None
    deadline: float = 0.0
    candidates: int = 0  # Power-of-Choice's d (0: 2k)
    tags: Sequence[dict[str, str]] = ()  # per client: the tags its records share
    tag: str = ""  # tag_mix: the tag whose mix is held (e.g. language)
    shares: dict[str, float] = field(default_factory=dict)  # tag_mix: value -> target share

    def __post_init__(self) -> None:
        if not self.available:
            self.available = list(range(len(self.sizes)))


Selector = Callable[[Selection], list[int]]
SELECTORS: Registry[Selector] = Registry("client selection rule")


def _pick(
    pool: Sequence[int], k: int, rng: np.random.Generator, p: np.ndarray | None = None
) -> list[int]:
    pool = list(pool)
    if k >= len(pool):
        return sorted(pool)
    return sorted(int(pool[i]) for i in rng.choice(len(pool), size=k, replace=False, p=p))


@SELECTORS.register("uniform")
def uniform(s: Selection) -> list[int]:
    """k distinct online clients, uniformly at random (the paper's sampling)."""
    return _pick(s.available, s.k, s.rng)


@SELECTORS.register("size")
def by_size(s: Selection) -> list[int]:
    """k distinct online clients with probability proportional to their number of examples."""
    p = np.asarray([s.sizes[c] for c in s.available], dtype=float)
    return _pick(s.available, s.k, s.rng, p / p.sum())


@SELECTORS.register("all")
def everyone(s: Selection) -> list[int]:
    """Every online client, every round (k is ignored)."""
    return sorted(s.available)


@SELECTORS.register("poisson")
def poisson(s: Selection) -> list[int]:
    """Each client on its own with probability k / N: a cohort of k clients on average, of
    varying size (possibly none). DP-FedAvg's accountant assumes this sampling."""
    n = len(s.sizes)
    return [int(i) for i in np.flatnonzero(s.rng.random(n) < s.k / n)]


@SELECTORS.register("power_of_choice")
def power_of_choice(s: Selection) -> list[int]:
    """Power-of-Choice (Cho, Wang and Joshi, 2022; its communication-light cpow-d variant):
    draw d candidates in proportion to their size, ask each for its loss under the current
    global adapter on a few of its own examples, keep the k with the highest loss.
    Ties go to the lower client id."""
    if s.probe is None:
        raise RuntimeError("power_of_choice needs a probe of the candidates' losses")
    d = min(s.candidates or 2 * s.k, len(s.available))
    p = np.asarray([s.sizes[c] for c in s.available], dtype=float)
    pool = _pick(s.available, d, s.rng, p / p.sum())
    if len(pool) <= s.k:
        return pool
    losses = s.probe(pool)
    ranked = sorted(pool, key=lambda c: (-losses[c], c))
    return sorted(ranked[: s.k])


def category_shares(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {c: n / total for c, n in counts.items()} if total else {}


@SELECTORS.register("coverage")
def coverage(s: Selection) -> list[int]:
    """Coverage-aware: greedily add the client whose data best covers the categories the
    federation has trained on least recently. A category c weighs 1 / (1 + exposure_c), the
    exposure being the decayed sum of the category shares of the clients of past rounds
    (`selection.decay`); each pick adds its shares before the next. A client's score is the
    weighted sum of its category shares; ties are broken at random (seeded)."""
    if not s.categories:
        raise RuntimeError("coverage needs the clients' category counts")
    exposure = dict(s.exposure)
    shares = {c: category_shares(s.categories[c]) for c in s.available}
    jitter = {c: float(s.rng.random()) for c in s.available}  # seeded tie-break
    chosen: list[int] = []
    for _ in range(min(s.k, len(s.available))):
        left = [c for c in s.available if c not in chosen]

        def score(c: int) -> tuple[float, float]:
            gain = sum(w / (1.0 + exposure.get(cat, 0.0)) for cat, w in shares[c].items())
            return (gain, jitter[c])

        best = max(left, key=score)
        chosen.append(best)
        for cat, w in shares[best].items():
            exposure[cat] = exposure.get(cat, 0.0) + w
    return sorted(chosen)


@SELECTORS.register("resource")
def resource_aware(s: Selection) -> list[int]:
    """Resource-aware (in the spirit of FedCS, Nishio and Yonetani 2019): pick uniformly among
    the online clients whose profile finishes the round within the deadline; if fewer than k
    do, fill up with the fastest of the rest. Without a deadline it is `uniform`."""
    if s.finish_time is None or not s.deadline:
        return uniform(s)
    times = {c: s.finish_time(c) for c in s.available}
    fits = [c for c in s.available if times[c] <= s.deadline]
    if len(fits) >= s.k:
        return _pick(fits, s.k, s.rng)
    rest = sorted((c for c in s.available if c not in fits), key=lambda c: (times[c], c))
    return sorted(fits + rest[: s.k - len(fits)])


@SELECTORS.register("tag_mix")
def tag_mix(s: Selection) -> list[int]:
    """Each round's clients in a target mix of a tag's values (`selection.tag`, e.g. language;
    `selection.shares`, e.g. {en = 0.8, ja = 0.2}; without shares, each value's share of the
    clients): k * share clients per value (largest remainders round, ties by value name),
    uniformly within the value, never more than it has online; a value short of clients
    leaves its places to the others, uniformly."""
    if not s.tag:
        raise RuntimeError("tag_mix needs selection.tag")
    groups: dict[str, list[int]] = {}
    for c in s.available:
        value = (s.tags[c] if c < len(s.tags) else {}).get(s.tag)
        if value is None:
            raise RuntimeError(f"tag_mix: client {c} has no single {s.tag!r} tag")
        groups.setdefault(value, []).append(c)
    values = sorted(groups)
    total = sum(s.shares.get(v, 0.0) for v in values) if s.shares else 0.0
    share = {v: (s.shares.get(v, 0.0) / total if total else len(groups[v]) / len(s.available))
             for v in values}  # fmt: skip
    k = min(s.k, len(s.available))
    want = {v: int(k * share[v]) for v in values}
    by_remainder = sorted(values, key=lambda v: (-(k * share[v] - want[v]), v))
    for v in by_remainder[: k - sum(want.values())]:
        want[v] += 1
    chosen: list[int] = []
    for v in values:
        chosen += _pick(groups[v], min(want[v], len(groups[v])), s.rng)
    left = [c for c in s.available if c not in chosen]
    chosen += _pick(left, k - len(chosen), s.rng) if len(chosen) < k else []
    return sorted(chosen)
