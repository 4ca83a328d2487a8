"""Instruction records: read JSON / JSONL / Parquet (or a hub dataset), map fields, validate.

Every bad row is reported as `file:line: what is wrong` before any training starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedit.config import DataConfig
from fedit.errors import FeditError
from fedit.files import atomic_lines

DATA_DIR_ENV = "FEDIT_DATA_DIR"
UNKNOWN_CATEGORY = "uncategorized"

# Field names per record layout; `data.fields` overrides them role by role.
FORMATS: dict[str, dict[str, str]] = {
    "dolly": {
        "instruction": "instruction",
        "input": "context",
        "output": "response",
        "category": "category",
        "user": "user",
    },
    "alpaca": {
        "instruction": "instruction",
        "input": "input",
        "output": "output",
        "category": "category",
        "user": "user",
    },
    "chat": {"messages": "messages", "category": "category", "user": "user"},
}


class DataError(FeditError, ValueError):
    """Unusable data; the message names the file and line."""


@dataclass
class Record:
    """One instruction example in fedit's canonical form."""

    instruction: str
    response: str
    context: str = ""
    category: str = UNKNOWN_CATEGORY
    user: str | None = None
    # Earlier turns of a chat record (role/content dicts), kept for the chat template.
    history: list[dict[str, str]] = field(default_factory=list)
    # data.sources: the source's tags (and its name as `source`), for partitioning and metrics.
    tags: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not self.history:
            d.pop("history")
        if not self.tags:
            d.pop("tags")
        if self.user is None:
            d.pop("user")
        return d


@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    skipped: list[str] = field(default_factory=list)


def resolve_data_path(path: str) -> Path:
    """Find a data file: as given, then inside $FEDIT_DATA_DIR. Errors say where it looked."""
    p = Path(path).expanduser()
    tried = [p.resolve()]
    if p.is_file():
        return p
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir and not p.is_absolute():
        q = Path(data_dir).expanduser() / p
        tried.append(q.resolve())
        if q.is_file():
            return q
    hint = "" if data_dir else f" (set {DATA_DIR_ENV} to the folder that holds it)"
    looked = ", ".join(str(t) for t in tried)
    raise DataError(f"data file {path!r} not found; looked in: {looked}{hint}")


def _iter_raw(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) pairs; JSON arrays number their items from 1."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from e
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for damaged files
            raise DataError(f"{path}: not a readable Parquet file: {e}") from None
        yield from enumerate(rows, start=1)
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {column} of the line)") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    if suffix == ".json" or (suffix != ".jsonl" and text.lstrip().startswith("[")):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON array of records")
        yield from enumerate(items, start=1)
        return
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield lineno, json.loads(raw)
        except json.JSONDecodeError as e:
            yield lineno, DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})")


def detect_format(obj: Mapping[str, Any], fields: Mapping[str, str]) -> str:
    keys = set(obj)
    for name in ("chat", "dolly", "alpaca"):
        spec = {**FORMATS[name], **fields}
        need = ["messages"] if name == "chat" else ["instruction", "output"]
        if all(spec[r] in keys for r in need):
            return name
    raise DataError(
        f"cannot tell the record format from keys {sorted(keys)}; set data.format "
        f"(dolly | alpaca | chat) and data.fields"
    )


def _text(obj: Mapping[str, Any], name: str, where: str, required: bool) -> str:
    if name not in obj or obj[name] is None:
        if required:
            raise DataError(f"{where}: missing field {name!r}")
        return ""
    value = obj[name]
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise DataError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    text = str(value)
    if required and not text.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return text


