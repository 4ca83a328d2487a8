"""Personalized FedIT: what a client keeps for itself beside the global adapter.

A method (`personalization.method`) decides what a client trains from, what it keeps (its
personal state, in the client's own store: on the client's disk, stamped by round, never in
any message) and what it sends. The server side is plain FedAvg over what arrives.

- `none`: FedIT; the personal model is the global one.
- `finetune`: after the federation each client fine-tunes the final global adapter on its own
  data (`personalization.finetune_steps`); nothing is kept during the rounds.
- `ditto` (Li et al., ICML 2021): beside its global update, a client trains its personal
  adapter v on its own data with the proximal term lambda/2 ||v - w_global||^2
  (`personalization.ditto_lambda`), starting from its last v (the global adapter at first).
- `fedsa` (FedSA-LoRA, Guo et al., ICLR 2025): A is shared and averaged, B stays local; a
  client trains from the global A and its own B and sends A only.
- `feddpa` (FedDPA, Yang et al., NeurIPS 2024, its FedDPA-T variant): beside its global update,
  a client trains a local adapter (fresh at first, then its last one) on its own data with the
  global adapter it received frozen beside it, the two mixed half and half. Its personal model
  mixes them per instance: the local adapter's weight is `feddpa_max_weight` times the mean
  cosine similarity of the instance's representation (the last prompt token's last hidden
  state under the local adapter) to `feddpa_instances` of the client's training instances.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedit.client.batching import collate, token_losses
from fedit.client.mixing import Mixture, fresh_adapter
from fedit.client.train import train_local
from fedit.heldout import EvalSet, evaluate_loss
from fedit.lora import AdapterState, set_adapter
from fedit.protocol import ClientPlan, Task, Update
from fedit.registry import Registry
from fedit.seeding import derive_seed, generator

if TYPE_CHECKING:
    from fedit.config import Config
    from fedit.data.prompts import Example

PERSONALIZERS: Registry[Callable[[Config], Personalizer]] = Registry("personalization method")


def is_b(key: str) -> bool:
    return ".lora_B." in key


class Personalizer:
    """`none`: the global adapter is every client's model; nothing is kept."""

    keeps_state = False

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.p = cfg.personalization

    def start(self, task: Task, personal: AdapterState | None) -> AdapterState:
        """The adapter the client's round of training starts from."""
        return task.adapter

    def after(
        self,
        model: Any,
        task: Task,
        update: Update,
        examples: list[Example],
        personal: AdapterState | None,
        pad_id: int,
    ) -> AdapterState | None:
        """The personal state to keep after this round (None: keep nothing new)."""
        return None

    def outgoing(self, state: AdapterState) -> AdapterState:
        """What of the trained adapter is sent to the server."""
        return state

    def model(
        self,
        model: Any,
        task: Task,
        examples: list[Example],
        personal: AdapterState | None,
        pad_id: int,
    ) -> AdapterState | None:
        """The client's personal adapter to evaluate (None: it has none beyond the global)."""
        return None

    def score(
        self,
        model: Any,
        task: Task,
        mine: AdapterState,
        own: EvalSet,
        examples: list[Example],
        pad_id: int,
    ) -> float:
        """The loss of the personal model `mine` (from `model()`) on the client's own records."""
        set_adapter(model, mine)
        return float(evaluate_loss(model, own, pad_id)["loss"])

    def compose(self, global_state: AdapterState, personal: AdapterState) -> AdapterState:
        """The client's personal model from the global adapter and its kept state."""
        return {**global_state, **personal}


@PERSONALIZERS.register("none")
def _none(cfg: Config) -> Personalizer:
    return Personalizer(cfg)


class FineTune(Personalizer):
    def model(
        self,
        model: Any,
        task: Task,
        examples: list[Example],
        personal: AdapterState | None,
        pad_id: int,
    ) -> AdapterState | None:
        if task.round < self.cfg.federation.rounds:
            return None  # only the final global adapter is fine-tuned
        steps = self.p.finetune_steps or self.cfg.client.max_steps
        client = replace(
            self.cfg.client, max_steps=steps, lr=self.p.finetune_lr or self.cfg.client.lr
        )
        seed = derive_seed(self.cfg.seed, "finetune", task.client)
        return train_local(
            model,
            task.adapter,
            examples,
            client,
            client_id=task.client,
            seed=seed,
            pad_token_id=pad_id,
        ).state


@PERSONALIZERS.register("finetune")
def _finetune(cfg: Config) -> Personalizer:
    return FineTune(cfg)


class Kept(Personalizer):
    """A method whose personal model is the adapter the client keeps."""

    keeps_state = True

    def model(
        self,
        model: Any,
        task: Task,
        examples: list[Example],
        personal: AdapterState | None,
        pad_id: int,
    ) -> AdapterState | None:
        return personal


class Ditto(Kept):
    def after(
        self,
        model: Any,
        task: Task,
        update: Update,
        examples: list[Example],
        personal: AdapterState | None,
        pad_id: int,
    ) -> AdapterState | None:
        seed = derive_seed(self.cfg.seed, "ditto", task.round, task.client)
        return train_local(
            model,
            personal if personal is not None else task.adapter,
            examples,
            self.cfg.client,
            client_id=task.client,
            seed=seed,
            pad_token_id=pad_id,
            plan=ClientPlan(prox_mu=self.p.ditto_lambda),
            anchor=task.adapter,
        ).state


@PERSONALIZERS.register("ditto")
def _ditto(cfg: Config) -> Personalizer:
    return Ditto(cfg)


