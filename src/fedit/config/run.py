"""Sections around the rounds: evaluation, faults, client systems, Flower, privacy,
compression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedit.config.fields import check, opt
from fedit.faults import crash_problem, crashes_at, injected_kinds, injection_problem


@dataclass
class EvalConfig:
    every: int = opt(
        1, "Evaluate the global adapter every N rounds (and always the last); 0 = never."
    )
    micro_batch_size: int = opt(8, "Examples per evaluation forward pass.")
    at_start: bool = opt(True, "Also evaluate the starting adapter, as round 0.")
    tensorboard: bool = opt(
        True, "Also write each round's metrics as TensorBoard event files in RUN/tensorboard/."
    )
    max_examples: int = opt(
        0, "Evaluate on at most N test examples (0 = all), same ones each round."
    )
    suites: list[str] = opt(
        [],
        "Question sets every arm of `fedit compare` is also scored on: dolly-test, vicuna80, "
        "mt-bench, self-instruct, fed-aya, vicuna80-LANG, or a path to your own .jsonl.",
    )
    suite_items: int = opt(
        0, "At most N items per suite (a seeded sample, the same for every model; 0 = all)."
    )
    vicuna80_reference: str = opt(
        "gpt35",
        "Recorded answers scored as the vicuna80 suite's references (ROUGE-L, similarity): "
        "eval/vicuna80/answer/answer_NAME.jsonl, e.g. gpt35, bard; '' for none.",
    )

    def __post_init__(self) -> None:
        check(self.every >= 0, "eval.every", "must be >= 0")
        check(self.suite_items >= 0, "eval.suite_items", "must be >= 0")
        known = ("dolly-test", "vicuna80", "mt-bench", "self-instruct", "fed-aya")
        for i, name in enumerate(self.suites):
            check(
                name in known or name.startswith("vicuna80-") or name.endswith((".jsonl", ".json")),
                f"eval.suites[{i}]",
                f"unknown suite {name!r}; known: {', '.join(known)}, vicuna80-LANG, or a .jsonl",
            )
        check(self.micro_batch_size >= 1, "eval.micro_batch_size", "must be >= 1")
        check(self.max_examples >= 0, "eval.max_examples", "must be >= 0")


@dataclass
class FaultsConfig:
    inject: list[str] = opt(
        [],
        "Injected client faults 'KIND:CLIENT:ROUND' (KIND fail | nan | huge, applied by the server "
        "as it receives the update, or leave: under secure aggregation the client's node exits "
        "after sending its masked update; CLIENT and ROUND a number or '*'), to test and "
        "demonstrate fault handling.",
    )
    crash: str = opt(
        "",
        "Kill the run with SIGKILL at 'train:ROUND' (after the round's first client) or "
        "'checkpoint:ROUND' (mid-write), to test crash recovery.",
    )

    def __post_init__(self) -> None:
        for i, spec in enumerate(self.inject):
            problem = injection_problem(spec)
            check(problem is None, f"faults.inject[{i}]", str(problem))
        if self.crash:
            problem = crash_problem(self.crash)
            check(problem is None, "faults.crash", str(problem))

    def injected(self, client: int, rnd: int) -> list[str]:
        """The fault kinds injected for this client in this round."""
        return injected_kinds(self.inject, client, rnd)

    def crashes_at(self, point: str, rnd: int) -> bool:
        return crashes_at(self.crash, point, rnd)


@dataclass
class SystemConfig:
    speed: str = opt(
        "",
        "Simulated client speed relative to 1 (steps per virtual second / system.step_seconds), "
        "drawn per client: 'const:X', 'uniform:LO:HI' or 'lognormal:MU:SIGMA' ('' = all 1).",
    )
    availability: str = opt(
        "",
        "Probability a client is online in a round, per client: 'const:P', 'uniform:LO:HI' or "
        "'beta:A:B' ('' = always online).",
    )
    diurnal: float = opt(
        0.0,
        "Amplitude in [0, 1] of a daily cycle on availability: at the low of its (per-client) "
        "phase a client's availability is multiplied by 1 - diurnal.",
    )
    period: int = opt(24, "Rounds per simulated day of the diurnal cycle.")
    profiles: str = opt(
        "",
        "CSV file of client profiles with a header: client,speed,availability[,phase]; its "
        "rows replace the drawn values for the clients they name.",
    )
    step_seconds: float = opt(1.0, "Virtual seconds one local step takes at speed 1.")
    deadline: float = opt(0.0, "Virtual seconds a round waits for its clients (0 = no deadline).")
    straggler: Literal["drop", "partial"] = opt(
        "drop",
        "A client that cannot finish by the deadline: 'drop' it, or take the 'partial' work "
        "(the steps it completed by then; aggregate with fednova to weigh it right).",
    )

    def __post_init__(self) -> None:
        for key, value, kinds in (
            ("system.speed", self.speed, ("const", "uniform", "lognormal")),
            ("system.availability", self.availability, ("const", "uniform", "beta")),
        ):
            problem = distribution_problem(value, kinds)
            check(problem is None, key, str(problem))
        if self.speed and self.speed.split(":")[0] != "lognormal":
            low = min(float(a) for a in self.speed.split(":")[1:])
            check(low > 0, "system.speed", f"{self.speed!r}: speeds must be > 0")
        if self.availability and self.availability.split(":")[0] != "beta":
            vals = [float(a) for a in self.availability.split(":")[1:]]
            check(min(vals) >= 0 and max(vals) <= 1, "system.availability",
                  f"{self.availability!r}: probabilities must be in [0, 1]")  # fmt: skip
        check(0 <= self.diurnal <= 1, "system.diurnal", "must be in [0, 1]")
        check(self.period >= 1, "system.period", "must be >= 1")
        check(self.step_seconds > 0, "system.step_seconds", "must be > 0")
        check(self.deadline >= 0, "system.deadline", "must be >= 0")

    @property
    def enabled(self) -> bool:
        return bool(self.speed or self.availability or self.diurnal or self.profiles
                    or self.deadline)  # fmt: skip


def distribution_problem(spec: str, kinds: tuple[str, ...]) -> str | None:
    """What is wrong with a 'KIND:ARG[:ARG]' distribution spec ('' is fine)."""
    if not spec:
        return None
    kind, *args = spec.split(":")
    want = {"const": 1, "uniform": 2, "lognormal": 2, "beta": 2}
    if kind not in kinds:
        return f"{spec!r}: expected one of {', '.join(k + ':...' for k in kinds)}"
    try:
        values = [float(a) for a in args]
    except ValueError:
        return f"{spec!r}: the arguments must be numbers"
    if len(values) != want[kind]:
        return f"{spec!r}: {kind} takes {want[kind]} number(s)"
    if kind == "uniform" and not values[0] <= values[1]:
        return f"{spec!r}: LO must be <= HI"
    if kind == "beta" and min(values) <= 0:
        return f"{spec!r}: A and B must be > 0"
    if kind == "lognormal" and values[1] < 0:
        return f"{spec!r}: SIGMA must be >= 0"
    return None


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
        check(self.round_timeout > 0, "flower.round_timeout", "must be > 0")
        check(self.connect_timeout > 0, "flower.connect_timeout", "must be > 0")
        check(self.worker_idle_timeout > 0, "flower.worker_idle_timeout", "must be > 0")


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
    secure_aggregation: bool = opt(
        False,
        "Flower only: the server learns only the sum of the round's updates (Flower's SecAgg+; "
        "with DP the clients clip and add the noise). Needs a sum-based rule: fedavg, fedprox, "
        "fedavgm, fedadam, fedyogi or fedadagrad with naive, ffa or rolora LoRA aggregation.",
    )
    secagg_clipping_range: float = opt(
        8.0,
        "Secure aggregation: each weighted update delta value is clipped to +-this before "
        "SecAgg+ quantizes it to 2^22 levels (Flower's default range).",
    )

    def __post_init__(self) -> None:
        check(self.clip_norm >= 0, "privacy.clip_norm", "must be >= 0")
        check(self.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
        check(0 < self.delta < 1, "privacy.delta", "must be in (0, 1)")
        check(self.epsilon_budget >= 0, "privacy.epsilon_budget", "must be >= 0")
        if self.noise_multiplier > 0:
            check(self.clip_norm > 0, "privacy.noise_multiplier", "needs privacy.clip_norm > 0")
        check(self.secagg_clipping_range > 0, "privacy.secagg_clipping_range", "must be > 0")


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
        check(self.block_size >= 1, "compression.block_size", "must be >= 1")
        check(0 < self.topk_ratio <= 1, "compression.topk_ratio", "must be in (0, 1]")


@dataclass
class PersonalizationConfig:
    method: Literal["none", "finetune", "ditto", "fedsa", "feddpa"] = opt(
        "none",
        "A model per client beside the global one: 'finetune' (the final global adapter tuned "
        "on each client's data), 'ditto' (a personal adapter pulled toward the global one), "
        "'fedsa' (FedSA-LoRA: A shared, B kept on the client), 'feddpa' (FedDPA: a local "
        "adapter mixed with the global one per instance). Scored on data.client_test_fraction.",
    )
    ditto_lambda: float = opt(0.1, "ditto: weight of the proximal term lambda/2 ||v - w||^2.")
    finetune_steps: int = opt(
        0, "finetune: local steps on the final global adapter (0 = client.max_steps)."
    )
    finetune_lr: float = opt(0.0, "finetune: learning rate (0 = client.lr).")
    feddpa_max_weight: float = opt(
        0.5,
        "feddpa: the local adapter's weight for an instance is this times its mean cosine "
        "similarity to the client's reference instances (the global one gets the rest).",
    )
    feddpa_instances: int = opt(
        5, "feddpa: the client's own training instances an instance is compared with."
    )

    def __post_init__(self) -> None:
        check(self.ditto_lambda >= 0, "personalization.ditto_lambda", "must be >= 0")
        check(self.finetune_steps >= 0, "personalization.finetune_steps", "must be >= 0")
        check(self.finetune_lr >= 0, "personalization.finetune_lr", "must be >= 0")
        check(
            0 <= self.feddpa_max_weight <= 1,
            "personalization.feddpa_max_weight",
            "must be in [0, 1]",
        )
        check(self.feddpa_instances >= 1, "personalization.feddpa_instances", "must be >= 1")
