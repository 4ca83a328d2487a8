"""The 2023 Vicuna-80 pairwise review, read from its shipped files, and `fedit judge-check`.

The protocol is FastChat's GPT-4 review of that time, taken as shipped (never retyped): each
review prompt of `prompt.jsonl` (general, coding, math) with its system prompt, its template
over the question and two answers, and its instruction; the reviews under `review/` name the
reviewer each used (`reviewer_id`: a prompt id, or a reviewer of `reviewer.jsonl`), the two
answers (`answer1_id`, `answer2_id` in `answer/`) and GPT-4's recorded scores. The reply's
first line holds the two scores.

`judge_check` puts the recorded pairs to the configured judge, in the recorded order, with
the recorded prompt, and compares its verdicts with GPT-4's: which answer wins (1, 2 or tie),
Cohen's kappa, and Spearman's rank correlation of the score differences. A pair the endpoint
refuses (a prompt over its context) is counted and named, and the check goes on; a reply
without two scores on its first line counts as unparsed, never as a guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedit.data.records import DataError, resolve_data_path
from fedit.evaluate.judge import JudgeRefused
from fedit.evaluate.votes import cohen_kappa

DEFAULT_FOLDER = "eval/vicuna80"


@dataclass
class Pair:
    file: str
    question_id: int
    category: str
    question: str
    answer_1: str
    answer_2: str
    prompt_id: int
    recorded: tuple[float, float]


def read_jsonl(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Every line of `path` as an object holding `required`; errors name file:line."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e})") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
        missing = [k for k in required if not isinstance(row, dict) or k not in row]
        if missing:
            raise DataError(f"{path}:{n}: missing {missing}")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: empty")
    return rows


def vicuna_folder(folder: str | None = None) -> Path:
    """The Vicuna-80 folder: as given, else inside $FEDIT_DATA_DIR."""
    question = resolve_data_path(str(Path(folder or DEFAULT_FOLDER) / "question.jsonl"))
    return question.parent


def load_prompts(folder: Path) -> dict[int, dict[str, str]]:
    out = {}
    path = folder / "prompt.jsonl"
    for row in read_jsonl(path, ["prompt_id", "system_prompt", "prompt_template", "defaults"]):
        out[int(row["prompt_id"])] = {
            "system": row["system_prompt"],
            "template": row["prompt_template"],
            "prompt": row["defaults"]["prompt"],
        }
    return out


def load_pairs(folder: Path) -> list[Pair]:
    """Every recorded review under `review/`, with its question and both answers."""
    rows = read_jsonl(folder / "question.jsonl", ["question_id", "text", "category"])
    questions = {int(q["question_id"]): q for q in rows}
    answers: dict[str, str] = {}
    for f in sorted((folder / "answer").glob("*.jsonl")):
        for a in read_jsonl(f, ["answer_id", "question_id", "text"]):
            answers[str(a["answer_id"])] = str(a["text"])
    reviewers = read_jsonl(folder / "reviewer.jsonl", ["reviewer_id", "prompt_id", "category"])
    prompt_of: dict[str, int] = {str(r["reviewer_id"]): int(r["prompt_id"]) for r in reviewers}
    # Some review files name the reviewer of general questions gpt-4-0328-generic, the one
    # reviewer.jsonl lists as gpt-4-0328-default (category general).
    by_kind = {str(r["category"]): int(r["prompt_id"]) for r in reviewers}
    by_kind["generic"] = by_kind.get("general", 1)
    pairs = []
    files = sorted((folder / "review").rglob("*.jsonl"))
    if not files:
        raise DataError(f"{folder / 'review'}: no review files")
    need = ["question_id", "answer1_id", "answer2_id", "reviewer_id", "score"]
    for f in files:
        for n, r in enumerate(read_jsonl(f, need), start=1):
            lost = [k for k in ("answer1_id", "answer2_id") if str(r[k]) not in answers]
            if lost or int(r["question_id"]) not in questions:
                raise DataError(f"{f}:{n}: its question or answers {lost} are not in {folder}")
            q = questions[int(r["question_id"])]
            rid = r["reviewer_id"]
            kind = str(rid).rsplit("-", 1)[-1]
            pid = rid if isinstance(rid, int) else prompt_of.get(str(rid), by_kind.get(kind))
            if pid is None:
                raise DataError(f"{f}:{n}: reviewer {rid!r} is not in reviewer.jsonl")
            pairs.append(Pair(str(f.relative_to(folder)), int(r["question_id"]), str(q["category"]),
                              str(q["text"]), answers[str(r["answer1_id"])],
                              answers[str(r["answer2_id"])], int(pid),
                              (float(r["score"][0]), float(r["score"][1]))))  # fmt: skip
    return pairs


def review_prompt(prompts: dict[int, dict[str, str]], pair: Pair) -> tuple[str, str]:
    """(system prompt, user prompt) of the recorded review of `pair`."""
    if pair.prompt_id not in prompts:
        raise DataError(f"review prompt {pair.prompt_id} (of {pair.file}) is not in prompt.jsonl")
    p = prompts[pair.prompt_id]
    user = p["template"].format(question=pair.question, answer_1=pair.answer_1,
                                answer_2=pair.answer_2, prompt=p["prompt"])  # fmt: skip
    return p["system"], user


def parse_review(reply: str) -> tuple[float, float] | None:
    """The two scores on the reply's first line ("8 9", "8, 9"), as the protocol asks."""
    first = reply.strip().split("\n", 1)[0].replace(",", " ")
    nums = re.findall(r"-?\d+(?:\.\d+)?", first)
    if len(nums) != 2:
        return None
    return float(nums[0]), float(nums[1])


