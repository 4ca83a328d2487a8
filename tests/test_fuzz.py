"""Property tests: whatever the bytes or values, the readers and the config loader give a result
or a FeditError (with its clear message), never another exception."""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedit.config import Config, config_from_dict, iter_keys, load_config
from fedit.data.records import load_records
from fedit.errors import FeditError

EXAMPLES = 200
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip
FIELDS = ["instruction", "context", "response", "category", "input", "output", "messages",
          "role", "content", "user", "type", "text"]  # fmt: skip
record_like = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
turn = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "bot"]),
     "content": st.one_of(st.text(max_size=10), st.lists(json_values, max_size=3), json_values)}
)  # fmt: skip
chat_record = st.fixed_dictionaries({"messages": st.lists(turn, max_size=4)})


def _read(suffix: str, data: bytes, fmt: str = "auto") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / f"data{suffix}"
        p.write_bytes(data)
        try:
            records, _ = load_records(
                config_from_dict({"data": {"path": str(p), "format": fmt}}).data
            )
        except FeditError:
            return
        assert records and all(r.instruction.strip() and r.response.strip() for r in records)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@given(data=st.binary(max_size=300))
@SETTINGS
def test_any_bytes(suffix: str, data: bytes) -> None:
    _read(suffix, data)


@pytest.mark.parametrize("fmt", ["auto", "dolly", "alpaca", "chat"])
@given(rows=st.lists(st.one_of(record_like, chat_record, json_values), min_size=0, max_size=5))
@SETTINGS
def test_any_json_values(fmt: str, rows: list[Any]) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in rows).encode()
    _read(".jsonl", lines, fmt)
    _read(".json", json.dumps(rows).encode(), fmt)


@given(rows=st.lists(st.dictionaries(st.sampled_from(FIELDS),
                                     st.none() | st.text(max_size=12) | st.integers(),
                                     max_size=5), min_size=1, max_size=5))  # fmt: skip
@SETTINGS
def test_any_parquet_table(rows: list[dict[str, Any]]) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return  # mixed column types: pyarrow itself cannot write such a file
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "data.parquet"
        pq.write_table(table, p)
        with contextlib.suppress(FeditError):
            load_records(config_from_dict({"data": {"path": str(p)}}).data)


KEYS = [k for k, *_ in iter_keys()] + ["bogus", "data.bogus", "model"]


@given(values=st.dictionaries(st.sampled_from(KEYS), json_values, max_size=4))
@SETTINGS
def test_any_config_values(values: dict[str, Any]) -> None:
    data: dict[str, Any] = {}
    for key, value in values.items():
        *sections, leaf = key.split(".")
        node = data
        for s in sections:
            nxt = node.setdefault(s, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[leaf] = value
    with contextlib.suppress(FeditError):
        assert isinstance(config_from_dict(data), Config)


@given(text=st.text(max_size=200), overrides=st.lists(st.text(max_size=30), max_size=3))
@SETTINGS
def test_any_config_file_and_overrides(text: str, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "c.toml"
        p.write_text(text, encoding="utf-8")
        with contextlib.suppress(FeditError):
            load_config(p, overrides)
