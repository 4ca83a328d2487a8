"""Up-front resource guards: estimated peak memory of a run against what the machine has."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from fedit.config import Config
from fedit.errors import FeditError

GiB = 1024**3
# Python, torch, tokenizers and the data, measured at about 1 GiB on the tiny model.
RUNTIME_BYTES = int(1.0 * GiB)


class ResourceError(FeditError):
    """A run that would not fit the machine; the message gives the numbers."""


@dataclass
class MemoryEstimate:
    weights: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.logits + RUNTIME_BYTES

    def describe(self) -> str:
        return (
            f"{self.total / GiB:.1f} GiB (weights {self.weights / GiB:.2f}, activations "
            f"{self.activations / GiB:.2f}, logits {self.logits / GiB:.2f}, runtime "
            f"{RUNTIME_BYTES / GiB:.1f})"
        )


def available_memory(device: torch.device | None = None) -> int | None:
    """Free memory of a CUDA device, else MemAvailable from /proc/meminfo, else physical
    memory; None if unknown."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(model_config: Any, cfg: Config) -> MemoryEstimate:
    """A deliberately generous estimate for one LoRA training micro-batch on a decoder LM.

    Weights: every parameter at the configured dtype. Activations kept for backward: per layer
    and token about 12 hidden-size and 4 intermediate-size fp32 values, plus the attention
    probabilities (heads x T^2 per sequence, twice for the gradient). Logits: fp32 logits,
    their log-softmax and gradient (evaluation batches without the gradient).
    """
    h = int(model_config.hidden_size)
    layers = int(model_config.num_hidden_layers)
    inter = int(getattr(model_config, "intermediate_size", 4 * h))
    vocab = int(model_config.vocab_size)
    heads = int(model_config.num_attention_heads)
    kv = int(getattr(model_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(model_config, "head_dim", None) or h // heads)
    per_layer = h * (heads * head_dim) * 2 + h * (kv * head_dim) * 2 + 3 * h * inter + 2 * h
    embeddings = vocab * h * (1 if getattr(model_config, "tie_word_embeddings", False) else 2)
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.dtype]
    # quantized layers: 1 or ~0.5 bytes a weight (embeddings and norms stay in bf16)
    quantized = cfg.model.quantization != "none"
    layer_bytes = {"none": dtype_bytes, "8bit": 1, "4bit": 0.55}[cfg.model.quantization]
    weights = int(layers * per_layer * layer_bytes + embeddings * (2 if quantized else dtype_bytes))
    micro, seq = cfg.client.micro_batch_size, cfg.data.cutoff_len
    one_layer = micro * seq * (12 * h + 4 * inter) * 4 + micro * heads * seq * seq * 8
    # gradient checkpointing keeps each layer's input only, and one layer's activations
    activations = (
        layers * micro * seq * h * 4 + one_layer
        if cfg.model.gradient_checkpointing
        else layers * one_layer
    )
    # training keeps logits, log-softmax and gradient; evaluation (no backward) two of them
    logits = max(3 * micro, 2 * cfg.eval.micro_batch_size) * seq * vocab * 4
    return MemoryEstimate(weights, activations, logits)


def check_memory(
    model_config: Any, cfg: Config, device: torch.device | None = None
) -> MemoryEstimate:
    est = estimate_memory(model_config, cfg)
    avail = available_memory(device)
    where = f" on {device}" if device is not None else ""
    if cfg.model.check_memory and avail is not None and est.total > avail:
        raise ResourceError(
            f"estimated peak memory {est.describe()} exceeds the {avail / GiB:.1f} GiB "
            f"available{where}; lower client.micro_batch_size / eval.micro_batch_size "
            f"(now {cfg.client.micro_batch_size} / {cfg.eval.micro_batch_size}) or "
            f"data.cutoff_len (now {cfg.data.cutoff_len}), or pick a smaller model.name; "
            "model.check_memory=false skips this check"
        )
    return est
