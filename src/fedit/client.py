"""`train_local`: THE training loop. Simulation and every other engine call this one function."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import get_scheduler

from fedit.batching import collate, token_losses, training_plan
from fedit.config import ClientConfig
from fedit.data.prompts import Example
from fedit.lora import AdapterState, get_adapter, set_adapter
from fedit.seeding import derive_seed, generator

# on_step(step, total_steps, loss of that step)
StepCallback = Callable[[int, int, float], None]

_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass
class Update:
    """What a client sends back: its adapter after local training, and how it got there."""

    client_id: int
    state: AdapterState
    num_examples: int
    num_steps: int
    metrics: dict[str, float] = field(default_factory=dict)


def train_local(
    model: Any,
    adapter: AdapterState,
    examples: Sequence[Example],
    cfg: ClientConfig,
    *,
    client_id: int,
    seed: int,
    pad_token_id: int,
    on_step: StepCallback | None = None,
) -> Update:
    """Load `adapter`, train it on `examples` with AdamW, return the new adapter state.

    The loss of a step is the mean over all target tokens of its micro-batches, so gradient
    accumulation gives the same step as one big batch. Batch order and dropout are fixed by
    `seed`; the global RNG state is restored on return.
    """
    if not examples:
        raise ValueError(f"client {client_id} has no training examples")
    set_adapter(model, adapter)
    params = [p for p in model.parameters() if p.requires_grad]
    plan = training_plan(
        [len(e.input_ids) for e in examples],
        cfg.batch_size,
        cfg.micro_batch_size,
        cfg.group_by_length,
        cfg.local_epochs,
        cfg.max_steps,
        generator(seed, "batches"),
    )
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        _SCHEDULES[cfg.lr_scheduler],
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=len(plan),
    )
    loss_sum = 0.0
    target_tokens = real_tokens = computed_tokens = 0
    step_losses: list[float] = []
    start = time.perf_counter()
    model.train()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(seed, "dropout"))
            for step, micro_batches in enumerate(plan, start=1):
                n_targets = sum(examples[i].num_target_tokens for mb in micro_batches for i in mb)
                step_loss = 0.0
                for mb in micro_batches:
                    batch = collate([examples[i] for i in mb], pad_token_id)
                    losses, _ = token_losses(model, batch)
                    loss = losses.sum() / n_targets
                    loss.backward()
                    step_loss += float(loss.detach())
                    real_tokens += int(batch["attention_mask"].sum())
                    computed_tokens += batch["input_ids"].numel()
                if not math.isfinite(step_loss):
                    raise FloatingPointError(
                        f"client {client_id}: non-finite loss at local step {step}"
                    )
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += step_loss * n_targets
                target_tokens += n_targets
                step_losses.append(step_loss)
                if on_step is not None:
                    on_step(step, len(plan), step_loss)
    finally:
        model.eval()
    seconds = time.perf_counter() - start
    return Update(
        client_id=client_id,
        state=get_adapter(model),
        num_examples=len(examples),
        num_steps=len(plan),
        metrics={
            "train_loss": loss_sum / max(target_tokens, 1),
            "first_step_loss": step_losses[0],
            "last_step_loss": step_losses[-1],
            "steps": float(len(plan)),
            "target_tokens": float(target_tokens),
            "real_tokens": float(real_tokens),
            "padding_efficiency": real_tokens / max(computed_tokens, 1),
            "seconds": seconds,
            "tokens_per_s": real_tokens / seconds if seconds > 0 else 0.0,
        },
    )
