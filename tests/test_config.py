from pathlib import Path

import pytest

from fedit.config import Config, ConfigError, iter_keys, load_config, to_toml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def test_there_are_configs() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "quickstart", "paper", "shepherd"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.federation.rounds >= 1
    assert load_config(None, []).seed == Config().seed


def test_paper_config_is_the_paper_setup() -> None:
    cfg = load_config(ROOT / "configs" / "paper.toml")
    assert cfg.partition.num_clients == 100
    assert cfg.partition.method == "shards"
    assert cfg.federation.clients_this_round(100) == 5
    assert cfg.federation.rounds == 20
    assert cfg.client.local_epochs == 1.0


def test_shepherd_config_is_shepherds_defaults() -> None:
    cfg = load_config(ROOT / "configs" / "shepherd.toml")
    assert cfg.federation.clients_this_round(cfg.partition.num_clients) == 1
    assert (cfg.client.batch_size, cfg.client.micro_batch_size) == (64, 8)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 16, ["q_proj"])
    assert (cfg.federation.rounds, cfg.client.local_epochs, cfg.data.cutoff_len) == (50, 10.0, 512)


def test_overrides_are_typed() -> None:
    cfg = load_config(
        None,
        [
            "federation.rounds=7",
            "client.lr=1e-3",
            "lora.target_modules=['q_proj', 'k_proj']",
            "model.name=some/model",
            "data.train_on_inputs=true",
            "federation.clients_per_round=0.25",
        ],
    )
    assert cfg.federation.rounds == 7
    assert cfg.client.lr == pytest.approx(1e-3)
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.model.name == "some/model"
    assert cfg.data.train_on_inputs is True
    assert cfg.federation.clients_this_round(10) == 2  # floor(0.25 x 10), as Shepherd
    assert load_config(None, ["client.lr=1"]).client.lr == 1.0  # int accepted for float


def test_clients_per_round_count_vs_fraction() -> None:
    assert (
        load_config(None, ["federation.clients_per_round=1"]).federation.clients_this_round(8) == 1
    )
    assert (
        load_config(None, ["federation.clients_per_round=1.0"]).federation.clients_this_round(8)
        == 8
    )
    with pytest.raises(ConfigError, match="federation.clients_per_round"):
        load_config(None, ["federation.clients_per_round=12"]).federation.clients_this_round(8)
    with pytest.raises(ConfigError, match="federation.clients_per_round"):
        load_config(None, ["federation.clients_per_round=1.5"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("federation.strategyy=fedavg", "federation.strategyy"),
        ("nosuch.key=1", "nosuch"),
        ("client.lr=fast", "client.lr"),
        ("federation.rounds=2.5", "federation.rounds"),
        ("data.train_on_inputs=3", "data.train_on_inputs"),
        ("client.micro_batch_size=3", "client.batch_size"),
        ("model.dtype=int8", "model.dtype"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("data.fields={answer='x'}", "data.fields.answer"),
    ],
)
def test_bad_keys_and_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[client]\nlrr = 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "client.lrr" in str(e.value)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("[client\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "shepherd.toml", ["data.fields={output='answer'}"])
    p = tmp_path / "roundtrip.toml"
    p.write_text(to_toml(cfg))
    assert load_config(p) == cfg


def test_issue_keys_exist_and_are_documented() -> None:
    keys = {k: h for k, _, _, h in iter_keys()}
    for k in [
        "seed", "model.name", "data.path", "data.test_per_category", "data.cutoff_len",
        "data.train_on_inputs", "data.template", "partition.method", "partition.num_clients",
        "partition.alpha", "federation.rounds", "federation.clients_per_round",
        "federation.strategy", "client.local_epochs", "client.max_steps", "client.batch_size",
        "client.micro_batch_size", "client.lr", "lora.r", "lora.alpha", "lora.dropout",
        "lora.target_modules",
    ]:  # fmt: skip
        assert keys.get(k), f"{k} missing or undocumented"
