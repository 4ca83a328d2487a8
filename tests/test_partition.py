from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedit.config import PartitionConfig
from fedit.data.partition import (
    PARTITIONERS,
    PartitionError,
    dirichlet,
    make_partition,
    write_partition,
)
from fedit.data.records import Record, read_canonical
from tests.conftest import make_rows, tiny_config

METHODS = ["iid", "shards", "dirichlet", "quantity", "natural"]


def records(n_per_category: int = 30, users: int = 6) -> list[Record]:
    return [Record(**{**r, "context": r["context"]}) for r in make_rows(n_per_category, users)]


def part(method: str, seed: int = 1, n: int = 5, **kw: object):  # type: ignore[no-untyped-def]
    cfg = tiny_config(
        Path("unused"),
        seed=seed,
        data={"test_per_category": 3},
        partition={
            "method": method,
            "num_clients": 0 if method == "natural" else n,
            "min_client_size": 4,
            **kw,
        },
    )
    return make_partition(records(), cfg)


def key(r: Record) -> tuple[str, str]:
    return (r.instruction, r.category)


@pytest.mark.parametrize("method", METHODS)
def test_disjoint_covering_deterministic(method: str) -> None:
    p = part(method)
    everything = Counter(key(r) for r in records())
    got = Counter(key(r) for c in p.clients for r in c) + Counter(key(r) for r in p.test)
    assert got == everything  # covering, and disjoint (no record twice)
    assert all(p.clients)
    again = part(method)
    assert [[key(r) for r in c] for c in again.clients] == [[key(r) for r in c] for c in p.clients]
    assert p.stats["num_train"] + p.stats["num_test"] == len(records())


def test_seed_changes_split() -> None:
    a, b = part("iid", seed=1), part("iid", seed=2)
    assert [[key(r) for r in c] for c in a.clients] != [[key(r) for r in c] for c in b.clients]


def test_test_split_is_stratified() -> None:
    p = part("iid")
    assert Counter(r.category for r in p.test) == {c: 3 for c in {r.category for r in records()}}


def test_skew_is_measurable() -> None:
    tv = {m: part(m, alpha=0.1).stats["heterogeneity"]["category_tv_mean"] for m in METHODS}
    assert tv["iid"] < 0.2
    assert tv["shards"] > tv["iid"] + 0.2
    assert tv["dirichlet"] > tv["iid"] + 0.2
    sizes = part("quantity", alpha=0.3).stats["heterogeneity"]["size_cv"]
    assert sizes > part("iid").stats["heterogeneity"]["size_cv"] + 0.2


def test_shards_give_each_client_few_categories() -> None:
    p = part("shards", n=10)
    assert max(len({r.category for r in c}) for c in p.clients) <= 3


def test_natural_by_user() -> None:
    p = part("natural")
    assert len(p.clients) == 6
    assert all(len({r.user for r in c}) == 1 for c in p.clients)
    merged = part("natural", n=4, num_clients=4)
    assert len(merged.clients) == 4


def test_natural_errors_name_the_key() -> None:
    with pytest.raises(PartitionError, match="partition.num_clients"):
        part("natural", num_clients=50)
    no_users = [Record(instruction="a", response="b", category="x")] * 4
    with pytest.raises(PartitionError, match="partition.natural_field"):
        PARTITIONERS.get("natural")(
            no_users, PartitionConfig(method="natural"), np.random.default_rng(0)
        )


@pytest.mark.parametrize("method", ["iid", "dirichlet", "quantity", "shards"])
def test_more_clients_than_records_is_an_error(method: str) -> None:
    with pytest.raises(PartitionError, match="partition.num_clients"):
        part(method, n=500)


def test_unknown_method_lists_known() -> None:
    with pytest.raises(LookupError, match="dirichlet, iid, natural, quantity, shards"):
        part("random")


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    k=st.integers(1, 30),
    alpha=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**16),
)
def test_dirichlet_always_terminates_and_fills_every_client(
    sizes: list[int], k: int, alpha: float, seed: int
) -> None:
    recs = [
        Record(instruction=f"{c}-{i}", response="r", category=f"c{c}")
        for c, n in enumerate(sizes)
        for i in range(n)
    ]
    cfg = PartitionConfig(method="dirichlet", num_clients=k, alpha=alpha)
    if len(recs) < k:
        with pytest.raises(PartitionError):
            dirichlet(recs, cfg, np.random.default_rng(seed))
        return
    parts = dirichlet(recs, cfg, np.random.default_rng(seed))
    assert len(parts) == k and all(parts)
    assert sorted(i for p in parts for i in p) == list(range(len(recs)))


def test_write_partition(tmp_path: Path) -> None:
    p = part("shards")
    write_partition(p, tmp_path)
    files = sorted((tmp_path / "clients").glob("client_*.jsonl"))
    assert len(files) == 5
    assert read_canonical(files[0]) == p.clients[0]
    assert read_canonical(tmp_path / "test.jsonl") == p.test
    assert (tmp_path / "stats.json").is_file()


def test_clients_smaller_than_a_batch_are_refused_or_topped_up() -> None:
    with pytest.raises(PartitionError, match=r"client.batch_size=4.*partition.min_client_size"):
        part("quantity", n=20, alpha=0.05, min_client_size=1)
    p = part("dirichlet", n=20, alpha=0.05, min_client_size=4)
    assert min(len(c) for c in p.clients) >= 4


def test_a_partitioner_that_leaves_a_client_empty_is_named() -> None:
    @PARTITIONERS.register("test-leaves-one-empty", replace=True)
    def leaves_one_empty(
        records: list[Record], cfg: PartitionConfig, rng: np.random.Generator
    ) -> list[list[int]]:
        return [list(range(len(records))), []]

    with pytest.raises(
        PartitionError, match=r"partition.method='test-leaves-one-empty' left client 1 empty"
    ):
        part("test-leaves-one-empty", n=2)


def test_one_category_is_not_called_far_from_iid() -> None:
    from fedit.data.stats import heterogeneity_statement

    one = {"category_tv_mean": 0.0, "category_tv_iid_mean": 0.0, "category_tv_iid_std": 0.0}
    assert heterogeneity_statement(one).endswith("one category, no category skew")
    skewed = {"category_tv_mean": 0.6, "category_tv_iid_mean": 0.05, "category_tv_iid_std": 0.01}
    assert heterogeneity_statement(skewed).endswith("(12.0x): far from IID")
