"""What an exported model file carries besides its graph, so that the file alone is enough to use it: the classes its
outputs stand for, the input it expects (image size, normalisation) and its temperature. The same string pairs go
into an ONNX file's `metadata_props` and, as JSON, into a TorchScript archive's extra file. No torch here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from inatpipe.errors import UserError

METADATA_FORMAT = "1"
ONNX_SUFFIX = ".onnx"
TORCHSCRIPT_SUFFIX = ".ts"
TORCHSCRIPT_METADATA = "inatpipe.json"  # the TorchScript archive's extra file holding the same metadata
# The input and output names of exported models, and what they hold (also written into the file).
INPUT_NAME, OUTPUT_NAME = "images", "logits"
INPUT_DOC = "float32 (batch, 3, image_size, image_size): RGB scaled to [0, 1], then (x - mean) / std per channel"
OUTPUT_DOC = "float32 (batch, number of classes): logits; softmax(logits / temperature) gives the probabilities"


@dataclass(frozen=True)
class ModelInfo:
    """What using a model needs besides its weights: the classes its outputs stand for, the input it expects, and
    the temperature that calibrates its probabilities (1.0: as trained)."""

    model_name: str
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:  # also NaN
            raise UserError(f"temperature must be > 0 (the logits are divided by it), got {self.temperature}")

    @classmethod
    def of_checkpoint(cls, meta: Mapping[str, Any]) -> ModelInfo:
        norm = meta["normalization"]
        return cls(
            meta["model_name"],
            list(meta["classes"]),
            int(meta["image_size"]),
            [float(v) for v in norm["mean"]],
            [float(v) for v in norm["std"]],
            float(meta.get("temperature", 1.0)),
        )

    def metadata(self) -> dict[str, str]:
        """String key-value pairs (ONNX `metadata_props`; the TorchScript extra file holds the same as JSON): each
        value is JSON, so any reader gets the numbers back exactly."""
        values = {k: json.dumps(v) for k, v in asdict(self).items()}
        return {"inatpipe_format": METADATA_FORMAT, **values, INPUT_NAME: INPUT_DOC, OUTPUT_NAME: OUTPUT_DOC}

    @classmethod
    def of_metadata(cls, props: Mapping[str, str], source: Path) -> ModelInfo:
        if props.get("inatpipe_format") != METADATA_FORMAT:
            raise UserError(
                f"{source} carries no inatpipe metadata of format {METADATA_FORMAT} (classes, image size, "
                "normalisation); export the model with `inatpipe export`"
            )
        try:
            values = {k: json.loads(props[k]) for k in ("model_name", "classes", "image_size", "mean", "std")}
            temperature = float(json.loads(props.get("temperature", "1.0")))
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(
                f"{source} has broken inatpipe metadata ({type(e).__name__}: {e}); export it again"
            ) from None
        return cls(**values, temperature=temperature)
