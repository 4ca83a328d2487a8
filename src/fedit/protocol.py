"""The one message format between the server and its clients, used by every engine.

The server sends a `Task` (the global adapter and the strategy's `ClientPlan` for one client
and round); the client answers with an `Update` (its adapter, or with update compression the
encoded delta, plus counts and metrics). Both convert to and from a `Payload`: named groups of
numpy arrays and a flat table of scalars, which is what the worker pool pickles, the Flower
engine puts into ArrayRecords / a ConfigRecord, and the in-process engine hands over as is.
Decoding a compressed update onto the global adapter happens in one place, `Update.decoded`,
called by the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedit.compression import Codec
    from fedit.lora import AdapterState

# torch loads on first use: the Flower ClientApp shim handles payloads without it.
Wire = dict[str, np.ndarray]  # the arrays that travel for one tensor (compression parts)
Scalar = int | float | str | bool
WIRE = "wire."  # prefix of the array groups holding one part of every encoded tensor


@dataclass
class Payload:
    """What travels: array groups (one Flower ArrayRecord each) and scalars (a ConfigRecord)."""

    arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    values: dict[str, Scalar] = field(default_factory=dict)

    def nbytes(self, prefix: str = "") -> int:
        return sum(a.nbytes for g, arrs in self.arrays.items() if g.startswith(prefix)
                   for a in arrs.values())  # fmt: skip


def _to_numpy(state: AdapterState, values: dict[str, Scalar], group: str) -> dict[str, np.ndarray]:
    """numpy has no bfloat16: such tensors travel as float32 (exact) and are cast back."""
    import torch

    if any(v.dtype == torch.bfloat16 for v in state.values()):
        values[f"dtype.{group}"] = "bfloat16"
        return {k: v.detach().cpu().float().numpy() for k, v in state.items()}
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def _to_torch(payload: Payload, group: str) -> AdapterState:
    import torch

    out = {k: torch.from_numpy(np.array(a, copy=True)) for k, a in payload.arrays[group].items()}
    if payload.values.get(f"dtype.{group}") == "bfloat16":
        out = {k: v.to(torch.bfloat16) for k, v in out.items()}
    return out


@dataclass
class ClientPlan:
    """What the strategy asks of one client's local training this round."""

    # FedProx: adds mu/2 * ||w - w_global||^2 over the LoRA weights to the loss.
    prox_mu: float = 0.0
    # SCAFFOLD: c - c_i, added to every gradient (keys as in the adapter state).
    correction: AdapterState | None = None
    # FFA-LoRA: A stays at its shared init; only B is trained and sent back. RoLoRA: one
    # factor per round (B in odd rounds, A in even ones); only that one is sent back.
    train_lora_A: bool = True
    train_lora_B: bool = True
    # Heterogeneous ranks: train and send only the first `rank` LoRA components.
    rank: int | None = None
    # A round deadline (simulated systems): the steps the client finishes in time. Past it
    # the client sends the work done (`partial`) or, if not, only that it was too slow.
    max_steps: int | None = None
    partial: bool = False

    def trains(self, key: str) -> bool:
        """Whether the client trains (and sends back) the LoRA tensor `key`."""
        return self.train_lora_A if ".lora_A." in key else self.train_lora_B


def secagg_threshold(sampled: int) -> int:
    """Survivors a secure round needs to unmask the sum: half the cohort, at least 2. Under DP
    each client adds noise of variance (sigma C)^2 / threshold, so any sum that unmasks carries
    at least the noise of the mechanism."""
    return max(2, round(0.5 * sampled))


