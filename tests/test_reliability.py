"""Bad input, faulty clients, crashes and resource guards."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fedit.checkpoint
import fedit.resources
from fedit.checkpoint import CheckpointError, latest_checkpoint, list_rounds
from fedit.cli import main
from fedit.config import DataConfig, to_toml
from fedit.data.records import DataError, load_records
from fedit.lora import get_adapter, load_adapter_state, set_adapter
from fedit.models import ModelError
from fedit.recipe import run_federation, setup_run
from fedit.resources import ResourceError
from tests.conftest import client_runtime, tiny_config

FEDIT = str(Path(sys.executable).with_name("fedit"))


def write_config(tmp_path: Path, data_file: Path, **sections: dict) -> Path:
    p = tmp_path / "run.toml"
    p.write_text(to_toml(tiny_config(data_file, **sections)))
    return p


def test_named_category_field_must_exist(data_file: Path) -> None:
    with pytest.raises(
        DataError, match=rf"{data_file}:1: no field 'topic' \(data.fields.category\)"
    ):
        load_records(DataConfig(path=str(data_file), fields={"category": "topic"}))


def test_adapter_of_another_shape_is_refused(data_file: Path) -> None:
    model = client_runtime(tiny_config(data_file)).lm.model
    bad = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in get_adapter(model).items()}
    with pytest.raises(ModelError, match="different base model or LoRA rank"):
        set_adapter(model, bad)
    with pytest.raises(ModelError, match="does not match the model"):
        set_adapter(model, {"x.lora_A.weight": torch.zeros(1)})


def test_injected_faults_are_excluded_and_recorded(tmp_path: Path, data_file: Path) -> None:
    cfg = tiny_config(
        data_file,
        federation={"rounds": 3, "clients_per_round": 4},
        faults={"inject": ["fail:1:1", "nan:2:1", "huge:0:2", "nan:3:3"]},
    )
    result = run_federation(cfg, tmp_path / "out")
    rows = result.history
    assert [sorted(f["client"] for f in r["faults"]) for r in rows[1:]] == [[1, 2], [0], [3]]
    assert "injected failure" in rows[1]["faults"][0]["reason"]
    assert "non-finite" in rows[1]["faults"][1]["reason"]
    assert "federation.max_norm_ratio" in rows[2]["faults"][0]["reason"]
    assert rows[1]["accepted"] == [0, 3] and rows[2]["accepted"] == [1, 2, 3]
    assert all(torch.isfinite(v).all() for v in result.adapter.values())
    assert list_rounds(tmp_path / "out" / "checkpoints") == [1, 2, 3]


def test_too_few_valid_updates_fails_the_round_cleanly(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(
        tmp_path,
        data_file,
        federation={"rounds": 3, "clients_per_round": 2, "min_clients": 2},
        faults={"inject": ["nan:*:2"]},
    )
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "round 2: 0 valid updates, fewer than federation.min_clients=2" in err
    assert "global adapter of round 1 is kept" in err
    ckpt, problems = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.round == 1 and not problems
    assert all(torch.isfinite(v).all() for v in ckpt.adapter.values())


def run_cli(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEDIT, "run", *args], capture_output=True, text=True, timeout=300, **kw)  # type: ignore[call-overload]


@pytest.fixture
def reference(tmp_path: Path, data_file: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    cfg = write_config(tmp_path, data_file, federation={"rounds": 3})
    out = tmp_path / "reference"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    return cfg, load_adapter_state(out / "adapter")


@pytest.mark.parametrize("point", ["train:2", "checkpoint:2", "checkpoint:3"])
def test_kill_9_then_resume_equals_uninterrupted(
    tmp_path: Path, reference: tuple[Path, dict[str, torch.Tensor]], point: str
) -> None:
    cfg, expected = reference
    out = tmp_path / "crashed"
    proc = run_cli([str(cfg), "--out", str(out), "--quiet", "--set", f"faults.crash={point}"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-1000:]
    rounds = list_rounds(out / "checkpoints")
    assert rounds == list(range(1, int(point[-1])))  # the killed round left no round folder
    assert not (out / "adapter").exists()
    proc = run_cli([str(cfg), "--out", str(out), "--quiet", "--resume"])
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    got = load_adapter_state(out / "adapter")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    rows = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3]


def test_ctrl_c_finishes_the_checkpoint_and_says_how_to_resume(
    tmp_path: Path, reference: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    cfg, _ = reference
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [FEDIT, "run", str(cfg), "--out", str(out), "--quiet", "--set", "client.max_steps=40"],
        stderr=subprocess.PIPE,
        text=True,
        # A shell starts background jobs with SIGINT ignored and children inherit that; a user's
        # Ctrl-C reaches a foreground process, so give the run the default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 600  # generous: a loaded machine can take minutes per round
    while not list_rounds(out / "checkpoints") and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-1000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-1000:]
    assert "--resume" in err
    ckpt, problems = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and not problems


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fedit.checkpoint.save_file
    calls = {"n": 0}

    def full_disk(*args: object, **kw: object) -> None:
        calls["n"] += 1
        if calls["n"] > 1:  # round 1 wrote its strategy state; round 2 finds the disk full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(fedit.checkpoint, "save_file", full_disk)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="No space left on device.*earlier rounds .* intact"):
        run_federation(tiny_config(data_file, federation={"rounds": 3}), out)
    ckpt, problems = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.round == 1 and not problems
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["round_0001"]


def test_memory_guard_refuses_up_front(data_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fedit.resources, "available_memory", lambda device=None: 256 * 1024**2)

    def no_loading(*args: object, **kw: object) -> None:
        raise AssertionError("the model must not load")

    monkeypatch.setattr("fedit.models.load_model", no_loading)
    with pytest.raises(
        ResourceError, match=r"estimated peak memory .* exceeds the 0.2 GiB available on (cpu|cuda)"
    ):
        setup_run(tiny_config(data_file))
    huge = tiny_config(data_file, data={"cutoff_len": 65536})
    monkeypatch.setattr(fedit.resources, "available_memory", lambda device=None: 16 * 1024**3)
    with pytest.raises(ResourceError, match="client.micro_batch_size"):
        setup_run(huge)
