"""How a params section declares its keys: each field's type says what kind of value it takes, and beside it the
values it accepts (choices as `Literal[...]`, ranges and other rules as `Annotated[type, Rule]`). One builder checks a
YAML mapping against a section; one check runs each rule. No torch here: stages that only read params start fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from inatpipe.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """Which values a key accepts, and how the error says so: `params.yaml: <key> must be <expected>, got <value>`."""

    accepts: Callable[[Any], bool]
    expected: str

    def check(self, key: str, value: Any) -> None:
        if not self.accepts(value):
            fail(key, self.expected, value)


def fail(key: str, expected: str, value: Any) -> typing.NoReturn:
    raise ConfigError(f"params.yaml: {key} must be {expected}, got {value!r}")


def at_least(low: float, noun: str = "an integer", note: str = "") -> Rule:
    """`noun` >= low, e.g. at_least(1) accepts 1, 2, ... and says "an integer >= 1"."""
    return Rule(lambda v: v >= low, f"{noun} >= {low}{f' {note}' if note else ''}")


def within(low: float, high: float, *, closed: str = "[)", note: str = "") -> Rule:
    """A number in an interval written as mathematicians do: closed="[)" is [low, high), "(]" is (low, high]."""
    above = (lambda v: v >= low) if closed[0] == "[" else (lambda v: v > low)
    below = (lambda v: v <= high) if closed[1] == "]" else (lambda v: v < high)
    text = f"in {closed[0]}{low:g}, {high:g}{closed[1]}{f' {note}' if note else ''}"
    return Rule(lambda v: above(v) and below(v), text)


def one_of(choices: tuple[Any, ...]) -> Rule:
    return Rule(lambda v: v in choices, f"one of {', '.join(map(str, choices))}")


class Section:
    """Base of every params section: its fields' rules and choices are checked when it is built, from YAML or in
    Python, and `check` holds the rules that span several keys. SECTION names it in error messages.

    Section modules keep their annotations evaluated (no `from __future__ import annotations`), so that a Rule's
    lambda is created in, and looks names up in, its own module.
    """

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self), include_extras=True)
        for field in dataclasses.fields(self):
            for rule in rules(hints[field.name]):
                rule.check(self.key(field.name), getattr(self, field.name))
        self.check()

    def check(self) -> None:
        """Rules over several keys; each section that has some overrides this."""

    @classmethod
    def key(cls, name: str) -> str:
        return f"{cls.SECTION}.{name}" if cls.SECTION else name


def rules(tp: Any) -> list[Rule]:
    """The rules a field's annotation declares: a Literal's choices, an Annotated's Rules."""
    if typing.get_origin(tp) is Literal:
        return [one_of(typing.get_args(tp))]
    if typing.get_origin(tp) is Annotated:
        base, *extras = typing.get_args(tp)
        return [*rules(base), *(e for e in extras if isinstance(e, Rule))]
    return []


def _type_name(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }
    return names.get(type(value), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def coerce(key: str, value: Any, tp: Any) -> Any:
    """`value` read from YAML as the kind the annotation `tp` names (ints are accepted where floats are expected);
    its rules are checked later, by the section. Raises ConfigError naming the key otherwise."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return coerce(key, value, typing.get_args(tp)[0])
    if origin is Literal:
        kinds = {type(choice) for choice in typing.get_args(tp)}
        return coerce(key, value, kinds.pop() if len(kinds) == 1 else object)
    if tp is object:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            fail(key, "true or false", value)
        return value
    if tp is int:
        if not _is_int(value):
            fail(key, "an integer", value)
        return value
    if tp is float:
        if not (_is_int(value) or isinstance(value, float)):
            fail(key, "a number" + (" (a number; write floats as 1.0e-3)" if isinstance(value, str) else ""), value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(key, "a string", value)
        return value
    if isinstance(tp, types.UnionType):  # int | str: any of them; the field's Rule says which values
        kinds = typing.get_args(tp)
        if not isinstance(value, kinds) or isinstance(value, bool):
            fail(key, " or ".join(_type_name(kind()) for kind in kinds), value)
        return value
    if origin is tuple:  # tuple[int, ...]: a YAML list of ints
        if not isinstance(value, list):
            fail(key, "a list", value)
        item = typing.get_args(tp)[0]
        return tuple(coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in a section, not user input


def build(cls: type, raw: Any) -> Any:
    """A section (and the sections nested in it) from a parsed YAML mapping: every key required, none unknown."""
    where = cls.SECTION or "params.yaml"
    prefix = f"{cls.SECTION}." if cls.SECTION else ""
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml: {where} must be a mapping of keys, got {_type_name(raw)}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"params.yaml: unknown key {prefix}{key}{hint}; {where} accepts: {', '.join(names)}")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ConfigError(f"params.yaml: missing key {prefix}{missing[0]}; add it (see docs/params.md)")
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {}
    for name in names:
        tp = hints[name]
        nested = isinstance(tp, type) and issubclass(tp, Section)
        values[name] = build(tp, raw[name]) if nested else coerce(prefix + name, raw[name], tp)
    return cls(**values)


def plain(obj: Any) -> Any:
    """A section as plain JSON/YAML types (tuples become lists), e.g. for a checkpoint."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj
