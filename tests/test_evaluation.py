"""Evaluation: the four-arm comparison, generation metrics, serving, and the LLM judge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fedit.cli import main
from fedit.config import JudgeConfig, load_config, to_toml
from fedit.data.partition import make_partition
from fedit.data.records import load_records
from fedit.evaluate.generation import Embedder, rouge_l
from fedit.evaluate.judge import Judge, JudgeError, judge_answers, parse_pair, parse_single
from fedit.models import ModelError
from tests.conftest import make_rows, tiny_config, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
DOLLY = Path(os.environ.get("FEDIT_DATA_DIR", "/nonexistent")) / "databricks-dolly-15k.jsonl"


# ------------------------------------------------------------------ compare


@pytest.mark.skipif(not DOLLY.is_file(), reason="FEDIT_DATA_DIR lacks databricks-dolly-15k.jsonl")
def test_compare_tiny_config_four_arms(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    args = ["compare", str(ROOT / "configs" / "tiny.toml"), "--out", str(out),
            "--set", "generate.max_new_tokens=8", "--set", "generate.per_category=2",
            "--set", "compare.local_clients=2"]  # fmt: skip
    assert main(args) == 0
    table = (out / "results.md").read_text()
    for arm in ("base (no tuning)", "local-only", "FedIT", "centralized"):
        assert f"| {arm}" in table
    res = json.loads((out / "results.json").read_text())
    arms = res["arms"]
    assert list(arms) == ["base", "local", "fedit", "centralized"]
    # One compute budget: centralized spends FedIT's steps; a local client the steps of a
    # client selected every round.
    assert arms["centralized"]["steps"] == arms["fedit"]["steps"] == 2 * 2 * 4
    assert all(p["steps"] == 2 * 4 for p in arms["local"]["per_client"])
    assert len(arms["local"]["per_client"]) == 2
    for arm in arms.values():
        assert 0.0 <= arm["rougeL"] <= 1.0 and -1.0 <= arm["similarity"] <= 1.0
        # every category with test examples, never only the mean
        assert set(arm["loss_per_category"]) == set(arms["base"]["loss_per_category"])
    assert len(arms["base"]["loss_per_category"]) >= 6
    assert arms["fedit"]["loss_per_round"][0] == [0, arms["base"]["loss"]]
    assert [r for r, _ in arms["centralized"]["loss_per_round"]] == [0, 1, 2]
    for name in ("loss_per_round.png", "per_category.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Resumable: a second call reuses every finished arm and cached answer.
    capsys.readouterr()
    stamp = (out / "fedit" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("finished earlier") == 4 and "generating" not in err
    assert (out / "fedit" / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text()) == res


def test_only_and_pooled_keep_the_test_split(tmp_path: Path, data_file: Path) -> None:
    cfg = tiny_config(data_file)
    records, _ = load_records(cfg.data)
    full = make_partition(records, cfg)
    only = make_partition(records, tiny_config(data_file, partition={"only": [2]}))
    pooled = make_partition(records, tiny_config(data_file, partition={"pooled": True}))
    assert only.test == full.test == pooled.test
    assert only.clients == [full.clients[2]]
    assert len(pooled.clients) == 1
    assert sorted(r.instruction for r in pooled.clients[0]) == sorted(
        r.instruction for c in full.clients for r in c
    )
    with pytest.raises(Exception, match=r"partition.only: clients \[9\] do not exist"):
        make_partition(records, tiny_config(data_file, partition={"only": [9]}))


# ------------------------------------------------------------------ metrics and parsing


def test_generation_metrics() -> None:
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == [1.0]
    assert rouge_l(["dogs bark"], ["the cat sat"]) == [0.0]
    emb = Embedder("all-MiniLM-L6-v2")
    same, near, far = emb.similarity(
        ["Paris is the capital of France."] * 3,
        ["Paris is the capital of France.", "France's capital city is Paris.", "I like turtles."],
    )
    assert same == pytest.approx(1.0, abs=1e-5) and near > 0.7 > far


def test_judge_reply_parsing() -> None:
    assert parse_pair("8 6\nAssistant 1 is better.") == (8.0, 6.0)
    assert parse_pair("\n  7.5, 9\nbecause") == (7.5, 9.0)
    assert parse_pair("Scores: 10 and 3") == (10.0, 3.0)
    assert parse_pair("Assistant 1 is better.\n8 6") is None  # scores must lead
    assert parse_pair("11 4") is None and parse_pair("") is None
    assert parse_single("Good answer. Rating: [[7]]") == 7.0
    assert parse_single("Rating: 7") is None and parse_single("[[0]]") is None


# ------------------------------------------------------------------ judge against endpoints


class Scripted:
    """A real HTTP endpoint on loopback whose replies a test scripts (the judge's transport)."""

    def __init__(self, replies: list[tuple[int, Any]]) -> None:
        self.replies = replies
        self.seen: list[dict[str, Any]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.seen.append({"body": body, "auth": self.headers.get("Authorization")})
                status, payload = outer.replies.pop(0) if outer.replies else (200, "8 6")
                if isinstance(payload, str):
                    payload = {"choices": [{"message": {"role": "assistant", "content": payload}}]}
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_judge_protocol_orders_retries_cache_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    # Position bias: the judge always prefers whatever comes first (9 vs 5); asked in both
    # orders, the two answers come out equal.
    ep = Scripted([(500, "overloaded"), (200, "9 5"), (200, "9 5"), (200, b"not json"),
                   (200, "9 5"), (200, "9 5"), (200, "no scores here"), (200, "Fine. Rating: [[6]]")])  # fmt: skip
    cfg = JudgeConfig(base_url=ep.url, model="m", api_key_env="JUDGE_KEY", repeats=2)
    sleeps: list[float] = []
    judge = Judge(cfg, tmp_path / "cache.jsonl", sleep=sleeps.append)
    res = judge_answers(judge, ["q?"], ["answer"], ["reference"], "both")
    pw = res["pairwise"]
    assert pw["score"] == pytest.approx(7.0) and pw["reference_score"] == pytest.approx(7.0)
    assert pw["relative"] == pytest.approx(1.0) and pw["unparsed_replies"] == 0
    single = res["single"]  # an unreadable reply is reported, never scored as 0
    assert single["score"] == 6.0 and single["unparsed_replies"] == 1
    assert "no scores" in single["unparsed"][0]["reply"]
    assert sleeps == [1.0, 1.0]  # the 500 and the non-JSON body were retried after backoff
    assert all(s["auth"] == "Bearer sk-test" for s in ep.seen)
    first = ep.seen[1]["body"]["messages"][1]["content"]
    second = ep.seen[2]["body"]["messages"][1]["content"]
    assert first.index("answer") < first.index("reference")
    assert second.index("reference") < second.index("answer")
    # Everything judged is on disk: a rerun sends no request at all.
    n = len(ep.seen)
    again = Judge(cfg, tmp_path / "cache.jsonl", sleep=sleeps.append)
    assert judge_answers(again, ["q?"], ["answer"], ["reference"], "both") == res
    assert again.requests == 0 and len(ep.seen) == n
    # A refused key is named; an unreachable endpoint says how much is kept.
    ep.replies[:] = [(401, {"error": "bad key"})]
    with pytest.raises(JudgeError, match=r"JUDGE_KEY"):
        judge_answers(again, ["new?"], ["a"], ["r"], "single")
    ep.close()
    gone = Judge(cfg.__class__(**{**cfg.__dict__, "max_retries": 1}), tmp_path / "cache.jsonl",
                 sleep=lambda s: None)  # fmt: skip
    with pytest.raises(JudgeError, match=r"cannot reach.*6 earlier judgments are kept"):
        judge_answers(gone, ["new?"], ["a"], ["r"], "pairwise")


@pytest.fixture
def tiny_run(tmp_path: Path) -> Path:
    data = write_jsonl(tmp_path / "data.jsonl", make_rows())
    cfg = tmp_path / "run.toml"
    cfg.write_text(to_toml(tiny_config(data, federation={"rounds": 1})))
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture
def served(tiny_run: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    exe = Path(sys.executable).with_name("fedit")
    proc = subprocess.Popen(
        [str(exe), "serve", str(tiny_run), "--port", "0", "--max-new-tokens", "12", "--model-id", "fedit"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "serving" in line, proc.stderr.read() if proc.stderr else ""
        yield line.split(" on ", 1)[1].split(" ", 1)[0], proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_openai_api_and_judge_against_it(
    served: tuple[str, subprocess.Popen[str]], tmp_path: Path
) -> None:
    base, proc = served
    with urllib.request.urlopen(f"{base}/models", timeout=30) as r:
        models = json.loads(r.read())
    assert [m["id"] for m in models["data"]] == ["base", "fedit"]
    msg = {"model": "fedit", "messages": [{"role": "user", "content": "Name a river."}]}
    status, reply = _post(f"{base}/chat/completions", msg)
    assert status == 200 and reply["object"] == "chat.completion"
    assert isinstance(reply["choices"][0]["message"]["content"], str)
    assert 0 < reply["usage"]["completion_tokens"] <= 12
    assert _post(f"{base}/chat/completions", msg)[1] == {**reply, "id": ANY, "created": ANY}
    status, err = _post(f"{base}/chat/completions", {"messages": []})
    assert status == 400 and "messages" in err["error"]["message"]
    assert _post(f"{base}/chat/completions", {**msg, "model": "gpt-9"})[0] == 404

    # The judge protocol end to end against the live server: a random tiny model cannot
    # write scores, so every reply is reported unreadable, none becomes a 0.
    cfg = JudgeConfig(base_url=base, model="fedit", repeats=1, max_tokens=12)
    judge = Judge(cfg, tmp_path / "judge.jsonl")
    res = judge_answers(judge, ["Name a river.", "Name a city."], ["Nile", "Rome"],
                        ["The Nile.", "Paris."], "both")  # fmt: skip
    assert judge.requests == 2 * 2 + 2  # two orders per pairwise item, one single grade each
    for mode, replies in (("pairwise", 4), ("single", 2)):
        entry = res[mode]
        assert 0 <= entry["unparsed_replies"] <= replies
        if entry["unparsed_replies"] == replies:
            assert entry["score"] is None and entry["judged_items"] == 0
        assert entry["score"] is None or 1.0 <= entry["score"] <= 10.0
    lines = (tmp_path / "judge.jsonl").read_text().splitlines()
    assert len(lines) == 6
    rerun = Judge(cfg, tmp_path / "judge.jsonl")
    judge_answers(rerun, ["Name a river.", "Name a city."], ["Nile", "Rome"],
                  ["The Nile.", "Paris."], "both")  # fmt: skip
    assert rerun.requests == 0
    assert proc.poll() is None  # bad requests did not take the server down


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY = _Any()


def test_generate_and_eval_commands(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Name a river."}\n{"prompt": "Say hi.", "input": "x"}\n')
    out = tmp_path / "answers.jsonl"
    assert main(["generate", str(tiny_run), "--prompts", str(prompts), "--output", str(out),
                 "--max-new-tokens", "6"]) == 0  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == ["Name a river.", "Say hi."]
    assert all(isinstance(r["output"], str) for r in rows)
    prompts.write_text('{"instruction": "ok"}\n{"input": "no instruction"}\n')
    assert main(["generate", str(tiny_run), "--prompts", str(prompts)]) == 2
    assert f"{prompts}:2: needs a non-empty 'instruction'" in capsys.readouterr().err

    ev = tmp_path / "ev"
    assert main(["eval", str(tiny_run), "--out", str(ev),
                 "--set", "generate.max_new_tokens=6", "--set", "generate.per_category=1"]) == 0  # fmt: skip
    result = json.loads((ev / "eval.json").read_text())
    assert result["eval"]["per_category"] and result["generation"]["answers"] == 4
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "ROUGE-L" in printed


def test_adapter_that_does_not_fit_is_refused(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tiny_run / "adapter"
    args = ["generate", str(tiny_run), "--prompt", "hi", "--adapter", str(adapter)]
    assert main([*args, "--set", "model.name=other/model"]) == 2
    err = capsys.readouterr().err
    assert "trained on base model 'fedit/tiny-llama'" in err and "other/model" in err
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["r"] = 16  # the saved tensors are rank 4
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(args) == 2
    assert "shape" in capsys.readouterr().err
    assert main(["generate", str(tiny_run), "--prompt", "hi", "--adapter", str(tiny_run)]) == 2
    assert "not a saved adapter" in capsys.readouterr().err
    with pytest.raises(ModelError):
        from fedit.inference import load_for_inference

        load_for_inference(load_config(tiny_run / "config.toml"), tiny_run / "nowhere")
