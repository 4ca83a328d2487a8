"""End to end: the CLI, checkpoints, resume, and errors a user sees."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict

from fedit.checkpoint import latest_checkpoint, list_rounds
from fedit.cli import main
from fedit.config import to_toml
from fedit.lora import load_adapter_state
from fedit.models import load_model
from fedit.recipe import run_federation
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, data_file: Path, **sections: dict) -> Path:
    p = tmp_path / "run.toml"
    p.write_text(to_toml(tiny_config(data_file, **sections)))
    return p


def test_cli_run_writes_everything(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, data_file)
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--set", "federation.rounds=2"]) == 0
    printed = capsys.readouterr()
    assert "held-out loss per category" in printed.out and "round 2/2" in printed.err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert {"loss", "ppl", "per_category"} <= set(rows[0]["eval"])
    assert rows[1]["bytes_up_per_client"] > 0 and len(rows[1]["clients"]) == 2
    assert list_rounds(out / "checkpoints") == [1, 2]
    for f in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "config.toml",
        "summary.json",
        "partition_stats.json",
    ]:
        assert (out / f).is_file(), f
    assert not [p for p in out.rglob(".*") if p.name.startswith(".")]  # no temp leftovers


def test_checkpoint_is_a_standard_peft_adapter(tmp_path: Path, data_file: Path) -> None:
    cfg = write_config(tmp_path, data_file)
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    _, base = load_model(tiny_config(data_file).model, seed=0)
    state = load_adapter_state(out / "adapter")
    peft_model = PeftModel.from_pretrained(base, str(out / "adapter"))
    loaded = get_peft_model_state_dict(peft_model)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == "fedit/tiny-llama" and meta["r"] == 4


def test_resume_equals_uninterrupted(tmp_path: Path, data_file: Path) -> None:
    cfg = write_config(tmp_path, data_file)
    full, part = tmp_path / "full", tmp_path / "part"
    assert (
        main(["run", str(cfg), "--out", str(full), "--quiet", "--set", "federation.rounds=3"]) == 0
    )
    assert (
        main(["run", str(cfg), "--out", str(part), "--quiet", "--set", "federation.rounds=2"]) == 0
    )
    assert (
        main(
            [
                "run",
                str(cfg),
                "--out",
                str(part),
                "--quiet",
                "--set",
                "federation.rounds=3",
                "--resume",
            ]
        )
        == 0
    )
    a, b = load_adapter_state(full / "adapter"), load_adapter_state(part / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line)["round"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3]


def test_resume_after_losing_a_round_and_skipping_a_damaged_one(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, data_file, federation={"rounds": 3})
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["run", str(cfg), "--out", str(full), "--quiet"]) == 0
    assert main(["run", str(cfg), "--out", str(part), "--quiet"]) == 0
    # A crash after round 2's checkpoint: round 3 never happened; round 2's adapter is damaged.
    shutil.rmtree(part / "checkpoints" / "round_0003")
    damaged = part / "checkpoints" / "round_0002" / "adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-7] + b"garbage")
    ckpt, problems = latest_checkpoint(part / "checkpoints")
    assert ckpt is not None and ckpt.round == 1 and "round_0002" in problems[0]
    assert main(["run", str(cfg), "--out", str(part), "--resume"]) == 0
    assert "skipping damaged checkpoint" in capsys.readouterr().err
    a, b = load_adapter_state(full / "adapter"), load_adapter_state(part / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_needs_resume_and_resume_checks_config(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, data_file)
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (
        main(["run", str(cfg), "--out", str(out), "--quiet", "--resume", "--set", "client.lr=0.5"])
        == 2
    )
    assert "client.lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "federation.strategyy=fedavg"], "federation.strategyy"),
        (["--set", "federation.strategy=fedsgd"], "fedavg, fedavgm, fednova, fedprox"),
        (["--set", "partition.method=bogus"], "partition.method"),
        (["--set", "lora.target_modules=['nope']"], "q_proj"),
        (["--set", "model.name=/no/such/model"], "/no/such/model"),
    ],
)
def test_cli_errors_name_the_problem(
    tmp_path: Path,
    data_file: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    needle: str,
) -> None:
    cfg = write_config(tmp_path, data_file)
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedit: error:") and needle in err


def test_cli_malformed_data_names_file_and_line(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = data_file.read_text().splitlines()
    lines[6] = "{not json"
    data_file.write_text("\n".join(lines) + "\n")
    cfg = write_config(tmp_path, data_file)
    assert main(["run", str(cfg), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert f"{data_file}:7: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_partition_command(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, data_file)
    assert (
        main(
            [
                "partition",
                str(cfg),
                "--out",
                str(tmp_path / "p"),
                "--set",
                "partition.method=dirichlet",
            ]
        )
        == 0
    )
    assert "category TV distance" in capsys.readouterr().out
    assert len(list((tmp_path / "p" / "clients").glob("*.jsonl"))) == 4


def test_readme_key_table_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's table is the output of `fedit keys --markdown`: defaults live in config.py."""
    assert main(["keys", "--markdown"]) == 0
    readme = (ROOT / "README.md").read_text()
    for line in capsys.readouterr().out.splitlines():
        assert line in readme, f"README key table is stale (run `make readme-keys`): {line}"


