"""A trained model behind one small interface, whatever file holds it: a checkpoint (torch), an exported ONNX file
(onnxruntime alone, no torch) or an exported TorchScript file. `load_predictor(path)` picks the implementation by the
file's suffix; `predict`, and anything else that serves predictions, asks it for class probabilities of prepared
images (`data.images.prepare_image`). Nothing here imports torch or onnxruntime until a model of that kind is loaded.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inatpipe.data import pixels
from inatpipe.errors import UserError
from inatpipe.evaluation.model_info import ONNX_SUFFIX, TORCHSCRIPT_METADATA, TORCHSCRIPT_SUFFIX, ModelInfo

if TYPE_CHECKING:
    import torch


def model_input(images: Sequence[np.ndarray], meta: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """Prepared images (each (side, side, 3) uint8) as the model's input batch: resized to its image size and
    normalised with its statistics on `device`, exactly as the evaluate stage's loader gives them."""
    import torch

    from inatpipe.data.dataset import channel_tensor, normalize
    from inatpipe.data.transforms import BatchResize

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    x = BatchResize(meta["image_size"])(x).to(device)
    norm = meta["normalization"]
    return normalize(x, channel_tensor(norm["mean"], x.device), channel_tensor(norm["std"], x.device))


class Predictor:
    """Class probabilities for prepared images; subclasses say how to get the logits.

    As evaluate.tta and evaluate.calibrate do in the evaluate stage: `tta` "hflip" averages the probabilities of each
    image and its mirror, and `calibrate` divides the logits by the model's temperature (1 when off)."""

    info: ModelInfo
    tta: str = "none"
    calibrate: bool = True

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def image_size(self) -> int:
        return self.info.image_size

    def logits(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(n, classes) float32 logits of prepared images, each (side, side, 3) uint8."""
        raise NotImplementedError

    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(n, classes) float64 probabilities: softmax(logits / temperature), averaged over the test-time views,
        each row summing to 1."""
        temperature = self.info.temperature if self.calibrate else 1.0
        views = [images] if self.tta == "none" else [images, [image[:, ::-1] for image in images]]
        return np.mean([_softmax(self.logits(view).astype(np.float64) / temperature) for view in views], axis=0)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class CheckpointPredictor(Predictor):
    """A checkpoint of the pipeline (models/<model>.pt), in torch on `device`, autocast to `precision` as
    `evaluate.precision` does; its input is made exactly as the evaluate stage's loader makes it."""

    def __init__(self, path: Path, device: str = "auto", precision: str = "auto"):
        from inatpipe.checkpoint import load_checkpoint
        from inatpipe.runtime import choose_device

        try:
            self.device = choose_device(device)
        except UserError:  # its message speaks of params.yaml, which the command line does not read
            raise UserError(f"device {device!r} is not available on this machine; use --device auto or cpu") from None
        self.model, self.meta = load_checkpoint(path, self.device)
        self.precision = precision
        self.info = ModelInfo.of_checkpoint(self.meta)

    def logits(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        from inatpipe.training.precision import autocast

        with torch.no_grad(), autocast(self.device, self.precision):
            out = self.model(model_input(images, self.meta, self.device))
        return out.float().cpu().numpy()


def _cpu_only(kind: str, device: str, precision: str) -> None:
    if device not in ("auto", "cpu"):
        raise UserError(f"{kind} model runs on the CPU here; leave out --device {device}")
    if precision not in ("auto", "fp32"):
        raise UserError(
            f"{kind} model computes in fp32 (its parity was measured so); leave out --precision {precision}"
        )


class OnnxPredictor(Predictor):
    """An exported ONNX file under onnxruntime's CPU provider: numpy, Pillow and onnxruntime, no torch. Its input is
    made by `data.pixels`, which gives the same numbers as the torch path."""

    def __init__(self, path: Path, device: str = "auto", precision: str = "auto"):
        import onnxruntime

        _cpu_only("an ONNX", device, precision)
        if not Path(path).is_file():
            raise UserError(f"ONNX model {path} not found; write it with `inatpipe export` or `dvc repro`")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: no optimizer chatter on stderr
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for a truncated or foreign file
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path} is not a readable ONNX model ({why}); export it with `inatpipe export`") from None
        self.info = ModelInfo.of_metadata(self.session.get_modelmeta().custom_metadata_map, Path(path))
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, images: Sequence[np.ndarray]) -> np.ndarray:
        x = pixels.model_input(images, self.info.image_size, self.info.mean, self.info.std)
        return self.session.run(None, {self.input_name: x})[0]


def load_torchscript(path: Path, device: torch.device | str = "cpu") -> tuple[torch.jit.ScriptModule, ModelInfo]:
    """An exported TorchScript file and the metadata it carries."""
    import torch

    if not Path(path).is_file():
        raise UserError(f"TorchScript model {path} not found; write it with `inatpipe export --format torchscript`")
    extra = {TORCHSCRIPT_METADATA: ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated")
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as e:  # a foreign or truncated archive
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{path} is not a readable TorchScript model ({why}); export it with `inatpipe export`"
        ) from None
    props = json.loads(extra[TORCHSCRIPT_METADATA]) if extra[TORCHSCRIPT_METADATA] else {}
    return module.eval(), ModelInfo.of_metadata(props, Path(path))


class TorchScriptPredictor(Predictor):
    """An exported TorchScript file on the CPU, in fp32: torch, but not this package's model code."""

    def __init__(self, path: Path, device: str = "auto", precision: str = "auto"):
        _cpu_only("a TorchScript", device, precision)
        self.module, self.info = load_torchscript(path)

    def logits(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        x = pixels.model_input(images, self.info.image_size, self.info.mean, self.info.std)
        with torch.no_grad():
            return self.module(torch.from_numpy(x)).numpy()


def load_predictor(
    path: str | Path, device: str = "auto", precision: str = "auto", *, tta: str = "none", calibrate: bool = True
) -> Predictor:
    """The predictor for a model file: `.onnx` runs under onnxruntime, `.ts` as TorchScript, anything else is read
    as a checkpoint of the pipeline. `device` and `precision` apply to checkpoints; exported files run on the CPU.
    `tta` and `calibrate` as evaluate.tta and evaluate.calibrate."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ONNX_SUFFIX:
        predictor: Predictor = OnnxPredictor(path, device, precision)
    elif suffix == TORCHSCRIPT_SUFFIX:
        predictor = TorchScriptPredictor(path, device, precision)
    else:
        predictor = CheckpointPredictor(path, device, precision)
    predictor.tta, predictor.calibrate = tta, calibrate
    return predictor
