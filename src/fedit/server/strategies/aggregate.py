"""Pure tensor math over adapter states: means, robust combiners, clipping, exact LoRA products.

Adapter states map `<module>.lora_A.weight` (r x k) and `<module>.lora_B.weight` (d x r) to
tensors. Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedit.deltas import clip_scale, like, update_norm
from fedit.lora import AdapterState, module_of

__all__ = ["clip_scale", "like", "update_norm"]  # the one norm and clip rule, shared


def _check_same_keys(states: Sequence[AdapterState]) -> None:
    if not states:
        raise ValueError("nothing to average: no client updates")
    keys = states[0].keys()
    for s in states[1:]:
        if s.keys() != keys:
            raise ValueError("client updates have different adapter keys")


def _normalized(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise ValueError(f"{n} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    return [w / total for w in weights]


def weighted_average(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """sum_i w_i * state_i / sum_i w_i, key by key; accumulated in float64."""
    _check_same_keys(states)
    p = _normalized(weights, len(states))
    out: AdapterState = {}
    for k in states[0]:
        acc = torch.zeros_like(states[0][k], dtype=torch.float64)
        for s, w in zip(states, p, strict=True):
            acc += s[k].to(torch.float64) * w
        out[k] = acc.to(states[0][k].dtype)
    return out


def coordinate_median(states: Sequence[AdapterState]) -> AdapterState:
    """Coordinate-wise median (unweighted); the mean of the two middle values for even counts."""
    _check_same_keys(states)
    out: AdapterState = {}
    for k in states[0]:
        stacked = torch.stack([s[k].to(torch.float64) for s in states])
        out[k] = stacked.quantile(0.5, dim=0).to(states[0][k].dtype)
    return out


def trimmed_mean(states: Sequence[AdapterState], ratio: float) -> AdapterState:
    """Per coordinate, drop the floor(ratio * n) smallest and largest values, average the rest."""
    _check_same_keys(states)
    n = len(states)
    cut = math.floor(ratio * n)
    if n - 2 * cut < 1:
        raise ValueError(f"trim ratio {ratio} leaves nothing of {n} updates")
    out: AdapterState = {}
    for k in states[0]:
        stacked = torch.stack([s[k].to(torch.float64) for s in states]).sort(dim=0).values
        out[k] = stacked[cut : n - cut].mean(dim=0).to(states[0][k].dtype)
    return out


def clip_update(state: AdapterState, reference: AdapterState, max_norm: float) -> AdapterState:
    """reference + (state - reference) scaled down to L2 norm `max_norm` if it is longer."""
    scale = clip_scale(update_norm(state, reference), max_norm)
    if scale == 1.0:
        return state
    return {k: reference[k] + (v - reference[k]) * scale for k, v in state.items()}


def lora_modules(state: AdapterState) -> list[str]:
    mods = sorted({module_of(k) for k in state})
    for m in mods:
        if f"{m}.lora_A.weight" not in state or f"{m}.lora_B.weight" not in state:
            raise ValueError(f"adapter state lacks the A or B factor of {m}")
    return mods


def stack_factors(
    states: Sequence[AdapterState], weights: Sequence[float]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, (B_s, A_s) with B_s @ A_s == sum_i p_i B_i @ A_i exactly (FLoRA stacking).

    B_s = [p_1 B_1 | ... | p_n B_n] and A_s = [A_1; ...; A_n]; clients may have different ranks.
    """
    if not states:
        raise ValueError("nothing to aggregate: no client updates")
    p = _normalized(weights, len(states))
    out = {}
    for m in lora_modules(states[0]):
        bs = [s[f"{m}.lora_B.weight"].double() * w for s, w in zip(states, p, strict=True)]
        as_ = [s[f"{m}.lora_A.weight"].double() for s in states]
        out[m] = (torch.cat(bs, dim=1), torch.cat(as_, dim=0))
    return out


def fold_svd(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factors (B, A) of b @ a, balanced as U sqrt(S) and sqrt(S) V^T.

    Works through QR of the thin factors, so the d x k product is never formed.
    """
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    new_b = (qb @ u[:, :r]) * root
    new_a = root[:, None] * (vh[:r] @ qa.T)
    if r < rank:  # pad so the adapter keeps its configured shape
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], rank - r)], dim=1)
        new_a = torch.cat([new_a, new_a.new_zeros(rank - r, new_a.shape[1])], dim=0)
    return new_b, new_a


def svd_average(
    states: Sequence[AdapterState], weights: Sequence[float], rank: int, dtype: torch.dtype
) -> AdapterState:
    """Average the products B_i A_i exactly, then fold to rank `rank` (exact if it fits)."""
    out: AdapterState = {}
    for m, (b, a) in stack_factors(states, weights).items():
        new_b, new_a = fold_svd(b, a, rank)
        out[f"{m}.lora_B.weight"] = new_b.to(dtype)
        out[f"{m}.lora_A.weight"] = new_a.to(dtype)
    return out
