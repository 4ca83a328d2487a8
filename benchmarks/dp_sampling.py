"""Epsilon at the documented DP settings under each client-sampling scheme (docs/privacy.md).

    python benchmarks/dp_sampling.py          # needs dp-accounting (pip install dp-accounting)

- fedit: Poisson sampling at q = m / N (what DP runs do), opacus's RDP accountant (what runs
  report);
- Poisson, tight: the same mechanism by dp-accounting's PLD accountant;
- fixed size: exactly m of N clients without replacement (what fedit did before Poisson),
  accounted as what it is: replace-one neighbours, so the sum moves by up to 2C (the noise
  multiplier halves), by dp-accounting's RDP accountant for sampling without replacement.
"""

from __future__ import annotations

import dp_accounting
from dp_accounting import rdp
from dp_accounting.pld import pld_privacy_accountant

from fedit.server.privacy import Accountant

DELTA = 1e-5
# (where it is documented, clients N, per round m, rounds, noise multipliers)
SETTINGS = [
    ("dolly + SmolLM2, 10 clients", 10, 2, 3, [0.01, 0.03, 0.1, 1.0]),
    ("dolly + SmolLM2, 100 clients", 100, 20, 2, [0.7]),
    ("the paper's scale: 100 clients, 5 a round, 20 rounds", 100, 5, 20, [1.0, 2.0]),
    ("200 rounds at q = 0.05", 100, 5, 200, [1.0]),
]


def poisson_pld(q: float, sigma: float, rounds: int) -> float:
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(acc.get_epsilon(DELTA))


def fixed_size(n: int, m: int, sigma: float, rounds: int) -> float:
    inner = dp_accounting.GaussianDpEvent(sigma / 2)  # replace-one: sensitivity 2C
    event = dp_accounting.SampledWithoutReplacementDpEvent(n, m, inner)
    acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    acc.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(acc.get_epsilon(DELTA))


def main() -> None:
    print(
        f"| setting | noise multiplier | epsilon (delta {DELTA:g}): fedit, Poisson, RDP "
        "(reported) | Poisson, PLD (tight) | fixed size, without replacement |"
    )
    print("|---|---|---|---|---|")
    for where, n, m, rounds, sigmas in SETTINGS:
        q = m / n
        for sigma in sigmas:
            ours = Accountant(sigma, q, DELTA).after(rounds)
            tight = poisson_pld(q, sigma, rounds)
            fixed = fixed_size(n, m, sigma, rounds)
            print(
                f"| {where} (q = {q:g}, {rounds} rounds) | {sigma:g} | {ours:,.2f} "
                f"| {tight:,.2f} | {fixed:,.2f} |"
            )


if __name__ == "__main__":
    main()
