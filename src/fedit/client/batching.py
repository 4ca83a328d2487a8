"""Batch plans, padding and the summed token loss shared by training and evaluation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedit.data.prompts import IGNORE_INDEX, Example

# Step plan: a list of optimizer steps, each a list of micro-batches of example indices.
Plan = list[list[list[int]]]


def epoch_plan(
    lengths: Sequence[int],
    batch_size: int,
    micro_batch_size: int,
    group_by_length: bool,
    rng: np.random.Generator,
) -> Plan:
    """One pass over the data in random order.

    With `group_by_length`, examples are sorted by length inside mega-batches of 16 steps so that
    each micro-batch holds examples of similar length; the steps are then shuffled.
    """
    perm = rng.permutation(len(lengths)).tolist()
    if group_by_length:
        mega = batch_size * 16
        perm = [
            i
            for start in range(0, len(perm), mega)
            for i in sorted(perm[start : start + mega], key=lambda j: -lengths[j])
        ]
    steps = [perm[s : s + batch_size] for s in range(0, len(perm), batch_size)]
    if group_by_length:
        steps = [steps[i] for i in rng.permutation(len(steps))]
    return [
        [step[m : m + micro_batch_size] for m in range(0, len(step), micro_batch_size)]
        for step in steps
    ]


def training_plan(
    lengths: Sequence[int],
    batch_size: int,
    micro_batch_size: int,
    group_by_length: bool,
    local_epochs: float,
    max_steps: int,
    rng: np.random.Generator,
) -> Plan:
    """`max_steps` steps if set, else `local_epochs` passes (a fraction cuts the last pass)."""
    steps_per_epoch = math.ceil(len(lengths) / batch_size)
    total = max_steps or max(1, math.ceil(local_epochs * steps_per_epoch))
    plan: Plan = []
    while len(plan) < total:
        plan.extend(epoch_plan(lengths, batch_size, micro_batch_size, group_by_length, rng))
    return plan[:total]


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and labels."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (summed next-token loss, number of target tokens), on the model's device.

    A model given a `fedit_autocast` dtype (set by the engine on a GPU) runs under autocast.
    """
    device = model.device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    dtype = getattr(model, "fedit_autocast", None)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return loss.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)
