"""Every bad input we know of, tried through the `fedit` command: the message, and when it came.

    python benchmarks/bad_inputs.py                        # print the table
    python benchmarks/bad_inputs.py --write docs/reliability.md

Each case runs `fedit ...` in this process on the tiny model and small synthetic data (made
here, in a temporary folder), with probes on model loading and on the round loop. "when" is

- before loading: no model was loaded yet (config, data, folders, model files);
- before round 1: the model was loaded, no round started;
- mid-run (round N): the error came while round N ran;
- traceback: the command raised something other than fedit's own error (a defect).

`--write FILE` replaces the table between `<!-- bad-inputs:start -->` and `<!-- bad-inputs:end -->`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import make_rows, tiny_config, write_jsonl

import fedit.models
import fedit.server.server
from fedit.cli import main
from fedit.config import to_toml
from fedit.models import tiny_model, tiny_tokenizer

START, END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"


class Probe:
    """Records how far a command got: model loads and round starts."""

    def __init__(self) -> None:
        self.model_loaded = False
        self.round: int | None = None
        self._load = fedit.models.load_model
        self._round = fedit.server.server.Server.run_round

    def __enter__(self) -> Probe:
        probe = self

        def load_model(*a: Any, **k: Any) -> Any:
            probe.model_loaded = True
            return probe._load(*a, **k)

        def run_round(server: Any, rnd: int, *a: Any, **k: Any) -> Any:
            probe.round = rnd
            return probe._round(server, rnd, *a, **k)

        fedit.models.load_model = load_model  # type: ignore[assignment]
        fedit.server.server.Server.run_round = run_round  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        fedit.models.load_model = self._load  # type: ignore[assignment]
        fedit.server.server.Server.run_round = self._round  # type: ignore[method-assign]


def attempt(argv: list[str], root: Path) -> tuple[str, str]:
    """(message, when) for one command that is expected to fail."""
    err = io.StringIO()
    with (
        Probe() as probe,
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            rc = main(argv)
        except Exception as e:  # a traceback a user would see
            return f"{type(e).__name__}: {e}".splitlines()[0], "traceback"
    lines = [x for x in err.getvalue().splitlines() if x.startswith("fedit: error:")]
    if rc == 0 or not lines:
        return f"(no error, exit code {rc})", "not caught"
    message = lines[-1].removeprefix("fedit: error: ")
    message = message.replace(str(root) + "/", "").replace(str(root), ".")
    if probe.round is not None:
        when = f"mid-run (round {probe.round})"
    elif probe.model_loaded:
        when = "before round 1"
    else:
        when = "before loading"
    return message, when


def cases(root: Path) -> list[tuple[str, Callable[[], list[str]]]]:
    rows = make_rows()
    data = write_jsonl(root / "data.jsonl", rows)

    def config(name: str = "run", data_path: Path = data, **sections: Any) -> Path:
        p = root / f"{name}.toml"
        p.write_text(to_toml(tiny_config(data_path, **sections)))
        return p

    def run(cfg: Path, *extra: str, out: str = "out") -> list[str]:
        return ["run", str(cfg), "--out", str(root / out), "--quiet", *extra]

    def text_file(name: str, text: str | bytes) -> Path:
        p = root / name
        p.write_bytes(text.encode() if isinstance(text, str) else text)
        return p

    def model_folder(broken: str) -> Path:
        folder = root / f"model-{broken}"
        if not folder.exists():
            tok = tiny_tokenizer()
            tiny_model(tok).save_pretrained(folder)
            tok.save_pretrained(folder)
            if broken == "config":
                (folder / "config.json").write_text("{}")
            else:
                for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json"):
                    (folder / n).unlink(missing_ok=True)
        return folder

    def resumed(change: Callable[[], list[str]]) -> Callable[[], list[str]]:
        def go() -> list[str]:
            d = write_jsonl(root / "resume.jsonl", rows)
            cfg = config("resume", d)
            main(run(cfg, "--set", "federation.rounds=1", out="resumed"))
            return change() + run(cfg, "--resume", out="resumed")[len(change()) :]

        return go

    long = " ".join(["word"] * 200)
    long_rows = [{**r, "instruction": long} if r["category"] == "summarization" else r
                 for r in rows]  # fmt: skip
    natural = {"method": "natural", "natural_field": "category", "num_clients": 0}
    chat_image = {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
        {"role": "assistant", "content": "A cat."}]}  # fmt: skip
    read_only = Path("/sys/kernel") if os.geteuid() == 0 else root / "ro"

    def ro() -> list[str]:
        if read_only != Path("/sys/kernel"):
            read_only.mkdir(exist_ok=True)
            read_only.chmod(0o555)
        return run(config(), out=str(read_only / "out"))

    def changed_data() -> list[str]:
        main(run(config("resume2", write_jsonl(root / "r2.jsonl", rows)), "--set",
                 "federation.rounds=1", out="resumed2"))  # fmt: skip
        write_jsonl(root / "r2.jsonl", [{**r, "response": r["response"] + "!"} for r in rows])
        return run(root / "resume2.toml", "--resume", out="resumed2")

    def changed_config() -> list[str]:
        main(run(config("resume3"), "--set", "federation.rounds=1", out="resumed3"))
        return run(root / "resume3.toml", "--resume", "--set", "client.lr=0.5", out="resumed3")

    def eval_other_rank() -> list[str]:
        main(run(config("rank8", lora={"r": 8, "alpha": 16}), out="rank8"))
        adapter = root / "rank8" / "adapter"
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
        return ["eval", str(root / "rank8"), "--no-generate"]

    def used_partition_folder() -> list[str]:
        main(["partition", str(config()), "--out", str(root / "split")])
        return ["partition", str(config()), "--out", str(root / "split")]

    return [
        ("unknown config key", lambda: run(config(), "--set", "client.lrr=0.1")),
        ("bad value on the command line", lambda: run(config(), "--set", "privacy.delta=2")),
        ("bad value in the config file",
         lambda: run(text_file("bad.toml", config().read_text().replace(
             "delta = 1e-05", "delta = 2.0")))),
        ("config file that is a folder", lambda: run(root)),
        ("config file that does not exist", lambda: run(root / "nope.toml")),
        ("invalid TOML", lambda: run(text_file("broken.toml", "[federation\nrounds = 2"))),
        ("unknown strategy name", lambda: run(config(), "--set", "federation.strategy=fedbest")),
        ("data file that does not exist", lambda: run(config(data_path=root / "none.jsonl"))),
        ("malformed JSON line",
         lambda: run(config(data_path=text_file("bad.jsonl", json.dumps(rows[0]) + "\n{oops\n")))),
        ("non-UTF-8 bytes",
         lambda: run(config(data_path=text_file("latin1.jsonl", b'{"instruction": "caf\xe9"}\n')))),
        ("empty data file", lambda: run(config(data_path=text_file("empty.jsonl", "")))),
        ("a record without its response",
         lambda: run(config(data_path=write_jsonl(root / "noresp.jsonl",
                                                  [{"instruction": "Hi", "category": "x"}]),
                            data={"format": "dolly"}))),
        ("a named category field that is not there",
         lambda: run(config(), "--set", "data.fields={category='topic'}")),
        ("corrupt Parquet file",
         lambda: run(config(data_path=text_file("bad.parquet", b"PAR1 no")))),
        ("chat turn with an image part",
         lambda: run(config(data_path=write_jsonl(root / "chat.jsonl", [chat_image])))),
        ("model folder whose config.json is {}",
         lambda: run(config(model={"name": str(model_folder("config"))}))),
        ("model folder without a tokenizer",
         lambda: run(config(model={"name": str(model_folder("tokenizer"))}))),
        ("model name that resolves nowhere",
         lambda: run(config(), "--set", "model.name=/no/model")),
        ("LoRA target module the model lacks",
         lambda: run(config(), "--set", "lora.target_modules=['nope']")),
        ("--out naming a file", lambda: run(config(), out=str(text_file("taken", "x")))),
        ("--out in a read-only place", ro),
        ("partition --out naming a file",
         lambda: ["partition", str(config()), "--out", str(text_file("taken2", "x"))]),
        ("partition into a folder holding an earlier split", used_partition_folder),
        ("more clients than records",
         lambda: run(config(), "--set", "partition.num_clients=500")),
        ("a client smaller than one optimizer step",
         lambda: run(config(), "--set", "partition.num_clients=12", "--set",
                     "client.batch_size=8", "--set", "client.micro_batch_size=4")),
        ("an adapter of another rank given to fedit eval", eval_other_rank),
        ("more clients per round than clients",
         lambda: run(config(), "--set", "federation.clients_per_round=9")),
        ("federation.min_clients above clients_per_round",
         lambda: run(config(), "--set", "federation.min_clients=3")),
        ("federation.min_clients above a fractional clients_per_round",
         lambda: run(config(), "--set", "federation.clients_per_round=0.5",
                     "--set", "federation.min_clients=3")),
        ("a client whose examples all fall past data.cutoff_len",
         lambda: run(config("long", write_jsonl(root / "long.jsonl", long_rows),
                            partition=natural, data={"test_per_category": 0}))),
        ("faults.inject naming a client that does not exist",
         lambda: run(config(), "--set", "faults.inject=['nan:9:1']")),
        ("faults.inject naming a round past the last",
         lambda: run(config(), "--set", "faults.inject=['fail:1:7']")),
        ("faults.crash past the last round",
         lambda: run(config(), "--set", "faults.crash=train:9")),
        ("a client-speed distribution that does not exist",
         lambda: run(config(), "--set", "system.speed='fast'")),
        ("a profiles CSV with a negative speed",
         lambda: run(config(), "--set", "system.profiles='"
                     + str(text_file("profiles.csv", "client,speed\n0,1\n1,-2\n")) + "'")),
        ("secure aggregation with the median",
         lambda: run(config(), "--set", "privacy.secure_aggregation=true",
                     "--set", "strategy.robust=median")),
        ("estimated memory above the machine's",
         lambda: run(config(), "--set", "data.cutoff_len=1000000")),
        ("resume after the data changed", changed_data),
        ("resume with another config value", changed_config),
        ("existing run without --resume",
         lambda: (main(run(config("again"), out="again")), run(config("again"), out="again"))[1]),
    ]  # fmt: skip


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| bad input | what `fedit` says | caught |", "|---|---|---|"]
    for what, message, when in rows:
        message = re.sub(r"/tmp/[^ ,;:'\"]+/", "", message).replace("|", "\\|")
        lines.append(f"| {what} | `{message}` | {when} |")
    return "\n".join(lines)


def main_() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--write", help="replace the table in this markdown file")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    with tempfile.TemporaryDirectory(prefix="fedit-bad-") as tmp:
        root = Path(tmp).resolve()
        for what, make in cases(root):
            with (
                contextlib.redirect_stderr(io.StringIO()),
                contextlib.redirect_stdout(io.StringIO()),
            ):
                argv = make()
            message, when = attempt(argv, root)
            results.append((what, message, when))
            print(f"{when:>20}  {what}", file=sys.stderr)
    text = table(results)
    print(text)
    if args.write:
        path = Path(args.write)
        doc = path.read_text(encoding="utf-8")
        a, b = doc.index(START) + len(START), doc.index(END)
        path.write_text(doc[:a] + "\n" + text + "\n" + doc[b:], encoding="utf-8")
    bad = [r for r in results if r[2] in ("traceback", "not caught")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main_())
