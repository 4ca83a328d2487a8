"""Held-out test split and the client partitioners, with statistics and files on disk."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedit.config import Config, PartitionConfig
from fedit.data.records import Record, write_jsonl
from fedit.data.stats import partition_stats
from fedit.errors import FeditError
from fedit.files import atomic_dir, atomic_json, writable_folder
from fedit.registry import Registry
from fedit.seeding import generator


class PartitionError(FeditError, ValueError):
    """A partition that cannot be made; the message names the config key."""


# (training records, partition config, rng) -> one list of record indices per client
Partitioner = Callable[[Sequence[Record], PartitionConfig, np.random.Generator], list[list[int]]]
PARTITIONERS: Registry[Partitioner] = Registry("partition method")


@dataclass
class Partition:
    clients: list[list[Record]]
    test: list[Record]
    stats: dict[str, Any]
    # `data.client_test_fraction`: each client's own held-out records (never trained on),
    # keyed as `clients` is (with partition.only, the kept clients renumbered from 0; none
    # when pooled: the pooled client is nobody's own data).
    client_tests: dict[int, list[Record]] = field(default_factory=dict)


def split_test(
    records: Sequence[Record],
    per_category: int,
    rng: np.random.Generator,
    by: Sequence[str] = (),
) -> tuple[list[int], list[int]]:
    """Stratified held-out set: `per_category` per category (and per value of the tags `by`),
    never more than half of one."""
    by_cat: dict[tuple[str, ...], list[int]] = {}
    for i, r in enumerate(records):
        key = (*(r.tags.get(t, "") for t in by), r.category)
        by_cat.setdefault(key, []).append(i)
    test: list[int] = []
    for cat in sorted(by_cat):
        idx = by_cat[cat]
        take = min(per_category, len(idx) // 2)
        test.extend(int(i) for i in rng.choice(idx, size=take, replace=False))
    test_set = set(test)
    train = [i for i in range(len(records)) if i not in test_set]
    return train, sorted(test)


def _need(n: int, clients: int, per_client: int = 1, what: str = "") -> None:
    if clients < 1:
        raise PartitionError("partition.num_clients: must be >= 1 for this method")
    if n < clients * per_client:
        raise PartitionError(
            f"partition.num_clients: {clients} clients need at least {clients * per_client} "
            f"records{what}, but only {n} training records remain after the test split"
        )


@PARTITIONERS.register("iid")
def iid(
    records: Sequence[Record], cfg: PartitionConfig, rng: np.random.Generator
) -> list[list[int]]:
    """Uniformly shuffled, equal-sized clients."""
    _need(len(records), cfg.num_clients)
    perm = rng.permutation(len(records))
    return [part.tolist() for part in np.array_split(perm, cfg.num_clients)]


@PARTITIONERS.register("shards")
def shards(
    records: Sequence[Record], cfg: PartitionConfig, rng: np.random.Generator
) -> list[list[int]]:
    """Shepherd's heterogeneous split: sort by category, cut into shards, deal them out."""
    n_shards = cfg.num_clients * cfg.shards_per_client
    _need(len(records), cfg.num_clients, cfg.shards_per_client, " (one per shard)")
    perm = rng.permutation(len(records))
    order = sorted(perm.tolist(), key=lambda i: records[i].category)  # stable: random within
    pieces = np.array_split(np.asarray(order), n_shards)
    deal = rng.permutation(n_shards)
    s = cfg.shards_per_client
    return [
        sorted(int(i) for j in deal[c * s : (c + 1) * s] for i in pieces[j])
        for c in range(cfg.num_clients)
    ]


def _fill_small(parts: list[list[int]], min_size: int) -> None:
    """Top every client up to `min_size` records, one at a time from the largest client.

    Terminates whenever there are at least len(parts) * min_size records in all.
    """
    for part in parts:
        while len(part) < min_size:
            donor = max(range(len(parts)), key=lambda j: (len(parts[j]), -j))
            part.append(parts[donor].pop())


@PARTITIONERS.register("dirichlet")
def dirichlet(
    records: Sequence[Record], cfg: PartitionConfig, rng: np.random.Generator
) -> list[list[int]]:
    """Per category, client shares drawn from Dirichlet(alpha); small alpha = strong skew.

    One draw per category, so it always terminates; a client left below `min_client_size`
    is topped up from the largest client.
    """
    k = cfg.num_clients
    _need(len(records), k, cfg.min_client_size, " (partition.min_client_size each)")
    by_cat: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_cat.setdefault(r.category, []).append(i)
    parts: list[list[int]] = [[] for _ in range(k)]
    for cat in sorted(by_cat):
        idx = rng.permutation(by_cat[cat])
        p = rng.dirichlet(np.full(k, cfg.alpha))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
        for c, piece in enumerate(np.split(idx, cuts)):
            parts[c].extend(int(i) for i in piece)
    _fill_small(parts, cfg.min_client_size)
    return [sorted(p) for p in parts]


