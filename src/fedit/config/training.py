"""Sections that shape training: the model, data, partition, federation, strategy, client, LoRA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fedit.config.fields import ConfigError, check, opt


@dataclass
class ModelConfig:
    name: str = opt(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "Base model: a local HF folder, a hub id (online), "
        "'HuggingFaceTB/SmolLM2-135M-Instruct' (offline packaged copy), 'fedit/tiny-llama' "
        "(random-init test model) or 'fedit/random:<preset or HF config folder>' (a real "
        "architecture at full size with random weights, for throughput: presets "
        "llama-7b, llama2-7b, llama2-13b, smollm2-135m).",
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
    quantization: Literal["none", "8bit", "4bit"] = opt(
        "none",
        "Frozen base weights in 8-bit (LLM.int8) or 4-bit NF4 with double quantization and "
        "bf16 compute (the QLoRA recipe; LoRA stays in fp32); bitsandbytes, CUDA only.",
    )
    gradient_checkpointing: bool = opt(
        False, "Recompute each layer's activations in backward (less memory, ~30% more compute)."
    )
    check_memory: bool = opt(
        True, "Refuse up front a run whose estimated peak memory exceeds what is available."
    )

    def __post_init__(self) -> None:
        check(bool(self.name), "model.name", "must not be empty")
        check(self.threads >= 0, "model.threads", "must be >= 0")
        check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "model.device",
            "must be 'auto', 'cpu', 'cuda' or 'cuda:N'",
        )


FIELD_ROLES = {"instruction", "input", "output", "category", "user", "messages", "role", "content"}
SOURCE_KEYS = {"path", "format", "fields", "roles", "tags", "category", "max_records", "clients",
               "train_records"}  # fmt: skip


def check_source(src: Any, where: str) -> None:
    """One table of data.sources, key by key."""
    check(isinstance(src, dict), where, "must be a table {path = ..., ...}")
    unknown = sorted(set(src) - SOURCE_KEYS)
    check(
        not unknown,
        f"{where}.{unknown[0] if unknown else ''}",
        f"unknown key (known: {sorted(SOURCE_KEYS)})",
    )
    check(
        isinstance(src.get("path"), str) and bool(src.get("path")),
        f"{where}.path",
        "must be a non-empty string",
    )
    fmt = src.get("format", "auto")
    check(
        fmt in ("auto", "dolly", "alpaca", "chat"),
        f"{where}.format",
        f"must be auto, dolly, alpaca or chat, got {fmt!r}",
    )
    for key in ("fields", "roles", "tags"):
        table = src.get(key, {})
        check(
            isinstance(table, dict) and all(isinstance(v, str) for v in table.values()),
            f"{where}.{key}",
            "must be a table of strings",
        )
    for key in ("max_records", "clients", "train_records"):
        n = src.get(key, 0)
        check(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0,
            f"{where}.{key}",
            f"must be an integer >= 0, got {n!r}",
        )
    for role in src.get("fields", {}):
        check(
            role in FIELD_ROLES,
            f"{where}.fields.{role}",
            f"unknown role (known: {sorted(FIELD_ROLES)})",
        )
    for name, role in src.get("roles", {}).items():
        check(
            role in ("system", "user", "assistant"),
            f"{where}.roles.{name}",
            f"must be system, user or assistant, got {role!r}",
        )
    check(isinstance(src.get("category", ""), str), f"{where}.category", "must be a string")


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
    test_split_by: list[str] = opt(
        [],
        "Tags of data.sources the test split is also drawn per, e.g. ['language']: "
        "test_per_category per category and language, so each language has its own test set.",
    )
    client_test_fraction: float = opt(
        0.0,
        "Hold out this fraction of each client's own records (at least one, seeded per client, "
        "never trained on) and score every evaluation on each client's own held-out examples.",
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
    roles: dict[str, str] = opt(
        {},
        "Chat turns: the record's role names mapped to system | user | assistant, e.g. "
        "{human='user', gpt='assistant'} for ShareGPT (with fields {messages='conversations', "
        "role='from', content='value'}).",
    )
    sources: list[dict[str, Any]] = opt(
        [],
        "Several files in one federation, each a table {path, format, fields, roles, tags, "
        "category, max_records, clients, train_records}; tags (e.g. {domain='code'}) are kept on "
        "every record and tag:NAME can define clients (partition.natural_field); `clients = k` "
        "on every source splits each source into its own k clients; `train_records = n` keeps "
        "n of the source's records left after the test split for training (a seeded sample; a "
        "smaller n keeps a subset of a larger one's, and the test split does not move), 0 = "
        "the source only feeds the test split. Empty = data.path alone.",
    )
    license: str = opt(
        "",
        "The data's license, written into every adapter's model card; '' = looked up for the "
        "data sets fedit knows (dolly-15k: CC BY-SA 3.0), else 'not stated'.",
    )

    def __post_init__(self) -> None:
        check(bool(self.path), "data.path", "must not be empty")
        check(self.test_per_category >= 0, "data.test_per_category", "must be >= 0")
        check(self.cutoff_len >= 8, "data.cutoff_len", "must be >= 8")
        check(self.max_records >= 0, "data.max_records", "must be >= 0")
        check(
            0.0 <= self.client_test_fraction <= 0.5,
            "data.client_test_fraction",
            "must be in [0, 0.5]",
        )
        for role in self.fields:
            check(
                role in FIELD_ROLES,
                f"data.fields.{role}",
                f"unknown role (known: {sorted(FIELD_ROLES)})",
            )
        for name, role in self.roles.items():
            check(
                role in ("system", "user", "assistant"),
                f"data.roles.{name}",
                f"must be system, user or assistant, got {role!r}",
            )
        for i, src in enumerate(self.sources):
            check_source(src, f"data.sources[{i}]")
        for name in self.test_split_by:
            check(bool(self.sources), "data.test_split_by", "needs data.sources with tags")
            for i, src in enumerate(self.sources):
                check(
                    name in src.get("tags", {}) or name == "source",
                    f"data.sources[{i}].tags.{name}",
                    f"missing: data.test_split_by asks for a {name!r} tag on every source",
                )
        for i, src in enumerate(self.sources):
            check(
                src.get("train_records") != 0 or not src.get("clients"),
                f"data.sources[{i}].clients",
                "train_records = 0 makes this source test-only: it has no clients",
            )
        counted = [bool(src.get("clients")) or src.get("train_records") == 0
                   for src in self.sources]  # fmt: skip
        if any(counted):
            i = counted.index(False) if not all(counted) else -1
            check(
                i < 0,
                f"data.sources[{i}].clients",
                "clients is set on another source: give every source its number of clients "
                "(each source is split into its own clients)",
            )


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
    natural_field: str = opt(
        "user", "What defines clients for 'natural': user, category or tag:NAME (e.g. tag:source)."
    )
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
        check(self.num_clients >= 0, "partition.num_clients", "must be >= 0")
        check(self.alpha > 0, "partition.alpha", "must be > 0")
        check(self.shards_per_client >= 1, "partition.shards_per_client", "must be >= 1")
        check(self.min_client_size >= 1, "partition.min_client_size", "must be >= 1")
        check(
            self.natural_field in {"user", "category"} or self.natural_field.startswith("tag:"),
            "partition.natural_field",
            "must be 'user', 'category' or 'tag:NAME' (a data.sources tag, e.g. tag:source)",
        )
        for i, c in enumerate(self.only):
            check(c >= 0, f"partition.only[{i}]", "client indices are >= 0")
        check(len(set(self.only)) == len(self.only), "partition.only", "repeats a client")


@dataclass
class FederationConfig:
    rounds: int = opt(3, "Communication rounds.")
    clients_per_round: int | float = opt(
        2, "Clients sampled per round: an int count, or a float fraction in (0, 1]."
    )
    strategy: str = opt(
        "fedavg",
        "Aggregation strategy: fedavg, fedprox, fednova, fedavgm, fedadam, fedyogi, "
        "fedadagrad, scaffold, qfedavg, or a registered name.",
    )
    selection: str = opt(
        "uniform",
        "Client-selection rule: uniform, size, all, poisson, power_of_choice, coverage, "
        "resource (docs/heterogeneity.md), tag_mix (a target mix of a tag's values, e.g. "
        "languages), or a registered name.",
    )
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
        check(self.rounds >= 0, "federation.rounds", "must be >= 0")
        check(self.min_clients >= 1, "federation.min_clients", "must be >= 1")
        check(self.workers >= 1, "federation.workers", "must be >= 1")
        check(self.max_norm_ratio >= 0, "federation.max_norm_ratio", "must be >= 0")
        k = self.clients_per_round
        if isinstance(k, float):
            check(0 < k <= 1, "federation.clients_per_round", "a fraction must be in (0, 1]")
        else:
            check(k >= 1, "federation.clients_per_round", "must be >= 1")

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
        check(self.local_epochs > 0, "client.local_epochs", "must be > 0")
        check(self.max_steps >= 0, "client.max_steps", "must be >= 0")
        check(self.batch_size >= 1, "client.batch_size", "must be >= 1")
        check(self.micro_batch_size >= 1, "client.micro_batch_size", "must be >= 1")
        check(
            self.batch_size % self.micro_batch_size == 0,
            "client.batch_size",
            f"must be a multiple of client.micro_batch_size ({self.micro_batch_size})",
        )
        check(self.lr > 0, "client.lr", "must be > 0")
        check(self.weight_decay >= 0, "client.weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, "client.warmup_steps", "must be >= 0")
        check(self.max_grad_norm >= 0, "client.max_grad_norm", "must be >= 0")


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
            check(
                1 <= rank <= self.r, f"lora.client_ranks[{i}]", f"must be in [1, lora.r={self.r}]"
            )
        check(self.r >= 1, "lora.r", "must be >= 1")
        check(self.alpha >= 1, "lora.alpha", "must be >= 1")
        check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        check(bool(self.target_modules), "lora.target_modules", "must not be empty")
