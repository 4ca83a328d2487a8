"""A base model with a trained adapter, ready to answer: shared by eval, generate, chat, serve.

A *source* is a run folder (its config.toml, and its adapter/ unless another is given) or a
config file. The adapter's own adapter_config.json decides rank and target modules, so an
adapter made with other LoRA settings than the config's still loads; one made for another
base model is refused with both names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fedit.config import Config, ConfigError, load_config
from fedit.data.prompts import render
from fedit.data.records import Record
from fedit.lora import (
    ADAPTER_FILE,
    CONFIG_FILE,
    AdapterState,
    attach_lora,
    get_adapter,
    load_adapter_state,
    set_adapter,
)
from fedit.models import ModelError, autocast_dtype, load_model, pick_device
from fedit.seeding import derive_seed


@dataclass
class Loaded:
    cfg: Config
    tokenizer: Any
    model: Any
    adapter: Path | None
    device: torch.device

    @property
    def label(self) -> str:
        return str(self.adapter) if self.adapter else f"{self.cfg.model.name} (no adapter)"


def resolve_source(source: str | Path, overrides: list[str] | None = None) -> tuple[Config, Path]:
    """(config, default adapter folder) of a run folder or a config file."""
    p = Path(source)
    if p.is_dir():
        cfg_file = p / "config.toml"
        if not cfg_file.is_file():
            raise ConfigError(f"{p}: not a run folder (no config.toml); give one or a TOML file")
        return load_config(cfg_file, overrides or []), p / "adapter"
    if p.is_file():
        return load_config(p, overrides or []), Path("runs") / p.stem / "adapter"
    raise ConfigError(f"{p}: no such run folder or config file")


def _adapter_settings(cfg: Config, folder: Path) -> Config:
    """The LoRA settings the adapter was saved with; its base model must be the config's."""
    cfg_file = folder / CONFIG_FILE
    if not (folder / ADAPTER_FILE).is_file() or not cfg_file.is_file():
        raise ModelError(f"{folder}: not a saved adapter (needs {ADAPTER_FILE} and {CONFIG_FILE})")
    try:
        saved = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file}: invalid JSON: {e}") from e
    base = saved.get("base_model_name_or_path")
    if base and base != cfg.model.name:
        raise ModelError(
            f"{folder}: the adapter was trained on base model {base!r}, but model.name is "
            f"{cfg.model.name!r}; pass --set model.name={base} or another adapter"
        )
    targets = saved.get("target_modules") or cfg.lora.target_modules
    if isinstance(targets, str):
        targets = [targets]
    lora = replace(
        cfg.lora,
        r=int(saved.get("r", cfg.lora.r)),
        alpha=int(saved.get("lora_alpha", cfg.lora.alpha)),
        target_modules=sorted(targets),
        client_ranks=[],
    )
    return replace(cfg, lora=lora)


def load_for_inference(cfg: Config, adapter: Path | None, progress: Any = None) -> Loaded:
    """The base model of `cfg` with `adapter` loaded (None: the base model alone)."""
    if adapter is not None:
        cfg = _adapter_settings(cfg, adapter)
    tokenizer, base = load_model(cfg.model, seed=derive_seed(cfg.seed, "base-init"))
    model = attach_lora(base, cfg.lora, derive_seed(cfg.seed, "lora-init"), cfg.model.name)
    if adapter is not None:
        state = load_adapter_state(adapter)
        try:
            set_adapter(model, state)
        except ModelError as e:
            raise ModelError(f"{adapter}: {e}") from None
    else:  # LoRA's B starts at zero, but say so explicitly: the base model alone
        set_adapter(model, {k: torch.zeros_like(v) for k, v in get_adapter(model).items()})
    device = pick_device(cfg.model)
    model.to(device)
    model.fedit_autocast = autocast_dtype(cfg.model, device)
    model.eval()
    return Loaded(cfg, tokenizer, model, adapter, device)


def use_adapter(loaded: Loaded, state: AdapterState, label: Path | None) -> None:
    set_adapter(loaded.model, state)
    loaded.adapter = label


def prompt_for(record: Record, cfg: Config, tokenizer: Any) -> str:
    """The prompt text the model was tuned on, without the answer."""
    prompt, _ = render(replace(record, response=""), cfg.data.template, tokenizer)
    return prompt


def messages_to_record(messages: list[dict[str, Any]]) -> Record:
    """OpenAI-style chat messages -> a record: the last user turn is the instruction."""
    if not messages:
        raise ValueError("messages: must not be empty")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: expected {{'role': ..., 'content': <string>}}")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}].role: must be system, user or assistant, got {role!r}")
        turns.append({"role": str(role), "content": m["content"]})
    if turns[-1]["role"] != "user":
        raise ValueError("messages: the last message must come from the user")
    return Record(instruction=turns[-1]["content"], response="", history=turns[:-1])