@dataclass
class Task:
    """The server's request to one client: train from `adapter` under `plan` in round `round`."""

    round: int
    client: int
    adapter: AdapterState
    plan: ClientPlan = field(default_factory=ClientPlan)
    # Names the run, so that state a client keeps on disk is never taken from another run.
    run_id: str = ""
    # Secure aggregation: answer with the update's delta (the server sees only the sum);
    # under DP clipped to `clip_norm` and noised with `noise_std` per coordinate on the client.
    secure: bool = False
    clip_norm: float = 0.0
    noise_std: float = 0.0
    # > 0: do not train; answer with the loss of `adapter` on this many of the client's
    # examples (a selection rule's probe, e.g. Power-of-Choice).
    probe: int = 0
    # Do not train: answer with the loss of `adapter` (and of the client's personal model)
    # on the client's own held-out records (data.client_test_fraction).
    own_eval: bool = False

    def to_payload(self) -> Payload:
        p = Payload()
        p.values.update(round=self.round, client=self.client, run_id=self.run_id,
                        prox_mu=float(self.plan.prox_mu), train_lora_A=self.plan.train_lora_A,
                        train_lora_B=self.plan.train_lora_B,
                        rank=-1 if self.plan.rank is None else int(self.plan.rank),
                        secure=self.secure, clip_norm=float(self.clip_norm),
                        noise_std=float(self.noise_std), probe=int(self.probe),
                        own_eval=self.own_eval,
                        max_steps=-1 if self.plan.max_steps is None else int(self.plan.max_steps),
                        partial=self.plan.partial)  # fmt: skip
        p.arrays["adapter"] = _to_numpy(self.adapter, p.values, "adapter")
        if self.plan.correction is not None:
            p.arrays["correction"] = _to_numpy(self.plan.correction, p.values, "correction")
        return p

    @classmethod
    def from_payload(cls, p: Payload) -> Task:
        v = p.values
        rank = int(v["rank"])
        max_steps = int(v.get("max_steps", -1))
        plan = ClientPlan(
            prox_mu=float(v["prox_mu"]),
            correction=_to_torch(p, "correction") if "correction" in p.arrays else None,
            train_lora_A=bool(v["train_lora_A"]),
            train_lora_B=bool(v.get("train_lora_B", True)),
            rank=None if rank < 0 else rank,
            max_steps=None if max_steps < 0 else max_steps,
            partial=bool(v.get("partial", False)),
        )
        return cls(int(v["round"]), int(v["client"]), _to_torch(p, "adapter"), plan,
                   str(v.get("run_id", "")), bool(v.get("secure", False)),
                   float(v.get("clip_norm", 0.0)), float(v.get("noise_std", 0.0)),
                   int(v.get("probe", 0)), bool(v.get("own_eval", False)))  # fmt: skip


@dataclass
class Update:
    """What a client sends back: its adapter after local training (or, with compression, the
    encoded delta in `wire` and `state` empty until the server decodes it), and how it got
    there."""

    client_id: int
    state: AdapterState
    num_examples: int
    num_steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    # With update compression: the encoded delta per tensor, what actually travels.
    wire: dict[str, Wire] | None = None
    codec: str = "none"

    def to_payload(self) -> Payload:
        p = Payload()
        p.values.update(client=self.client_id, num_examples=self.num_examples,
                        num_steps=self.num_steps, codec=self.codec)  # fmt: skip
        p.values.update({f"metric.{k}": float(v) for k, v in self.metrics.items()})
        if self.wire is not None:
            for key, parts in self.wire.items():
                for part, arr in parts.items():
                    p.arrays.setdefault(WIRE + part, {})[key] = arr
        else:
            p.arrays["state"] = _to_numpy(self.state, p.values, "state")
        return p

    @classmethod
    def from_payload(cls, p: Payload) -> Update:
        v = p.values
        wire: dict[str, Wire] | None = None
        if any(g.startswith(WIRE) for g in p.arrays):
            wire = {}
            for group, arrays in p.arrays.items():
                for key, arr in arrays.items():
                    wire.setdefault(key, {})[group[len(WIRE) :]] = arr
        metrics = {k[len("metric.") :]: float(x) for k, x in v.items() if k.startswith("metric.")}
        return cls(
            client_id=int(v["client"]),
            state=_to_torch(p, "state") if "state" in p.arrays else {},
            num_examples=int(v["num_examples"]),
            num_steps=int(v["num_steps"]),
            metrics=metrics,
            wire=wire,
            codec=str(v.get("codec", "none")),
        )

    def decoded(self, codec: Codec, global_state: AdapterState) -> Update:
        """The server side of compression: the adapter it receives is global + decoded delta."""
        if self.wire is None:
            return self
        if self.codec != codec.method:
            raise ValueError(
                f"client {self.client_id} sent a {self.codec!r} update; the server expects "
                f"compression.method={codec.method!r}"
            )
        state = {}
        for k, w in self.wire.items():
            g = global_state[k]
            state[k] = (g.float() + codec.decode(w, tuple(g.shape))).to(g.dtype)
        return replace(self, state=state, wire=None)
