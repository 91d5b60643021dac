"""Typed, validated view of params.yaml.

Stages call `load_params()` once and pass the frozen dataclasses down; nothing else in the library reads
params.yaml. Every key is required (params.yaml is the single source of defaults, so DVC sees every input),
unknown keys are errors, and each error names the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from inatpipe.errors import ConfigError
from inatpipe.filter_patterns import EXPLICIT, FILTER_PATTERNS, expand_filters

# Names of torch.nn activation modules that take no required arguments; FlexibleCNN builds them by name.
ACTIVATIONS = ("ReLU", "GELU", "SiLU", "Mish", "LeakyReLU", "ELU", "SELU", "Tanh", "Hardswish")
POOLINGS = ("max", "avg")
DEVICES = ("auto", "cpu", "cuda", "mps")
RESNET_WEIGHTS = ("imagenet", "none")  # or a path to a state_dict file
# torchvision ResNets and their wide and ResNeXt variants: one layout (stem, layer1..layer4, fc), one model class.
RESNET_ARCHS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
STRATEGIES = ("head", "partial", "full", "staged")
RESNET_STAGES = 5  # stem, layer1, layer2, layer3, layer4: what resnet.unfreeze counts from the top
OPTIMIZERS = ("adam", "adamw", "sgd")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 where the device computes it natively, else fp32
SCHEDULERS = ("constant", "cosine", "onecycle")


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"params.yaml: {key} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class DataParams:
    root: str
    train_dir: str
    test_dir: str
    val_fraction: float
    image_size: int
    augment: bool
    hflip: bool
    rotation: float
    crop_scale: float
    num_workers: int | str  # an integer >= 0, or auto
    max_bad_fraction: float

    def __post_init__(self) -> None:
        _require(bool(self.root), "data.root", "a folder path", self.root)
        _require(
            self.test_dir != self.train_dir, "data.test_dir", "a different folder from data.train_dir", self.test_dir
        )
        _require(0 < self.val_fraction < 1, "data.val_fraction", "between 0 and 1 (exclusive)", self.val_fraction)
        _require(self.image_size >= 8, "data.image_size", "an integer >= 8 (pixels)", self.image_size)
        _require(0 <= self.rotation <= 180, "data.rotation", "between 0 and 180 degrees", self.rotation)
        _require(
            0 < self.crop_scale <= 1, "data.crop_scale", "in (0, 1] (smallest crop area fraction)", self.crop_scale
        )
        _require(
            self.num_workers == "auto" or isinstance(self.num_workers, int) and self.num_workers >= 0,
            "data.num_workers",
            "auto or an integer >= 0",
            self.num_workers,
        )
        _require(
            0 <= self.max_bad_fraction < 1,
            "data.max_bad_fraction",
            "in [0, 1) (a share of the image files)",
            self.max_bad_fraction,
        )


@dataclass(frozen=True)
class ModelParams:
    """FlexibleCNN architecture: one conv block per entry of `filters`, then a dense layer.

    `filters` is `num_filters` as written when `filter_pattern` is `explicit`, else the pattern expanded with
    `base_filters` and `depth` (see filter_patterns.py).
    """

    num_filters: tuple[int, ...]
    filter_pattern: str
    base_filters: int
    depth: int
    kernel_size: int
    activation: str
    batch_norm: bool
    dropout: float
    pooling: str
    pooling_kernel_size: int
    pooling_stride: int
    dense_neurons: int
    convs_per_block: int

    def __post_init__(self) -> None:
        _require(
            len(self.num_filters) > 0 and all(n > 0 for n in self.num_filters),
            "model.num_filters",
            "a non-empty list of positive integers, e.g. [32, 64, 128]",
            list(self.num_filters),
        )
        _require(
            self.filter_pattern in FILTER_PATTERNS,
            "model.filter_pattern",
            f"one of {', '.join(FILTER_PATTERNS)}",
            self.filter_pattern,
        )
        _require(self.base_filters >= 1, "model.base_filters", "an integer >= 1", self.base_filters)
        _require(self.depth >= 1, "model.depth", "an integer >= 1 (conv blocks)", self.depth)
        _require(
            self.kernel_size >= 1 and self.kernel_size % 2 == 1,
            "model.kernel_size",
            "an odd integer >= 1 (same-padding needs an odd size: 1, 3, 5, 7, ...)",
            self.kernel_size,
        )
        _require(
            self.activation in ACTIVATIONS, "model.activation", f"one of {', '.join(ACTIVATIONS)}", self.activation
        )
        _require(0 <= self.dropout < 1, "model.dropout", "in [0, 1)", self.dropout)
        _require(self.pooling in POOLINGS, "model.pooling", f"one of {', '.join(POOLINGS)}", self.pooling)
        _require(
            self.pooling_kernel_size >= 1, "model.pooling_kernel_size", "an integer >= 1", self.pooling_kernel_size
        )
        _require(self.pooling_stride >= 1, "model.pooling_stride", "an integer >= 1", self.pooling_stride)
        _require(self.dense_neurons >= 1, "model.dense_neurons", "an integer >= 1", self.dense_neurons)
        _require(self.convs_per_block >= 1, "model.convs_per_block", "an integer >= 1", self.convs_per_block)

    @property
    def filters(self) -> tuple[int, ...]:
        """The conv widths that run: `num_filters`, or the pattern's expansion."""
        if self.filter_pattern == EXPLICIT:
            return self.num_filters
        return expand_filters(self.filter_pattern, self.base_filters, self.depth)

    def architecture(self) -> dict[str, Any]:
        """FlexibleCNN's keyword arguments, with `num_filters` resolved: what a checkpoint records and rebuilds."""
        config = _plain(dataclasses.asdict(self))
        for key in ("filter_pattern", "base_filters", "depth"):
            del config[key]
        config["num_filters"] = list(self.filters)
        return config


