"""Typed option parsers shared by every place a user's value enters: `--conf` (strings), infer
request params and train request params (JSON), the CLIs' defaults.

Each parser takes the option's key (named in the message) and a raw value, and returns the typed
value or raises `OptionError` (a ValueError) saying what is allowed. Callers turn that into their
own error: `ConfError` at start-up, HTTP 400 for a request. `read` applies the common rules of a
request: absent or "" means the default, and MONAI Label's config() list form of a choice its first entry.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
MAX_NAME = 128
_NAME = re.compile(r"^[^./\\~\x00-\x1f][^/\\\x00-\x1f]*$")


class OptionError(ValueError):
    """An option value that is not allowed; the message names the key and the valid values."""


def _show(value, n: int = 60) -> str:
    """A client value for a message (paths are not echoed back)."""
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return "(a path)"
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def parse_bool(value) -> bool | None:
    """true/false, 1/0, yes/no, on/off (any case) or a bool -> bool; anything else -> None."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    return True if v in TRUE else False if v in FALSE else None


def as_bool(key: str, value) -> bool:
    parsed = parse_bool(value)
    if parsed is None:
        raise OptionError(f"{key} {_show(value)} is not valid: choose one of true | false")
    return parsed


def as_float(key: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite number in [low, high]."""
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        x = math.nan
    if not math.isfinite(x) or not low <= x <= high:
        bounds = f" between {low} and {high}" if math.isfinite(low) and math.isfinite(high) else (
            f" >= {low}" if math.isfinite(low) else f" <= {high}" if math.isfinite(high) else "")
        raise OptionError(f"{key} {_show(value)} is not valid: expected a finite number{bounds}")
    return x


def as_fraction(key: str, value) -> float:
    """A number strictly between 0 and 1 (a probability threshold)."""
    try:
        x = as_float(key, value)
    except OptionError:
        x = None
    if x is None or not 0.0 < x < 1.0:
        raise OptionError(f"{key} {_show(value)} is not valid: expected a number between 0 and 1 (exclusive)")
    return x


def as_int(key: str, value, low: int | None = None, high: int | None = None) -> int:
    """A whole number (3, "3", 3.0) in [low, high]."""
    try:
        x = as_float(key, value)
    except OptionError:
        x = math.nan
    if not math.isfinite(x) or x != int(x) or (low is not None and x < low) or (high is not None and x > high):
        bounds = " between {} and {}".format(low, high) if low is not None and high is not None else (
            f" >= {low}" if low is not None else f" <= {high}" if high is not None else "")
        raise OptionError(f"{key} {_show(value)} is not valid: expected an integer{bounds}")
    return int(x)


def as_choice(key: str, value, choices) -> str:
    v = str(value).strip().lower() if isinstance(value, str) else value
    if v not in choices:
        raise OptionError(f"{key} {_show(value)} is not valid: choose one of {' | '.join(map(str, choices))}")
    return v


def default_first(value: str, choices) -> list[str]:
    """A choice and the others, in their order: how a client's drop-down is offered, its default first
    (read back with `read(..., listed=True)`)."""
    return [value] + [c for c in choices if c != value]


def as_name(key: str, value) -> str:
    """An image id, label tag or session id: 1-128 characters, no '/' '\\' or '..', no leading '.' or '~'."""
    if not isinstance(value, str) or not value or len(value) > MAX_NAME or not _NAME.match(value) or ".." in value:
        raise OptionError(f"{key} {_show(value)} is not valid: a plain name of at most {MAX_NAME} characters "
                          "(no path separators, no '..', no leading '.' or '~', no control characters)")
    return value


def as_label_values(key: str, value) -> list[int]:
    """None | '' | 3 | '1,3' | [1, 3] -> [1, 3] (label values 0-255)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    elif not isinstance(value, list):
        value = [value]
    return [as_int(f"{key} entry", v, 0, 255) for v in value]


def read(source: dict, key: str, parse: Callable[..., Any], default=None, *args, listed: bool = False):
    """source[key] parsed with `parse(key, value, *args)`; absent, None or "" -> default. `listed`: the
    task's config() offers this option as a list of choices, which MONAI Label merges into the request
    as is, so a list means its first entry; any other list is refused by the parser."""
    value = source.get(key)
    if listed and isinstance(value, list):
        value = value[0] if value else None
    if value is None or value == "":
        return default
    return parse(key, value, *args)
