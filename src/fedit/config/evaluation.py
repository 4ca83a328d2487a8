"""Sections that steer scoring after training: generation, the LLM judge, the comparison."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedit.config.fields import check, opt


@dataclass
class GenerateConfig:
    max_new_tokens: int = opt(128, "Longest generated answer, in tokens.")
    per_category: int = opt(
        5, "Test examples per category answered greedily for ROUGE-L / similarity / the judge."
    )
    batch_size: int = opt(8, "Prompts generated together (left-padded).")
    embedder: str = opt(
        "all-MiniLM-L6-v2",
        "Sentence embedder for answer similarity: 'all-MiniLM-L6-v2' (offline packaged copy), "
        "a local folder, or '' to skip.",
    )

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "generate.max_new_tokens", "must be >= 1")
        check(self.per_category >= 0, "generate.per_category", "must be >= 0")
        check(self.batch_size >= 1, "generate.batch_size", "must be >= 1")


@dataclass
class JudgeConfig:
    base_url: str = opt(
        "",
        "OpenAI-compatible endpoint of the LLM judge, e.g. 'https://api.openai.com/v1' or "
        "'http://127.0.0.1:8000/v1' (fedit serve); '' = no judge.",
    )
    model: str = opt("gpt-4", "Judge model name sent to the endpoint.")
    api_key_env: str = opt(
        "OPENAI_API_KEY", "Environment variable holding the judge's API key (may be unset)."
    )
    mode: Literal["pairwise", "single", "both"] = opt(
        "pairwise",
        "pairwise: answer vs reference, each rated 1-10, asked in both orders; single: one "
        "answer graded 1-10 alone; both.",
    )
    repeats: int = opt(2, "Judgments per question and order, averaged.")
    temperature: float = opt(0.2, "Judge sampling temperature.")
    max_tokens: int = opt(512, "Longest judge reply.")
    timeout: float = opt(120.0, "Seconds to wait for one judge reply.")
    max_retries: int = opt(4, "Retries of a failed request, with exponential backoff.")

    def __post_init__(self) -> None:
        check(self.repeats >= 1, "judge.repeats", "must be >= 1")
        check(self.timeout > 0, "judge.timeout", "must be > 0")
        check(self.max_retries >= 0, "judge.max_retries", "must be >= 0")
        check(self.max_tokens >= 8, "judge.max_tokens", "must be >= 8")
        if self.base_url:
            check(
                self.base_url.startswith(("http://", "https://")),
                "judge.base_url",
                f"must start with http:// or https://, got {self.base_url!r}",
            )


@dataclass
class CompareConfig:
    arms: list[str] = opt(
        ["base", "local", "fedit", "centralized"],
        "Arms of `fedit compare`: base (no tuning), local (clients alone), fedit, centralized, "
        "and personalized FedIT: finetune, ditto, fedsa, feddpa (scored per client on "
        "data.client_test_fraction).",
    )
    local_clients: int = opt(
        4, "Clients sampled for the local-only arm; each tunes alone for federation.rounds rounds."
    )

    def __post_init__(self) -> None:
        known = ("base", "local", "fedit", "centralized", "finetune", "ditto", "fedsa", "feddpa")
        for i, arm in enumerate(self.arms):
            check(arm in known, f"compare.arms[{i}]", f"unknown arm {arm!r}; known: {known}")
        check(self.local_clients >= 1, "compare.local_clients", "must be >= 1")
