"""Fingerprints of what a run was trained on: the data file, the model weights, the tokenizer.

A run records them in every checkpoint; `--resume` compares them with what the config names
now, so rounds trained on changed data or another model never continue a run silently.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable
from pathlib import Path

from fedit.config import Config
from fedit.data.records import DataError, resolve_data_path
from fedit.models import TOKENIZER_FILES, resolve

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _sha256(paths: Iterable[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root) if root else p.name).encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprints(cfg: Config) -> dict[str, str]:
    """'data', 'model' and 'tokenizer': sha256 of the files, or the name where there are no
    local files (a hub id, the seeded test model). Data not readable here is left out."""
    out: dict[str, str] = {}
    paths = [s["path"] for s in cfg.data.sources] or [cfg.data.path]
    if any(p.startswith("hf:") for p in paths):
        out["data"] = ", ".join(paths)
    else:
        with contextlib.suppress(DataError):  # a Flower server may hold no data; clients do
            out["data"] = f"sha256:{_sha256([resolve_data_path(p) for p in paths])}"
    kind, where = resolve(cfg.model)
    if kind != "folder":
        out["model"] = out["tokenizer"] = f"{kind}:{where}"
        return out
    folder = Path(where)
    files = [p for p in folder.iterdir() if p.is_file()]
    weights = [p for p in files if p.suffix in WEIGHT_SUFFIXES or p.name == "config.json"]
    out["model"] = f"sha256:{_sha256(weights, folder)}"
    tok = [p for p in files if p.name in TOKENIZER_FILES or p.name.startswith("special_tokens")]
    out["tokenizer"] = f"sha256:{_sha256(tok, folder)}"
    return out


def changed(saved: dict[str, str], now: dict[str, str]) -> list[str]:
    """The fingerprints that differ (those both sides know)."""
    return sorted(k for k in saved.keys() & now.keys() if saved[k] != now[k])
