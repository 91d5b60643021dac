"""params.yaml as typed sections: read it, check every key, and build the frozen `Params` the stages pass down.

Stages call `load_params()` once; nothing else in the library reads params.yaml. Every key is required (params.yaml
is the single source of defaults, so DVC sees every input), unknown keys are errors, and each error names the key
and what it accepts.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml

from inatpipe.errors import ConfigError
from inatpipe.params.data import DataParams
from inatpipe.params.evaluate import EvaluateParams
from inatpipe.params.filters import EXPLICIT
from inatpipe.params.model import ModelParams
from inatpipe.params.recipe import ResnetParams, TrainParams
from inatpipe.params.schema import Section, at_least, build, plain
from inatpipe.params.sweep import SweepParams

Device = Literal["auto", "cpu", "cuda", "mps"]


@dataclass(frozen=True)
class Params(Section):
    SECTION: ClassVar[str] = ""

    seed: Annotated[int, at_least(0)]
    device: Device
    data: DataParams
    model: ModelParams
    train: TrainParams
    resnet: ResnetParams
    evaluate: EvaluateParams
    sweep: SweepParams

    def check(self) -> None:
        """Each FlexibleCNN block pools; catch a stack too deep for the image size before any work starts."""
        m = self.model
        size = self.data.image_size
        source = "model.num_filters" if m.filter_pattern == EXPLICIT else f"model.filter_pattern {m.filter_pattern}"
        for block in range(1, len(m.filters) + 1):
            size = (size - m.pooling_kernel_size) // m.pooling_stride + 1
            if size < 1:
                raise ConfigError(
                    f"params.yaml: {source} has {len(m.filters)} blocks, but data.image_size="
                    f"{self.data.image_size} pools down to nothing at block {block}; use fewer blocks, a smaller "
                    "model.pooling_kernel_size / model.pooling_stride, or a larger data.image_size"
                )


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float, as YAML 1.2 (and DVC) do; plain PyYAML reads a string."""


# Only exponent forms without a dot (1e-3, 5E+2) need adding: SafeLoader already reads 1.0e-3, 0.001 and ints.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def parse_params(raw: Any) -> Params:
    """Validate a parsed params mapping into `Params`; raises ConfigError naming the first bad key."""
    return build(Params, raw)


def read_raw(path: str | Path = "params.yaml") -> Any:
    """params.yaml as plain YAML data, before validation (`1e-3` reads as a float, as DVC reads it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; run from the project root, where params.yaml lives")
    try:
        return yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{line}: {getattr(e, 'problem', e)}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    return parse_params(read_raw(path))


def as_dict(params: Any) -> Any:
    """A params section as plain JSON/YAML types (tuples become lists), e.g. for a checkpoint."""
    return plain(params)


def lookup(raw: dict, key: str) -> Any:
    """The value of a dotted params.yaml key (`model.kernel_size`) or section (`model`) in the raw mapping."""
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"params.yaml: missing key {key}")
        node = node[part]
    return node
