"""The `evaluate` section: how the test set is scored."""

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from inatpipe.params.schema import Section, at_least

# auto: bf16 where the device computes it natively, else fp32
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class EvaluateParams(Section):
    SECTION: ClassVar[str] = "evaluate"

    batch_size: Annotated[int, at_least(1)]
    precision: Precision