def winner(scores: tuple[float, float]) -> str:
    return "1" if scores[0] > scores[1] else "2" if scores[1] > scores[0] else "tie"


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (average ranks for ties); nan when either side is constant."""

    def ranks(v: Sequence[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for value in np.unique(a):
            where = a == value
            r[where] = r[where].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def judge_check(pairs: Sequence[Pair], prompts: dict[int, dict[str, str]],
                ask: Callable[[str, str], str],
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """The judge (`ask(system, user) -> reply`) on each recorded pair, against GPT-4."""
    rows: list[tuple[Pair, tuple[float, float] | None]] = []
    refused: list[str] = []
    for i, pair in enumerate(pairs, start=1):
        system, user = review_prompt(prompts, pair)
        try:
            rows.append((pair, parse_review(ask(system, user))))
        except JudgeRefused as e:  # this pair only (a prompt over the judge's context)
            refused.append(f"{pair.file} question {pair.question_id}: {e}")
            rows.append((pair, None))
        if progress is not None:
            progress(i, len(pairs))
    scored = [(p, j) for p, j in rows if j is not None]
    report: dict[str, Any] = {"pairs": len(rows), "parsed": len(scored), "refused": refused}
    report.update(_agreement(scored))
    by_cat: dict[str, Any] = {}
    for cat in sorted({p.category for p, _ in rows}):
        mine = [(p, j) for p, j in scored if p.category == cat]
        n = sum(1 for p, _ in rows if p.category == cat)
        by_cat[cat] = {"pairs": n, "parsed": len(mine), **_agreement(mine)}
    report["per_category"] = by_cat
    return report


def _agreement(rows: list[tuple[Pair, tuple[float, float]]]) -> dict[str, Any]:
    if not rows:
        return {"agreement": None, "kappa": None, "spearman": None}
    gpt4 = [winner(p.recorded) for p, _ in rows]
    judge = [winner(j) for _, j in rows]
    d_gpt4 = [p.recorded[0] - p.recorded[1] for p, _ in rows]
    d_judge = [j[0] - j[1] for _, j in rows]
    rho = spearman(d_gpt4, d_judge) if len(rows) > 1 else float("nan")
    return {
        "agreement": sum(a == b for a, b in zip(gpt4, judge, strict=True)) / len(rows),
        "kappa": cohen_kappa(gpt4, judge),
        "spearman": None if rho != rho else rho,
        "gpt4_wins": {w: gpt4.count(w) for w in ("1", "2", "tie")},
        "judge_wins": {w: judge.count(w) for w in ("1", "2", "tie")},
    }


def markdown(report: dict[str, Any], judge: str) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"Judge {judge} against GPT-4's recorded Vicuna-80 reviews ({report['pairs']} pairs, "
        f"{report['parsed']} replies parsed):",
        "",
        "| category | pairs | parsed | winner agreement | Cohen's kappa "
        "| Spearman (score difference) |",
        "|---|---|---|---|---|---|",
    ]
    for cat, r in [*report["per_category"].items(), ("**all**", report)]:
        lines.append(f"| {cat} | {r['pairs']} | {r['parsed']} | {f(r['agreement'])} | "
                     f"{f(r['kappa'])} | {f(r['spearman'])} |")  # fmt: skip
    if report.get("refused"):
        lines += ["", f"{len(report['refused'])} pairs refused by the judge; the first: "
                  f"{report['refused'][0]}"]  # fmt: skip
    return "\n".join(lines) + "\n"
