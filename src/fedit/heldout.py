"""Held-out loss and perplexity, overall and per category, on a fixed batch plan.

Below the round loop: the recipe evaluates the global adapter with it every round, and
`fedit eval` / `fedit compare` score a saved adapter with the same `heldout_set` and
`evaluate_loss`, so a finished run and a later evaluation report the same number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedit.client.batching import collate, token_losses
from fedit.data.prompts import Example, tokenize_records
from fedit.data.records import Record
from fedit.seeding import generator

if TYPE_CHECKING:
    from fedit.config import Config


@dataclass
class EvalSet:
    """Test examples with their micro-batches planned once (sorted by length: little padding)."""

    examples: list[Example]
    batches: list[list[int]]

    @classmethod
    def build(cls, examples: Sequence[Example], micro_batch_size: int) -> EvalSet:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        batches = [order[s : s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]
        return cls(list(examples), batches)


def _summary(loss_sum: float, tokens: int) -> dict[str, float]:
    loss = loss_sum / tokens if tokens else float("nan")
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": float(tokens)}


@torch.inference_mode()
def evaluate_loss(model: Any, eval_set: EvalSet, pad_token_id: int) -> dict[str, Any]:
    """Token-weighted mean loss over all target tokens, and the same per category."""
    was_training = model.training
    model.eval()
    per_cat: dict[str, list[float]] = {}
    per_tag: dict[tuple[str, str], list[float]] = {}  # [loss sum, tokens, example means, examples]
    per_tag_cat: dict[tuple[str, str, str], list[float]] = {}
    total_loss, total_tokens = 0.0, 0
    try:
        for idx in eval_set.batches:
            batch_examples = [eval_set.examples[i] for i in idx]
            losses, counts = token_losses(model, collate(batch_examples, pad_token_id))
            for ex, lo, n in zip(batch_examples, losses.tolist(), counts.tolist(), strict=True):
                acc = per_cat.setdefault(ex.category, [0.0, 0])
                acc[0] += lo
                acc[1] += n
                for tag in ex.tags.items():
                    t = per_tag.setdefault(tag, [0.0, 0, 0.0, 0])
                    t[0] += lo
                    t[1] += n
                    t[2] += lo / max(n, 1)
                    t[3] += 1
                    tc = per_tag_cat.setdefault((*tag, ex.category), [0.0, 0])
                    tc[0] += lo
                    tc[1] += n
                total_loss += lo
                total_tokens += n
    finally:
        model.train(was_training)
    result: dict[str, Any] = _summary(total_loss, total_tokens)
    cats = {c: _summary(s, int(n)) for c, (s, n) in sorted(per_cat.items())}
    result["per_category"] = cats
    if per_tag:  # data.sources: the same per source and per tag value
        tags: dict[str, dict[str, dict[str, float]]] = {}
        for (name, value), (s, n, means, k) in sorted(per_tag.items()):
            # Per token, and per example (each example's mean token loss, averaged): a language
            # its tokenizer splits finely weighs more per token than per example.
            tags.setdefault(name, {})[value] = {
                **_summary(s, int(n)),
                "example_loss": means / k,
                "examples": float(k),
            }
        result["per_tag"] = tags
        by_cat: dict[str, dict[str, dict[str, float]]] = {}
        for (name, value, cat), (s, n) in sorted(per_tag_cat.items()):
            by_cat.setdefault(name, {}).setdefault(value, {})[cat] = _summary(s, int(n))["loss"]
        result["per_tag_category"] = by_cat
        gaps: dict[str, dict[str, Any]] = {}
        for name, values in tags.items():
            if len(values) > 1:  # the worst value against the best: the gap between languages
                by_value = {v: x["loss"] for v, x in values.items()}
                worst, best = (
                    max(by_value, key=by_value.__getitem__),
                    min(by_value, key=by_value.__getitem__),
                )
                gaps[name] = {"gap": by_value[worst] - by_value[best], "worst": worst, "best": best}
        result["tag_gap"] = gaps
    losses_by_cat = [v["loss"] for v in cats.values()]
    if losses_by_cat:
        # The spread across domains, not only the mean (fairness across categories).
        result["category_loss_min"] = min(losses_by_cat)
        result["category_loss_max"] = max(losses_by_cat)
    return result


def eval_subset(examples: list[Example], cfg: Config) -> list[Example]:
    """`eval.max_examples` test examples, the same ones every round and in `fedit eval`."""
    if cfg.eval.max_examples and len(examples) > cfg.eval.max_examples:
        keep = generator(cfg.seed, "eval-subset").permutation(len(examples))
        return [examples[i] for i in sorted(keep[: cfg.eval.max_examples])]
    return examples


@dataclass
class HeldOut:
    """The evaluation set of a run and how it came from the test records."""

    eval_set: EvalSet
    records: int  # test records given
    dropped: int  # their response starts past data.cutoff_len
    lost: list[str]  # categories of the test split that no evaluated example represents

    @property
    def examples(self) -> int:
        return len(self.eval_set.examples)

    def describe(self) -> str:
        parts = [f"{self.examples} test examples"]
        if self.examples < self.records - self.dropped:
            parts.append(f"eval.max_examples of {self.records - self.dropped}")
        if self.dropped:
            parts.append(f"{self.dropped} dropped at data.cutoff_len")
        return parts[0] + (f" ({'; '.join(parts[1:])})" if len(parts) > 1 else "")


def scored_examples(
    records: Sequence[Record], tokenizer: Any, cfg: Config
) -> tuple[list[Example], int]:
    """Held-out records tokenized as training does, scored on their response tokens only;
    (examples, how many lost their response at cutoff_len)."""
    d = cfg.data
    return tokenize_records(records, tokenizer, d.template, d.cutoff_len, False)


def heldout_set(records: Sequence[Record], tokenizer: Any, cfg: Config) -> HeldOut:
    """Tokenize the test records as training does and keep the `eval.max_examples` subset.

    Held-out answers are scored on their response tokens always, also when a run trains on
    the prompt too (`data.train_on_inputs`): losses of runs with and without it compare.
    """
    examples, dropped = scored_examples(records, tokenizer, cfg)
    subset = eval_subset(examples, cfg)
    lost = sorted({r.category for r in records} - {e.category for e in subset})
    return HeldOut(EvalSet.build(subset, cfg.eval.micro_batch_size), len(records), dropped, lost)


def lost_note(held: HeldOut, cfg: Config) -> str | None:
    """A warning when a category of the test split has no example left to evaluate it by."""
    if not held.lost:
        return None
    why = f"data.cutoff_len={cfg.data.cutoff_len}"
    if cfg.eval.max_examples:
        why += f" or eval.max_examples={cfg.eval.max_examples}"
    return (
        f"warning: no held-out example left for categories {held.lost} ({why} dropped them "
        "all); the per-category evaluation leaves them out"
    )
