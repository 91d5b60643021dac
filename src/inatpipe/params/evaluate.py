"""The `evaluate` section: how the test set is scored."""

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from inatpipe.params.schema import Section, at_least

# auto: bf16 where the device computes it natively, else fp32
Precision = Literal["auto", "fp32", "bf16", "fp16"]
# Test-time augmentation: none, or the mean of the probabilities of each image and its horizontal mirror
Tta = Literal["none", "hflip"]
# Which of torch's ONNX exporters the export stage uses (evaluation/export.py): auto = torchscript where torch has it
OnnxExporter = Literal["auto", "torchscript", "dynamo"]


@dataclass(frozen=True)
class EvaluateParams(Section):
    SECTION: ClassVar[str] = "evaluate"

    batch_size: Annotated[int, at_least(1)]
    precision: Precision
    tta: Tta
    calibrate: bool  # apply the temperature stored in the checkpoint (fitted on val at the end of training)
    onnx_exporter: OnnxExporter
