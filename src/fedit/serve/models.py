"""Several adapters over one base model in memory: what `fedit serve` answers with.

Every source becomes one model name. A run folder (config.toml + adapter/) is one adapter; a
`fedit compare` folder is one adapter per arm; `NAME=PATH` names it. The base model alone is
always served too, as `base`. Each adapter is loaded once as a named peft adapter on the
shared base; a request switches the active one (a pointer swap, no reload) inside the single
generation thread, so concurrent requests never see each other's adapter.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedit.config import Config, ConfigError
from fedit.data.prompts import template_stops
from fedit.data.records import Record
from fedit.inference import (
    Answer,
    _adapter_settings,
    prompt_for,
    resolve_source,
    stream_answer,
)
from fedit.models import ModelError

BASE = "base"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


@dataclass
class Source:
    """One served model: its name, config (template, base model) and adapter folder."""

    name: str
    cfg: Config
    adapter: Path | None
    info: dict[str, Any] = field(default_factory=dict)


def _run_info(run: Path) -> dict[str, Any]:
    """What the web page shows about a run: rounds, strategy, last held-out loss."""
    info: dict[str, Any] = {"folder": str(run)}
    summary = run / "summary.json"
    if summary.is_file():
        try:
            data = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return info
        evals = [h["eval"] for h in data.get("history", []) if h.get("eval")]
        info["rounds"] = data.get("rounds")
        if evals:
            info["heldout_loss"] = round(float(evals[-1]["loss"]), 4)
    return info


def expand_sources(specs: Sequence[str], adapter: str | None = None) -> list[Source]:
    """The served models of the command line: run folders, compare folders, NAME=PATH."""
    out: list[Source] = []
    if adapter is not None and len(specs) != 1:
        raise ConfigError("--adapter: give exactly one source with it")
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        p = Path(path)
        if p.is_dir() and not (p / "adapter").is_dir() and adapter is None:
            arms = sorted(d for d in p.iterdir() if (d / "adapter").is_dir())
            if (p / "config.toml").is_file() and arms:  # a compare folder: one model per arm
                for arm in arms:
                    cfg, folder = resolve_source(arm)
                    label = f"{name}/{arm.name}" if name else arm.name
                    out.append(Source(label, cfg, folder, _run_info(arm)))
                continue
            if not (p / "config.toml").is_file():
                raise ConfigError(
                    f"{p}: neither a run folder (config.toml + adapter/) nor a compare folder "
                    "(config.toml + arm folders with adapter/)"
                )
        cfg, folder = resolve_source(p)
        folder = Path(adapter) if adapter is not None else folder
        if not folder.is_dir():
            raise ConfigError(f"{spec}: no adapter at {folder}; train it first or pass --adapter")
        out.append(Source(name or (p.name if p.is_dir() else p.stem), cfg, folder, _run_info(p)))
    seen: set[str] = set()
    for s in out:
        if not _NAME.match(s.name) and "/" not in s.name:
            raise ConfigError(
                f"model name {s.name!r}: use letters, digits and . _ : - (give NAME=PATH)"
            )
        if s.name in seen or s.name == BASE:
            raise ConfigError(
                f"model name {s.name!r} is used twice (or is the reserved {BASE!r}); "
                "name the sources with NAME=PATH"
            )
        seen.add(s.name)
    bases = {s.cfg.model.name for s in out}
    if len(bases) > 1:
        raise ConfigError(
            f"one base model per server; these sources use {sorted(bases)}: serve them apart"
        )
    return out


@dataclass
class Request:
    """One generation: a prompt text for one model, the sampling settings and the stops."""

    model: str
    prompt: str
    max_tokens: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stops: list[str] = field(default_factory=list)
    add_special_tokens: bool = True


class ContextError(ValueError):
    """A prompt plus max_tokens that do not fit the model's context."""


class Models:
    """The base model with every source's adapter loaded under its own peft name."""

    def __init__(self, sources: Sequence[Source], max_new_tokens: int | None = None) -> None:
        from peft import PeftModel

        from fedit.lora import load_lora_model

        if not sources:
            raise ConfigError("nothing to serve: give at least one run folder")
        first = sources[0]
        cfg = _adapter_settings(first.cfg, first.adapter) if first.adapter else first.cfg
        lm = load_lora_model(cfg, training=False)
        self.tokenizer, self.device = lm.tokenizer, lm.device
        self.model: Any = lm.model
        if not isinstance(self.model, PeftModel):
            raise ModelError("serving needs a peft model")
        self.sources: dict[str, Source] = {BASE: Source(BASE, first.cfg, None, {})}
        self._slots: dict[str, str] = {}  # model name -> peft adapter name
        for i, s in enumerate(sources):
            assert s.adapter is not None
            _adapter_settings(s.cfg, s.adapter)  # refuses another base model with both names
            slot = f"served_{i}"
            try:
                self.model.load_adapter(str(s.adapter), adapter_name=slot, is_trainable=False)
            except (OSError, ValueError, RuntimeError, KeyError) as e:
                raise ModelError(f"{s.adapter}: cannot load this adapter: {e}") from None
            self.sources[s.name] = s
            self._slots[s.name] = slot
        self.model.eval()
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        self.max_new_tokens = max_new_tokens or first.cfg.generate.max_new_tokens
        self.lock = threading.Lock()
        self.base_name = first.cfg.model.name

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def template(self, name: str) -> str:
        return self.sources[name].cfg.data.template

    def chat_prompt(self, name: str, record: Record) -> tuple[str, bool]:
        """The prompt text in `name`'s template and whether BOS is added when tokenizing."""
        cfg = self.sources[name].cfg
        return prompt_for(record, cfg, self.tokenizer), cfg.data.template != "chat"

    def default_stops(self, name: str) -> list[str]:
        return template_stops(self.template(name))

    def encode(self, req: Request) -> tuple[list[int], int]:
        """Prompt token ids and the answer budget, bounded by the model's context."""
        ids = self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
        room = self.context - len(ids)
        if req.max_tokens is None:
            if room < 1:
                raise ContextError(
                    f"the prompt has {len(ids)} tokens; the model's context is {self.context}"
                )
            return ids, min(self.max_new_tokens, room)
        if req.max_tokens > room:
            raise ContextError(
                f"max_tokens: the prompt has {len(ids)} tokens and max_tokens is "
                f"{req.max_tokens}, over the model's context of {self.context} tokens"
            )
        return ids, req.max_tokens

    def run(
        self,
        req: Request,
        on_text: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Answer:
        """Generate with `req.model`'s adapter active; one generation at a time."""
        ids, budget = self.encode(req)
        with self.lock:
            if req.model == BASE:
                with self.model.disable_adapter():
                    return self._generate(req, ids, budget, on_text, cancelled)
            self.model.set_adapter(self._slots[req.model])
            return self._generate(req, ids, budget, on_text, cancelled)

    def _generate(
        self,
        req: Request,
        ids: list[int],
        budget: int,
        on_text: Callable[[str], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> Answer:
        return stream_answer(
            self.model,
            self.tokenizer,
            ids,
            budget,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            stops=req.stops,
            on_text=on_text,
            cancelled=cancelled,
        )
