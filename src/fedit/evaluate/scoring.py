"""Score one model (base, or base + adapter) on the held-out split: loss, answers, judge."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedit.config import Config
from fedit.data.partition import load_partition
from fedit.data.records import Record
from fedit.evaluate.generation import Embedder, rouge_l
from fedit.evaluate.judge import Judge, judge_answers
from fedit.files import atomic_lines
from fedit.heldout import evaluate_loss, heldout_set, lost_note
from fedit.inference import Loaded, generate, prompt_for
from fedit.progress import Progress
from fedit.seeding import generator


def held_out(cfg: Config) -> list[Record]:
    """The run's test split: the same records for the same seed and data settings."""
    return load_partition(cfg).test


def generation_subset(test: Sequence[Record], per_category: int, seed: int) -> list[Record]:
    """Up to `per_category` test records per category, chosen by seed, in a stable order."""
    by_cat: dict[str, list[int]] = {}
    for i, r in enumerate(test):
        by_cat.setdefault(r.category, []).append(i)
    chosen: list[int] = []
    for cat in sorted(by_cat):
        idx = by_cat[cat]
        rng = generator(seed, "generation-subset", cat)
        take = sorted(rng.permutation(len(idx))[:per_category].tolist())
        chosen += [idx[i] for i in take]
    return [test[i] for i in chosen]


def question_text(record: Record) -> str:
    ctx = record.context.strip()
    return f"{record.instruction}\n\n{ctx}" if ctx else record.instruction


def score_model(
    loaded: Loaded,
    test: Sequence[Record],
    *,
    loss: bool = True,
    answer: bool = True,
    answers: Path | None = None,
    judge_cache: Path | None = None,
    embedder: Embedder | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One model on the held-out split: 'eval' (loss, overall and per category, on the same
    examples a run evaluates), 'generation' (ROUGE-L, similarity) and 'judge' as configured.

    `fedit eval` and every arm of `fedit compare` are scored by this function.
    """
    cfg = loaded.cfg
    progress = progress or Progress(enabled=False)
    result: dict[str, Any] = {}
    if loss:
        held = heldout_set(test, loaded.tokenizer, cfg)
        progress.log(f"held-out loss on {held.describe()} ({loaded.label})")
        note = lost_note(held, cfg)
        if note:
            progress.log(note)
        pad = int(loaded.tokenizer.pad_token_id)
        result["eval"] = evaluate_loss(loaded.model, held.eval_set, pad)
    records = generation_subset(test, cfg.generate.per_category, cfg.seed) if answer else []
    if records:
        rows = answers_for(loaded, records, answers, progress)
        result["generation"] = answer_metrics(rows, embedder)
        if cfg.judge.base_url:
            progress.log(f"judging {loaded.label} ({cfg.judge.model} at {cfg.judge.base_url})")
            cache = judge_cache or Path("runs") / "judge_cache.jsonl"
            result["judge"] = judge_rows(cfg, rows, cache, progress)
    return result


def answers_for(
    loaded: Loaded, records: Sequence[Record], cache: Path | None, progress: Progress | None = None
) -> list[dict[str, Any]]:
    """Greedy answers, reused from `cache` when it holds the same prompts and settings."""
    cfg = loaded.cfg
    prompts = [prompt_for(r, cfg, loaded.tokenizer) for r in records]
    stamp = hashlib.sha256(
        json.dumps([prompts, cfg.generate.max_new_tokens, str(loaded.adapter)]).encode()
    ).hexdigest()
    if cache is not None and cache.is_file():
        rows = [json.loads(line) for line in cache.read_text(encoding="utf-8").splitlines()]
        if rows and all(r.get("stamp") == stamp for r in rows) and len(rows) == len(records):
            return rows

    def on_batch(b: int, n: int) -> None:
        if progress:
            progress.log(
                f"generating answers: batch {b}/{n} ({loaded.label})"
                + progress.rate(("answers", loaded.label), b, n, "batch")
            )

    outs = generate(
        loaded.model,
        loaded.tokenizer,
        prompts,
        max_new_tokens=cfg.generate.max_new_tokens,
        batch_size=cfg.generate.batch_size,
        max_prompt_tokens=cfg.data.cutoff_len,
        add_special_tokens=cfg.data.template != "chat",
        on_batch=on_batch,
    )
    rows = [
        {
            "stamp": stamp,
            "category": r.category,
            "question": question_text(r),
            "reference": r.response,
            "answer": o["text"],
            "completion_tokens": o["completion_tokens"],
        }
        for r, o in zip(records, outs, strict=True)
    ]
    if cache is not None:
        atomic_lines(cache, rows)
    return rows


def answer_metrics(rows: Sequence[dict[str, Any]], embedder: Embedder | None) -> dict[str, Any]:
    """ROUGE-L and embedding similarity against the reference, overall and per category."""
    answers = [r["answer"] for r in rows]
    refs = [r["reference"] for r in rows]
    scores: dict[str, list[float]] = {"rougeL": rouge_l(answers, refs)}
    if embedder is not None:
        scores["similarity"] = embedder.similarity(answers, refs)
    out: dict[str, Any] = {"answers": len(rows)}
    for name, values in scores.items():
        out[name] = sum(values) / len(values) if values else None
        per: dict[str, list[float]] = {}
        for row, v in zip(rows, values, strict=True):
            per.setdefault(row["category"], []).append(v)
        out[f"{name}_per_category"] = {c: sum(v) / len(v) for c, v in sorted(per.items())}
    return out


def judge_rows(
    cfg: Config, rows: Sequence[dict[str, Any]], cache: Path, progress: Progress | None = None
) -> dict[str, Any]:
    judge = Judge(cfg.judge, cache)

    def on_item(i: int, n: int) -> None:
        if progress and (i == n or i % 10 == 0):
            progress.log(f"judge: {i}/{n} answers" + progress.rate("judge", i, n, "answer"))

    return judge_answers(
        judge,
        [r["question"] for r in rows],
        [r["answer"] for r in rows],
        [r["reference"] for r in rows],
        cfg.judge.mode,
        on_item,
    )
