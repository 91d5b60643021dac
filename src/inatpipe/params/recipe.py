"""The `train` and `resnet` sections: one set of recipe keys (optimizer, schedule, loss, stopping, how the loop runs)
for both training stages, and for `resnet` also which backbone, which weights and which layers train."""

import typing
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from inatpipe.params.evaluate import Precision
from inatpipe.params.schema import Rule, Section, at_least, within

Optimizer = Literal["adam", "adamw", "sgd"]
Scheduler = Literal["constant", "cosine", "onecycle"]
# torchvision ResNets and their wide and ResNeXt variants: one layout (stem, layer1..layer4, fc), one model class.
ResnetArch = Literal[
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
]
Strategy = Literal["head", "partial", "full", "staged"]
RESNET_ARCHS: tuple[str, ...] = typing.get_args(ResnetArch)
RESNET_WEIGHTS = ("imagenet", "none")  # or a path to a state_dict file
RESNET_STAGES = 5  # stem, layer1, layer2, layer3, layer4: what resnet.unfreeze counts from the top


@dataclass(frozen=True)
class RecipeParams(Section):
    """How a model is trained: optimizer, per-batch learning-rate schedule, loss smoothing, batch mixing, weight
    averaging, early stopping, budget, and how the loop runs (precision, memory layout, torch.compile).

    One set of keys, one implementation (training/recipe.py), two sections: `train` (FlexibleCNN) and `resnet`.
    """

    SECTION: ClassVar[str] = "recipe"

    epochs: Annotated[int, at_least(1)]
    batch_size: Annotated[int, at_least(1)]
    optimizer: Optimizer
    learning_rate: Annotated[float, Rule(lambda v: v > 0, "a positive number, e.g. 1.0e-3")]
    weight_decay: Annotated[float, at_least(0, "a number")]
    scheduler: Scheduler
    # Longer than the run, it is shortened to half the run (see `warmup`): a one-key `epochs=1` override still runs.
    warmup_epochs: Annotated[float, at_least(0, "a number of epochs")]
    label_smoothing: Annotated[float, within(0, 1)]
    # Mixing of whole training batches (training/mixing.py): Beta(alpha, alpha) mixing weights; 0 turns one off.
    mixup: Annotated[float, at_least(0, "a number", "(the Beta distribution's alpha; 0 turns MixUp off)")]
    cutmix: Annotated[float, at_least(0, "a number", "(the Beta distribution's alpha; 0 turns CutMix off)")]
    mix_switch_prob: Annotated[float, within(0, 1, closed="[]", note="(a batch's chance of CutMix when both are on)")]
    # Exponential moving average of the weights (training/ema.py), validated and saved as the model; 0 = off.
    ema: Annotated[float, within(0, 1, note="(the EMA decay per step, e.g. 0.999; 0 turns it off)")]
    patience: Annotated[int, at_least(0, note="(0 turns early stopping off)")]
    grad_clip: Annotated[float, at_least(0, "a number", "(0 turns clipping off)")]
    max_minutes: Annotated[float, at_least(0, "a number", "(0: no time limit)")]
    precision: Precision
    channels_last: bool
    compile: bool

    @property
    def warmup(self) -> float:
        """The warm-up the schedule runs, in epochs: `warmup_epochs`, or half the run when that would fill it all
        (a schedule that only ever rises never anneals)."""
        return self.warmup_epochs if self.warmup_epochs < self.epochs else self.epochs / 2

    def adjustments(self) -> list[str]:
        """One line per setting that runs other than written because the run is too short for it."""
        if self.warmup == self.warmup_epochs:
            return []
        return [
            f"{self.key('warmup_epochs')} ({self.warmup_epochs:g}) is not shorter than {self.key('epochs')} "
            f"({self.epochs}): warming up over the first half of the run ({self.warmup:g} epochs) instead"
        ]


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

    arch: ResnetArch
    weights: Annotated[str, Rule(bool, f"one of {', '.join(RESNET_WEIGHTS)} or a path to a state_dict file")]
    require_pretrained: bool
    strategy: Strategy
    unfreeze: Annotated[
        int,
        Rule(
            lambda v: 1 <= v <= RESNET_STAGES,
            f"an integer from 1 (layer4) to 4 (layer1-layer4), or {RESNET_STAGES} (every layer)",
        ),
    ]
    # staged: 0 unfreezes from the start; as long as the run or longer, it is shortened (see `head_phase`).
    head_epochs: Annotated[int, at_least(0)]
    lr_decay: Annotated[float, within(0, 1, closed="(]", note="(1: one rate for every layer)")]

    @property
    def trainable_stages(self) -> int:
        """How many backbone stages, counted from the top, train by the end of the run (0: only the head)."""
        return {"head": 0, "full": RESNET_STAGES}.get(self.strategy, self.unfreeze)

    @property
    def head_phase(self) -> int:
        """staged: epochs of head-only training that run, leaving at least one epoch for the unfrozen stages."""
        return min(self.head_epochs, self.epochs - 1)

    def adjustments(self) -> list[str]:
        lines = super().adjustments()
        if self.strategy == "staged" and self.head_phase != self.head_epochs:
            lines.append(
                f"resnet.head_epochs ({self.head_epochs}) leaves no epoch of resnet.epochs ({self.epochs}) for the "
                f"unfrozen stages: training the head alone for {self.head_phase} epochs instead"
            )
        return lines
