"""The one norm and clip rule of an update, shared by both sides.

The server clips with it (`strategy.clip_norm`, DP-FedAvg) and screens with it; under secure
aggregation a client clips its own delta with it before masking. In float64 throughout.
"""

from __future__ import annotations

import math

import torch

AdapterState = dict[str, torch.Tensor]


def like(reference: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`reference` cut to `value`'s shape (a client of lower LoRA rank sends a leading slice)."""
    if reference.shape == value.shape:
        return reference
    return reference[tuple(slice(0, n) for n in value.shape)]


def update_norm(state: AdapterState, reference: AdapterState) -> float:
    """L2 norm of (state - reference) over the keys of `state`, in float64.

    The one norm behind `strategy.clip_norm`, DP-FedAvg's clipping and the fault screen.
    """
    sq = 0.0
    for k, v in state.items():
        sq += float((v.double() - like(reference[k], v).double()).pow(2).sum())
    return math.sqrt(sq)


def clip_scale(norm: float, bound: float) -> float:
    """The factor that brings a change of L2 norm `norm` within `bound` (1 if it is)."""
    return bound / norm if norm > bound and norm > 0 else 1.0


def clipped_delta(
    state: AdapterState, reference: AdapterState, bound: float
) -> tuple[AdapterState, float]:
    """(state - reference) in float64, scaled to L2 norm <= bound, and its norm before."""
    norm = update_norm(state, reference)
    scale = clip_scale(norm, bound)
    return {k: (v.double() - reference[k].double()) * scale for k, v in state.items()}, norm


def gaussian_noise(like: AdapterState, std: float, generator: torch.Generator) -> AdapterState:
    return {
        k: torch.randn(v.shape, generator=generator, dtype=torch.float32) * std
        for k, v in like.items()
    }