@dataclass(frozen=True)
class RecipeParams:
    """How a model is trained: optimizer, per-batch learning-rate schedule, loss smoothing, early stopping, budget,
    and how the loop runs (precision, memory layout, torch.compile).

    One set of keys, one implementation (recipe.py), two sections: `train` (FlexibleCNN) and `resnet`.
    """

    SECTION: ClassVar[str] = "recipe"

    epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float
    weight_decay: float
    scheduler: str
    warmup_epochs: float
    label_smoothing: float
    patience: int
    grad_clip: float
    max_minutes: float
    precision: str
    channels_last: bool
    compile: bool

    def __post_init__(self) -> None:
        s = self.SECTION
        _require(self.epochs >= 1, f"{s}.epochs", "an integer >= 1", self.epochs)
        _require(self.batch_size >= 1, f"{s}.batch_size", "an integer >= 1", self.batch_size)
        _require(self.optimizer in OPTIMIZERS, f"{s}.optimizer", f"one of {', '.join(OPTIMIZERS)}", self.optimizer)
        _require(self.learning_rate > 0, f"{s}.learning_rate", "a positive number, e.g. 1.0e-3", self.learning_rate)
        _require(self.weight_decay >= 0, f"{s}.weight_decay", "a number >= 0", self.weight_decay)
        _require(self.scheduler in SCHEDULERS, f"{s}.scheduler", f"one of {', '.join(SCHEDULERS)}", self.scheduler)
        _require(
            0 <= self.warmup_epochs < self.epochs,
            f"{s}.warmup_epochs",
            f"a number of epochs >= 0 and below {s}.epochs ({self.epochs})",
            self.warmup_epochs,
        )
        _require(0 <= self.label_smoothing < 1, f"{s}.label_smoothing", "in [0, 1)", self.label_smoothing)
        _require(self.patience >= 0, f"{s}.patience", "an integer >= 0 (0 turns early stopping off)", self.patience)
        _require(self.grad_clip >= 0, f"{s}.grad_clip", "a number >= 0 (0 turns clipping off)", self.grad_clip)
        _require(self.max_minutes >= 0, f"{s}.max_minutes", "a number >= 0 (0: no time limit)", self.max_minutes)
        _require(self.precision in PRECISIONS, f"{s}.precision", f"one of {', '.join(PRECISIONS)}", self.precision)


@dataclass(frozen=True)
class TrainParams(RecipeParams):
    """How FlexibleCNN is trained."""

    SECTION: ClassVar[str] = "train"


