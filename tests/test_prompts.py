from typing import Any

import pytest

from fedit.data.prompts import ALPACA_NO_INPUT, IGNORE_INDEX, encode, render, tokenize_records
from fedit.data.records import Record
from fedit.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    return tiny_tokenizer()


REC = Record(instruction="Name a fruit.", response="An apple.", category="open_qa")


def test_alpaca_template_matches_the_paper() -> None:
    prompt, response = render(REC, "alpaca", None)
    assert prompt == ALPACA_NO_INPUT.format(instruction="Name a fruit.")
    assert prompt.endswith("### Response:\n") and response == "An apple."
    with_ctx = Record(instruction="Summarize.", context="Long text.", response="Short.")
    assert "### Input:\nLong text.\n\n### Response:\n" in render(with_ctx, "alpaca", None)[0]


def test_prompt_is_masked_and_eos_appended(tok: Any) -> None:
    ex = encode(REC, tok, "alpaca", cutoff_len=512, train_on_inputs=False)
    prompt_ids = tok(render(REC, "alpaca", tok)[0])["input_ids"]
    n = len(prompt_ids)
    assert ex.input_ids[:n] == prompt_ids
    assert ex.labels[:n] == [IGNORE_INDEX] * n
    assert ex.labels[n:] == ex.input_ids[n:]
    assert ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[n:-1]) == "An apple."


def test_train_on_inputs_keeps_prompt_labels(tok: Any) -> None:
    ex = encode(REC, tok, "alpaca", cutoff_len=512, train_on_inputs=True)
    assert ex.labels == ex.input_ids


def test_truncation_at_cutoff(tok: Any) -> None:
    long = Record(instruction="Say it.", response="word " * 300)
    ex = encode(long, tok, "alpaca", cutoff_len=64, train_on_inputs=False)
    assert len(ex.input_ids) == len(ex.labels) == 64
    # a prompt that fills the whole cutoff leaves nothing to learn: dropped and counted
    long_prompt = Record(instruction="word " * 300, response="ok")
    examples, dropped = tokenize_records([REC, long_prompt, long], tok, "alpaca", 200, False)
    assert dropped == 1 and len(examples) == 2


def test_chat_template(tok: Any) -> None:
    rec = Record(instruction="Hi?", context="ctx", response="Hello.")
    prompt, _ = render(rec, "chat", tok)
    assert prompt == "<|im_start|>user\nHi?\n\nctx<|im_end|>\n<|im_start|>assistant\n"
    ex = encode(rec, tok, "chat", cutoff_len=256, train_on_inputs=False)
    assert ex.input_ids[-1] == tok.eos_token_id and ex.num_target_tokens > 1


def test_unknown_template_lists_known(tok: Any) -> None:
    with pytest.raises(LookupError, match="alpaca, chat"):
        encode(REC, tok, "vicuna", 64, False)
