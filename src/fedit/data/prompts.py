"""Prompt templates and tokenization: prompt + response + EOS, truncated, prompt masked."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedit.data.records import DataError, Record
from fedit.registry import Registry

IGNORE_INDEX = -100

# A template turns a record into (prompt text, response text) for a given tokenizer.
Template = Callable[[Record, Any], tuple[str, str]]
TEMPLATES: Registry[Template] = Registry("prompt template")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@TEMPLATES.register("alpaca")
def alpaca(record: Record, tokenizer: Any) -> tuple[str, str]:
    """The Alpaca template used by the FedIT paper and Shepherd."""
    context = record.context.strip()
    if record.history:
        earlier = "\n".join(f"{t['role']}: {t['content']}" for t in record.history)
        context = f"{earlier}\n{context}".strip()
    if context:
        prompt = ALPACA_WITH_INPUT.format(instruction=record.instruction, input=context)
    else:
        prompt = ALPACA_NO_INPUT.format(instruction=record.instruction)
    return prompt, record.response


@TEMPLATES.register("chat")
def chat(record: Record, tokenizer: Any) -> tuple[str, str]:
    """The tokenizer's own chat template; dolly's context goes after the instruction."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template='chat': this tokenizer has no chat template")
    user = record.instruction
    if record.context.strip():
        user = f"{user}\n\n{record.context.strip()}"
    messages = [*record.history, {"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return str(prompt), record.response


# Where an answer in each template ends when the model runs on into a next turn: a client
# asks for these as stop strings by default (the chat template ends at the tokenizer's EOS).
TEMPLATE_STOPS: dict[str, list[str]] = {
    "alpaca": ["\n### Instruction:", "\n### Input:", "\n### Response:", "\n\n### "],
    "chat": ["<|im_start|>", "<|im_end|>"],
}


def template_stops(template: str) -> list[str]:
    """The turn markers of `template` (none for a template registered without them)."""
    return list(TEMPLATE_STOPS.get(template, []))


@dataclass
class Example:
    """A tokenized example; labels are IGNORE_INDEX on masked positions."""

    input_ids: list[int]
    labels: list[int]
    category: str
    tags: dict[str, str] = field(default_factory=dict)  # the record's (data.sources)
    prompt_len: int = 0  # tokens before the response (the instruction a model is given)

    @property
    def num_target_tokens(self) -> int:
        """Tokens the loss predicts: the first token never is (labels shift by one)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def render(record: Record, template: str, tokenizer: Any) -> tuple[str, str]:
    return TEMPLATES.get(template)(record, tokenizer)


def encode(
    record: Record,
    tokenizer: Any,
    template: str,
    cutoff_len: int,
    train_on_inputs: bool,
) -> Example:
    prompt, response = render(record, template, tokenizer)
    # Tokenizing the two parts apart keeps the prompt/response boundary exact.
    prompt_ids = tokenizer(prompt, add_special_tokens=template != "chat")["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = [*prompt_ids, *response_ids, tokenizer.eos_token_id][:cutoff_len]
    n_prompt = min(len(prompt_ids), len(ids))
    labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return Example(
        input_ids=ids,
        labels=labels,
        category=record.category,
        tags=record.tags,
        prompt_len=n_prompt,
    )


def tokenize_records(
    records: Sequence[Record],
    tokenizer: Any,
    template: str,
    cutoff_len: int,
    train_on_inputs: bool,
) -> tuple[list[Example], int]:
    """Tokenize once; examples whose response was cut off entirely are dropped and counted."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token")
    examples = []
    dropped = 0
    for r in records:
        ex = encode(r, tokenizer, template, cutoff_len, train_on_inputs)
        if ex.num_target_tokens == 0:
            dropped += 1
            continue
        examples.append(ex)
    return examples, dropped


def usable_count(
    records: Sequence[Record],
    tokenizer: Any,
    template: str,
    cutoff_len: int,
    train_on_inputs: bool,
) -> int:
    """How many of `records` keep a response token at `cutoff_len` (what `tokenize_records`
    would not drop), from prompt lengths alone: cheap enough to ask of every client up front."""
    if train_on_inputs:
        return len(records)
    usable = 0
    for start in range(0, len(records), 256):  # in chunks: memory stays flat in the count
        prompts = [render(r, template, tokenizer)[0] for r in records[start : start + 256]]
        ids = tokenizer(prompts, add_special_tokens=template != "chat")["input_ids"]
        usable += sum(1 for x in ids if len(x) < cutoff_len)
    return usable