def test_keys_and_config_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys"]) == 0
    assert "federation.clients_per_round" in capsys.readouterr().out
    assert main(["config", str(ROOT / "configs" / "paper.toml"), "--set", "seed=9"]) == 0
    assert "seed = 9" in capsys.readouterr().out


@pytest.mark.skipif(
    not (
        Path(os.environ.get("FEDIT_DATA_DIR", "/nonexistent")) / "databricks-dolly-15k.jsonl"
    ).is_file(),
    reason="FEDIT_DATA_DIR does not hold databricks-dolly-15k.jsonl",
)
def test_console_script_on_dolly_tiny_config(tmp_path: Path) -> None:
    """The installed `fedit` command, in its own process, on the real dolly data."""
    exe = Path(sys.executable).with_name("fedit")
    proc = subprocess.run(
        [str(exe), "run", str(ROOT / "configs" / "tiny.toml"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert "databricks" not in proc.stderr or "error" not in proc.stderr


@pytest.mark.parametrize("feedback", [True, False])
@pytest.mark.parametrize("method", ["fp16", "int8", "int4", "topk"])
def test_resume_is_exact_for_every_codec(
    tmp_path: Path, data_file: Path, method: str, feedback: bool
) -> None:
    """Error-feedback residuals are client state: the checkpoint carries them."""
    sections = {
        "federation": {"rounds": 3, "clients_per_round": 3},
        "compression": {"method": method, "error_feedback": feedback, "topk_ratio": 0.2},
        "eval": {"every": 0},
    }
    full = run_federation(tiny_config(data_file, **sections), tmp_path / "full").adapter
    two = tiny_config(
        data_file, **{**sections, "federation": {"rounds": 2, "clients_per_round": 3}}
    )
    run_federation(two, tmp_path / "part")
    resumed = run_federation(tiny_config(data_file, **sections), tmp_path / "part", resume=True)
    worst = max((full[k] - resumed.adapter[k]).abs().max().item() for k in full)
    assert worst == 0.0, f"largest difference {worst:.3g}"
    saved = tmp_path / "part" / "checkpoints" / "round_0002" / "client_state.safetensors"
    assert saved.is_file() == feedback


def test_metrics_rows_are_complete_and_a_resumed_summary_matches(
    tmp_path: Path, data_file: Path
) -> None:
    full = run_federation(tiny_config(data_file, federation={"rounds": 3}), tmp_path / "full")
    run_federation(tiny_config(data_file, federation={"rounds": 2}), tmp_path / "part")
    run_federation(tiny_config(data_file, federation={"rounds": 3}), tmp_path / "part", resume=True)
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert all("checkpoint" in r["time"] for r in rows if r["round"] > 0)

    def shape(value: object) -> object:  # keys and structure; times and losses may differ
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shape(v) for v in value]
        return type(value).__name__

    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert shape(a) == shape(b)
    assert [h["eval"]["loss"] for h in a["history"]] == [h["eval"]["loss"] for h in b["history"]]
    assert full.history[-1]["eval"] == a["history"][-1]["eval"]


def test_eval_of_a_finished_run_reports_its_last_held_out_loss(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, data_file)
    out = tmp_path / "run"
    limit = ["--set", "eval.max_examples=5"]
    assert main(["run", str(cfg), "--out", str(out), "--quiet", *limit]) == 0
    summary = json.loads((out / "summary.json").read_text())
    last = summary["history"][-1]["eval"]
    capsys.readouterr()
    assert main(["eval", str(out), "--no-generate", "--out", str(tmp_path / "ev")]) == 0
    err = capsys.readouterr().err
    assert "held-out loss on 5 test examples (eval.max_examples of " in err
    got = json.loads((tmp_path / "ev" / "eval.json").read_text())["eval"]
    assert got["loss"] == pytest.approx(last["loss"], rel=1e-6)
    assert got["per_category"].keys() == last["per_category"].keys()
    assert got["tokens"] == last["tokens"]
