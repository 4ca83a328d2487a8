"""The one typed config tree: defaults, TOML loading, `--set a.b=c` overrides, validation.

Every default lives here and nowhere else. Each field carries its help text in its metadata;
`fedit keys` prints them, and the README's key table is generated from the same source.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from fedit.errors import FeditError


class ConfigError(FeditError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


def opt(default: Any, help: str) -> Any:
    """A field with its help text; mutable defaults are copied per instance."""
    if isinstance(default, list | dict):
        copy: Callable[[], Any] = lambda: type(default)(default)  # noqa: E731
        return field(default_factory=copy, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    name: str = opt(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "Base model: a local HF folder, a hub id (online), "
        "'HuggingFaceTB/SmolLM2-135M-Instruct' (offline packaged copy) or 'fedit/tiny-llama' "
        "(random-init test model).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = opt(
        "float32", "Weights dtype of the frozen base model (fp32 is fastest on CPU)."
    )
    threads: int = opt(0, "torch intra-op threads; 0 keeps torch's default.")
    device: str = opt(
        "auto", "Where to train: 'auto' (the GPU if there is one), 'cpu', 'cuda', 'cuda:N'."
    )
    autocast: Literal["auto", "off", "bf16"] = opt(
        "auto", "Mixed precision: 'auto' = bf16 autocast on a GPU, off on CPU (slower there)."
    )
    check_memory: bool = opt(
        True, "Refuse up front a run whose estimated peak memory exceeds what is available."
    )

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "must not be empty")
        _check(self.threads >= 0, "model.threads", "must be >= 0")
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "model.device",
            "must be 'auto', 'cpu', 'cuda' or 'cuda:N'",
        )


@dataclass
class DataConfig:
    path: str = opt(
        "databricks-dolly-15k.jsonl",
        "Instruction records: a .json/.jsonl/.parquet file (absolute, relative to the working "
        "directory, or inside $FEDIT_DATA_DIR), or 'hf:<dataset id>' for a hub dataset (online).",
    )
    format: Literal["auto", "dolly", "alpaca", "chat"] = opt(
        "auto", "Record layout; 'auto' detects it from the first record's keys."
    )
    fields: dict[str, str] = opt(
        {},
        "Field-name overrides for the format, e.g. {instruction='question', output='answer', "
        "category='topic', user='author'}. Roles: instruction, input, output, category, user, "
        "messages.",
    )
    test_per_category: int = opt(
        10, "Held-out global test examples drawn per category before partitioning."
    )
    cutoff_len: int = opt(256, "Maximum tokens per example (prompt + response + EOS).")
    train_on_inputs: bool = opt(False, "Also train on prompt tokens (otherwise they are masked).")
    template: str = opt(
        "alpaca", "Prompt template: 'alpaca' (the paper's) or 'chat' (the tokenizer's own)."
    )
    max_records: int = opt(
        0, "Use a seeded random sample of N records (0 = all); for quick experiments."
    )
    skip_bad_records: bool = opt(
        False, "Skip malformed records and report their count instead of failing."
    )

    def __post_init__(self) -> None:
        _check(bool(self.path), "data.path", "must not be empty")
        _check(self.test_per_category >= 0, "data.test_per_category", "must be >= 0")
        _check(self.cutoff_len >= 8, "data.cutoff_len", "must be >= 8")
        _check(self.max_records >= 0, "data.max_records", "must be >= 0")
        roles = {"instruction", "input", "output", "category", "user", "messages"}
        for role in self.fields:
            _check(role in roles, f"data.fields.{role}", f"unknown role (known: {sorted(roles)})")


@dataclass
class PartitionConfig:
    method: str = opt(
        "shards",
        "How training records are split: iid | shards | dirichlet | quantity | natural "
        "(or a registered partitioner).",
    )
    num_clients: int = opt(
        10, "Number of clients. For 'natural', 0 means one client per distinct value."
    )
    alpha: float = opt(
        0.5, "Dirichlet concentration for 'dirichlet' (categories) and 'quantity' (sizes)."
    )
    shards_per_client: int = opt(2, "Shards per client for 'shards' (Shepherd uses 2).")
    min_client_size: int = opt(
        1, "'dirichlet' and 'quantity' move records from the largest clients up to this size."
    )
    natural_field: str = opt("user", "Record role that defines clients for 'natural'.")
    only: list[int] = opt(
        [],
        "Keep only these clients of the partition (by index), e.g. [3] for one client tuning "
        "alone; the test split is unchanged.",
    )
    pooled: bool = opt(
        False,
        "Pool the (kept) clients' data into one client: centralized tuning on the same data "
        "and the same test split.",
    )

    def __post_init__(self) -> None:
        _check(self.num_clients >= 0, "partition.num_clients", "must be >= 0")
        _check(self.alpha > 0, "partition.alpha", "must be > 0")
        _check(self.shards_per_client >= 1, "partition.shards_per_client", "must be >= 1")
        _check(self.min_client_size >= 1, "partition.min_client_size", "must be >= 1")
        _check(
            self.natural_field in {"user", "category"},
            "partition.natural_field",
            "must be 'user' or 'category'",
        )
        for i, c in enumerate(self.only):
            _check(c >= 0, f"partition.only[{i}]", "client indices are >= 0")
        _check(len(set(self.only)) == len(self.only), "partition.only", "repeats a client")


@dataclass
class FederationConfig:
    rounds: int = opt(3, "Communication rounds.")
    clients_per_round: int | float = opt(
        2, "Clients sampled per round: an int count, or a float fraction in (0, 1]."
    )
    strategy: str = opt("fedavg", "Aggregation strategy (registered name).")
    selection: str = opt("uniform", "Client-selection rule (registered name).")
    workers: int = opt(
        1,
        "Processes training a round's clients in parallel, each with its own copy of the model "
        "(for machines with many cores); 1 trains them in turn in this process.",
    )
    min_clients: int = opt(
        1, "A round needs at least this many valid updates, or it fails (global adapter kept)."
    )
    max_norm_ratio: float = opt(
        10.0,
        "Reject an update whose norm exceeds this multiple of the median norm of the round's "
        "other updates; 0 = off.",
    )

    def __post_init__(self) -> None:
        _check(self.rounds >= 0, "federation.rounds", "must be >= 0")
        _check(self.min_clients >= 1, "federation.min_clients", "must be >= 1")
        _check(self.workers >= 1, "federation.workers", "must be >= 1")
        _check(self.max_norm_ratio >= 0, "federation.max_norm_ratio", "must be >= 0")
        k = self.clients_per_round
        if isinstance(k, float):
            _check(0 < k <= 1, "federation.clients_per_round", "a fraction must be in (0, 1]")
        else:
            _check(k >= 1, "federation.clients_per_round", "must be >= 1")

    def clients_this_round(self, num_clients: int) -> int:
        k = self.clients_per_round
        # Shepherd's rule: floor of fraction x clients, at least one.
        n = max(1, int(k * num_clients + 1e-9)) if isinstance(k, float) else k
        if n > num_clients:
            raise ConfigError(
                f"federation.clients_per_round: {n} clients per round but the partition has "
                f"only {num_clients}"
            )
        return n


@dataclass
class StrategyConfig:
    prox_mu: float = opt(
        0.01, "FedProx: weight mu of the client penalty mu/2 * ||w - w_global||^2."
    )
    server_lr: float = opt(1.0, "Server step size for fedavgm, scaffold and fednova.")
    momentum: float = opt(0.9, "FedAvgM: server momentum.")
    adaptive_lr: float = opt(1e-3, "FedAdam / FedYogi / FedAdagrad: server learning rate.")
    beta1: float = opt(0.9, "FedAdam / FedYogi: first-moment decay.")
    beta2: float = opt(0.99, "FedAdam / FedYogi: second-moment decay.")
    tau: float = opt(1e-3, "FedAdam / FedYogi / FedAdagrad: adaptivity (epsilon).")
    lora_aggregation: Literal["naive", "svd", "ffa"] = opt(
        "naive",
        "How LoRA factors combine: 'naive' averages A and B apart (FedIT); 'svd' averages the "
        "products B·A exactly and folds them back to rank r by truncated SVD; 'ffa' freezes A "
        "at its shared init and trains and sends only B (exact, half the bytes).",
    )
    robust: Literal["mean", "median", "trimmed_mean"] = opt(
        "mean", "Combine client adapters by weighted mean, coordinate-wise median or trimmed mean."
    )
    trim_ratio: float = opt(0.1, "trimmed_mean: fraction cut from each end per coordinate.")
    clip_norm: float = opt(
        0.0, "Clip each client's update (adapter - global) to this L2 norm; 0 = off."
    )

    def __post_init__(self) -> None:
        _check(self.prox_mu >= 0, "strategy.prox_mu", "must be >= 0")
        _check(self.server_lr > 0, "strategy.server_lr", "must be > 0")
        _check(0 <= self.momentum < 1, "strategy.momentum", "must be in [0, 1)")
        _check(self.adaptive_lr > 0, "strategy.adaptive_lr", "must be > 0")
        _check(0 <= self.beta1 < 1, "strategy.beta1", "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "strategy.beta2", "must be in [0, 1)")
        _check(self.tau > 0, "strategy.tau", "must be > 0")
        _check(0 <= self.trim_ratio < 0.5, "strategy.trim_ratio", "must be in [0, 0.5)")
        _check(self.clip_norm >= 0, "strategy.clip_norm", "must be >= 0")


@dataclass
class ClientConfig:
    local_epochs: float = opt(1.0, "Local epochs per round (ignored when max_steps > 0).")
    max_steps: int = opt(0, "Optimizer steps per round; 0 = use local_epochs.")
    batch_size: int = opt(8, "Examples per optimizer step.")
    micro_batch_size: int = opt(4, "Examples per forward pass (gradient accumulation).")
    lr: float = opt(3e-4, "Peak learning rate of AdamW.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = opt(
        "linear", "LR schedule within a round's local training."
    )
    warmup_steps: int = opt(0, "Linear warmup steps at the start of each local training.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm; 0 disables clipping.")
    group_by_length: bool = opt(True, "Batch examples of similar length to avoid padding.")

    def __post_init__(self) -> None:
        _check(self.local_epochs > 0, "client.local_epochs", "must be > 0")
        _check(self.max_steps >= 0, "client.max_steps", "must be >= 0")
        _check(self.batch_size >= 1, "client.batch_size", "must be >= 1")
        _check(self.micro_batch_size >= 1, "client.micro_batch_size", "must be >= 1")
        _check(
            self.batch_size % self.micro_batch_size == 0,
            "client.batch_size",
            f"must be a multiple of client.micro_batch_size ({self.micro_batch_size})",
        )
        _check(self.lr > 0, "client.lr", "must be > 0")
        _check(self.weight_decay >= 0, "client.weight_decay", "must be >= 0")
        _check(self.warmup_steps >= 0, "client.warmup_steps", "must be >= 0")
        _check(self.max_grad_norm >= 0, "client.max_grad_norm", "must be >= 0")


@dataclass
class LoraConfig:
    r: int = opt(8, "LoRA rank.")
    alpha: int = opt(16, "LoRA scaling numerator (scale = alpha / r).")
    dropout: float = opt(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] = opt(["q_proj", "v_proj"], "Module names that get LoRA.")
    client_ranks: list[int] = opt(
        [],
        "Heterogeneous ranks: client c trains rank client_ranks[c % len] (each <= r, e.g. by "
        "device budget); needs strategy.lora_aggregation='svd'. Empty = every client uses r.",
    )

    def __post_init__(self) -> None:
        for i, rank in enumerate(self.client_ranks):
            _check(
                1 <= rank <= self.r, f"lora.client_ranks[{i}]", f"must be in [1, lora.r={self.r}]"
            )
        _check(self.r >= 1, "lora.r", "must be >= 1")
        _check(self.alpha >= 1, "lora.alpha", "must be >= 1")
        _check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        _check(bool(self.target_modules), "lora.target_modules", "must not be empty")


@dataclass
class EvalConfig:
    every: int = opt(
        1, "Evaluate the global adapter every N rounds (and always the last); 0 = never."
    )
    micro_batch_size: int = opt(8, "Examples per evaluation forward pass.")
    at_start: bool = opt(True, "Also evaluate the starting adapter, as round 0.")
    max_examples: int = opt(
        0, "Evaluate on at most N test examples (0 = all), same ones each round."
    )

    def __post_init__(self) -> None:
        _check(self.every >= 0, "eval.every", "must be >= 0")
        _check(self.micro_batch_size >= 1, "eval.micro_batch_size", "must be >= 1")
        _check(self.max_examples >= 0, "eval.max_examples", "must be >= 0")


FAULT_KINDS = ("fail", "nan", "huge")
CRASH_POINTS = ("train", "checkpoint")


@dataclass
class FaultsConfig:
    inject: list[str] = opt(
        [],
        "Injected client faults 'KIND:CLIENT:ROUND' (KIND fail | nan | huge; CLIENT and ROUND a "
        "number or '*'), to test and demonstrate fault handling.",
    )
    crash: str = opt(
        "",
        "Kill the run with SIGKILL at 'train:ROUND' (after the round's first client) or "
        "'checkpoint:ROUND' (mid-write), to test crash recovery.",
    )

    def __post_init__(self) -> None:
        for i, spec in enumerate(self.inject):
            parts = spec.split(":")
            ok = len(parts) == 3 and parts[0] in FAULT_KINDS
            ok = ok and all(p == "*" or p.isdigit() for p in parts[1:])
            _check(
                ok, f"faults.inject[{i}]", f"expected KIND:CLIENT:ROUND with KIND in {FAULT_KINDS}"
            )
        if self.crash:
            point, _, rnd = self.crash.partition(":")
            _check(
                point in CRASH_POINTS and rnd.isdigit(),
                "faults.crash",
                f"expected POINT:ROUND with POINT in {CRASH_POINTS}",
            )

    def injected(self, client: int, rnd: int) -> list[str]:
        """The fault kinds injected for this client in this round."""
        kinds = []
        for spec in self.inject:
            kind, c, r = spec.split(":")
            if c in ("*", str(client)) and r in ("*", str(rnd)):
                kinds.append(kind)
        return kinds

    def crashes_at(self, point: str, rnd: int) -> bool:
        return self.crash == f"{point}:{rnd}"


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
        _check(self.max_new_tokens >= 1, "generate.max_new_tokens", "must be >= 1")
        _check(self.per_category >= 0, "generate.per_category", "must be >= 0")
        _check(self.batch_size >= 1, "generate.batch_size", "must be >= 1")


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
        _check(self.repeats >= 1, "judge.repeats", "must be >= 1")
        _check(self.timeout > 0, "judge.timeout", "must be > 0")
        _check(self.max_retries >= 0, "judge.max_retries", "must be >= 0")
        _check(self.max_tokens >= 8, "judge.max_tokens", "must be >= 8")
        if self.base_url:
            _check(
                self.base_url.startswith(("http://", "https://")),
                "judge.base_url",
                f"must start with http:// or https://, got {self.base_url!r}",
            )


@dataclass
class CompareConfig:
    arms: list[str] = opt(
        ["base", "local", "fedit", "centralized"],
        "Arms of `fedit compare`: base (no tuning), local (clients alone), fedit, centralized.",
    )
    local_clients: int = opt(
        4, "Clients sampled for the local-only arm; each tunes alone for federation.rounds rounds."
    )

    def __post_init__(self) -> None:
        known = ("base", "local", "fedit", "centralized")
        for i, arm in enumerate(self.arms):
            _check(arm in known, f"compare.arms[{i}]", f"unknown arm {arm!r}; known: {known}")
        _check(self.local_clients >= 1, "compare.local_clients", "must be >= 1")


@dataclass
class FlowerConfig:
    round_timeout: float = opt(
        600.0, "Seconds a round waits for its nodes' replies; late or lost nodes are excluded."
    )
    connect_timeout: float = opt(
        300.0, "Seconds the server waits at the start for every client's node to connect."
    )
    worker_idle_timeout: float = opt(
        1800.0, "A node's model-holding worker exits after this many idle seconds."
    )

    def __post_init__(self) -> None:
        _check(self.round_timeout > 0, "flower.round_timeout", "must be > 0")
        _check(self.connect_timeout > 0, "flower.connect_timeout", "must be > 0")
        _check(self.worker_idle_timeout > 0, "flower.worker_idle_timeout", "must be > 0")


@dataclass
class PrivacyConfig:
    clip_norm: float = opt(
        0.0,
        "DP-FedAvg: clip each client's update delta to this L2 norm (0 = no differential "
        "privacy). Needs federation.strategy='fedavg' and lora_aggregation 'naive' or 'ffa'.",
    )
    noise_multiplier: float = opt(
        0.0, "DP-FedAvg: Gaussian noise std on the sum of clipped deltas, in units of clip_norm."
    )
    delta: float = opt(1e-5, "DP: the delta at which epsilon is reported.")
    epsilon_budget: float = opt(
        0.0, "DP: stop (or warn) before epsilon would exceed this; 0 = none."
    )
    on_budget: Literal["stop", "warn"] = opt("stop", "DP: what reaching epsilon_budget does.")

    def __post_init__(self) -> None:
        _check(self.clip_norm >= 0, "privacy.clip_norm", "must be >= 0")
        _check(self.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
        _check(0 < self.delta < 1, "privacy.delta", "must be in (0, 1)")
        _check(self.epsilon_budget >= 0, "privacy.epsilon_budget", "must be >= 0")
        if self.noise_multiplier > 0:
            _check(self.clip_norm > 0, "privacy.noise_multiplier", "needs privacy.clip_norm > 0")


@dataclass
class CompressionConfig:
    method: Literal["none", "fp16", "int8", "int4", "topk"] = opt(
        "none", "Upload encoding of each client's update delta."
    )
    block_size: int = opt(64, "int8 / int4: values per quantization block (one fp16 scale each).")
    topk_ratio: float = opt(0.1, "topk: fraction of each tensor's entries sent.")
    error_feedback: bool = opt(
        True, "Clients keep what compression dropped and add it to their next delta."
    )

    def __post_init__(self) -> None:
        _check(self.block_size >= 1, "compression.block_size", "must be >= 1")
        _check(0 < self.topk_ratio <= 1, "compression.topk_ratio", "must be in (0, 1]")


@dataclass
class Config:
    seed: int = opt(42, "Run seed; every random choice derives from it and the round.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)

    def __post_init__(self) -> None:
        s = self.strategy
        if self.lora.client_ranks and s.lora_aggregation != "svd":
            raise ConfigError(
                "lora.client_ranks: heterogeneous ranks need strategy.lora_aggregation='svd' "
                f"(got {s.lora_aggregation!r})"
            )
        lossy = self.compression.method not in ("none", "fp16")
        if lossy and self.compression.error_feedback and self.federation.workers > 1:
            raise ConfigError(
                "compression.error_feedback keeps each client's residual in the process that "
                "trains it; with federation.workers > 1 a client moves between processes: "
                "set federation.workers=1 or compression.error_feedback=false"
            )
        if self.compression.method != "none" and self.lora.client_ranks:
            raise ConfigError("compression.method: not supported with lora.client_ranks")
        if self.privacy.clip_norm and (
            self.federation.strategy != "fedavg" or s.lora_aggregation == "svd"
        ):
            raise ConfigError(
                "privacy.clip_norm: DP-FedAvg replaces the aggregation; it needs "
                "federation.strategy='fedavg' with strategy.lora_aggregation 'naive' or 'ffa' "
                f"(got {self.federation.strategy!r}, {s.lora_aggregation!r})"
            )
        if s.lora_aggregation == "svd" and s.robust != "mean":
            raise ConfigError(
                f"strategy.robust={s.robust!r} works on adapter coordinates; it cannot combine "
                "with strategy.lora_aggregation='svd' (use 'naive' or 'ffa')"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in get_args(tp):  # exact type match first, so 1 stays int and 1.0 float
            if type(value) is arg:
                return value
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, vt = get_args(tp)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{full}: unknown key (known in this section: {sorted(fields)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full}: expected a table of keys, got {value!r}")
            kwargs[key] = _build(tp, value, f"{full}.")  # type: ignore[arg-type]
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], value); the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. federation.rounds=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def merge_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: Mapping[str, Any]) -> Config:
    return typing.cast(Config, _build(Config, data, ""))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the TOML file (if any), then `--set` overrides; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p.resolve()}")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text: {e}") from e
    data = merge_overrides(data, overrides)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def iter_keys(cls: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every leaf key, in declaration order."""
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            yield (
                f"{prefix}{f.name}",
                _type_name(tp),
                getattr(default, f.name),
                f.metadata.get("help", ""),
            )


def to_toml(cfg: Config) -> str:
    """Serialize a config as TOML (for run records and `fedit config`)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        return repr(v)

    top: list[str] = []
    sections: list[str] = []
    for key, v in cfg.to_dict().items():
        if isinstance(v, dict) and dataclasses.is_dataclass(getattr(cfg, key)):
            sections.append(f"\n[{key}]")
            sections.extend(f"{k} = {value(x)}" for k, x in v.items())
        else:
            top.append(f"{key} = {value(v)}")
    return "\n".join(top + sections) + "\n"