@dataclass(frozen=True)
class ResnetParams(RecipeParams):
    """ResNet transfer learning: which backbone, which weights, which layers train, and the recipe keys of `train`.

    strategy: head (backbone frozen), partial (also the last `unfreeze` stages), full (every layer), staged (the
    head alone for `head_epochs`, then the last `unfreeze` stages too). Below the head, each stage trains at the
    rate of the stage above it times `lr_decay` (discriminative learning rates).
    """

    SECTION: ClassVar[str] = "resnet"

    arch: str
    weights: str
    require_pretrained: bool
    strategy: str
    unfreeze: int
    head_epochs: int
    lr_decay: float

    def __post_init__(self) -> None:
        _require(self.arch in RESNET_ARCHS, "resnet.arch", f"one of {', '.join(RESNET_ARCHS)}", self.arch)
        _require(
            bool(self.weights),
            "resnet.weights",
            f"one of {', '.join(RESNET_WEIGHTS)} or a path to a state_dict file",
            self.weights,
        )
        _require(self.strategy in STRATEGIES, "resnet.strategy", f"one of {', '.join(STRATEGIES)}", self.strategy)
        _require(
            1 <= self.unfreeze <= RESNET_STAGES,
            "resnet.unfreeze",
            f"an integer from 1 (layer4) to 4 (layer1-layer4), or {RESNET_STAGES} (every layer)",
            self.unfreeze,
        )
        _require(0 < self.lr_decay <= 1, "resnet.lr_decay", "in (0, 1] (1: one rate for every layer)", self.lr_decay)
        super().__post_init__()
        if self.strategy == "staged":
            _require(
                1 <= self.head_epochs < self.epochs,
                "resnet.head_epochs",
                f"an integer from 1 to resnet.epochs - 1 ({self.epochs - 1}) with strategy staged",
                self.head_epochs,
            )
        else:
            _require(self.head_epochs >= 0, "resnet.head_epochs", "an integer >= 0", self.head_epochs)

    @property
    def trainable_stages(self) -> int:
        """How many backbone stages, counted from the top, train by the end of the run (0: only the head)."""
        return {"head": 0, "full": RESNET_STAGES}.get(self.strategy, self.unfreeze)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    precision: str

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "evaluate.batch_size", "an integer >= 1", self.batch_size)
        _require(self.precision in PRECISIONS, "evaluate.precision", f"one of {', '.join(PRECISIONS)}", self.precision)


@dataclass(frozen=True)
class Params:
    seed: int
    device: str
    data: DataParams
    model: ModelParams
    train: TrainParams
    resnet: ResnetParams
    evaluate: EvaluateParams

    def __post_init__(self) -> None:
        _require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        _require(self.device in DEVICES, "device", f"one of {', '.join(DEVICES)}", self.device)
        self._check_feature_map()

    def _check_feature_map(self) -> None:
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


def _type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    if tp is bool:
        _require(isinstance(value, bool), key, "true or false", value)
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if tp is float:
        hint = " (a number; write floats as 1.0e-3)" if isinstance(value, str) else ""
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number" + hint, value)
        return float(value)
    if tp is str:
        _require(isinstance(value, str), key, "a string", value)
        return value
    if isinstance(tp, types.UnionType):  # int | str: any of them; __post_init__ says which values
        types_ = typing.get_args(tp)
        expected = " or ".join(_type_name(t()) for t in types_)
        _require(isinstance(value, types_) and not isinstance(value, bool), key, expected, value)
        return value
    if typing.get_origin(tp) is tuple:  # tuple[int, ...]: a YAML list of ints
        _require(isinstance(value, list), key, "a list", value)
        item_type = typing.get_args(tp)[0]
        return tuple(_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not user input


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "params.yaml"
    if not isinstance(raw, dict):
        raise ConfigError(f"params.yaml: {where} must be a mapping of keys, got {_type_name(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"params.yaml: unknown key {prefix}{key}{hint}; {where} accepts: {', '.join(names)}")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ConfigError(f"params.yaml: missing key {prefix}{missing[0]}; add it (see the README's params table)")
    values = {}
    for name in names:
        tp = hints[name]
        if isinstance(tp, types.GenericAlias) or not dataclasses.is_dataclass(tp):
            values[name] = _coerce(prefix + name, raw[name], tp)
        else:
            values[name] = _build(tp, raw[name], f"{prefix}{name}.")
    return cls(**values)


def parse_params(raw: Any) -> Params:
    """Validate a parsed params mapping into `Params`; raises ConfigError naming the first bad key."""
    return _build(Params, raw, "")


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


def as_dict(params: Any) -> dict:
    """A params dataclass as plain JSON/YAML types (tuples become lists), e.g. for a checkpoint."""
    return _plain(dataclasses.asdict(params))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