@PARTITIONERS.register("quantity")
def quantity(
    records: Sequence[Record], cfg: PartitionConfig, rng: np.random.Generator
) -> list[list[int]]:
    """IID content, client sizes drawn from Dirichlet(alpha) (at least min_client_size each)."""
    k, floor = cfg.num_clients, cfg.min_client_size
    _need(len(records), k, floor, " (partition.min_client_size each)")
    sizes = floor + rng.multinomial(len(records) - k * floor, rng.dirichlet(np.full(k, cfg.alpha)))
    perm = rng.permutation(len(records))
    return [sorted(p.tolist()) for p in np.split(perm, np.cumsum(sizes)[:-1])]


@PARTITIONERS.register("natural")
def natural(
    records: Sequence[Record], cfg: PartitionConfig, rng: np.random.Generator
) -> list[list[int]]:
    """One client per value of a record field (e.g. the user); with fewer clients than values,
    whole groups are packed onto the currently smallest client (largest group first)."""
    groups: dict[str, list[int]] = {}
    missing = 0
    name = cfg.natural_field
    for i, r in enumerate(records):
        key = r.tags.get(name[4:]) if name.startswith("tag:") else getattr(r, name)
        if key is None:
            missing += 1
            continue
        groups.setdefault(str(key), []).append(i)
    if missing:
        raise PartitionError(
            f"partition.natural_field: {missing} of {len(records)} records have no "
            f"{cfg.natural_field!r} value (map it with data.fields.{cfg.natural_field})"
        )
    k = cfg.num_clients or len(groups)
    if k > len(groups):
        raise PartitionError(
            f"partition.num_clients: {k} clients but only {len(groups)} distinct "
            f"{cfg.natural_field!r} values"
        )
    if k == len(groups):
        return [groups[key] for key in sorted(groups)]
    parts: list[list[int]] = [[] for _ in range(k)]
    for key in sorted(groups, key=lambda g: (-len(groups[g]), g)):
        smallest = min(range(k), key=lambda c: (len(parts[c]), c))
        parts[smallest].extend(groups[key])
    return [sorted(p) for p in parts]


def _keep(clients: list[list[Record]], only: Sequence[int], pooled: bool) -> list[list[Record]]:
    """`partition.only` and `partition.pooled`: the same split, fewer or merged clients."""
    bad = [c for c in only if c >= len(clients)]
    if bad:
        raise PartitionError(
            f"partition.only: clients {bad} do not exist; the partition has {len(clients)} "
            f"(0..{len(clients) - 1})"
        )
    kept = [clients[c] for c in only] if only else clients
    return [[r for c in kept for r in c]] if pooled else kept


def make_partition(records: Sequence[Record], cfg: Config) -> Partition:
    """Optional subsample, test split, then client split, all seeded from `cfg.seed`."""
    if cfg.data.max_records and len(records) > cfg.data.max_records:
        keep = generator(cfg.seed, "subsample").choice(len(records), cfg.data.max_records, False)
        records = [records[i] for i in sorted(keep)]
    train_idx, test_idx = split_test(
        records, cfg.data.test_per_category, generator(cfg.seed, "test-split"),
        cfg.data.test_split_by,
    )  # fmt: skip
    train = _cap_training([records[i] for i in train_idx], cfg)
    parts = _split(train, cfg)
    clients = [[train[i] for i in p] for p in parts]
    clients, own = _client_tests(clients, cfg.data.client_test_fraction, cfg.seed)
    kept = cfg.partition.only or range(len(clients))
    clients = _keep(clients, cfg.partition.only, cfg.partition.pooled)
    own = {} if cfg.partition.pooled else {i: own[c] for i, c in enumerate(kept) if own.get(c)}
    for c, recs in enumerate(clients):
        if not recs:
            raise PartitionError(
                f"partition.method={cfg.partition.method!r} left client {c} empty; "
                "use fewer clients or another method"
            )
    small = [(c, len(r)) for c, r in enumerate(clients) if len(r) < cfg.client.batch_size]
    if small:
        listed = ", ".join(f"client {c}: {n}" for c, n in small[:5])
        raise PartitionError(
            f"{len(small)} clients hold fewer records than client.batch_size="
            f"{cfg.client.batch_size} (one optimizer step): {listed}; raise "
            "partition.min_client_size, use fewer clients or a smaller batch"
        )
    test = [records[i] for i in test_idx]
    return Partition(clients, test, partition_stats(clients, test), own)


def _source_names(cfg: Config) -> list[str]:
    return [src.get("tags", {}).get("source", Path(src["path"]).stem) for src in cfg.data.sources]


