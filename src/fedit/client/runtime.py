"""What runs on a data owner's machine for a run: the client runtime.

A `ClientRuntime` holds the base model with LoRA attached, the records of the clients it
serves (all of them in one process, one client on a Flower node), each client's tokenized data
(tokenized once, on first use) and the state a client keeps between rounds (`ClientStore`: the
error-feedback residuals of update compression). It answers a `Task` with an `Update` through
the one `train_local`. Every engine builds this and nothing else on the client side.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from fedit.client.personal import PERSONALIZERS
from fedit.client.train import train_local
from fedit.compression import Codec
from fedit.config import Config
from fedit.data.prompts import Example, tokenize_records, usable_count
from fedit.data.records import DataError, Record
from fedit.deltas import clipped_delta, gaussian_noise
from fedit.files import atomic_bytes, atomic_file
from fedit.heldout import EvalSet, evaluate_loss, scored_examples
from fedit.lora import AdapterState, LoraModel, set_adapter, state_bytes
from fedit.progress import Progress
from fedit.protocol import Payload, Task, Update
from fedit.seeding import derive_seed, generator

_ROUND_FILE = re.compile(r"round_(\d{4,})\.safetensors$")


class ClientStore:
    """State each client keeps between its rounds, stamped with the round that produced it.

    A client training round r continues from its latest state of a round before r, so a round
    redone after the server resumes sees exactly what the interrupted one saw. With `folder`
    (a Flower node) the state also lives on the node's disk, one file per client and round,
    so it survives the node's worker and the server restarting.
    """

    def __init__(self, folder: Path | None = None, cache: bool = True) -> None:
        self.folder = folder
        # With a folder and no cache, states live on disk only: a run with thousands of
        # clients never holds them all in memory.
        self.cache = cache or folder is None
        self.mem: dict[int, dict[int, AdapterState]] = {}
        self.secrets: dict[int, tuple[int, ...]] = {}

    def _client_dir(self, client: int) -> Path:
        assert self.folder is not None
        return self.folder / f"client_{client:04d}"

    def _rounds(self, client: int) -> dict[int, AdapterState | None]:
        found: dict[int, AdapterState | None] = dict(self.mem.get(client, {}))
        if self.folder is not None and self._client_dir(client).is_dir():
            for p in self._client_dir(client).iterdir():
                m = _ROUND_FILE.match(p.name)
                if m and int(m.group(1)) not in found:
                    found[int(m.group(1))] = None  # on disk, read when asked for
        return found

    def get(self, client: int, before: int) -> AdapterState | None:
        rnd = self._used(client, before)
        if rnd is None:
            return None
        state = self.mem.get(client, {}).get(rnd)
        if state is None:
            state = load_file(str(self._client_dir(client) / f"round_{rnd:04d}.safetensors"))
        return state

    def put(self, client: int, rnd: int, state: AdapterState) -> None:
        # The server committed every round before this one, so only the state this round
        # started from can be asked for again (if the round is redone): older entries go.
        used = self._used(client, rnd)
        for old in [r for r in self._rounds(client) if r < rnd and r != used]:
            self.mem.get(client, {}).pop(old, None)
            if self.folder is not None:
                (self._client_dir(client) / f"round_{old:04d}.safetensors").unlink(missing_ok=True)
        if self.cache:
            self.mem.setdefault(client, {})[rnd] = state
        if self.folder is not None:
            path = self._client_dir(client) / f"round_{rnd:04d}.safetensors"
            with atomic_file(path, binary=True) as f:
                f.write(_safetensors_bytes(state))

    def secret(self, client: int) -> tuple[int, ...]:
        """A seed only this client knows (its DP noise shares under secure aggregation): drawn
        from the OS at first use and kept owner-only in the client's folder, so the same node
        repeats its noise while the server, which knows the run's seed, cannot regenerate it."""
        if client not in self.secrets:
            path = self._client_dir(client) / "noise.key" if self.folder is not None else None
            if path is not None and path.is_file():
                key = path.read_bytes()
            else:
                key = os.urandom(32)
                if path is not None:
                    atomic_bytes(path, key, private=True)
            words = hashlib.sha256(key).digest()
            self.secrets[client] = tuple(
                int.from_bytes(words[i : i + 4], "big") for i in (0, 4, 8, 12, 16, 20, 24, 28)
            )
        return self.secrets[client]

    def _used(self, client: int, before: int) -> int | None:
        """The round of the latest state before round `before`."""
        earlier = [r for r in self._rounds(client) if r < before]
        return max(earlier) if earlier else None

    def state_dict(self, upto: int) -> dict[str, torch.Tensor]:
        """Each client's latest state of a round <= `upto`, for the run's checkpoint."""
        out: dict[str, torch.Tensor] = {}
        for client in sorted(self.mem):
            state = self.get(client, upto + 1)
            rnd = self._used(client, upto + 1)
            if state is not None:
                out.update({f"{client}/{rnd}/{k}": v for k, v in state.items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.mem = {}
        for key, v in state.items():
            client, rnd, name = key.split("/", 2)
            self.mem.setdefault(int(client), {}).setdefault(int(rnd), {})[name] = v


def _safetensors_bytes(state: AdapterState) -> bytes:
    return save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def category_counts(records: Sequence[Record]) -> dict[str, int]:
    return dict(sorted(Counter(r.category for r in records).items()))


def common_tags(records: Sequence[Record]) -> dict[str, str]:
    """The tags (data.sources) every one of a client's records carries with one value."""
    if not records:
        return {}
    first = records[0].tags
    return {k: v for k, v in sorted(first.items()) if all(r.tags.get(k) == v for r in records)}


def check_client_data(data: Mapping[int, Sequence[Record]], tokenizer: Any, cfg: Config) -> None:
    """Before round 1: every client keeps at least one example at `data.cutoff_len`."""
    d = cfg.data
    for client in sorted(data):
        records = data[client]
        if not usable_count(records, tokenizer, d.template, d.cutoff_len, d.train_on_inputs):
            raise DataError(
                f"client {client}: all {len(records)} examples lose their response at "
                f"data.cutoff_len={d.cutoff_len}; raise it"
            )


class ClientRuntime:
    """The client side of a run for the clients in `data` (client id -> its records)."""

    def __init__(
        self,
        cfg: Config,
        lm: LoraModel,
        data: Mapping[int, Sequence[Record]],
        progress: Progress | None = None,
        store: ClientStore | None = None,
        own: Mapping[int, Sequence[Record]] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.lm = lm
        self.data = data
        self.own = own or {}  # each client's own held-out records (data.client_test_fraction)
        self.progress = progress or Progress(enabled=False)
        self.store = store or ClientStore()
        self.codec = Codec.from_config(cfg.compression)
        self.personalizer = PERSONALIZERS.get(cfg.personalization.method)(cfg)
        self.personal = ClientStore(state_dir / "personal" if state_dir else None, cache=False)
        self._examples: dict[int, list[Example]] = {}
        self._own_sets: dict[int, EvalSet | None] = {}

    @property
    def model(self) -> object:
        return self.lm.model

    def sizes(self) -> list[int]:
        """Record counts of clients 0..n-1 (what selection weighs clients by)."""
        return [len(self.data[c]) for c in range(len(self.data))]

    def tags(self) -> list[dict[str, str]]:
        """Tags shared by all records of clients 0..n-1 (e.g. their language)."""
        return [common_tags(self.data[c]) for c in range(len(self.data))]

    def categories(self) -> list[dict[str, int]]:
        """Records per category of clients 0..n-1 (what coverage-aware selection reads)."""
        return [category_counts(self.data[c]) for c in range(len(self.data))]

    def examples(self, client: int) -> list[Example]:
        """Tokenized once per client, on first use, then kept for the run."""
        if client not in self._examples:
            if client not in self.data:
                raise DataError(f"client {client}: no data here (clients {sorted(self.data)})")
            d = self.cfg.data
            examples, dropped = tokenize_records(
                self.data[client], self.lm.tokenizer, d.template, d.cutoff_len, d.train_on_inputs
            )
            if not examples:
                raise DataError(
                    f"client {client}: all {dropped} examples lose their response at "
                    f"data.cutoff_len={d.cutoff_len}; raise it"
                )
            if dropped:
                self.progress.log(
                    f"client {client}: {dropped} of {dropped + len(examples)} examples dropped "
                    f"(response starts past data.cutoff_len={d.cutoff_len})"
                )
            self._examples[client] = examples
        return self._examples[client]

    def use_store_folder(self, folder: Path) -> None:
        """A Flower node: its client's state (residuals, personal state) on its own disk."""
        self.store = ClientStore(folder)
        self.personal = ClientStore(folder / "personal", cache=False)

    def train(self, task: Task, slot: str = "") -> Update:
        """One client's local training from the task's adapter under its plan."""
        if task.probe:
            return self._probe(task)
        if task.own_eval:
            return self._own_eval(task)
        rounds = self.cfg.federation.rounds

        def on_step(step: int, total: int, loss: float) -> None:
            self.progress.step(task.round, rounds, slot, task.client, step, total, loss)

        how = self.personalizer
        personal = self.personal.get(task.client, task.round) if how.keeps_state else None
        examples = self.examples(task.client)
        update = train_local(
            self.lm.model,
            how.start(task, personal),
            examples,
            self.cfg.client,
            client_id=task.client,
            seed=derive_seed(self.cfg.seed, "client", task.round, task.client),
            pad_token_id=self.lm.pad_id,
            on_step=on_step,
            plan=task.plan,
        )
        if update.metrics.get("straggler"):
            return update
        update.metrics["data_tokens"] = float(sum(e.num_target_tokens for e in examples))
        kept = how.after(self.lm.model, task, update, examples, personal, self.lm.pad_id)
        if kept is not None:  # stays here: stamped by round, never in a message
            self.personal.put(task.client, task.round, kept)
        update.state = how.outgoing(update.state)
        return self._encode(task, update)

    def _own_set(self, client: int) -> EvalSet | None:
        if client not in self._own_sets:
            records = self.own.get(client) or []
            examples, _ = scored_examples(records, self.lm.tokenizer, self.cfg)
            self._own_sets[client] = (
                EvalSet.build(examples, self.cfg.eval.micro_batch_size) if examples else None
            )
        return self._own_sets[client]

    def _own_eval(self, task: Task) -> Update:
        """The loss of the global adapter, and of the client's personal model, on the client's
        own held-out records; only the two numbers leave the client."""
        own = self._own_set(task.client)
        metrics: dict[str, float] = {}
        if own is not None:
            model, pad = self.lm.model, self.lm.pad_id
            set_adapter(model, task.adapter)
            scored = evaluate_loss(model, own, pad)
            metrics.update(own_loss=scored["loss"], own_tokens=float(scored["tokens"]))
            how = self.personalizer
            personal = self.personal.get(task.client, task.round + 1) if how.keeps_state else None
            mine = how.model(model, task, self.examples(task.client), personal, pad)
            if mine is not None:
                if not how.keeps_state:  # finetune: the model is kept for later use
                    self.personal.put(task.client, task.round, mine)
                examples = self.examples(task.client)
                metrics["personal_loss"] = how.score(model, task, mine, own, examples, pad)
        return Update(task.client, {}, len(self.data.get(task.client, [])), 0, metrics)

    def _probe(self, task: Task) -> Update:
        """The loss of the task's adapter on `task.probe` of the client's examples (seeded by
        round and client), without training: what a loss-driven selection rule asks."""
        examples = self.examples(task.client)
        rng = generator(self.cfg.seed, "probe", task.round, task.client)
        n = min(task.probe, len(examples))
        picked = [examples[int(i)] for i in sorted(rng.choice(len(examples), n, replace=False))]
        set_adapter(self.lm.model, task.adapter)
        scored = evaluate_loss(
            self.lm.model, EvalSet.build(picked, self.cfg.eval.micro_batch_size), self.lm.pad_id
        )
        return Update(task.client, {}, len(examples), 0, {"probe_loss": scored["loss"]})

    def _encode(self, task: Task, update: Update) -> Update:
        """Compression, client side: the delta is encoded; what it lost is kept for next time."""
        if update.metrics.get("straggler"):
            return update  # it missed the deadline: nothing to send, no residual to keep
        if task.secure:
            return self._secure(task, update)
        if self.codec.method == "none":
            update.metrics["bytes_up"] = float(state_bytes(update.state))
            return update
        adapter = task.adapter
        delta = {k: v.float() - adapter[k].float() for k, v in update.state.items()}
        keep = self.cfg.compression.error_feedback
        residual = self.store.get(task.client, task.round) if keep else None
        wires, _, left, nbytes = self.codec.compress(delta, residual)
        if keep:
            self.store.put(task.client, task.round, left)
        update.wire, update.codec, update.state = wires, self.codec.method, {}
        update.metrics["bytes_up"] = float(nbytes)
        return update

    def _secure(self, task: Task, update: Update) -> Update:
        """Secure aggregation: the delta goes into the masked sum. Under DP the client clips it
        and adds its share of the noise, so the server never sees an un-noised sum."""
        if task.clip_norm:
            delta, norm = clipped_delta(update.state, task.adapter, task.clip_norm)
            update.metrics["clipped"] = float(norm > task.clip_norm)
        else:
            delta = {k: v.double() - task.adapter[k].double() for k, v in update.state.items()}
        if task.noise_std:
            # 256 secret bits in, a 63-bit generator seed out: not guessable from the run seed.
            parts = self.store.secret(task.client)
            seed = derive_seed(0, "dp-noise-share", *parts, task.run_id, task.round)
            noise = gaussian_noise(delta, task.noise_std, torch.Generator().manual_seed(seed))
            delta = {k: v + noise[k].double() for k, v in delta.items()}
        if not all(bool(torch.isfinite(v).all()) for v in delta.values()):
            # Quantized, a NaN is garbage in the sum; the node drops out of the round instead.
            raise FloatingPointError(
                f"client {task.client}, round {task.round}: the update is not finite; not sent "
                "to the secure sum"
            )
        update.state = {k: v.float() for k, v in delta.items()}
        update.metrics["bytes_up"] = float(sum(v.numel() * 8 for v in delta.values()))
        return update

    def handle(self, payload: Payload, slot: str = "") -> Payload:
        """The message boundary: a task payload in, an update payload out."""
        return self.train(Task.from_payload(payload), slot).to_payload()

    def state_dict(self, upto: int) -> dict[str, torch.Tensor]:
        return self.store.state_dict(upto)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.store.load_state_dict(state)
