"""`fedit serve` as clients use it: the official OpenAI client streaming, stop sequences,
several adapters at once under concurrent load, the web page in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fedit.cli import main
from fedit.config import to_toml
from tests.conftest import make_rows, tiny_config, write_jsonl

PROMPTS = ["Tell me about the river.", "Name a city.", "What is music?", "Describe bread."]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny runs over one base model whose adapters answer differently."""
    tmp = tmp_path_factory.mktemp("serve")
    data = write_jsonl(tmp / "data.jsonl", make_rows())
    out = {}
    for name, extra in (("fed", {}), ("hot", {"client": {"lr": 0.2, "max_steps": 6}})):
        cfg = tmp / f"{name}.toml"
        rounds = {"rounds": 1 if name == "fed" else 2}
        cfg.write_text(to_toml(tiny_config(data, federation=rounds, **extra)))
        assert main(["run", str(cfg), "--out", str(tmp / name), "--quiet"]) == 0
        out[name] = tmp / name
    return out


@pytest.fixture(scope="module")
def server(runs: dict[str, Path]) -> Iterator[str]:
    exe = Path(sys.executable).with_name("fedit")
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            str(runs["fed"]),
            f"hot={runs['hot']}",
            "--port",
            "0",
            "--max-new-tokens",
            "16",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "serving base, fed, hot on " in line, proc.stderr.read() if proc.stderr else ""
        yield line.split(" on ", 1)[1].split("/v1", 1)[0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log = proc.stderr.read() if proc.stderr else ""
        # Every generation left an access line with its latency and token counts.
        assert "POST /v1/chat/completions 200" in log and "completion=" in log, log


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(server: str, model: str, text: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
    status, reply = post(f"{server}/v1/chat/completions", body)
    assert status == 200, reply
    return reply


def content(reply: dict[str, Any], i: int = 0) -> str:
    return reply["choices"][i]["message"]["content"]


def test_openai_client_streams_the_same_answer(server: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["base", "fed", "hot"]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    whole = client.chat.completions.create(model="hot", messages=messages, max_tokens=12)
    stream = client.chat.completions.create(
        model="hot",
        messages=messages,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    deltas, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            deltas.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert len([d for d in deltas if d]) > 1  # it really streamed, token by token
    assert "".join(deltas) == whole.choices[0].message.content != ""
    assert finish == whole.choices[0].finish_reason == "length"
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens == 12

    # The legacy completions endpoint streams too, over a raw prompt.
    text = client.completions.create(model="fed", prompt="The river", max_tokens=6)
    parts = client.completions.create(model="fed", prompt="The river", max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in parts) == text.choices[0].text


def test_stop_cuts_the_answer(server: str) -> None:
    full = content(chat(server, "hot", PROMPTS[0]))
    assert len(full) > 8
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)].rstrip()
    for value in (stop, ["never-there", stop]):
        reply = chat(server, "hot", PROMPTS[0], stop=value)
        assert content(reply) == cut and reply["choices"][0]["finish_reason"] == "stop"
    # Streamed, the stop string's first characters are held back, never sent and taken back.
    assert "".join(_stream(server, "hot", PROMPTS[0], stop=stop)) == cut


def _stream(server: str, model: str, text: str, **extra: Any) -> list[str]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "stream": True}
    req = urllib.request.Request(
        f"{server}/v1/chat/completions",
        json.dumps({**body, **extra}).encode(),
        {"Content-Type": "application/json"},
    )
    out = []
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    out.append(c["delta"].get("content") or "")
    return out


def test_concurrent_mixed_adapters_match_sequential_answers(server: str) -> None:
    jobs = [(model, p) for p in PROMPTS for model in ("fed", "hot")]
    assert len(jobs) == 8
    sequential = [content(chat(server, m, p)) for m, p in jobs]
    # The adapters do differ: a server that mixed them up would be caught.
    assert any(sequential[i] != sequential[i + 1] for i in range(0, 8, 2))
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda j: content(chat(server, *j)), jobs))
    assert parallel == sequential
    with ThreadPoolExecutor(8) as pool:  # streaming and not, at once
        streamed = list(pool.map(lambda j: "".join(_stream(server, *j)), jobs))
    assert streamed == sequential
    base = content(chat(server, "base", PROMPTS[0]))
    assert base == content(chat(server, "base", PROMPTS[0]))


