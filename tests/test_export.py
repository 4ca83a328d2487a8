"""`fedit export`: the merged model loads in plain transformers and answers as fedit does;
every adapter folder describes itself (model card, prompt format)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedit.cli import main
from fedit.config import to_toml
from tests.conftest import make_rows, tiny_config, write_jsonl

QUESTION = "Tell me about the river number 3."


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    data = write_jsonl(tmp / "data.jsonl", make_rows())
    cfg = tmp / "run.toml"
    cfg.write_text(
        to_toml(
            tiny_config(
                data, client={"lr": 0.2, "max_steps": 6}, data={"license": "CC0 (test rows)"}
            )
        )
    )
    assert main(["run", str(cfg), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp / "run"


def test_adapter_folder_describes_itself(run: Path) -> None:
    card = (run / "adapter" / "README.md").read_text()
    for words in (
        "base_model: fedit/tiny-llama",
        "`alpaca`",
        "CC0 (test rows)",
        "fedavg",
        "Held-out loss:** ",
        "PeftModel.from_pretrained",
        "### Instruction:",
    ):
        assert words in card, words
    prompt = json.loads((run / "adapter" / "fedit_prompt.json").read_text())
    assert prompt["template"] == "alpaca" and "\n### Instruction:" in prompt["stop"]
    summary = json.loads((run / "summary.json").read_text())
    assert prompt["heldout_loss"] == summary["history"][-1]["eval"]["loss"]


def test_merged_export_answers_like_fedit_generate(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedit.data.records import Record
    from fedit.inference import load_for_inference, prompt_for, resolve_source

    assert main(["generate", str(run), "--prompt", QUESTION, "--max-new-tokens", "12"]) == 0
    expected = capsys.readouterr().out.strip()
    out = tmp_path / "merged"
    assert main(["export", str(run), "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not isinstance(model, PeftModel)  # plain transformers, no peft needed
    # The saved chat template renders exactly the prompt fedit tuned and answers with.
    cfg, _ = resolve_source(run)
    loaded = load_for_inference(cfg, run / "adapter")
    prompt = prompt_for(Record(instruction=QUESTION, response=""), cfg, loaded.tokenizer)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert ids == tok(prompt)["input_ids"]
    seq = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    answer = tok.decode(seq[0, len(ids) :], skip_special_tokens=True).strip()
    assert answer == expected != ""
    # ... and the merged weights equal base + LoRA: same logits as the adapter model.
    with torch.no_grad():
        a = model(torch.tensor([ids])).logits
        b = loaded.model(torch.tensor([ids])).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert (out / "generation_config.json").is_file() and "Merged model" in (
        out / "README.md"
    ).read_text()
    # Again into the same folder replaces the export; a foreign folder is refused.
    assert main(["export", str(run), "--out", str(out), "--dtype", "bfloat16"]) == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["export", str(run), "--out", str(foreign)]) == 2
    assert "not a fedit export" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep"


def test_adapter_only_export_loads_in_peft(run: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from fedit.config import ModelConfig
    from fedit.models import load_model

    out = tmp_path / "adapter"
    assert main(["export", str(run), "--out", str(out), "--adapter-only"]) == 0
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "README.md",
        "fedit_prompt.json",
        "tokenizer.json",
    } <= {p.name for p in out.iterdir()}
    _, base = load_model(ModelConfig(name="fedit/tiny-llama"), seed=0)
    model = PeftModel.from_pretrained(base, str(out))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TensorBoard event files, read as TFRecords (no TensorBoard needed)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_events_follow_metrics(run: Path) -> None:
    scalars = _events(run / "tensorboard")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = [(r["round"], r["eval"]["loss"]) for r in rows if r.get("eval")]
    assert [(s, round(v, 4)) for s, v in scalars["heldout/loss"]] == [
        (s, round(v, 4)) for s, v in loss
    ]
    assert {"train/loss", "bytes/up_total", "time/seconds"} <= set(scalars)
    assert any(t.startswith("heldout_category/") for t in scalars)


def test_chat_keeps_the_conversation(run: Path) -> None:
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("fedit")
    script = "/help\nTell me about the river.\nAnd the city?\n/reset\n/bogus\nHi\n"
    proc = subprocess.run([str(exe), "chat", str(run), "--max-new-tokens", "6"], input=script,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model> ") == 3
    for words in ("/reset", "(new conversation)", "unknown command /bogus"):
        assert words in proc.stderr


def test_progress_shows_rate_and_eta_off_a_terminal() -> None:
    import io
    import re
    import time

    from fedit.progress import Progress

    stream = io.StringIO()
    p = Progress(stream=stream, every=2)
    for step in range(1, 5):
        time.sleep(0.01)
        p.step(1, 3, "0", 7, step, 4, 1.0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "step 4/4" in lines[-1]
    assert re.search(r"\(\d+\.\d\d step/s, ETA 00:00\)$", lines[-1]), lines[-1]
