"""Update compression on the wire: a client sends its update *delta*, encoded.

- fp16: half precision, 2 bytes per value;
- int8 / int4: per-block absmax quantization (one fp16 scale per `block_size` values),
  round to nearest; int4 packs two values per byte;
- topk: the `topk_ratio` largest-magnitude entries of each tensor (fp16 values, int32 indices).

Error feedback (on by default for the lossy methods): the client keeps what compression dropped
and adds it to its next delta, so nothing is lost for good: the sum of what was sent over the
rounds equals the sum of the true deltas minus the residual still held (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from fedit.config import CompressionConfig

METHODS = ("none", "fp16", "int8", "int4", "topk")

Wire = dict[str, np.ndarray]  # the arrays that travel for one tensor


@dataclass(frozen=True)
class Codec:
    method: str = "none"
    block_size: int = 64
    topk_ratio: float = 0.1

    @classmethod
    def from_config(cls, comp: CompressionConfig) -> Codec:
        return cls(comp.method, comp.block_size, comp.topk_ratio)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"compression.method: unknown {self.method!r}; known: {METHODS}")

    # ------------------------------------------------------------ one tensor

    def encode(self, x: torch.Tensor) -> Wire:
        """The arrays that travel for one tensor (their total nbytes is the cost)."""
        flat = x.detach().to(torch.float32).reshape(-1).cpu().numpy()
        m = self.method
        if m == "none":
            return {"v": flat.copy()}
        if m == "fp16":
            return {"v": flat.astype(np.float16)}
        if m in ("int8", "int4"):
            levels = 127 if m == "int8" else 7
            n = flat.size
            pad = (-n) % self.block_size
            blocks = np.concatenate([flat, np.zeros(pad, np.float32)]).reshape(-1, self.block_size)
            scale = (np.abs(blocks).max(axis=1) / levels).astype(np.float16)
            safe = np.where(scale == 0, 1, scale).astype(np.float32)[:, None]
            q = np.clip(np.rint(blocks / safe), -levels, levels).astype(np.int8).reshape(-1)[:n]
            if m == "int4":
                q = _pack4(q)
            return {"q": q, "s": scale}
        k = max(1, math.ceil(self.topk_ratio * flat.size))
        idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]
        idx.sort()
        return {"i": idx.astype(np.int32), "v": flat[idx].astype(np.float16)}

    def decode(self, wire: Wire, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        m = self.method
        if m in ("none", "fp16"):
            flat = wire["v"].astype(np.float32)
        elif m in ("int8", "int4"):
            q = _unpack4(wire["q"], n) if m == "int4" else wire["q"]
            scale = wire["s"].astype(np.float32)
            padded = np.zeros(len(scale) * self.block_size, np.float32)
            padded[:n] = q.astype(np.float32)
            flat = (padded.reshape(-1, self.block_size) * scale[:, None]).reshape(-1)[:n]
        else:
            flat = np.zeros(n, np.float32)
            flat[wire["i"]] = wire["v"].astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(flat)).reshape(shape)

    # ------------------------------------------------------------ an adapter delta

    def compress(
        self, delta: dict[str, torch.Tensor], residual: dict[str, torch.Tensor] | None
    ) -> tuple[dict[str, Wire], dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
        """(wire per tensor, what the server will decode, new residual, bytes on the wire)."""
        wires, sent, new_residual, nbytes = {}, {}, {}, 0
        for k, d in delta.items():
            target = d.to(torch.float32) + (residual[k] if residual and k in residual else 0)
            w = self.encode(target)
            got = self.decode(w, tuple(d.shape))
            wires[k], sent[k] = w, got
            new_residual[k] = target - got
            nbytes += sum(a.nbytes for a in w.values())
        return wires, sent, new_residual, nbytes


def _pack4(q: np.ndarray) -> np.ndarray:
    u = (q.astype(np.int16) + 8).astype(np.uint8)  # -7..7 -> 1..15
    if u.size % 2:
        u = np.concatenate([u, np.full(1, 8, np.uint8)])
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


def _unpack4(packed: np.ndarray, n: int) -> np.ndarray:
    lo = (packed & 0x0F).astype(np.int16) - 8
    hi = (packed >> 4).astype(np.int16) - 8
    out = np.empty(packed.size * 2, np.int16)
    out[0::2], out[1::2] = lo, hi
    return out[:n].astype(np.int8)


def error_bound(codec: Codec, x: torch.Tensor) -> float:
    """The largest per-value error the codec promises for `x` (topk: the largest dropped)."""
    flat = x.detach().to(torch.float32).reshape(-1).abs()
    if codec.method == "none":
        return 0.0
    if codec.method == "fp16":
        return float(flat.max()) * 2.0**-11 + 6e-8
    if codec.method in ("int8", "int4"):
        levels = 127 if codec.method == "int8" else 7
        # half a quantization step of the block's scale, plus the fp16 rounding of the scale
        return float(flat.max()) / levels * (0.5 + levels * 2.0**-11) + 1e-12
    k = max(1, math.ceil(codec.topk_ratio * flat.numel()))
    kept = torch.topk(flat, k).values
    dropped = float(kept.min()) if k < flat.numel() else 0.0
    return max(dropped, float(kept.max()) * 2.0**-11)