def content_text(content: Any, where: str) -> str:
    """A chat turn's content: a string, or OpenAI-style parts of which only text ones are
    allowed ([{"type": "text", "text": ...}], joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = repr(kind) if kind is not None else type(part).__name__
                raise DataError(
                    f"{where}.content[{j}]: a {what} part; only text parts "
                    '({"type": "text", "text": ...}) can be used'
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise DataError(
        f"{where}.content: expected text or a list of text parts, got {type(content).__name__}"
    )


def to_record(
    obj: Any,
    fmt: str,
    fields: Mapping[str, str],
    where: str,
    roles: Mapping[str, str] | None = None,
) -> Record:
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    spec = {**FORMATS[fmt], **fields}
    for role in ("category", "user"):  # a field the user named must be there
        if role in fields and fields[role] not in obj:
            raise DataError(
                f"{where}: no field {fields[role]!r} (data.fields.{role}); "
                f"the record has {sorted(obj)}"
            )
    category = _text(obj, spec["category"], where, False).strip() or UNKNOWN_CATEGORY
    user = _text(obj, spec["user"], where, False).strip() or None
    if fmt != "chat":
        return Record(
            instruction=_text(obj, spec["instruction"], where, True),
            context=_text(obj, spec["input"], where, False),
            response=_text(obj, spec["output"], where, True),
            category=category,
            user=user,
        )
    messages = obj.get(spec["messages"])
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {spec['messages']!r} must be a non-empty list of turns")
    role_key, content_key = spec.get("role", "role"), spec.get("content", "content")
    names = {"system": "system", "user": "user", "assistant": "assistant", **(roles or {})}
    if "output" in fields:  # preference layouts: the answer apart from the turns (ShareGPT DPO)
        answer = obj.get(fields["output"])
        if isinstance(answer, Mapping):
            answer = {**answer, role_key: answer.get(role_key, "assistant")}
        if answer is None:
            raise DataError(f"{where}: missing field {fields['output']!r} (data.fields.output)")
        messages = [
            *messages,
            answer if isinstance(answer, Mapping) else {role_key: "assistant", content_key: answer},
        ]
    turns: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        at = f"{where}: {spec['messages']}[{i}]"
        if not isinstance(m, Mapping) or role_key not in m or content_key not in m:
            raise DataError(f"{at} needs {role_key!r} and {content_key!r}")
        if m[role_key] not in names:
            raise DataError(
                f"{at} has unknown role {m[role_key]!r}; map it with data.roles "
                f"(e.g. {{{m[role_key]}='user'}}), known: {sorted(names)}"
            )
        turns.append({"role": names[m[role_key]], "content": content_text(m[content_key], at)})
    if len(turns) < 2 or turns[-1]["role"] != "assistant" or turns[-2]["role"] != "user":
        raise DataError(f"{where}: a chat record must end with a user turn then an assistant turn")
    if not turns[-1]["content"].strip():
        raise DataError(f"{where}: the final assistant turn is empty")
    if not turns[-2]["content"].strip():
        raise DataError(f"{where}: the last user turn (the instruction) is empty")
    return Record(
        instruction=turns[-2]["content"],
        response=turns[-1]["content"],
        category=category,
        user=user,
        history=turns[:-2],
    )


def parse_records(
    raw: Iterable[tuple[int, Any]], source: str, cfg: DataConfig
) -> tuple[list[Record], LoadReport]:
    report = LoadReport(source=source)
    records: list[Record] = []
    fmt: str = cfg.format
    for lineno, obj in raw:
        where = f"{source}:{lineno}"
        try:
            if isinstance(obj, DataError):
                raise obj
            if fmt == "auto":
                if not isinstance(obj, Mapping):
                    raise DataError(f"{where}: expected a JSON object")
                try:
                    fmt = detect_format(obj, cfg.fields)
                except DataError as e:
                    raise DataError(f"{where}: {e}") from None
            records.append(to_record(obj, fmt, cfg.fields, where, cfg.roles))
        except DataError as e:
            if not cfg.skip_bad_records:
                raise
            report.skipped.append(str(e))
    report.loaded = len(records)
    if not records:
        raise DataError(f"{source}: no usable records" + _skip_note(report))
    return records, report


def _skip_note(report: LoadReport) -> str:
    if not report.skipped:
        return ""
    return f" ({len(report.skipped)} skipped; first: {report.skipped[0]})"


def load_records(cfg: DataConfig) -> tuple[list[Record], LoadReport]:
    """Load and validate the records named by `data.path`, or by each of `data.sources`."""
    if cfg.sources:
        return _load_sources(cfg)
    if cfg.path.startswith("hf:"):
        return _load_hub(cfg)
    path = resolve_data_path(cfg.path)
    return parse_records(_iter_raw(path), str(path), cfg)


def _load_sources(cfg: DataConfig) -> tuple[list[Record], LoadReport]:
    """Each source read with its own format, fields and roles, its records tagged with the
    source's tags and name (`source`); a source's `max_records` is a seeded sample of it."""
    from dataclasses import replace

    from fedit.seeding import generator

    out: list[Record] = []
    total = LoadReport(source=", ".join(str(s["path"]) for s in cfg.sources))
    names: set[str] = set()
    for i, src in enumerate(cfg.sources):
        one = replace(
            cfg,
            path=src["path"],
            format=src.get("format", "auto"),
            fields=src.get("fields", {}),
            roles=src.get("roles", {}),
            sources=[],
            test_split_by=[],
        )
        records, report = load_records(one)
        tags = {"source": Path(src["path"]).stem, **src.get("tags", {})}
        if tags["source"] in names:
            raise DataError(
                f"data.sources[{i}]: a second source named {tags['source']!r}; give it "
                "tags = {source = '...'}"
            )
        names.add(tags["source"])
        n = int(src.get("max_records", 0))
        if n and len(records) > n:
            keep = generator(0, "source-sample", i).choice(len(records), n, replace=False)
            records = [records[j] for j in sorted(keep)]
        category = src.get("category", "")
        for r in records:
            r.tags = {**r.tags, **tags}
            if category and r.category == UNKNOWN_CATEGORY:
                r.category = category
        out += records
        total.loaded += len(records)
        total.skipped += [f"{report.source}: {s}" for s in report.skipped]
    return out, total


def _load_hub(cfg: DataConfig) -> tuple[list[Record], LoadReport]:
    name = cfg.path[3:]
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"data.path {cfg.path!r}: hub datasets need `pip install datasets`") from e
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise DataError(f"data.path {cfg.path!r}: could not load from the hub: {e}") from e
    return parse_records(enumerate(ds, start=1), f"hf:{name}", cfg)


def write_jsonl(path: Path, records: Iterable[Record]) -> None:
    """Atomic JSONL write in the canonical (dolly-like) layout."""
    atomic_lines(path, (r.to_json() for r in records))


def read_canonical(path: Path) -> list[Record]:
    """Read a file written by `write_jsonl` (client and test files of a partition)."""
    records = []
    for lineno, obj in _iter_raw(path):
        where = f"{path}:{lineno}"
        if isinstance(obj, DataError):
            raise obj
        if not isinstance(obj, Mapping):
            raise DataError(f"{where}: expected a JSON object")
        try:
            records.append(Record(**obj))
        except TypeError as e:
            raise DataError(f"{where}: not a fedit record: {e}") from None
    return records


def read_prompts(path: Path) -> list[Record]:
    """Prompts to answer, one JSON object per line: 'instruction' (or 'prompt'), optional
    'input' / 'context' and 'category'; any 'output' is kept as the reference."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object")
            text = obj.get("instruction", obj.get("prompt"))
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: needs a non-empty 'instruction' (or 'prompt') string")
            context = obj.get("input", obj.get("context", "")) or ""
            if not isinstance(context, str):
                raise DataError(f"{where}: 'input' must be a string")
            records.append(
                Record(
                    instruction=text,
                    response=str(obj.get("output", obj.get("response", "")) or ""),
                    context=context,
                    category=str(obj.get("category", UNKNOWN_CATEGORY)),
                )
            )
    if not records:
        raise DataError(f"{path}: no prompts")
    return records
