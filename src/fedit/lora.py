"""LoRA on the frozen base through peft; adapter state is a plain dict[str, Tensor].

peft's get/set_peft_model_state_dict are the only way in and out of the model.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from fedit.config import LoraConfig as LoraSettings
from fedit.files import atomic_dir
from fedit.models import ModelError, module_names
from fedit.seeding import derive_seed

if TYPE_CHECKING:
    from fedit.config import Config

AdapterState = dict[str, torch.Tensor]
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def attach_lora(model: Any, cfg: LoraSettings, seed: int, base_name: str) -> Any:
    """Wrap the frozen base with a LoRA adapter whose init is fixed by `seed`."""
    available = module_names(model)
    missing = [t for t in cfg.target_modules if t not in available]
    if missing:
        raise ModelError(
            f"lora.target_modules: {missing} not found in the model; its Linear modules are "
            f"{available}"
        )
    peft_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls deprecated HF helpers
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, peft_cfg)
    return peft_model


def get_adapter(model: Any) -> AdapterState:
    """A detached copy of the adapter's tensors."""
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def set_adapter(model: Any, state: AdapterState) -> None:
    expected = adapter_parameters(model)
    if set(expected) != set(state):
        extra = sorted(set(state) - set(expected))[:3]
        lacking = sorted(set(expected) - set(state))[:3]
        raise ModelError(f"adapter does not match the model: unexpected {extra}, missing {lacking}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ModelError(
                f"adapter tensor {k} has shape {tuple(v.shape)}, the model expects "
                f"{tuple(expected[k].shape)} (different base model or LoRA rank?)"
            )
    result: Any = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelError(f"adapter keys not used by the model: {unexpected[:3]}")


_PARAMS: weakref.WeakKeyDictionary[Any, dict[str, torch.nn.Parameter]] = weakref.WeakKeyDictionary()


def adapter_parameters(model: Any) -> dict[str, torch.nn.Parameter]:
    """The model's LoRA parameters under the keys of get_peft_model_state_dict.

    peft names a parameter `<module>.lora_A.<adapter>.weight` and saves it as
    `<module>.lora_A.weight`; the same rule maps them here, checked against peft's own keys
    once per model (the mapping is then reused: it is asked for every client and round).
    """
    cached = _PARAMS.get(model)
    if cached is not None:
        return cached
    name = model.active_adapter if isinstance(model.active_adapter, str) else "default"
    params = {
        n.replace(f".{name}.", "."): p
        for n, p in model.named_parameters()
        if ".lora_" in n and f".{name}." in n
    }
    expected = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    if set(params) != expected:
        raise ModelError("LoRA parameters do not match the adapter state keys")
    _PARAMS[model] = params
    return params


def module_of(key: str) -> str:
    """`<module>.lora_A.weight` -> `<module>`."""
    return key.rsplit(".lora_", 1)[0]


def trainable_names(model: Any) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def save_adapter(
    model: Any, state: AdapterState, out: Path, extra: Callable[[Path], None] | None = None
) -> None:
    """A standard PEFT adapter folder (PeftModel.from_pretrained loads it), written atomically.

    `extra(folder)` adds files (the model card) before the folder takes its name; an old one
    is moved aside first.
    """

    def fill(folder: Path) -> None:
        write_adapter_files(model, state, folder)
        if extra is not None:
            extra(folder)

    atomic_dir(out, fill)


def write_adapter_files(model: Any, state: AdapterState, folder: Path) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    model.peft_config["default"].save_pretrained(str(folder))


def load_adapter_state(folder: Path) -> AdapterState:
    path = folder / ADAPTER_FILE
    if not path.is_file():
        raise ModelError(f"no {ADAPTER_FILE} in {folder}")
    return load_file(str(path))


def state_bytes(state: AdapterState) -> int:
    return sum(v.numel() * v.element_size() for v in state.values())


@dataclass
class LoraModel:
    """The frozen base with LoRA attached, on its device, and its tokenizer."""

    tokenizer: Any
    model: Any
    device: torch.device

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def full_model_bytes(self) -> int:
        return sum(p.numel() * 4 for p in self.model.parameters())


def load_lora_model(cfg: Config, training: bool = True) -> LoraModel:
    """`cfg`'s base model with its LoRA init: the same seed gives the same adapter anywhere.

    `training`: first refuse a run whose estimated peak memory exceeds the device's.
    """
    from fedit.models import RANDOM, autocast_dtype, load_model, model_config, pick_device
    from fedit.resources import check_memory

    device = pick_device(cfg.model)
    if training:
        check_memory(model_config(cfg.model), cfg, device)
    # A random or quantized base is built where it trains (a 7B model in fp32 would not fit
    # the host); any other is loaded on the CPU and moved.
    built_there = cfg.model.quantization != "none" or cfg.model.name.startswith(RANDOM)
    seed = derive_seed(cfg.seed, "base-init")
    tokenizer, base = load_model(cfg.model, seed=seed, device=device if built_there else None)
    if cfg.model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # LayerNorms and the output layer in fp32 for stable training on a quantized base
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if cfg.model.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach LoRA though the base is frozen, and
        # dropout replays the same mask in the recomputation.
        kw = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.24's name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        base.config.use_cache = False
    # LoRA is initialized on the CPU, so the same seed gives the same adapter on any device
    # (on a base built on the GPU, LoRA is initialized there).
    model = attach_lora(base, cfg.lora, derive_seed(cfg.seed, "lora-init"), cfg.model.name)
    if cfg.model.quantization == "none":
        model.to(device)
    model.fedit_autocast = autocast_dtype(cfg.model, device)
    return LoraModel(tokenizer, model, device)