class FedSA(Personalizer):
    keeps_state = True

    def start(self, task: Task, personal: AdapterState | None) -> AdapterState:
        if personal is None:
            return task.adapter
        return {k: personal[k] if is_b(k) else v for k, v in task.adapter.items()}

    def after(
        self,
        model: Any,
        task: Task,
        update: Update,
        examples: list[Example],
        personal: AdapterState | None,
        pad_id: int,
    ) -> AdapterState | None:
        return {k: v for k, v in update.state.items() if is_b(k)}

    def outgoing(self, state: AdapterState) -> AdapterState:
        return {k: v for k, v in state.items() if not is_b(k)}

    def model(
        self,
        model: Any,
        task: Task,
        examples: list[Example],
        personal: AdapterState | None,
        pad_id: int,
    ) -> AdapterState | None:
        return self.start(task, personal) if personal is not None else None


@PERSONALIZERS.register("fedsa")
def _fedsa(cfg: Config) -> Personalizer:
    return FedSA(cfg)


FEDDPA_TRAIN_WEIGHT = 0.5  # the local adapter's share while it trains (the paper's code)


class FedDPA(Kept):
    def after(
        self,
        model: Any,
        task: Task,
        update: Update,
        examples: list[Example],
        personal: AdapterState | None,
        pad_id: int,
    ) -> AdapterState | None:
        if personal is None:
            personal = fresh_adapter(
                task.adapter, derive_seed(self.cfg.seed, "feddpa", task.client)
            )
        with Mixture(model, task.adapter) as mix:
            mix.weight(FEDDPA_TRAIN_WEIGHT)
            return train_local(
                model,
                personal,
                examples,
                self.cfg.client,
                client_id=task.client,
                seed=derive_seed(self.cfg.seed, "feddpa", task.round, task.client),
                pad_token_id=pad_id,
            ).state

    def score(
        self,
        model: Any,
        task: Task,
        mine: AdapterState,
        own: EvalSet,
        examples: list[Example],
        pad_id: int,
    ) -> float:
        rng = generator(self.cfg.seed, "feddpa-reference", task.client)
        n = min(self.p.feddpa_instances, len(examples))
        reference = [examples[int(i)] for i in sorted(rng.choice(len(examples), n, replace=False))]
        set_adapter(model, mine)
        refs = torch.stack([embed(model, e) for e in reference])
        weights = [
            local_weight(embed(model, e), refs, self.p.feddpa_max_weight) for e in own.examples
        ]
        loss_sum, tokens = 0.0, 0
        was_training = model.training
        model.eval()
        try:
            with Mixture(model, task.adapter) as mix, torch.inference_mode():
                for e, w in zip(own.examples, weights, strict=True):
                    mix.weight(w)
                    losses, counts = token_losses(model, collate([e], pad_id))
                    loss_sum += float(losses.sum())
                    tokens += int(counts.sum())
        finally:
            model.train(was_training)
        return loss_sum / tokens if tokens else float("nan")

    def compose(self, global_state: AdapterState, personal: AdapterState) -> AdapterState:
        from fedit.config import ConfigError

        raise ConfigError(
            "personalization.method='feddpa': a client's personal model weighs its local and the "
            "global adapter per instance, so it is not one adapter to generate from, serve or "
            "export; it is scored in the evaluation (own_data) and in fedit compare"
        )


@torch.inference_mode()
def embed(model: Any, example: Example) -> torch.Tensor:
    """The last hidden state at an example's last prompt token (the instance's representation)."""
    n = example.prompt_len or len(example.input_ids)
    ids = torch.tensor([example.input_ids[:n]], device=model.device)
    was_training = model.training
    model.eval()
    dtype = getattr(model, "fedit_autocast", None)
    try:
        with torch.autocast(
            model.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        model.train(was_training)
    return out.hidden_states[-1][0, -1].float().cpu()


def local_weight(x: torch.Tensor, refs: torch.Tensor, max_weight: float) -> float:
    """FedDPA's instance-wise weight of the local adapter: max_weight times the mean cosine
    similarity of `x` to the reference representations (rows of `refs`), kept in [0, 1]."""
    sim = torch.nn.functional.cosine_similarity(refs, x.unsqueeze(0), dim=1).mean()
    return float(min(1.0, max(0.0, max_weight * float(sim))))


@PERSONALIZERS.register("feddpa")
def _feddpa(cfg: Config) -> Personalizer:
    return FedDPA(cfg)


def personal_files(run: Path, client: int) -> list[Path]:
    """Client `client`'s kept states under a run folder (its own, or a Flower node's state
    folder inside it), oldest round first."""
    pattern = f"personal/client_{client:04d}/round_*.safetensors"
    return sorted(run.rglob(pattern), key=lambda p: p.name)


def personal_adapter(
    cfg: Config, run: Path, client: int, global_state: AdapterState
) -> AdapterState:
    """Client `client`'s personal model of the run in `run` (for generate, serve, export)."""
    from safetensors.torch import load_file

    from fedit.config import ConfigError

    method = cfg.personalization.method
    if method == "none":
        raise ConfigError(f"--client {client}: {run} ran without personalization (method 'none')")
    files = personal_files(run, client)
    if not files:
        raise ConfigError(
            f"--client {client}: no personal model of client {client} under {run} (method "
            f"{method!r}: a client keeps one once it trained, or, with 'finetune', after the "
            "final evaluation with data.client_test_fraction > 0)"
        )
    return PERSONALIZERS.get(method)(cfg).compose(global_state, load_file(str(files[-1])))
