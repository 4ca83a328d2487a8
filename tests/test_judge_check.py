"""`fedit judge-check`: the Vicuna-80 review protocol from its shipped files, and a judge's
agreement with GPT-4's recorded reviews."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedit.cli import main
from fedit.data.records import DataError
from fedit.evaluate.vicuna import (
    load_pairs,
    load_prompts,
    parse_review,
    review_prompt,
    spearman,
    vicuna_folder,
    winner,
)
from tests.test_evaluation import Scripted


@pytest.fixture(scope="module")
def folder() -> Path:
    try:
        return vicuna_folder()
    except DataError as e:
        pytest.skip(f"the Vicuna-80 files are not here: {e}")


def test_the_protocol_is_read_from_the_shipped_files(folder: Path) -> None:
    prompts, pairs = load_prompts(folder), load_pairs(folder)
    assert sorted(prompts) == [1, 2, 3] and len(pairs) == 13 * 80
    shipped = [json.loads(line) for line in (folder / "prompt.jsonl").read_text().splitlines()]
    coding = next(p for p in pairs if p.category == "coding")
    system, user = review_prompt(prompts, coding)
    assert coding.prompt_id == 2 and system == shipped[1]["system_prompt"]
    assert user.startswith(f"[Question]\n{coding.question}\n\n[The Start of Assistant 1's Answer]")
    assert shipped[1]["defaults"]["prompt"] in user and coding.answer_2 in user
    assert parse_review("8 9\nBoth were fine.") == (8.0, 9.0)
    assert parse_review("7, 6.5\n...") == (7.0, 6.5) and parse_review("no scores") is None
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_a_judge_that_always_picks_the_first_answer(folder: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    pairs = load_pairs(folder)
    keep = np.random.default_rng(0).choice(len(pairs), 30, replace=False)
    gpt4 = [winner(pairs[int(i)].recorded) for i in sorted(keep)]
    judge = Scripted([(200, "9 1\nThe first is better.")] * 30)
    try:
        args = ["judge-check", "--set", f"judge.base_url={judge.url}", "--set", "judge.model=first",
                "--limit", "30", "--out", str(tmp_path)]  # fmt: skip
        assert main(args) == 0
    finally:
        judge.close()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["pairs"] == report["parsed"] == 30 and len(judge.seen) == 30
    assert report["agreement"] == pytest.approx(gpt4.count("1") / 30)
    assert report["kappa"] == pytest.approx(0.0) and report["spearman"] is None  # constant
    assert report["judge_wins"] == {"1": 30, "2": 0, "tie": 0}
    sent = judge.seen[0]["body"]["messages"]
    systems = {p["system"] for p in load_prompts(folder).values()}
    assert sent[0]["content"] in systems and sent[1]["content"].startswith("[Question]\n")
    out = capsys.readouterr().out
    assert "Judge first at" in out and "| **all** | 30 | 30 |" in out
    assert main(args) == 0  # everything judged is cached: nothing is asked again


def test_a_malformed_review_file_names_its_line(folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "vicuna80"
    shutil.copytree(folder, copy)
    review = sorted((copy / "review").rglob("*.jsonl"))[0]
    lines = review.read_text().splitlines()
    lines[4] = '{"question_id": 5, "answer1_id": "x"'
    review.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{review.name}:5: not JSON"):
        load_pairs(copy)
    lines[4] = json.dumps({"question_id": 5, "answer1_id": "nope", "answer2_id": "nope",
                           "reviewer_id": 1, "score": [1, 2]})  # fmt: skip
    review.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{review.name}:5: its question or answers"):
        load_pairs(copy)
    assert main(["judge-check", "--data", str(tmp_path / "missing"), "--set",
                 "judge.base_url=http://127.0.0.1:9/v1"]) == 2  # fmt: skip
