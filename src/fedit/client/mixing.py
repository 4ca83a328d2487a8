"""Two LoRA adapters in one forward pass: the model's own adapter and a frozen second one.

`Mixture(model, other)` puts `other` (an adapter state with the model's keys) into a second
peft adapter beside the model's and makes both active; `weight(w)` sets the output to
W0 x + w * dW_own x + (1 - w) * dW_other x (each dW with its LoRA scaling). On exit the model
is as before: its own adapter alone, at its own scaling. The model's own adapter stays the one
`set_adapter`, `get_adapter` and `train_local` see, so training inside a mixture trains it
with the other adapter frozen (FedDPA's local adapter beside the global one).
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

from fedit.lora import AdapterState, adapter_parameters
from fedit.seeding import derive_seed

OTHER = "fedit_other"


def _other_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    own = adapter_parameters(model)  # mapped (and cached) before the second adapter exists
    if OTHER not in model.peft_config:
        with torch.random.fork_rng():  # its init is overwritten; it must not move the RNG
            model.add_adapter(OTHER, model.peft_config["default"])
        model.set_adapter("default")
        model.train(model.training)  # its new dropout modules follow the model's mode
    params = {
        n.replace(f".{OTHER}.", "."): p for n, p in model.named_parameters() if f".{OTHER}." in n
    }
    if set(params) != set(own):
        raise RuntimeError("the second adapter's parameters do not match the model's adapter")
    return params


class Mixture:
    """While inside: the model's adapter mixed with the frozen `other` (see the module)."""

    def __init__(self, model: Any, other: AdapterState) -> None:
        self.model = model
        self.other = other
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self.saved: list[tuple[float, float]] = []

    def __enter__(self) -> Mixture:
        params = _other_parameters(self.model)
        self.model.base_model.set_adapter(["default", OTHER])
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.other[k].to(p.device, p.dtype))
                p.requires_grad_(False)
        self.saved = [(m.scaling["default"], m.scaling[OTHER]) for m in self.layers]
        return self

    def weight(self, own: float) -> None:
        for m, (s, t) in zip(self.layers, self.saved, strict=True):
            m.scaling["default"] = s * own
            m.scaling[OTHER] = t * (1.0 - own)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for m, (s, t) in zip(self.layers, self.saved, strict=True):
            m.scaling["default"], m.scaling[OTHER] = s, t
        self.model.set_adapter("default")  # the own adapter alone, trainable again


def fresh_adapter(like: AdapterState, seed: int) -> AdapterState:
    """A new LoRA adapter with `like`'s keys and shapes, initialized as peft does (A uniform
    in +-1/sqrt(fan_in), B zero), from `seed`."""
    rng = torch.Generator().manual_seed(derive_seed(seed, "fresh-lora"))
    out: AdapterState = {}
    for k in sorted(like):
        v = like[k]
        if ".lora_A." in k:
            bound = 1.0 / math.sqrt(v.shape[1])
            out[k] = (torch.rand(v.shape, generator=rng, dtype=torch.float32) * 2 - 1) * bound
            out[k] = out[k].to(v.dtype)
        else:
            out[k] = torch.zeros_like(v)
    return out
