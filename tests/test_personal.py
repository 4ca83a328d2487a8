"""Per-client evaluation: each client's own held-out data, never trained on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedit.client.runtime import ClientRuntime
from fedit.config import ConfigError, variant
from fedit.data.partition import load_partition
from fedit.engines.inprocess import InProcess
from fedit.lora import load_lora_model
from fedit.protocol import Update
from fedit.recipe import run_federation
from tests.conftest import tiny_config


def test_client_test_fraction_holds_out_each_clients_own_records(data_file: Path) -> None:
    plain = load_partition(tiny_config(data_file))
    cfg = tiny_config(data_file, data={"client_test_fraction": 0.25})
    split = load_partition(cfg)
    assert split.test == plain.test and plain.client_tests == {}
    for c, recs in enumerate(plain.clients):
        own, train = split.client_tests[c], split.clients[c]
        assert len(own) == round(0.25 * len(recs)) and len(train) + len(own) == len(recs)
        assert sorted(map(repr, own + train)) == sorted(map(repr, recs))
        assert not {repr(r) for r in own} & {repr(r) for r in train}  # never trained on
    assert load_partition(cfg).client_tests == split.client_tests  # seeded, stable
    # A local-only arm keeps its client's own test, numbered as its clients are.
    only = load_partition(variant(cfg, partition={"only": [2]}))
    assert only.client_tests == {0: split.client_tests[2]} and only.clients == [split.clients[2]]
    pooled = load_partition(variant(cfg, partition={"pooled": True}))
    assert pooled.client_tests == {} and len(pooled.clients) == 1


def test_a_node_with_its_own_file_holds_out_what_the_simulation_does(
    tmp_path: Path, data_file: Path
) -> None:
    from fedit.data.partition import write_partition
    from fedit.engines.flower.node import NodeState

    cfg = tiny_config(data_file, data={"client_test_fraction": 0.25})
    split = load_partition(cfg)
    parts = tmp_path / "parts"
    write_partition(load_partition(variant(cfg, data={"client_test_fraction": 0.0})), parts)
    write_partition(split, tmp_path / "with-own")
    own_file = tmp_path / "with-own" / "clients" / "client_0002.own.jsonl"
    assert own_file.is_file()  # `fedit partition` writes each client's own records too
    config_json = json.dumps(cfg.to_dict())
    for node_config in (  # its whole file, held out on the node / train and own files apart
        {"data-path": str(parts / "clients" / "client_0002.jsonl"), "client-id": 2},
        {"data-path": str(tmp_path / "with-own" / "clients" / "client_0002.jsonl"),
         "own-data-path": str(own_file), "client-id": 2},
    ):  # fmt: skip
        node = NodeState()
        node.setup(config_json, node_config)
        assert [r.instruction for r in node.runtime.data[2]] == [
            r.instruction for r in split.clients[2]
        ]
        assert [r.instruction for r in node.runtime.own[2]] == [
            r.instruction for r in split.client_tests[2]
        ]


def test_own_data_evaluation_in_metrics_and_summary(tmp_path: Path, data_file: Path) -> None:
    cfg = tiny_config(data_file, data={"client_test_fraction": 0.25})
    result = run_federation(cfg, tmp_path / "run")
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    own = rows[-1]["eval"]["own_data"]
    assert set(own["clients"]) == {"0", "1", "2", "3"}
    losses = [v["loss"] for v in own["clients"].values()]
    assert own["worst"] == max(losses) and abs(own["mean"] - sum(losses) / 4) < 1e-12
    assert rows[0]["eval"]["own_data"]["mean"] != own["mean"]  # the base model scored too
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["own_data"] == own == result.history[-1]["eval"]["own_data"]


class Recording:
    """The in-process engine, keeping every message that crosses it (both ways)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.sent, self.received = inner, [], []
        self.sizes, self.categories = inner.sizes, inner.categories

    def launch(self, tasks: Any) -> Any:
        out = []
        for task in tasks:

            def run(task: Any = task) -> Any:
                p = task.to_payload()
                self.sent.append(p)
                reply = self.inner.runtime.handle(p, "rec")
                self.received.append(reply)
                return Update.from_payload(reply)

            out.append((task.client, run))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _run(tmp: Path, cfg: Any, rounds: int, resume: bool = False) -> tuple[Any, Recording]:
    cfg = variant(cfg, federation={"rounds": rounds})
    split = load_partition(cfg)
    lm = load_lora_model(cfg)
    runtime = ClientRuntime(cfg, lm, dict(enumerate(split.clients)), own=split.client_tests,
                            state_dir=tmp / "client-state")  # fmt: skip
    engine = Recording(InProcess(runtime))
    return run_federation(cfg, tmp, resume=resume, engine=engine), engine


