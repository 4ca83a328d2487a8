"""`train_local`: THE training loop. Every engine reaches it through the client runtime."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import get_scheduler

from fedit.client.batching import Plan, collate, token_losses, training_plan
from fedit.config import ClientConfig
from fedit.data.prompts import Example
from fedit.lora import AdapterState, adapter_parameters, get_adapter, set_adapter
from fedit.protocol import ClientPlan, Update
from fedit.seeding import derive_seed, generator

# on_step(step, total_steps, loss of that step)
StepCallback = Callable[[int, int, float], None]

_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


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
    plan: ClientPlan | None = None,
    anchor: AdapterState | None = None,
) -> Update:
    """Load `adapter`, train it on `examples` with AdamW, return the new adapter state.

    The loss of a step is the mean over all target tokens of its micro-batches, so gradient
    accumulation gives the same step as one big batch. Batch order and dropout are fixed by
    `seed`; the global RNG state is restored on return. The proximal term of `plan.prox_mu`
    pulls toward `anchor` (Ditto: the global adapter) or, by default, toward `adapter`.
    """
    if not examples:
        raise ValueError(f"client {client_id} has no training examples")
    plan = plan or ClientPlan()
    t_setup = time.perf_counter()
    schedule = client_schedule(examples, cfg, seed)
    planned = len(schedule)
    late = plan.max_steps is not None and planned > plan.max_steps
    if late and (not plan.partial or not plan.max_steps):  # too slow for the deadline
        return Update(client_id, {}, len(examples), 0,
                          {"straggler": 1.0, "planned_steps": float(planned)})  # fmt: skip
    set_adapter(model, adapter)
    by_key = adapter_parameters(model)
    frozen = [k for k in by_key if not plan.trains(k)]
    masks = _rank_masks(by_key, plan.rank) if plan.rank is not None else {}
    with torch.no_grad():
        for k, m in masks.items():
            by_key[k].mul_(m)
    for k in frozen:
        by_key[k].requires_grad_(False)
    trained = {k: p for k, p in by_key.items() if k not in frozen}
    params = list(trained.values())
    if not plan.prox_mu:
        anchor = {}
    elif anchor is not None:
        anchor = {k: anchor[k].to(p.device, p.dtype) for k, p in trained.items()}
    else:
        anchor = {k: p.detach().clone() for k, p in trained.items()}
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        _SCHEDULES[cfg.lr_scheduler],
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=len(schedule),
    )
    setup_seconds = time.perf_counter() - t_setup
    collate_seconds = 0.0
    loss_sum = 0.0
    target_tokens = real_tokens = computed_tokens = 0
    step_losses: list[float] = []
    model.train()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(seed, "dropout"))
            # A partial client stops at the deadline: the first steps of its schedule, under
            # the learning-rate schedule of the whole.
            limit = planned if plan.max_steps is None else min(planned, plan.max_steps)
            for step, micro_batches in enumerate(schedule[:limit], start=1):
                n_targets = sum(examples[i].num_target_tokens for mb in micro_batches for i in mb)
                step_loss = 0.0
                for mb in micro_batches:
                    t_collate = time.perf_counter()
                    batch = collate([examples[i] for i in mb], pad_token_id)
                    collate_seconds += time.perf_counter() - t_collate
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
                _adjust_gradients(trained, plan, anchor, masks)
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += step_loss * n_targets
                target_tokens += n_targets
                step_losses.append(step_loss)
                if on_step is not None:
                    on_step(step, limit, step_loss)
    finally:
        model.eval()
        for k in frozen:
            by_key[k].requires_grad_(True)
    seconds = time.perf_counter() - t_setup
    state = get_adapter(model)
    if frozen:  # FFA-LoRA / RoLoRA send the trained factor only; the other one is shared
        state = {k: v for k, v in state.items() if k not in frozen}
    if plan.rank is not None:
        state = {k: _slice_rank(k, v, plan.rank) for k, v in state.items()}
    return Update(
        client_id=client_id,
        state=state,
        num_examples=len(examples),
        num_steps=limit,
        metrics={
            "planned_steps": float(planned),
            "train_loss": loss_sum / max(target_tokens, 1),
            "first_step_loss": step_losses[0],
            "last_step_loss": step_losses[-1],
            "steps": float(limit),
            "target_tokens": float(target_tokens),
            "real_tokens": float(real_tokens),
            "padding_efficiency": real_tokens / max(computed_tokens, 1),
            "seconds": seconds,
            # adapter load + optimizer and schedule set-up, and batch assembly, inside `seconds`
            "setup_seconds": setup_seconds,
            "collate_seconds": collate_seconds,
            "tokens_per_s": real_tokens / seconds if seconds > 0 else 0.0,
        },
    )


def client_schedule(examples: Sequence[Example], cfg: ClientConfig, seed: int) -> Plan:
    """The optimizer steps (micro-batches of example indices) a client runs for `seed`."""
    return training_plan(
        [len(e.input_ids) for e in examples],
        cfg.batch_size,
        cfg.micro_batch_size,
        cfg.group_by_length,
        cfg.local_epochs,
        cfg.max_steps,
        generator(seed, "batches"),
    )


def _rank_masks(params: dict[str, torch.nn.Parameter], rank: int) -> dict[str, torch.Tensor]:
    """1 on the first `rank` LoRA components (rows of A, columns of B), 0 elsewhere."""
    masks = {}
    for k, p in params.items():
        m = torch.zeros_like(p)
        if ".lora_A." in k:
            m[:rank] = 1
        else:
            m[:, :rank] = 1
        masks[k] = m
    return masks


def _slice_rank(key: str, value: torch.Tensor, rank: int) -> torch.Tensor:
    return value[:rank].clone() if ".lora_A." in key else value[:, :rank].clone()


def _adjust_gradients(
    params: dict[str, torch.nn.Parameter],
    plan: ClientPlan,
    anchor: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
) -> None:
    """Strategy terms on the accumulated gradients, before clipping and the optimizer step."""
    if not (plan.prox_mu or plan.correction is not None or masks):
        return
    with torch.no_grad():
        for k, p in params.items():
            if p.grad is None:
                continue
            if plan.prox_mu:  # gradient of mu/2 * ||w - w_global||^2
                p.grad.add_(p.detach() - anchor[k], alpha=plan.prox_mu)
            if plan.correction is not None:
                p.grad.add_(plan.correction[k].to(p.device))
            if k in masks:
                p.grad.mul_(masks[k])
