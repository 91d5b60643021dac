"""Top-k predictions for image files and folders, from a model file alone: a checkpoint, or an exported ONNX or
TorchScript file (classes and normalisation travel inside; `predictor.load_predictor` reads each kind).

Each file is read as the pipeline reads it (`prepare_image`: one decoder, the prepared square) and resized and
normalised as the evaluate stage's loader does, and its probabilities calibrated with the model's temperature
(and averaged over test-time views) as evaluate calibrates them, so an image of the test set gets the prediction
evaluate gave it. Nothing here imports torch at import time: predictions from an ONNX file run without it.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from inatpipe.atomic import atomic_open
from inatpipe.data.images import DECODE_ERRORS, prepare_image
from inatpipe.errors import UserError
from inatpipe.evaluation.predictor import Predictor
from inatpipe.evaluation.predictor import model_input as model_input  # where inspection and others import it


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class, probability), most probable first


def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, and under each folder every file with an extension Pillow can read, sorted."""
    readable = {ext.lower() for ext in Image.registered_extensions()}
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files += sorted(
                p
                for p in item.rglob("*")
                if p.is_file()
                and p.suffix.lower() in readable
                and not any(part.startswith(".") for part in p.relative_to(item).parts)
            )
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"{item} not found; give image files or folders of images")
    if not files:
        raise UserError(f"no image files in {', '.join(map(str, inputs))}")
    return files


def read_image(path: Path, image_size: int) -> np.ndarray | None:
    """The file as `prepare` would store it, or None (after a warning on stderr) when it is not a readable image."""
    try:
        return prepare_image(path, image_size)
    except DECODE_ERRORS as e:
        print(f"warning: skipping {path}: not a readable image ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def _batches(files: Iterable[Path], image_size: int, batch_size: int) -> Iterator[tuple[list[Path], list[np.ndarray]]]:
    paths, images = [], []
    for path in files:
        img = read_image(path, image_size)
        if img is None:
            continue
        paths.append(path)
        images.append(img)
        if len(paths) == batch_size:
            yield paths, images
            paths, images = [], []
    if paths:
        yield paths, images


def predict_files(
    predictor: Predictor, files: Sequence[Path], top_k: int = 3, batch_size: int = 64
) -> list[Prediction]:
    """Top-k classes per readable file, in the order given; unreadable files are skipped with a warning."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    classes = predictor.classes
    k = min(top_k, len(classes))
    out = []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=None, leave=False)
    for paths, images in _batches(files, predictor.image_size, batch_size):
        probs = predictor.probabilities(images)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # most probable first; ties: the lower index
        for path, p, order in zip(paths, probs, top, strict=True):
            out.append(Prediction(path, [(classes[c], float(p[c])) for c in order]))
        bar.update(len(paths))
    bar.close()
    return out


def format_prediction(pred: Prediction) -> str:
    return f"{pred.path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in pred.top)


def write_csv(predictions: Sequence[Prediction], out: Path) -> None:
    """One row per image: path, then class_1, probability_1, class_2, probability_2, ..."""
    k = max((len(p.top) for p in predictions), default=0)
    header = ["path"] + [f"{field}_{r}" for r in range(1, k + 1) for field in ("class", "probability")]
    with atomic_open(out) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for p in predictions:
            writer.writerow([str(p.path)] + [v for name, prob in p.top for v in (name, f"{prob:.6f}")])
