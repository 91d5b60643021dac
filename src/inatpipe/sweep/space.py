"""A search space (sweep.yaml): read it, check every key and value against params.yaml, and write a configuration as
`dvc exp run -S key=value` arguments. Optuna draws the configurations (sweep/run.py); this module knows the file.

sweep.yaml maps params.yaml keys (dotted) to what a trial may take:

    parameters:
      model.kernel_size: {values: [3, 5, 7]}               # one of the listed values (categorical)
      model.dropout: {min: 0.0, max: 0.3}                  # a number in [min, max]
      train.learning_rate: {min: 1.0e-5, max: 1.0e-3, log: true}   # on a log scale: each decade alike
      model.base_filters: {min: 16, max: 64}               # both ends integers: an integer in [min, max]
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from inatpipe.errors import ConfigError, UserError
from inatpipe.params import parse_params

SPACE_FILE = Path("sweep.yaml")
ENTRY_FIELDS = ("values", "min", "max", "log")


@dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool
    integer: bool


Space = dict[str, Choice | Range]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_space(raw: Any, source: str = "sweep.yaml") -> Space:
    """Check the shape of a search space (not yet its keys or values against params.yaml)."""
    if not isinstance(raw, dict) or set(raw) != {"parameters"} or not isinstance(raw["parameters"], dict):
        raise UserError(
            f"{source} must hold one mapping, `parameters:`, of params.yaml keys to {{values: [...]}} or "
            "{min: ..., max: ...}"
        )
    if not raw["parameters"]:
        raise UserError(f"{source}: parameters is empty; add at least one params.yaml key to sweep")
    return {str(key): _parse_entry(str(key), spec, source) for key, spec in raw["parameters"].items()}


def _parse_entry(key: str, spec: Any, source: str) -> Choice | Range:
    where = f"{source}: {key}"
    if not isinstance(spec, dict):
        raise UserError(f"{where} must be a mapping: {{values: [...]}} or {{min: ..., max: ...}}, got {spec!r}")
    unknown = [f for f in spec if f not in ENTRY_FIELDS]
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r}; an entry has values, or min, max and optionally log")
    if "values" in spec:
        if set(spec) != {"values"}:
            raise UserError(f"{where}: give either values or min/max, not both")
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: values must be a non-empty list, got {values!r}")
        return Choice(tuple(values))
    if "min" not in spec or "max" not in spec:
        raise UserError(f"{where}: a range needs both min and max (or give values: [...])")
    low, high, log = spec["min"], spec["max"], spec.get("log", False)
    if not (_is_number(low) and _is_number(high)):
        raise UserError(f"{where}: min and max must be numbers, got min={low!r} max={high!r}")
    if low > high:
        raise UserError(f"{where}: min ({low}) is greater than max ({high})")
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs min > 0, got min={low}")
    integer = isinstance(low, int) and isinstance(high, int)
    return Range(low, high, log, integer)


def load_space(path: Path = SPACE_FILE) -> Space:
    if not path.is_file():
        raise UserError(f"{path} not found; write a search space there (docs/sweeps.md)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {getattr(e, 'problem', e)}") from None
    return parse_space(raw, str(path))


def _leaves(raw: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in raw.items():
        keys += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def with_overrides(raw_params: dict, config: dict[str, Any]) -> dict:
    """A copy of the params mapping with each dotted key of `config` set, as `dvc exp run -S` would set it."""
    out = copy.deepcopy(raw_params)
    for key, value in config.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[leaf] = value
    return out


def check_space(space: Space, raw_params: dict, source: str = "sweep.yaml") -> None:
    """Every key is a params.yaml key, and every listed value (every range end) is valid for it on its own."""
    leaves = _leaves(raw_params)
    for key, spec in space.items():
        if key not in leaves:
            close = difflib.get_close_matches(key, leaves, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{source}: {key} is not a key of params.yaml{hint}")
        candidates = spec.values if isinstance(spec, Choice) else (spec.low, spec.high)
        for value in candidates:
            try:
                parse_params(with_overrides(raw_params, {key: value}))
            except ConfigError as e:
                # Only the key's own errors: a value can be invalid beside today's params yet valid beside other
                # sampled values (model.depth 6 with a larger data.image_size); a trial that draws such a combination
                # fails at once, without a run, and the search goes on.
                if re.match(rf"params\.yaml: {re.escape(key)}(\[\d+\])? must ", str(e)):
                    raise UserError(f"{source}: {key}: {value!r} is not valid ({e})") from None


def format_value(value: Any) -> str:
    """A value as `dvc exp run -S key=value` reads it (Hydra's override grammar)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        mantissa, _, exponent = text.partition("e")
        if "." not in mantissa and "inf" not in mantissa and "nan" not in mantissa:
            mantissa += ".0"  # a dot keeps it a float in params.yaml for every YAML reader
        return mantissa + (f"e{exponent}" if exponent else "")
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[A-Za-z0-9_./-]+", value):
        return "'" + value.replace("'", "\\'") + "'"  # commas etc. would be read as a Hydra sweep
    return str(value)


def override_args(config: dict[str, Any]) -> list[str]:
    args = []
    for key, value in config.items():
        args += ["-S", f"{key}={format_value(value)}"]
    return args
