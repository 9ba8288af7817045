"""Settings declared once: a dataclass field per setting, with its default, its help text and its valid
range, from which the CLI options, their help and the checks all derive.

    @dataclass
    class Config:
        batch_size: int = setting(16, "batch size per device", ge=1)

`check_settings(config)` refuses a value outside its range with a message that names the setting, the
value and what is allowed, before any work starts.
"""

import copy
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable, Dict, Optional, Sequence


def setting(default: Any, help: str, *, ge: Optional[float] = None, gt: Optional[float] = None,
            le: Optional[float] = None, lt: Optional[float] = None, choices: Optional[Sequence[Any]] = None,
            unset: Any = MISSING) -> Field:
    """A setting: its default, the help text its CLI option shows, and its valid values (bounds, choices;
    `unset` is one more value allowed outside them, such as -1 for "no limit"). None is always allowed
    for a setting whose default is None."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    metadata = {"help": help, "bounds": bounds, "choices": choices, "unset": unset}
    if isinstance(default, (dict, list, set)):  # each instance gets its own copy
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def same_as(config_class, name: str, help: Optional[str] = None) -> Field:
    """The setting `name` of another config, declared there: the same default and range (and help, unless
    this one says it in its own words)."""
    f = next(f for f in fields(config_class) if f.name == name)
    return field(default=default_of(f), metadata={**f.metadata, **({"help": help} if help else {})})


def default_of(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def defaults(config_class) -> Dict[str, Any]:
    return {f.name: default_of(f) for f in fields(config_class)}


def allowed(f: Field) -> str:
    """What a setting accepts, in words: ">= 1", "> 0 and < 1", "one of line, paragraph", "-1 or >= 1"."""
    meta = f.metadata
    if meta.get("choices"):
        text = "one of " + ", ".join(map(str, meta["choices"]))
    else:
        signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        text = " and ".join(f"{signs[k]} {v:g}" for k, v in meta.get("bounds", {}).items())
    if meta.get("unset", MISSING) is not MISSING and text:
        text = f"{meta['unset']} or {text}"
    return text


def problem(f: Field, value: Any) -> Optional[str]:
    """Why `value` is not valid for the setting `f` (None when it is)."""
    meta = f.metadata
    if value is None and default_of(f) is None:
        return None
    if meta.get("unset", MISSING) is not MISSING and value == meta["unset"]:
        return None
    if meta.get("choices") and value not in meta["choices"]:
        return f"use {allowed(f)}"
    checks: Dict[str, Callable[[Any, Any], bool]] = {"ge": lambda x, b: x >= b, "gt": lambda x, b: x > b,
                                                    "le": lambda x, b: x <= b, "lt": lambda x, b: x < b}
    bounds = meta.get("bounds", {})
    if bounds:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number ({allowed(f)})"
        if value != value or not all(checks[k](value, b) for k, b in bounds.items()):  # (NaN fails too)
            return f"must be {allowed(f)}"
    return None


def option_name(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def check_settings(config: Any, name: Callable[[str], str] = option_name, error: type = ValueError) -> None:
    """Raise `error` naming the first setting of the dataclass `config` whose value is out of its range."""
    for f in fields(config):
        message = problem(f, getattr(config, f.name))
        if message:
            raise error(f"{name(f.name)} {getattr(config, f.name)!r}: {message}")
