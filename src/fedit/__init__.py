"""fedit: federated instruction tuning of LLMs with LoRA (FedIT).

The public API, for notebooks and scripts::

    import fedit
    cfg = fedit.load_config("configs/tiny.toml", ["federation.rounds=3"])
    result = fedit.run_federation(cfg, out_dir="runs/tiny")

Extension points are registries: add a partitioner, strategy, prompt template or selection rule
with `@fedit.PARTITIONERS.register("name")` (and STRATEGIES, TEMPLATES, SELECTORS), then name it
in the config. Heavy modules (torch) load on first use of a name that needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "fedit.config",
    "ConfigError": "fedit.config",
    "load_config": "fedit.config",
    "config_from_dict": "fedit.config",
    "Record": "fedit.data.records",
    "load_records": "fedit.data.records",
    "PARTITIONERS": "fedit.data.partition",
    "make_partition": "fedit.data.partition",
    "write_partition": "fedit.data.partition",
    "TEMPLATES": "fedit.data.prompts",
    "SELECTORS": "fedit.server.selection",
    "Selection": "fedit.server.selection",
    "STRATEGIES": "fedit.server.strategies",
    "weighted_average": "fedit.server.strategies",
    "Update": "fedit.protocol",
    "Task": "fedit.protocol",
    "ClientPlan": "fedit.protocol",
    "train_local": "fedit.client.train",
    "ClientRuntime": "fedit.client.runtime",
    "Server": "fedit.server.server",
    "RunResult": "fedit.recipe",
    "run_federation": "fedit.recipe",
    "load_model": "fedit.models",
    "attach_lora": "fedit.lora",
    "get_adapter": "fedit.lora",
    "set_adapter": "fedit.lora",
    "save_adapter": "fedit.lora",
    "evaluate_loss": "fedit.heldout",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedit' has no attribute {name!r}")
