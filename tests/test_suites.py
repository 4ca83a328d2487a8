"""Question sets (`fedit eval --suite`, `eval.suites`): each loads, generates and scores on the
tiny model; answers are kept and reused; bad files name their line; MT-Bench grading reads its
shipped judge prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedit.cli import main
from fedit.config import to_toml
from fedit.data.records import DataError
from fedit.evaluate.suites import load_suite
from tests.conftest import make_rows, tiny_config, write_jsonl
from tests.test_evaluation import Scripted

SUITES = ["dolly-test", "vicuna80", "mt-bench", "self-instruct", "fed-aya", "vicuna80-Japanese"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        load_suite("vicuna80", tiny_config(Path("x")))
    except DataError as e:
        pytest.skip(f"the evaluation sets are not here: {e}")
    tmp = tmp_path_factory.mktemp("suites")
    cfg = tmp / "tiny.toml"
    cfg.write_text(to_toml(tiny_config(write_jsonl(tmp / "data.jsonl", make_rows()),
                                       federation={"rounds": 1})))  # fmt: skip
    assert main(["run", str(cfg), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp / "run"


def test_every_suite_loads_whole(run: Path) -> None:
    cfg = tiny_config(Path("x"))
    sizes = {n: len(load_suite(n, cfg)) for n in SUITES[1:]}
    assert sizes == {"vicuna80": 80, "mt-bench": 80, "self-instruct": 252, "fed-aya": 160,
                     "vicuna80-Japanese": 80}  # fmt: skip
    mt = load_suite("mt-bench", cfg)
    assert all(len(i.turns) == 2 for i in mt)
    assert sum(bool(i.references[0]) for i in mt) == 30  # math, reasoning, coding
    aya = load_suite("fed-aya", cfg)
    assert len({i.language for i in aya}) == 8 and all(i.references[0] for i in aya)
    si = load_suite("self-instruct", cfg)[0]
    assert si.context and si.references[0]  # the first instance: input and output
    with pytest.raises(DataError, match="unknown suite 'nope'"):
        load_suite("nope", cfg)


def test_each_suite_generates_scores_and_is_not_asked_twice(run: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    out = tmp_path / "eval"
    args = ["eval", str(run), "--out", str(out), "--set", "generate.max_new_tokens=4",
            "--set", "eval.suite_items=6", "--set", "generate.batch_size=4"]  # fmt: skip
    for name in SUITES:
        args += ["--suite", name]
    assert main(args) == 0
    printed = capsys.readouterr()
    for name in SUITES:
        result = json.loads((out / "suites" / f"adapter-{name}.json").read_text())
        rows = (out / "answers" / f"adapter-{name}.jsonl").read_text().splitlines()
        assert result["items"] == len(rows) == 6, name
        if name in ("dolly-test", "self-instruct", "fed-aya", "vicuna80"):
            assert result["reference"]["references"] == 6 and "rougeL" in result["reference"]
        if name in ("fed-aya", "vicuna80-Japanese"):  # languages with a script of their own
            assert 0.0 <= result.get("script_match", -1) <= 1.0, name
    vicuna = json.loads((out / "suites" / "adapter-vicuna80.json").read_text())
    assert vicuna["reference"]["reference_answers"] == "recorded (gpt35)"  # eval.vicuna80_reference
    japanese = json.loads((out / "suites" / "adapter-vicuna80-Japanese.json").read_text())
    assert "reference" not in japanese  # no English reference for another language
    mt = [
        json.loads(line)
        for line in (out / "answers" / "adapter-mt-bench.jsonl").read_text().splitlines()
    ]
    assert all(len(r["answers"]) == 2 for r in mt)  # the second turn after its own first answer
    assert "fed-aya: 6 items" in printed.out
    # Rerun: every answer is on disk, nothing is generated.
    before = {p.name: p.read_text() for p in (out / "answers").iterdir()}
    assert main(args) == 0
    assert "answered" not in capsys.readouterr().err
    assert {p.name: p.read_text() for p in (out / "answers").iterdir()} == before
    # Interrupted halfway (the last line cut short): only the missing items are answered.
    path = out / "answers" / "adapter-vicuna80.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    assert main([*args[:8], "--suite", "vicuna80"]) == 0
    assert "vicuna80: answered 6/6" in capsys.readouterr().err
    assert path.read_text().splitlines()[-3:] == lines[3:]  # the same answers (greedy)


def test_script_of_an_answer() -> None:
    from fedit.evaluate.suite_scoring import script, script_metrics

    assert script("時間管理のスキルを向上させる") == "Japanese"  # kanji with kana
    assert script("提高时间管理技能") == "Han" and script("Manage your time") == "Latin"
    assert script("Улучшить") == "Cyrillic" and script("123 !?") is None
    rows = [{"language": "Japanese", "answers": ["はい、そうです"]},
            {"language": "Japanese", "answers": ["Yes, it is."]},
            {"language": "English", "answers": ["Yes."]},  # Latin script: not checked
            {"language": "Simplified_Chinese", "answers": ["你好"]}]  # fmt: skip
    got = script_metrics(rows)
    assert got["script_match"] == pytest.approx(2 / 3)
    assert got["script_match_per_language"] == {"Japanese": 0.5, "Simplified_Chinese": 1.0}


def test_own_suite_file_and_its_errors(run: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    mine = write_jsonl(tmp_path / "mine.jsonl", [
        {"instruction": "Name a river.", "reference": "Nile", "category": "geo"},
        {"turns": ["Pick a number.", "Double it."], "references": ["4", "8"]},
    ])  # fmt: skip
    items = load_suite(str(mine), tiny_config(Path("x")))
    assert [i.turns for i in items] == [["Name a river."], ["Pick a number.", "Double it."]]
    # A split's test.jsonl (fedit partition) is a suite: its responses are the references.
    split = write_jsonl(tmp_path / "test.jsonl", make_rows()[:3])
    got = load_suite(str(split), tiny_config(Path("x")))
    assert [i.references[0] for i in got] == [r["response"] for r in make_rows()[:3]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"turns": [1, 2]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: needs `instruction`"):
        load_suite(str(bad), tiny_config(Path("x")))
    bad.write_text('{"instruction": "ok"}\n{"instruction": \n')
    assert main(["eval", str(run), "--suite", str(bad)]) == 2  # before the model loads
    wrong = ["eval", str(run), "--suite", "vicuna80", "--set", "eval.vicuna80_reference=nobody"]
    assert main(wrong) == 2  # the recorded answers are checked before the model loads too
    assert "answer_nobody.jsonl" in capsys.readouterr().err


def test_mt_bench_grading_with_the_shipped_judge_prompts(run: Path, tmp_path: Path) -> None:
    judge = Scripted([])
    judge.replies = [(200, "The answer is fine. Rating: [[7]]")] * 400
    try:
        args = ["eval", str(run), "--out", str(tmp_path), "--suite", "mt-bench",
                "--set", "generate.max_new_tokens=4", "--set", "eval.suite_items=10",
                "--set", f"judge.base_url={judge.url}", "--set", "judge.model=scripted",
                "--set", "judge.repeats=1"]  # fmt: skip
        assert main(args) == 0
    finally:
        judge.close()
    j = json.loads((tmp_path / "suites" / "adapter-mt-bench.json").read_text())["judge"]
    assert j["score"] == 7.0 and j["graded"] == j["answers"] == 20 and j["unparsed_replies"] == 0
    assert set(j["per_turn"]) == {"turn 1", "turn 2"}
    shipped = {json.loads(line)["name"]: json.loads(line) for line in
               (Path(load_suite.__globals__["resolve_data_path"]("eval/mt_bench/judge_prompts.jsonl"))
                .read_text().splitlines())}  # fmt: skip
    systems = {m["body"]["messages"][0]["content"] for m in judge.seen}
    assert shipped["single-v1-multi-turn"]["system_prompt"] in systems  # turn 2: the whole talk
    rows = [
        json.loads(line)
        for line in (tmp_path / "answers" / "adapter-mt-bench.jsonl").read_text().splitlines()
    ]
    math = [
        r for r in rows if r["category"] in ("math", "reasoning", "coding") and r["references"][0]
    ]
    if math:  # graded against GPT-4's reference answer
        assert any(
            math[0]["references"][0] in m["body"]["messages"][1]["content"] for m in judge.seen
        )


def test_compare_scores_every_arm_on_other_question_sets(run: Path, tmp_path: Path) -> None:
    cfg = tiny_config(write_jsonl(tmp_path / "data.jsonl", make_rows()),
                      compare={"arms": ["base", "fedit", "local"], "local_clients": 1},
                      eval={"suites": ["self-instruct", "vicuna80"], "suite_items": 3},
                      generate={"max_new_tokens": 4, "per_category": 1})  # fmt: skip
    path = tmp_path / "cmp.toml"
    path.write_text(to_toml(cfg))
    assert main(["compare", str(path), "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    for arm in ("base", "fedit", "local"):
        s = results["arms"][arm]["suites"]
        assert set(s) == {"self-instruct", "vicuna80"}, arm
        assert "rougeL" in s["self-instruct"]["reference"]  # references: ROUGE-L
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "### Other question sets" in table and "| FedIT | ROUGE-L " in table
    with pytest.raises(Exception, match=r"eval\.suites\[0\]"):
        tiny_config(Path("x"), eval={"suites": ["nope"]})
