import json
from pathlib import Path

import pytest

from fedit.config import DataConfig
from fedit.data.records import DataError, load_records, read_canonical, write_jsonl
from tests.conftest import make_rows


def cfg(path: Path, **kw: object) -> DataConfig:
    return DataConfig(path=str(path), **kw)  # type: ignore[arg-type]


def test_dolly_jsonl(data_file: Path) -> None:
    records, report = load_records(cfg(data_file))
    assert len(records) == report.loaded == 48
    r = records[1]
    assert r.instruction.startswith("Tell me about") and r.context and r.category == "open_qa"


def test_alpaca_json_array(tmp_path: Path) -> None:
    rows = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}] * 3
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps(rows))
    records, _ = load_records(cfg(p))
    assert [r.response for r in records] == ["5"] * 3
    assert records[0].category == "uncategorized"


def test_chat_records_keep_history(tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ],
        "topic": "geo",
        "author": "alice",
    }
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps(row) + "\n")
    (r,), _ = load_records(cfg(p, fields={"category": "topic", "user": "author"}))
    assert (r.instruction, r.response, r.category, r.user) == (
        "Capital of France?",
        "Paris.",
        "geo",
        "alice",
    )
    assert [t["role"] for t in r.history] == ["system", "user", "assistant"]


def test_field_mapping(tmp_path: Path) -> None:
    p = tmp_path / "qa.jsonl"
    p.write_text(json.dumps({"question": "Q?", "answer": "A.", "domain": "d"}) + "\n")
    (r,), _ = load_records(
        cfg(
            p,
            format="alpaca",
            fields={"instruction": "question", "output": "answer", "category": "domain"},
        )
    )
    assert (r.instruction, r.response, r.category) == ("Q?", "A.", "d")


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = make_rows(2)
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    records, _ = load_records(cfg(p))
    assert [r.response for r in records] == [r["response"] for r in rows]


def test_malformed_line_names_file_and_line(data_file: Path) -> None:
    lines = data_file.read_text().splitlines()
    lines[4] = '{"instruction": "broken", '
    data_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{data_file}:5: invalid JSON"):
        load_records(cfg(data_file))
    records, report = load_records(cfg(data_file, skip_bad_records=True))
    assert len(records) == 47 and len(report.skipped) == 1 and ":5:" in report.skipped[0]


def test_missing_and_empty_fields_name_file_line_and_field(tmp_path: Path) -> None:
    rows = make_rows(1)
    del rows[2]["response"]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{p}:3: missing field 'response'"):
        load_records(cfg(p, format="dolly"))
    rows = make_rows(1)
    rows[1]["instruction"] = "  "
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{p}:2: field 'instruction' is empty"):
        load_records(cfg(p))


def test_non_utf8_names_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(
        b'{"instruction": "a", "context": "", "response": "b"}\n{"instruction": "\xff"}\n'
    )
    with pytest.raises(DataError, match=rf"{p}:2: not valid UTF-8"):
        load_records(cfg(p))


def test_empty_file_and_unknown_layout(tmp_path: Path) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError, match="no usable records"):
        load_records(cfg(p))
    p.write_text(json.dumps({"q": 1}) + "\n")
    with pytest.raises(DataError, match=rf"{p}:1: cannot tell the record format"):
        load_records(cfg(p))


def test_missing_file_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDIT_DATA_DIR", str(tmp_path / "datadir"))
    with pytest.raises(DataError) as e:
        load_records(cfg(Path("nope.jsonl")))
    assert "nope.jsonl" in str(e.value) and str(tmp_path / "datadir" / "nope.jsonl") in str(e.value)


def test_data_dir_env_finds_file(data_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDIT_DATA_DIR", str(data_file.parent))
    records, _ = load_records(cfg(Path(data_file.name)))
    assert len(records) == 48


def test_canonical_round_trip(data_file: Path, tmp_path: Path) -> None:
    records, _ = load_records(cfg(data_file))
    out = tmp_path / "c.jsonl"
    write_jsonl(out, records)
    assert read_canonical(out) == records


def test_a_chat_record_with_an_empty_instruction_names_its_line(tmp_path: Path) -> None:
    p = tmp_path / "chat.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": ""}, '
                 '{"role": "assistant", "content": "0"}]}\n')  # fmt: skip
    with pytest.raises(DataError, match=r"chat.jsonl:1: the last user turn \(the instruction\)"):
        load_records(DataConfig(path=str(p), format="chat"))
