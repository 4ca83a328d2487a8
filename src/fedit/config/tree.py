"""The whole config tree: one field per section, cross-section checks on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedit.config.checks import check_sections
from fedit.config.evaluation import CompareConfig, GenerateConfig, JudgeConfig
from fedit.config.fields import opt
from fedit.config.run import (
    CompressionConfig,
    EvalConfig,
    FaultsConfig,
    FlowerConfig,
    PersonalizationConfig,
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


@dataclass
class Config:
    seed: int = opt(42, "Run seed; every random choice derives from it and the round.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)

    def __post_init__(self) -> None:
        check_sections(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
