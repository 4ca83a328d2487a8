"""Field helpers shared by every config section: help text in metadata, validation errors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any

from fedit.errors import FeditError


class ConfigError(FeditError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


def opt(default: Any, help: str) -> Any:
    """A field with its help text; mutable defaults are copied per instance."""
    if isinstance(default, list | dict):
        copy: Callable[[], Any] = lambda: type(default)(default)  # noqa: E731
        return field(default_factory=copy, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")
