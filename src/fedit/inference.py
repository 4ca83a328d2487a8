"""A base model with a trained adapter, ready to answer: shared by eval, generate, chat, serve.

A *source* is a run folder (its config.toml, and its adapter/ unless another is given) or a
config file. The adapter's own adapter_config.json decides rank and target modules, so an
adapter made with other LoRA settings than the config's still loads; one made for another
base model is refused with both names.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fedit.config import Config, ConfigError, load_config, variant
from fedit.data.prompts import render
from fedit.data.records import Record, content_text
from fedit.lora import (
    ADAPTER_FILE,
    CONFIG_FILE,
    AdapterState,
    get_adapter,
    load_adapter_state,
    load_lora_model,
    set_adapter,
)
from fedit.models import ModelError


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
    try:
        lora = {
            "r": int(saved.get("r", cfg.lora.r)),
            "alpha": int(saved.get("lora_alpha", cfg.lora.alpha)),
            "target_modules": sorted(targets),
            "client_ranks": [],
        }
        return variant(cfg, lora=lora)
    except (ConfigError, TypeError, ValueError) as e:
        raise ModelError(f"{cfg_file}: unusable LoRA settings: {e}") from None


def load_for_inference(cfg: Config, adapter: Path | None, progress: Any = None) -> Loaded:
    """The base model of `cfg` with `adapter` loaded (None: the base model alone)."""
    if adapter is not None:
        cfg = _adapter_settings(cfg, adapter)
    lm = load_lora_model(cfg, training=False)
    if adapter is not None:
        state = load_adapter_state(adapter)
        try:
            set_adapter(lm.model, state)
        except ModelError as e:
            raise ModelError(f"{adapter}: {e}") from None
    else:  # LoRA's B starts at zero, but say so explicitly: the base model alone
        set_adapter(lm.model, {k: torch.zeros_like(v) for k, v in get_adapter(lm.model).items()})
    lm.model.eval()
    return Loaded(cfg, lm.tokenizer, lm.model, adapter, lm.device)


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
        if not isinstance(m, dict) or "content" not in m:
            raise ValueError(f"messages[{i}]: expected {{'role': ..., 'content': <string>}}")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}].role: must be system, user or assistant, got {role!r}")
        turns.append({"role": str(role), "content": content_text(m["content"], f"messages[{i}]")})
    if turns[-1]["role"] != "user":
        raise ValueError("messages: the last message must come from the user")
    return Record(instruction=turns[-1]["content"], response="", history=turns[:-1])


def _sampling(temperature: float, top_p: float) -> dict[str, Any]:
    """generate() settings: greedy at temperature 0 (the model's own defaults cleared)."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def _precision(device: torch.device, dtype: torch.dtype | None) -> Any:
    return (
        torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    )


@torch.inference_mode()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 8,
    max_prompt_tokens: int = 1024,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    add_special_tokens: bool = True,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """One answer per prompt: {'text', 'prompt_tokens', 'completion_tokens', 'finish_reason'}.

    temperature 0 is greedy (deterministic); otherwise sampling from a seeded generator.
    Prompts are left-padded and batched by length; a prompt longer than `max_prompt_tokens`
    keeps its end (where the instruction and the answer cue are).
    """
    device = next(model.parameters()).device
    dtype = getattr(model, "fedit_autocast", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [
        tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"][-max_prompt_tokens:]
        for p in prompts
    ]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[dict[str, Any]] = [{} for _ in prompts]
    was_training = model.training
    model.eval()
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    try:
        for b, idx in enumerate(batches, 1):
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                ids[row, width - n :] = torch.tensor(encoded[i])
                mask[row, width - n :] = 1
            kwargs: dict[str, Any] = {
                "input_ids": ids.to(device),
                "attention_mask": mask.to(device),
                "max_new_tokens": max_new_tokens,
                "pad_token_id": pad,
                "eos_token_id": tokenizer.eos_token_id,
            }
            kwargs.update(_sampling(temperature, top_p))
            ctx = _precision(device, dtype)
            # generate() samples from the global RNG: seed it inside a fork, restore after.
            with ctx, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if temperature > 0:
                    torch.manual_seed(seed + b)
                seqs = model.generate(**kwargs)
            for row, i in enumerate(idx):
                new = seqs[row, width:].tolist()
                finish = "length"
                if tokenizer.eos_token_id in new:
                    new = new[: new.index(tokenizer.eos_token_id)]
                    finish = "stop"
                while new and new[-1] == pad and pad != tokenizer.eos_token_id:
                    new.pop()
                out[i] = {
                    "text": tokenizer.decode(new, skip_special_tokens=True).strip(),
                    "prompt_tokens": len(encoded[i]),
                    "completion_tokens": len(new),
                    "finish_reason": finish,
                }
            if on_batch:
                on_batch(b, len(batches))
    finally:
        model.train(was_training)
    return out


@dataclass
class Answer:
    """One streamed answer: what `stream_answer` returns once it is done."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class _Watch:
    """Streamer and stopping criterion in one: decodes the new tokens as they come, cuts at
    the first stop string, and hands out only text that cannot turn into one."""

    def __init__(
        self,
        tokenizer: Any,
        stops: Sequence[str],
        on_text: Callable[[str], None] | None,
        cancelled: Callable[[], bool] | None,
    ) -> None:
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.on_text, self.cancelled = on_text, cancelled
        self.ids: list[int] = []
        self.text, self.sent, self.prompt_seen = "", 0, False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        if self.stopped:
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return
        self.text = text
        hold = max((n for s in self.stops for n in range(len(s), 0, -1) if text.endswith(s[:n])),
                   default=0)  # fmt: skip
        safe = len(text) - hold
        while safe > self.sent and text[safe - 1] == "\ufffd":  # half a UTF-8 character
            safe -= 1
        self._emit(safe)

    def _emit(self, upto: int) -> None:
        if upto > self.sent and self.on_text:
            self.on_text(self.text[self.sent : upto])
        self.sent = max(self.sent, upto)

    def end(self) -> None:
        self.text = self.text.rstrip()
        self._emit(len(self.text))

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = self.stopped or bool(self.cancelled and self.cancelled())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def stream_answer(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    stops: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Answer:
    """One answer to one tokenized prompt, text handed to `on_text` as it is generated.

    Ends at EOS, at the first of `stops` (which is not part of the answer), after
    `max_new_tokens`, or when `cancelled()` turns true. Greedy at temperature 0; otherwise
    sampled from the global RNG seeded with `seed` inside a fork (the caller runs one
    generation at a time). The text equals `generate`'s for the same prompt up to the cut.
    """
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    dtype = getattr(model, "fedit_autocast", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    watch = _Watch(tokenizer, stops, on_text, cancelled)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    kwargs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad,
        "eos_token_id": tokenizer.eos_token_id,
        "streamer": watch,
        "stopping_criteria": StoppingCriteriaList([watch]),
    }
    kwargs.update(_sampling(temperature, top_p))
    ctx = _precision(device, dtype)
    was_training = model.training
    model.eval()
    try:
        with ctx, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if temperature > 0:
                torch.manual_seed(seed % 2**64)  # any integer a client sends
            model.generate(**kwargs)
    finally:
        model.train(was_training)
    new = watch.ids
    eos = tokenizer.eos_token_id in new
    if eos:
        new = new[: new.index(tokenizer.eos_token_id)]
    finish = "stop" if eos or watch.stopped else "length"
    return Answer(watch.text, len(prompt_ids), len(new), finish)