def latest(files: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each client's newest personal tensors (file names sort by round)."""
    return {k.split("/", 1)[0] + "/" + k.rsplit("/", 1)[1]: v for k, v in sorted(files.items())}


def _personal_files(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run / "client-state" / "personal").rglob("*.safetensors")):
        out.update({f"{f.parent.name}/{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.parametrize("method", ["ditto", "fedsa", "finetune", "feddpa"])
def test_each_method_keeps_its_state_home_and_resumes_exactly(
    method: str, tmp_path: Path, data_file: Path
) -> None:
    cfg = tiny_config(data_file, data={"client_test_fraction": 0.25},
                      personalization={"method": method, "finetune_steps": 2})  # fmt: skip
    whole, rec = _run(tmp_path / "whole", cfg, 3)
    own = whole.history[-1]["eval"]["own_data"]
    assert all("personal" in v for v in own["clients"].values())  # every client has its model
    assert 0.0 <= own["helped"] <= 1.0 and own["helped"] + own["hurt"] <= 1.0
    mine = [v["personal"] - v["loss"] for v in own["clients"].values()]
    assert own["gain"] == pytest.approx(sum(mine) / len(mine))  # the same clients, paired
    if method != "finetune":  # only the final round's evaluation fine-tunes
        first = whole.history[1]["eval"]["own_data"]["clients"].values()
        assert sum("personal" in v for v in first) == 2  # the round's two clients
    else:
        assert not any(
            "personal" in v for v in whole.history[1]["eval"]["own_data"]["clients"].values()
        )
    sent_up = [set(p.arrays[g]) for p in rec.received for g in p.arrays]
    trained = [s for s in sent_up if s]
    assert trained, "no update went up"
    if method == "fedsa":  # A only on the wire; B stays home
        assert all(all(".lora_A." in k for k in s) for s in trained)
    else:
        assert any(any(".lora_B." in k for k in s) for s in trained)
    personal = _personal_files(tmp_path / "whole")
    assert personal
    if method == "finetune":  # made at the final evaluation, kept for --client N
        assert all("/round_0003.safetensors/" in k for k in personal)
    # The personal state is in no message, either way.
    wire = [v for p in rec.sent + rec.received for g in p.arrays.values() for v in g.values()]
    for v in personal.values():
        assert not any(w.shape == tuple(v.shape) and np.array_equal(w, v.numpy()) for w in wire)
    # Interrupted after round 2 and resumed: the same global adapter and personal states.
    _run(tmp_path / "cut", cfg, 2)
    resumed, _ = _run(tmp_path / "cut", cfg, 3, resume=True)
    assert all(torch.equal(resumed.adapter[k], whole.adapter[k]) for k in whole.adapter)
    assert latest(_personal_files(tmp_path / "cut")).keys() == latest(personal).keys()
    for k, v in latest(personal).items():
        assert torch.equal(latest(_personal_files(tmp_path / "cut"))[k], v)
    assert resumed.history[-1]["eval"]["own_data"] == own


def test_ditto_pulls_toward_the_global_adapter_not_its_start(
    data_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedit.client import train as train_mod
    from fedit.lora import get_adapter
    from fedit.protocol import ClientPlan
    from tests.conftest import client_runtime

    # The proximal gradient mu (v - w_global), on hand numbers.
    p = torch.nn.Parameter(torch.tensor([1.0, 3.0]))
    p.grad = torch.zeros(2)
    train_mod._adjust_gradients(
        {"w": p}, ClientPlan(prox_mu=0.5), {"w": torch.tensor([0.0, 1.0])}, {}
    )
    assert torch.allclose(p.grad, torch.tensor([0.5, 1.0]))
    # Ditto's personal step starts from v and is pulled toward the global adapter w.
    runtime = client_runtime(tiny_config(data_file))
    model = runtime.lm.model
    w = get_adapter(model)
    v = {k: t + 0.1 for k, t in w.items()}
    seen: dict[str, torch.Tensor] = {}
    real = train_mod._adjust_gradients

    def spy(params: Any, plan: Any, anchor: Any, masks: Any) -> None:
        seen.update({k: a.clone() for k, a in anchor.items()})
        real(params, plan, anchor, masks)

    monkeypatch.setattr(train_mod, "_adjust_gradients", spy)
    train_mod.train_local(model, v, runtime.examples(0), runtime.cfg.client, client_id=0, seed=1,
                          pad_token_id=runtime.lm.pad_id, plan=ClientPlan(prox_mu=0.5),
                          anchor=w)  # fmt: skip
    assert seen and all(torch.equal(seen[k], w[k]) for k in seen)


def test_feddpa_mixes_two_adapters_and_weighs_them_per_instance(data_file: Path) -> None:
    from fedit.client.batching import collate, token_losses
    from fedit.client.mixing import Mixture, fresh_adapter
    from fedit.client.personal import local_weight
    from fedit.client.train import train_local
    from fedit.lora import get_adapter, set_adapter
    from tests.conftest import client_runtime

    # The local adapter's weight: max_weight x the mean cosine similarity, in [0, 1].
    refs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert local_weight(torch.tensor([2.0, 0.0]), refs, 0.5) == pytest.approx(0.25)
    assert local_weight(torch.tensor([1.0, 1.0]), refs, 1.0) == pytest.approx(2**-0.5)
    assert local_weight(torch.tensor([-1.0, -1.0]), refs, 0.5) == 0.0

    runtime = client_runtime(tiny_config(data_file))
    model, pad = runtime.lm.model, runtime.lm.pad_id
    model.eval()  # no LoRA dropout: the losses compare exactly
    batch = collate(runtime.examples(0)[:2], pad)

    def loss() -> torch.Tensor:
        with torch.inference_mode():
            return token_losses(model, batch)[0]

    g = {k: v + 0.05 * torch.randn_like(v) for k, v in get_adapter(model).items()}
    local = {k: v + 0.05 * torch.randn_like(v) for k, v in g.items()}
    zero_b = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in local.items()}
    half_b = {k: v * 0.3 if ".lora_B." in k else v for k, v in local.items()}
    set_adapter(model, g)
    alone_g = loss()
    set_adapter(model, half_b)
    alone_scaled = loss()
    set_adapter(model, local)
    alone = loss()
    with Mixture(model, g) as mix:  # w * dW_own + (1 - w) * dW_other
        mix.weight(1.0)
        assert torch.allclose(loss(), alone, atol=1e-5)
        mix.weight(0.0)
        assert torch.allclose(loss(), alone_g, atol=1e-5)
    with Mixture(model, zero_b) as mix:  # the other adds nothing: the own B scaled by w
        mix.weight(0.3)
        assert torch.allclose(loss(), alone_scaled, atol=1e-5)
    with Mixture(model, local) as mix:  # the same adapter twice: any mix is that adapter
        mix.weight(0.7)
        assert torch.allclose(loss(), alone, atol=1e-5)
    assert torch.equal(loss(), alone)  # restored: the own adapter alone, at its own scaling
    # Training inside a mixture trains the own adapter only; the other stays frozen.
    with Mixture(model, g) as mix:
        mix.weight(0.5)
        up = train_local(model, fresh_adapter(g, 3), runtime.examples(0), runtime.cfg.client,
                         client_id=0, seed=1, pad_token_id=pad)  # fmt: skip
    assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".fedit_other." in n)
    assert any(not torch.equal(up.state[k], v) for k, v in fresh_adapter(g, 3).items())
    fresh = fresh_adapter(g, 3)
    assert all(torch.equal(fresh[k], v) for k, v in fresh_adapter(g, 3).items())  # seeded
    assert all(float(v.abs().max()) == 0 for k, v in fresh.items() if ".lora_B." in k)


def test_personal_state_in_a_pool_of_workers(tmp_path: Path, data_file: Path) -> None:
    """A client trains in any worker of the pool: its personal state is on the run's disk, so
    the pool trains, scores and resumes what one process does."""
    cfg = tiny_config(data_file, data={"client_test_fraction": 0.25},
                      federation={"rounds": 3, "clients_per_round": 3},
                      personalization={"method": "feddpa"})  # fmt: skip
    alone = run_federation(cfg, tmp_path / "alone")
    pool_cfg = variant(cfg, federation={"workers": 2})
    run_federation(variant(pool_cfg, federation={"rounds": 2}), tmp_path / "pool")
    pooled = run_federation(pool_cfg, tmp_path / "pool", resume=True)
    for k in alone.adapter:
        assert torch.allclose(alone.adapter[k], pooled.adapter[k], atol=1e-5), k
    mine, theirs = (latest(_personal_files(tmp_path / n)) for n in ("alone", "pool"))
    assert mine.keys() == theirs.keys() and mine
    for k, v in mine.items():
        assert torch.allclose(v, theirs[k], atol=1e-5), k
    want, got = (r.history[-1]["eval"]["own_data"]["clients"] for r in (alone, pooled))
    assert {c for c, v in got.items() if "personal" in v} == {c for c in mine_clients(mine)}
    for c, v in want.items():
        if "personal" in v:
            assert abs(got[c]["personal"] - v["personal"]) < 1e-4


def mine_clients(files: dict[str, torch.Tensor]) -> set[str]:
    """The clients (as own_data names them) with a personal state among `files`."""
    return {str(int(k.split("/", 1)[0].removeprefix("client_"))) for k in files}


def test_personalization_refusals(data_file: Path) -> None:
    with pytest.raises(ConfigError, match="outside the DP guarantee"):
        tiny_config(data_file, data={"client_test_fraction": 0.2}, privacy={"clip_norm": 1.0})
    with pytest.raises(ConfigError, match="fedsa"):
        tiny_config(data_file, personalization={"method": "fedsa"},
                    strategy={"lora_aggregation": "ffa"})  # fmt: skip


def test_personal_models_answer_and_export(
    tmp_path: Path, data_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedit.cli import main
    from fedit.lora import load_adapter_state

    cfg = tiny_config(data_file, data={"client_test_fraction": 0.25},
                      personalization={"method": "fedsa"}, client={"lr": 0.2})  # fmt: skip
    run = tmp_path / "run"
    run_federation(cfg, run)
    sampled = sorted({c for h in json.loads((run / "summary.json").read_text())["history"]
                      for c in h["clients"]})  # fmt: skip
    client = sampled[0]
    ask = ["generate", str(run), "--prompt", "Tell me about the river.", "--max-new-tokens", "8"]
    assert main(ask) == 0
    global_answer = capsys.readouterr().out
    assert main([*ask, "--client", str(client)]) == 0
    assert capsys.readouterr().out != global_answer  # its own B, not the global zero B
    out = tmp_path / "export"
    assert (
        main(["export", str(run), "--out", str(out), "--adapter-only", "--client", str(client)])
        == 0
    )
    state = load_adapter_state(out)
    files = sorted(
        (run / "client-state" / "personal" / f"client_{client:04d}").glob("*.safetensors")
    )
    mine = load_file(str(files[-1]))
    glob = load_adapter_state(run / "adapter")
    for k, v in state.items():
        assert torch.equal(v, mine[k] if ".lora_B." in k else glob[k])
    never = next(c for c in range(4) if c not in sampled) if len(sampled) < 4 else None
    if never is not None:  # a client that never trained has no personal model, and is told so
        assert main([*ask, "--client", str(never)]) == 2
        assert "no personal model" in capsys.readouterr().err


def test_compare_scores_every_arm_on_each_clients_own_data(tmp_path: Path, data_file: Path) -> None:
    from fedit.cli import main
    from fedit.config import to_toml

    cfg = tiny_config(data_file, data={"client_test_fraction": 0.25}, generate={"per_category": 0},
                      compare={"arms": ["base", "local", "fedit", "ditto"], "local_clients": 2})  # fmt: skip
    path = tmp_path / "cmp.toml"
    path.write_text(to_toml(cfg))
    out = tmp_path / "compare"
    assert main(["compare", str(path), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    own = results["own_data"]
    assert set(own) == {"base", "fedit", "ditto (global)", "ditto", "local"}
    assert set(own["fedit"]) == {"0", "1", "2", "3"} and len(own["local"]) == 2
    # The fedit arm scored here equals what its clients reported in the run itself.
    run = json.loads((out / "fedit" / "summary.json").read_text())["own_data"]["clients"]
    assert all(abs(own["fedit"][c] - run[c]["loss"]) < 1e-9 for c in run)
    table = (out / "results.md").read_text()
    assert (
        "Each client's own held-out data" in table and "| **worst** |" in table and "Ditto" in table
    )


def test_several_sources_with_their_own_layouts_and_tags(tmp_path: Path, data_file: Path) -> None:
    from fedit.config import config_from_dict
    from fedit.data.records import load_records

    share = tmp_path / "share.json"
    share.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": f"Write code number {i}."}],
         "chosen": {"from": "gpt", "value": f"print({i})"}, "rejected": {"from": "gpt", "value": "no"}}
        for i in range(12)
    ]))  # fmt: skip
    sources = [
        {"path": str(data_file), "tags": {"domain": "general"}},
        {"path": str(share), "format": "chat", "category": "code", "tags": {"domain": "code"},
         "fields": {"messages": "conversations", "role": "from", "content": "value",
                    "output": "chosen"}, "roles": {"human": "user", "gpt": "assistant"}},
    ]  # fmt: skip
    cfg = tiny_config(data_file, data={"sources": sources, "test_per_category": 1},
                      partition={"method": "natural", "natural_field": "tag:source", "num_clients": 0},
                      client={"batch_size": 2, "micro_batch_size": 1})  # fmt: skip
    records, _ = load_records(cfg.data)
    code = [r for r in records if r.tags["domain"] == "code"]
    assert (
        len(code) == 12
        and code[0].instruction == "Write code number 0."
        and code[0].response == "print(0)"
    )
    assert {r.tags["source"] for r in records} == {"data", "share"} and code[0].category == "code"
    split = load_partition(cfg)
    assert len(split.clients) == 2  # one client per source
    assert {frozenset(r.tags["source"] for r in c) for c in split.clients} == {
        frozenset({"data"}),
        frozenset({"share"}),
    }
    # Each source split into its own clients (`clients` on every source), numbered in order.
    per = [{**sources[0], "clients": 3}, {**sources[1], "clients": 2}]
    split = load_partition(variant(cfg, data={"sources": per}, partition={"method": "shards"}))
    assert [{r.tags["source"] for r in c} for c in split.clients] == [{"data"}] * 3 + [
        {"share"}
    ] * 2
    with pytest.raises(
        Exception, match=r"partition.num_clients=4, but data.sources\[\]\.clients add up to 5"
    ):
        load_partition(
            variant(cfg, data={"sources": per}, partition={"method": "shards", "num_clients": 4})
        )
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.clients"):
        tiny_config(data_file, data={"sources": [per[0], sources[1]]})
    # Held-out loss per source and per tag, beside the categories.
    ev = run_federation(cfg).history[-1]["eval"]
    assert set(ev["per_tag"]["source"]) == {"data", "share"}
    assert set(ev["per_tag"]["domain"]) == {"general", "code"}
    code = ev["per_tag"]["domain"]["code"]
    assert {k: code[k] for k in ("loss", "ppl", "tokens")} == ev["per_category"]["code"]
    # The config round-trips through TOML, and a bad source names its key.
    assert config_from_dict(cfg.to_dict()).data.sources == cfg.data.sources
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.roles\.human"):
        tiny_config(
            data_file, data={"sources": [sources[0], {**sources[1], "roles": {"human": "person"}}]}
        )
    bad = tiny_config(data_file, data={"sources": [{**sources[1], "roles": {}}]})
    with pytest.raises(Exception, match="unknown role 'human'; map it with data.roles"):
        load_records(bad.data)