def test_sampling_settings_and_refusals(server: str) -> None:
    a = chat(server, "hot", PROMPTS[1], temperature=1.0, seed=7, n=2, max_tokens=8)
    b = chat(server, "hot", PROMPTS[1], temperature=1.0, seed=7, n=2, max_tokens=8)
    assert [content(a, i) for i in (0, 1)] == [content(b, i) for i in (0, 1)]
    assert len(a["choices"]) == 2 and a["usage"]["completion_tokens"] <= 16
    parts = [{"type": "text", "text": PROMPTS[0]}]
    assert content(chat(server, "hot", parts)) == content(chat(server, "hot", PROMPTS[0]))
    # A follow-up turn carries the earlier ones into the prompt.
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": PROMPTS[0]},
    ]
    reply = post(f"{server}/v1/chat/completions", {"model": "hot", "messages": turns})[1]
    assert (
        reply["usage"]["prompt_tokens"] > chat(server, "hot", PROMPTS[0])["usage"]["prompt_tokens"]
    )

    url = f"{server}/v1/chat/completions"
    msg = {"messages": [{"role": "user", "content": "x"}]}
    for body, status, words in [
        ({**msg, "temperature": 5}, 400, "temperature"),
        ({**msg, "model": "gpt-9"}, 404, "gpt-9"),
        ({**msg, "max_tokens": 10**6}, 400, "max_tokens"),
        ({**msg, "stop": [1]}, 400, "stop"),
        ({**msg, "n": 50}, 400, "n:"),
        ({**msg, "tools": [{"type": "function"}]}, 400, "tools"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "image_url"),
    ]:
        got, err = post(url, body)
        assert got == status and words in err["error"]["message"], (body, err)
    got, err = post(f"{server}/v1/completions", {"prompt": [1, 2]})
    assert got == 400 and "prompt" in err["error"]["message"]


