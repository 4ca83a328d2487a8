"""The one typed config tree: defaults, TOML loading, `--set a.b=c` overrides, validation.

Every default lives in the section dataclasses and nowhere else. Each field carries its help
text in its metadata; `fedit keys` prints them, and the README's key table is generated from
the same source.

- `fields`: the field helper and `ConfigError`;
- `training`, `run`, `evaluation`: the sections, by concern;
- `tree`: the whole `Config`; `checks`: rules that span sections and registry names;
- `load`: TOML, overrides, coercion, `variant`, key listing, TOML output.
"""

from fedit.config.evaluation import CompareConfig, GenerateConfig, JudgeConfig
from fedit.config.fields import ConfigError, opt
from fedit.config.load import (
    config_diff,
    config_from_dict,
    iter_keys,
    load_config,
    merge_overrides,
    parse_override,
    to_toml,
    variant,
)
from fedit.config.run import (
    CompressionConfig,
    EvalConfig,
    FaultsConfig,
    FlowerConfig,
    PrivacyConfig,
    SystemConfig,
)
from fedit.config.server import SelectionConfig, StrategyConfig
from fedit.config.training import (
    ClientConfig,
    DataConfig,
    FederationConfig,
    LoraConfig,
    ModelConfig,
    PartitionConfig,
)
from fedit.config.tree import Config

__all__ = [
    "ClientConfig",
    "CompareConfig",
    "CompressionConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FaultsConfig",
    "FederationConfig",
    "FlowerConfig",
    "GenerateConfig",
    "JudgeConfig",
    "LoraConfig",
    "ModelConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "SelectionConfig",
    "StrategyConfig",
    "SystemConfig",
    "config_diff",
    "config_from_dict",
    "iter_keys",
    "load_config",
    "merge_overrides",
    "opt",
    "parse_override",
    "to_toml",
    "variant",
]
