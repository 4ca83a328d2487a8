"""Scores of a model's suite answers: reference metrics and MT-Bench's single-answer grading.

Where items have references: ROUGE-L and embedding similarity, overall, per category and per
language. With a judge endpoint: MT-Bench's single-answer grading, 1-10, with the judge prompts
read from the shipped `eval/mt_bench/judge_prompts.jsonl` (never retyped): `single-v1`, or
`single-math-v1` with the reference answer for math, reasoning and coding questions that have
one, and for a second turn the `-multi-turn` prompts over the whole conversation. The rating
is read from `[[n]]` in the reply; a reply without it is counted, never scored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedit.data.records import DataError, resolve_data_path
from fedit.evaluate.generation import Embedder, rouge_l
from fedit.evaluate.vicuna import read_jsonl

if TYPE_CHECKING:
    from fedit.config import Config
    from fedit.progress import Progress

NEED_REFERENCE = ("math", "reasoning", "coding")  # MT-Bench grades these against a reference
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_LOOSE = re.compile(r"\[(\d+\.?\d*)\]")


def judge_prompts() -> dict[str, dict[str, str]]:
    path = resolve_data_path("eval/mt_bench/judge_prompts.jsonl")
    rows = read_jsonl(path, ["name", "type", "system_prompt", "prompt_template"])
    out = {str(r["name"]): r for r in rows}
    for name in (
        "single-v1",
        "single-math-v1",
        "single-v1-multi-turn",
        "single-math-v1-multi-turn",
    ):
        if name not in out:
            raise DataError(f"{path}: no judge prompt {name!r}")
    return out


def parse_rating(reply: str) -> float | None:
    m = RATING.search(reply) or RATING_LOOSE.search(reply)
    return float(m.group(1)) if m else None


def grading_prompt(
    prompts: dict[str, dict[str, str]], row: dict[str, Any], turn: int
) -> tuple[str, str, str]:
    """(prompt name, system, user) grading turn `turn` (0 or 1) of a suite answer row."""
    refs = row.get("references") or []
    with_ref = row["category"] in NEED_REFERENCE and len(refs) > turn and bool(refs[turn])
    q, a = row["turns"], row["answers"]
    if turn == 0:
        name = "single-math-v1" if with_ref else "single-v1"
        fields = {"question": q[0] + (f"\n\n{row['context']}" if row.get("context") else ""),
                  "answer": a[0], "ref_answer_1": refs[0] if refs else ""}  # fmt: skip
    else:
        name = "single-math-v1-multi-turn" if with_ref else "single-v1-multi-turn"
        fields = {"question_1": q[0], "question_2": q[1], "answer_1": a[0], "answer_2": a[1],
                  "ref_answer_1": refs[0] if refs else "", "ref_answer_2": refs[1]}  # fmt: skip
    p = prompts[name]
    return name, str(p["system_prompt"]), str(p["prompt_template"]).format(**fields)


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _grouped(rows: Sequence[dict[str, Any]], values: Sequence[float], key: str) -> dict[str, float]:
    per: dict[str, list[float]] = {}
    for r, v in zip(rows, values, strict=True):
        if r.get(key):
            per.setdefault(str(r[key]), []).append(v)
    return {k: sum(v) / len(v) for k, v in sorted(per.items())}


def reference_metrics(rows: Sequence[dict[str, Any]], embedder: Embedder | None) -> dict[str, Any]:
    """ROUGE-L (and similarity) of each turn's answer against its reference, where there is one."""
    pairs = []
    for r in rows:
        refs = r["references"]
        pairs += [(r, a, refs[t]) for t, a in enumerate(r["answers"]) if t < len(refs) and refs[t]]
    if not pairs:
        return {}
    scored = [p[0] for p in pairs]
    out: dict[str, Any] = {"references": len(pairs)}
    metrics = {"rougeL": rouge_l([p[1] for p in pairs], [p[2] for p in pairs])}
    if embedder is not None:
        metrics["similarity"] = embedder.similarity([p[1] for p in pairs], [p[2] for p in pairs])
    for name, values in metrics.items():
        out[name] = _mean(values)
        out[f"{name}_per_category"] = _grouped(scored, values, "category")
        langs = _grouped(scored, values, "language")
        if langs:
            out[f"{name}_per_language"] = langs
    return out


# Languages whose script tells them apart (Latin-script languages share one: no check).
SCRIPT_OF = {"japanese": "Japanese", "ja": "Japanese", "chinese": "Han", "zh": "Han",
             "korean": "Hangul", "ko": "Hangul", "arabic": "Arabic", "ar": "Arabic",
             "hindi": "Devanagari", "hi": "Devanagari", "telugu": "Telugu", "te": "Telugu",
             "russian": "Cyrillic", "ru": "Cyrillic"}  # fmt: skip