def _cap_training(train: list[Record], cfg: Config) -> list[Record]:
    """`data.sources[].train_records`: n of a source's training records (a seeded permutation's
    first n, so a smaller n keeps a subset of a larger one's); drawn after the test split, so
    the test split is the same whatever n is."""
    drop: set[int] = set()
    for i, (src, name) in enumerate(zip(cfg.data.sources, _source_names(cfg), strict=True)):
        n = src.get("train_records")
        if n is None:
            continue
        idx = [j for j, r in enumerate(train) if r.tags.get("source") == name]
        order = generator(cfg.seed, "train-records", i).permutation(len(idx))
        drop.update(idx[int(j)] for j in order[n:])
    return [r for j, r in enumerate(train) if j not in drop] if drop else train


def _split(train: Sequence[Record], cfg: Config) -> list[list[int]]:
    """`partition.method` over all records or, where each of `data.sources` names its number
    of clients, over each source's records apart (its clients numbered after the previous
    source's)."""
    method = cfg.partition.method
    fn = PARTITIONERS.get(method)
    counts = [int(src.get("clients", 0)) for src in cfg.data.sources]
    if not any(counts):
        return fn(train, cfg.partition, generator(cfg.seed, "partition", method))
    total = sum(counts)
    if cfg.partition.num_clients not in (0, total):
        raise PartitionError(
            f"partition.num_clients={cfg.partition.num_clients}, but data.sources[].clients "
            f"add up to {total} ({' + '.join(map(str, counts))}); set it to {total} or 0"
        )
    parts: list[list[int]] = []
    for i, (name, k) in enumerate(zip(_source_names(cfg), counts, strict=True)):
        if k == 0:  # a test-only source (train_records = 0): no clients
            continue
        idx = [j for j, r in enumerate(train) if r.tags.get("source") == name]
        if len(idx) < k:
            raise PartitionError(
                f"data.sources[{i}].clients={k}, but the source has {len(idx)} training records"
            )
        mine = [train[j] for j in idx]
        split = fn(mine, replace(cfg.partition, num_clients=k),
                   generator(cfg.seed, "partition", method, i))  # fmt: skip
        parts += [[idx[j] for j in p] for p in split]
    return parts


def _client_tests(
    clients: list[list[Record]], fraction: float, seed: int
) -> tuple[list[list[Record]], dict[int, list[Record]]]:
    """Hold out `fraction` of each client's records (at least one, seeded per client)."""
    if fraction <= 0:
        return clients, {}
    kept, own = [], {}
    for c, recs in enumerate(clients):
        train, held = hold_out(recs, fraction, seed, c)
        kept.append(train)
        own[c] = held
    return kept, own


def hold_out(
    records: Sequence[Record], fraction: float, seed: int, client: int
) -> tuple[list[Record], list[Record]]:
    """Client `client`'s records split into (kept for training, its own held-out test): a
    `fraction` of them, at least one, chosen by a generator seeded with the run seed and the
    client id (what a simulation and a node holding the same records both choose)."""
    k = max(1, round(fraction * len(records))) if len(records) > 1 and fraction > 0 else 0
    held = set(generator(seed, "client-test", client).permutation(len(records))[:k].tolist())
    return (
        [r for i, r in enumerate(records) if i not in held],
        [r for i, r in enumerate(records) if i in held],
    )


def partition_target(out: Path, replace: bool = False) -> Path:
    """Check, before any work, that a partition can be written to `out`."""
    writable_folder(out, "partition folder")
    entries = sorted(p.name for p in out.iterdir())
    if entries and not replace:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise PartitionError(
            f"{out}: not empty ({shown}); choose an empty folder or pass --replace to replace "
            "its contents with the new split"
        )
    return out


def write_partition(partition: Partition, out: Path, replace: bool = False) -> None:
    """clients/client_NNNN.jsonl (and client_NNNN.own.jsonl, the client's own held-out records,
    with data.client_test_fraction), test.jsonl and stats.json, as one folder that replaces
    `out` whole: no client file of an earlier split is left beside the new ones."""
    partition_target(out, replace)

    def fill(folder: Path) -> None:
        (folder / "clients").mkdir()
        for i, recs in enumerate(partition.clients):
            write_jsonl(folder / "clients" / f"client_{i:04d}.jsonl", recs)
            if partition.client_tests.get(i):  # its own held-out records, never trained on
                write_jsonl(folder / "clients" / f"client_{i:04d}.own.jsonl",
                            partition.client_tests[i])  # fmt: skip
        write_jsonl(folder / "test.jsonl", partition.test)
        atomic_json(folder / "stats.json", partition.stats)
        from fedit.data.heatmap import write_heatmap

        write_heatmap(partition.stats, folder / "heatmap.png")

    atomic_dir(out, fill)


def load_partition(cfg: Config, log: Callable[[str], None] | None = None) -> Partition:
    """The run's records, read and split: the same partition for the same config anywhere."""
    from fedit.data.records import load_records

    records, report = load_records(cfg.data)
    if report.skipped and log is not None:
        log(f"skipped {len(report.skipped)} bad records; first: {report.skipped[0]}")
    return make_partition(records, cfg)