def test_health_models_cors_and_page(server: str) -> None:
    with urllib.request.urlopen(f"{server}/health", timeout=30) as r:
        assert json.loads(r.read())["models"] == ["base", "fed", "hot"]
    req = urllib.request.Request(f"{server}/v1/models", headers={"Origin": "http://example.org"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["access-control-allow-origin"] == "*"
    with urllib.request.urlopen(f"{server}/fedit/models", timeout=30) as r:
        info = json.loads(r.read())
    assert [m["template"] for m in info["models"]] == ["alpaca"] * 3
    assert "### Instruction:\n{instruction}" in info["models"][1]["prompt_format"]
    assert info["models"][2]["rounds"] == 2 and "heldout_loss" in info["models"][2]
    with urllib.request.urlopen(f"{server}/fedit/questions", timeout=60) as r:
        questions = json.loads(r.read())["questions"]
    assert questions and {"instruction", "reference", "category"} <= set(questions[0])
    with urllib.request.urlopen(f"{server}/", timeout=30) as r:
        assert b"Arena" in r.read()


def test_serve_refuses_bad_sources(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(tmp_path)]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    assert main(["serve", str(runs["fed"]), str(runs["fed"])]) == 2
    assert "used twice" in capsys.readouterr().err
    assert main(["serve", f"base={runs['fed']}"]) == 2
    assert "reserved" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver",
)
def test_arena_page_in_a_real_browser(server: str, tmp_path: Path) -> None:
    """Headless Chromium opens the page, picks a held-out question, asks two models and waits
    for both streamed answers; the screenshot is kept (FEDIT_SCREENSHOT names where)."""
    from tools.arena_screenshot import drive_arena

    shot = Path(os.environ.get("FEDIT_SCREENSHOT") or tmp_path / "arena.png")
    t0 = time.perf_counter()
    answers = drive_arena(server, ["fed", "hot"], shot, CHROMIUM or "", DRIVER or "")
    assert set(answers) == {"fed", "hot"}
    assert all(a["stats"].endswith(")") and "tokens in" in a["stats"] for a in answers.values())
    assert answers["hot"]["text"]  # (the lightly tuned tiny adapter may answer blanks)
    assert answers["fed"]["reference"]  # a held-out question was asked, its reference shown
    assert shot.stat().st_size > 10_000, "the screenshot is empty"
    assert time.perf_counter() - t0 < 120


def test_a_compare_folder_serves_one_model_per_arm(runs: dict[str, Path], tmp_path: Path) -> None:
    from fedit.serve import expand_sources

    compare = tmp_path / "compare"
    compare.mkdir()
    shutil.copy(runs["fed"] / "config.toml", compare / "config.toml")
    for arm in ("fedit", "centralized", "local_client_0001"):
        shutil.copytree(runs["fed"], compare / arm)
    (compare / "answers").mkdir()  # not an arm: no adapter/
    names = [s.name for s in expand_sources([str(compare)])]
    assert names == ["centralized", "fedit", "local_client_0001"]
    named = expand_sources([f"cmp={compare}", f"solo={runs['hot']}"])
    assert [s.name for s in named] == [
        "cmp/centralized",
        "cmp/fedit",
        "cmp/local_client_0001",
        "solo",
    ]
    assert named[-1].info["rounds"] == 2


def _battle_answer(server: str, bid: str, side: str) -> str:
    req = urllib.request.Request(f"{server}/fedit/battles/{bid}/{side}", b"{}",
                                 {"Content-Type": "application/json"})  # fmt: skip
    text, done = "", False
    with urllib.request.urlopen(req, timeout=120) as r:
        raw = r.read().decode()
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            text += event.get("text", "")
            done = done or event.get("done", False)
    assert done, raw
    assert "fed" not in raw.replace("fedit", "") and "hot" not in raw  # no model is named
    return text


def test_blind_battles_and_votes_under_concurrent_voters(
    server: str, runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Two hidden models per battle, names shown only after the vote; parallel voters lose
    no vote; `fedit votes` counts exactly the votes cast."""
    from fedit.evaluate.votes import load_votes

    assert post(f"{server}/fedit/battles", {"prompt": " "})[0] == 400
    status, made = post(f"{server}/fedit/battles", {"prompt": PROMPTS[0]})
    assert status == 200 and set(made) == {"id"}  # the sides' models are not told
    assert post(f"{server}/fedit/battles/{made['id']}/vote", {"winner": "a"})[0] == 409  # early
    before = len(load_votes(runs["fed"])) if (runs["fed"] / "votes.sqlite").exists() else 0
    ids = [made["id"]]
    ids += [post(f"{server}/fedit/battles", {"prompt": p})[1]["id"] for p in PROMPTS[1:] * 2]
    for bid in ids:
        for side in ("a", "b"):
            _battle_answer(server, bid, side)
    winners = ["a", "b", "tie", "bad", "a", "a", "b"]
    with ThreadPoolExecutor(max_workers=len(ids)) as pool:
        replies = list(pool.map(lambda x: post(f"{server}/fedit/battles/{x[0]}/vote",
                                               {"winner": x[1]}), zip(ids, winners, strict=True)))  # fmt: skip
    assert all(s == 200 for s, _ in replies), replies
    assert all({r["model_a"], r["model_b"]} <= {"base", "fed", "hot"} for _, r in replies)
    assert all(r["model_a"] != r["model_b"] for _, r in replies)
    assert post(f"{server}/fedit/battles/{ids[0]}/vote", {"winner": "b"})[0] == 409  # once
    assert post(f"{server}/fedit/battles/{ids[1]}/vote", {"winner": "x"})[0] == 400
    assert post(f"{server}/fedit/battles/nope/vote", {"winner": "a"})[0] == 404
    rows = load_votes(runs["fed"])
    assert len(rows) == before + len(ids)
    mine = [r for r in rows if r["id"] in ids]
    assert sorted(r["winner"] for r in mine) == sorted(winners)
    assert all(r["answer_a"] is not None and r["answer_b"] is not None for r in mine)
    assert main(["votes", str(runs["fed"])]) == 0
    out = capsys.readouterr().out
    assert f"{len(rows)} votes: A " in out and "| 1 |" in out and "Bradley-Terry" in out


@pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver",
)
def test_votes_cast_in_a_real_browser_are_counted(
    server: str, runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Chromium casts blind votes on the page; the names show only after each vote, and
    `fedit votes` counts exactly those votes."""
    from tools.arena_screenshot import drive_votes

    from fedit.evaluate.votes import load_votes

    before = len(load_votes(runs["fed"])) if (runs["fed"] / "votes.sqlite").exists() else 0
    cast = drive_votes(server, ["a", "b", "tie"], CHROMIUM or "", DRIVER or "")
    assert [c["hidden"] for c in cast] == ["Model A / Model B"] * 3  # no name before the vote
    assert all("A was " in c["result"] and ", B was " in c["result"] for c in cast)
    rows = load_votes(runs["fed"])
    assert len(rows) == before + 3
    assert [r["winner"] for r in rows[-3:]] == ["a", "b", "tie"]
    for c, r in zip(cast, rows[-3:], strict=True):
        assert f"A was {r['model_a']}, B was {r['model_b']}" in c["result"]
    assert main(["votes", str(runs["fed"])]) == 0
    assert f"{before + 3} votes: A " in capsys.readouterr().out


def test_judge_check_against_fedit_serve(server: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """`fedit judge-check` with a served fedit model as the judge: the recorded Vicuna-80
    pairs go over HTTP and the agreement table is printed (a random tiny model's replies hold
    no scores: they are counted as unparsed, not guessed)."""
    from fedit.data.records import DataError
    from fedit.evaluate.vicuna import vicuna_folder

    try:
        vicuna_folder()
    except DataError as e:
        pytest.skip(f"the Vicuna-80 files are not here: {e}")
    args = ["judge-check", "--set", f"judge.base_url={server}/v1", "--set", "judge.model=fed",
            "--set", "judge.max_tokens=8", "--limit", "3", "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Judge fed at" in out and "| **all** | 3 |" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["pairs"] == 3 and 0 <= report["parsed"] <= 3
