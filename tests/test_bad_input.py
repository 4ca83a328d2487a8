"""Bad input as a new user or an adversary gives it: one clear error, before any work is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedit.cli import main
from fedit.config import ConfigError, DataConfig, load_config, to_toml
from fedit.data.records import DataError, load_records
from fedit.models import tiny_model, tiny_tokenizer
from fedit.recipe import run_federation
from tests.conftest import make_rows, tiny_config, write_jsonl

FEDIT = str(Path(sys.executable).with_name("fedit"))


def write_config(tmp_path: Path, data_file: Path, **sections: dict) -> Path:
    p = tmp_path / "run.toml"
    p.write_text(to_toml(tiny_config(data_file, **sections)))
    return p


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error of a command that must fail cleanly (no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "fedit: error:" in err and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- resume and changed data


def test_resume_refuses_changed_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", make_rows())
    cfg = write_config(tmp_path, data, federation={"rounds": 2})
    out = tmp_path / "run"
    assert (
        main(["run", str(cfg), "--out", str(out), "--quiet", "--set", "federation.rounds=1"]) == 0
    )
    rows = [{**r, "response": r["response"] + " Changed."} for r in make_rows()]
    write_jsonl(data, rows)
    err = fails(["run", str(cfg), "--out", str(out), "--quiet", "--resume"], capsys)
    assert "the data file" in err and "changed since round 1" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["round_0001"]
    write_jsonl(data, make_rows())  # restored: the run continues
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--resume"]) == 0


# ---------------------------------------------------------------- tracebacks that were


def test_corrupt_parquet_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "data.parquet"
    p.write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(DataError, match=rf"{p}: not a readable Parquet file"):
        load_records(DataConfig(path=str(p)))


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    tok = tiny_tokenizer()
    tiny_model(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_model_folder_without_tokenizer_or_with_empty_config(
    tmp_path: Path, data_file: Path, model_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, data_file, model={"name": str(model_folder)})
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0  # the folder works
    (model_folder / "config.json").write_text("{}")
    err = fails(["run", str(cfg), "--out", str(tmp_path / "r2"), "--quiet"], capsys)
    assert f"{model_folder}/config.json" in err
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model"):
        (model_folder / name).unlink(missing_ok=True)
    err = fails(["run", str(cfg), "--out", str(tmp_path / "r3"), "--quiet"], capsys)
    assert "has no tokenizer" in err


def test_out_that_is_a_file_or_read_only(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, data_file)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for cmd in ("run", "partition"):
        err = fails([cmd, str(cfg), "--out", str(a_file)], capsys)
        assert f"{a_file}: the" in err and "is a file" in err
    if os.geteuid() == 0:
        read_only = Path("/sys/kernel")  # root may write anywhere but a read-only mount
    else:
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
    for cmd in ("run", "partition"):
        err = fails([cmd, str(cfg), "--out", str(read_only / "out")], capsys)
        assert f"{read_only / 'out'}: cannot write the" in err


# ---------------------------------------------------------------- known before round 1


def test_client_without_usable_examples_stops_before_round_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = make_rows()
    long = " ".join(["word"] * 200)
    rows = [{**r, "instruction": long} if r["category"] == "summarization" else r for r in rows]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = write_config(
        tmp_path,
        data,
        partition={"method": "natural", "natural_field": "category", "num_clients": 0},
        federation={"rounds": 3, "clients_per_round": 1},
        data={"test_per_category": 0},
    )
    out = tmp_path / "run"
    err = fails(["run", str(cfg), "--out", str(out)], capsys)
    assert "all 12 examples lose their response at data.cutoff_len=96" in err
    assert "round 1" not in err and not (out / "checkpoints").exists()


def test_min_clients_above_clients_per_round_is_refused_up_front(data_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"federation.min_clients=3: more than the 2 clients"):
        tiny_config(data_file, federation={"min_clients": 3})
    cfg = tiny_config(data_file, federation={"min_clients": 3, "clients_per_round": 0.5})
    with pytest.raises(ConfigError, match=r"more than the 2 clients sampled per round") as e:
        run_federation(cfg)
    assert "Excluded" not in str(e.value)


# ---------------------------------------------------------------- partition folders


def test_partition_into_a_used_folder(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, data_file)
    out = tmp_path / "split"
    assert main(["partition", str(cfg), "--out", str(out)]) == 0
    assert len(list((out / "clients").iterdir())) == 4
    two = ["--set", "partition.num_clients=2"]
    err = fails(["partition", str(cfg), "--out", str(out), *two], capsys)
    assert "not empty" in err and "--replace" in err
    assert main(["partition", str(cfg), "--out", str(out), *two, "--replace"]) == 0
    assert sorted(p.name for p in (out / "clients").iterdir()) == [
        "client_0000.jsonl",
        "client_0001.jsonl",
    ]
    assert json.loads((out / "stats.json").read_text())["num_clients"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".split")]  # no leftovers


# ---------------------------------------------------------------- records


def test_chat_content_parts(tmp_path: Path) -> None:
    def chat(content: object) -> dict:
        return {"messages": [{"role": "user", "content": content},
                             {"role": "assistant", "content": "Fine."}]}  # fmt: skip

    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    p = write_jsonl(tmp_path / "chat.jsonl", [chat(parts), chat("Plain")])
    records, _ = load_records(DataConfig(path=str(p)))
    assert [r.instruction for r in records] == ["Hello\nthere", "Plain"]
    image = [{"type": "text", "text": "Look"}, {"type": "image_url", "image_url": {"url": "x"}}]
    p = write_jsonl(tmp_path / "bad.jsonl", [chat("Plain"), chat(image)])
    with pytest.raises(DataError, match=rf"{p}:2: messages\[0\].content\[1\]: a 'image_url' part"):
        load_records(DataConfig(path=str(p)))
    p = write_jsonl(tmp_path / "bad2.jsonl", [chat({"text": "x"})])
    with pytest.raises(DataError, match=rf"{p}:1: messages\[0\].content: expected text"):
        load_records(DataConfig(path=str(p)))


def test_byte_order_mark_is_accepted_and_bad_utf8_gives_the_column(tmp_path: Path) -> None:
    rows = make_rows(2)
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    records, _ = load_records(DataConfig(path=str(p)))
    assert len(records) == len(rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(rows[0]).encode() + b'\n{"instruction": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{bad}:2: not valid UTF-8 \(byte 21 of the line\)"):
        load_records(DataConfig(path=str(bad)))


# ---------------------------------------------------------------- config


def test_set_errors_name_the_override(tmp_path: Path, data_file: Path) -> None:
    cfg = write_config(tmp_path, data_file)
    with pytest.raises(ConfigError, match=r"^--set privacy.delta=2: privacy.delta: must be in"):
        load_config(cfg, ["privacy.delta=2"])
    with pytest.raises(ConfigError, match=r"^--set compare.arms=\['bogus'\]: compare.arms\[0\]"):
        load_config(cfg, ["compare.arms=['bogus']"])
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace("delta = 1e-05", "delta = 2.0"))
    with pytest.raises(ConfigError, match=rf"^{bad}: privacy.delta"):
        load_config(bad, ["federation.rounds=2"])
    with pytest.raises(ConfigError, match=r"a folder, not a config file"):
        load_config(tmp_path, [])


def test_faults_that_cannot_happen_are_refused(data_file: Path) -> None:
    with pytest.raises(ConfigError, match=r"faults.inject\[0\]: 'nan:7:1' names client 7"):
        tiny_config(data_file, faults={"inject": ["nan:7:1"]})
    with pytest.raises(ConfigError, match=r"faults.inject\[1\]: 'fail:\*:5' names round 5"):
        tiny_config(data_file, faults={"inject": ["nan:1:1", "fail:*:5"]})
    with pytest.raises(ConfigError, match=r"faults.crash: 'train:3' names round 3"):
        tiny_config(data_file, faults={"crash": "train:3"})
    tiny_config(data_file, faults={"inject": ["huge:3:*", "nan:*:2"], "crash": "checkpoint:2"})


def test_category_that_loses_every_test_example_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long = " ".join(["word"] * 200)
    rows = [{**r, "context": long} if r["category"] == "open_qa" else r for r in make_rows()]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = write_config(tmp_path, data, partition={"method": "iid"}, federation={"rounds": 1})
    assert main(["run", str(cfg), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "no held-out example left for categories ['open_qa']" in err
    stats = json.loads((tmp_path / "run" / "partition_stats.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    evaluated = set(summary["history"][-1]["eval"]["per_category"])
    assert set(stats["test_per_category"]) - evaluated == {"open_qa"}


def test_keys_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    proc = subprocess.run(
        f"'{FEDIT}' keys | head -n 1", shell=True, capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.startswith("seed") or proc.stdout.strip(), proc.stdout
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
