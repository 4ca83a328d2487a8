"""`fedit export`: a run's adapter as a self-describing folder other tools load directly.

Merged (the default): the adapter folded into the base weights (peft's `merge_and_unload`),
saved as a Hugging Face model folder with the tokenizer, a chat template that renders the
prompt the adapter was tuned with, a generation config and a model card: `AutoModelForCausalLM`
loads it, vLLM serves it, llama.cpp's `convert_hf_to_gguf.py` converts it. `adapter_only`: the
PEFT adapter files with the tokenizer, the card and the prompt format, for `--enable-lora`
servers and `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from fedit.card import PROMPT_FILE, chat_template_for, run_facts, write_card
from fedit.config import Config, ConfigError
from fedit.files import atomic_dir
from fedit.inference import _adapter_settings, load_for_inference, resolve_source
from fedit.lora import ADAPTER_FILE, CONFIG_FILE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _facts(run: Path, cfg: Config) -> dict[str, Any]:
    summary = run / "summary.json"
    if not summary.is_file():
        return {}
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{summary}: invalid JSON: {e}") from None
    return run_facts(cfg, data.get("history"), data.get("privacy"))


def _target(out: Path) -> Path:
    """`out` may be new, empty, or an earlier export (replaced whole); nothing else."""
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a folder")
        if any(out.iterdir()) and not (out / PROMPT_FILE).is_file():
            raise ConfigError(
                f"--out {out}: a non-empty folder that is not a fedit export; "
                "give a new or empty folder"
            )
    return out


def _tokenizer_files(tokenizer: Any, cfg: Config, folder: Path) -> None:
    template = chat_template_for(cfg, tokenizer)
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))


def export(
    source: str | Path,
    out: Path,
    adapter: Path | None = None,
    adapter_only: bool = False,
    dtype: str = "float32",
    log: Any = print,
) -> Path:
    """Write the export of `source` (a run folder) to `out`; returns `out`."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: one of {sorted(DTYPES)}, got {dtype!r}")
    cfg, default = resolve_source(source)
    folder = adapter or default
    if not (folder / ADAPTER_FILE).is_file():
        raise ConfigError(f"{source}: no trained adapter at {folder}; pass --adapter DIR")
    out = _target(out)
    run = Path(source) if Path(source).is_dir() else folder.parent
    facts = _facts(run, cfg)

    if adapter_only:
        from fedit.models import load_tokenizer

        tuned = _adapter_settings(cfg, folder)
        tokenizer = load_tokenizer(tuned.model)

        def fill_adapter(tmp: Path) -> None:
            for name in (ADAPTER_FILE, CONFIG_FILE):
                shutil.copy2(folder / name, tmp / name)
            _tokenizer_files(tokenizer, tuned, tmp)
            write_card(tmp, tuned, tokenizer, facts)

        atomic_dir(out, fill_adapter)
        log(f"wrote the adapter with tokenizer and model card to {out}")
        return out

    log(f"loading {cfg.model.name} with {folder} ...")
    loaded = load_for_inference(cfg, folder)
    merged = loaded.model.merge_and_unload()
    merged.to(device="cpu", dtype=DTYPES[dtype])
    tokenizer = loaded.tokenizer

    def fill(tmp: Path) -> None:
        from transformers import GenerationConfig

        merged.save_pretrained(str(tmp), safe_serialization=True)
        _tokenizer_files(tokenizer, loaded.cfg, tmp)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else None
        gen = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad if pad is not None else tokenizer.eos_token_id,
            max_new_tokens=loaded.cfg.generate.max_new_tokens,
            do_sample=False,
        )
        gen.save_pretrained(str(tmp))
        write_card(tmp, loaded.cfg, tokenizer, facts, kind="merged")

    atomic_dir(out, fill)
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    log(f"wrote the merged model ({dtype}, {size:.0f} MB) with tokenizer and model card to {out}")
    return out
