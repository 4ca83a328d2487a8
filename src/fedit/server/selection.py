"""Which clients train in a round: registered selection rules, seeded per round."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedit.registry import Registry

# (client sizes, how many to pick, rng) -> sorted client ids
Selector = Callable[[Sequence[int], int, np.random.Generator], list[int]]
SELECTORS: Registry[Selector] = Registry("client selection rule")


@SELECTORS.register("uniform")
def uniform(sizes: Sequence[int], k: int, rng: np.random.Generator) -> list[int]:
    """k distinct clients, uniformly at random (the paper's sampling)."""
    return sorted(int(i) for i in rng.choice(len(sizes), size=k, replace=False))


@SELECTORS.register("size")
def by_size(sizes: Sequence[int], k: int, rng: np.random.Generator) -> list[int]:
    """k distinct clients with probability proportional to their number of examples."""
    p = np.asarray(sizes, dtype=float)
    return sorted(int(i) for i in rng.choice(len(sizes), size=k, replace=False, p=p / p.sum()))


@SELECTORS.register("all")
def everyone(sizes: Sequence[int], k: int, rng: np.random.Generator) -> list[int]:
    """Every client, every round (k is ignored)."""
    return list(range(len(sizes)))


@SELECTORS.register("poisson")
def poisson(sizes: Sequence[int], k: int, rng: np.random.Generator) -> list[int]:
    """Each client on its own with probability k / N: a cohort of k clients on average, of
    varying size (possibly none). DP-FedAvg's accountant assumes this sampling."""
    return [int(i) for i in np.flatnonzero(rng.random(len(sizes)) < k / len(sizes))]
