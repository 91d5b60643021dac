"""The `data` section: where the images are, how they are split, and how training images are augmented."""

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from inatpipe.params.schema import Rule, Section, at_least, fail, within

# basic: the crop, flip and rotation alone; trivialaugment, randaugment: one more policy of colour and geometry
# operations after them, drawn per image (torchvision's TrivialAugmentWide and RandAugment).
Policy = Literal["basic", "trivialaugment", "randaugment"]


@dataclass(frozen=True)
class DataParams(Section):
    SECTION: ClassVar[str] = "data"

    root: Annotated[str, Rule(bool, "a folder path")]  # holds <train_dir>/<class>/* and <test_dir>/<class>/*
    train_dir: str
    test_dir: str  # the held-out test set
    val_fraction: Annotated[float, Rule(lambda v: 0 < v < 1, "between 0 and 1 (exclusive)")]
    image_size: Annotated[int, at_least(8, note="(pixels)")]
    augment: bool
    hflip: bool
    rotation: Annotated[float, Rule(lambda v: 0 <= v <= 180, "between 0 and 180 degrees")]
    crop_scale: Annotated[float, within(0, 1, closed="(]", note="(smallest crop area fraction)")]
    policy: Policy
    random_erasing: Annotated[float, within(0, 1, closed="[]", note="(each training image's chance of an erased box)")]
    num_workers: Annotated[
        int | str, Rule(lambda v: v == "auto" or isinstance(v, int) and v >= 0, "auto or an integer >= 0")
    ]
    max_bad_fraction: Annotated[float, within(0, 1, note="(a share of the image files)")]

    def check(self) -> None:
        if self.test_dir == self.train_dir:
            fail("data.test_dir", "a different folder from data.train_dir", self.test_dir)