RANGES = [("Kana", 0x3040, 0x30FF), ("Han", 0x4E00, 0x9FFF), ("Han", 0x3400, 0x4DBF),
          ("Hangul", 0xAC00, 0xD7AF), ("Hangul", 0x1100, 0x11FF), ("Arabic", 0x0600, 0x06FF),
          ("Devanagari", 0x0900, 0x097F), ("Telugu", 0x0C00, 0x0C7F),
          ("Cyrillic", 0x0400, 0x04FF), ("Latin", 0x0041, 0x024F)]  # fmt: skip


def script(text: str) -> str | None:
    """The script most of `text`'s letters are written in (Japanese: Han with kana), or None
    for text without letters."""
    counts: dict[str, int] = {}
    for ch in text:
        if ch.isalpha():
            o = ord(ch)
            name = next((n for n, lo, hi in RANGES if lo <= o <= hi), "other")
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        return None
    kana = counts.pop("Kana", 0)
    if kana:  # Japanese mixes kana and kanji; Chinese has no kana
        counts["Japanese"] = kana + counts.pop("Han", 0)
    return max(counts, key=lambda k: counts[k])


def script_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Share of first-turn answers written in the script of the language they were asked in,
    overall and per language, for items whose language has a script of its own."""
    hits: list[tuple[dict[str, Any], float]] = []
    for r in rows:
        want = SCRIPT_OF.get(str(r.get("language") or "").lower().split("_")[-1])
        if want and r["answers"]:
            hits.append((r, float(script(r["answers"][0]) == want)))
    if not hits:
        return {}
    return {"script_match": _mean([h for _, h in hits]),
            "script_match_per_language": _grouped([r for r, _ in hits],
                                                  [h for _, h in hits], "language")}  # fmt: skip


def judge_suite(cfg: Config, rows: Sequence[dict[str, Any]], cache: Path,
                progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """MT-Bench single-answer grading of every turn of every row, by the configured judge."""
    from fedit.evaluate.judge import Judge

    prompts = judge_prompts()
    judge = Judge(cfg.judge, cache)
    graded: list[tuple[dict[str, Any], int, float]] = []
    unparsed = 0
    jobs = [(r, t) for r in rows for t in range(len(r["answers"]))]
    for n, (row, turn) in enumerate(jobs, start=1):
        _, system, user = grading_prompt(prompts, row, turn)
        scores = [parse_rating(judge.ask(user, k, system)) for k in range(cfg.judge.repeats)]
        got = [s for s in scores if s is not None]
        unparsed += len(scores) - len(got)
        if got:
            graded.append((row, turn, sum(got) / len(got)))
        if progress is not None and (n == len(jobs) or n % 10 == 0):
            progress.log(f"judge: {n}/{len(jobs)} answers graded")
    values = [g[2] for g in graded]
    scored_rows = [g[0] for g in graded]
    turns = {f"turn {t + 1}": _mean([v for _, tt, v in graded if tt == t])
             for t in sorted({g[1] for g in graded})}  # fmt: skip
    return {"protocol": "MT-Bench single-answer grading (judge_prompts.jsonl)",
            "judge": cfg.judge.model, "base_url": cfg.judge.base_url, "score": _mean(values),
            "graded": len(graded), "answers": len(jobs), "unparsed_replies": unparsed,
            "per_turn": turns, "per_category": _grouped(scored_rows, values, "category"),
            "per_language": _grouped(scored_rows, values, "language")}  # fmt: skip


def score_suite(cfg: Config, rows: Sequence[dict[str, Any]], embedder: Embedder | None,
                judge_cache: Path, progress: Progress | None = None,
                recorded: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Reference metrics (against `recorded` answers by item id where given: vicuna80's),
    the share of answers in the asked language's script, and the judge's grading."""
    # The recorded answers are references for the metrics only: the judge keeps the suite's
    # own references (MT-Bench's reference-guided grading is for reference answers it ships).
    against = [{**r, "references": [recorded[r["id"]]]} if r["id"] in recorded else r
               for r in rows] if recorded else rows  # fmt: skip
    out: dict[str, Any] = {"items": len(rows), "answers": sum(len(r["answers"]) for r in rows)}
    ref = reference_metrics(against, embedder)
    if ref:
        if recorded:
            ref["reference_answers"] = f"recorded ({cfg.eval.vicuna80_reference})"
        out["reference"] = ref
    out.update(script_metrics(rows))
    if cfg.judge.base_url:
        out["judge"] = judge_suite(cfg, rows, judge_cache, progress)
    return out
