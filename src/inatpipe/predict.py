"""Top-k predictions for image files and folders, from a checkpoint alone (classes and normalisation travel inside)."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from inatpipe.data.transforms import eval_transform
from inatpipe.errors import UserError


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


def _load(path: Path, transform) -> torch.Tensor | None:
    """The transformed image, or None (after a warning on stderr) when Pillow can't read it."""
    try:
        with Image.open(path) as img:
            return transform(img.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        print(f"warning: skipping {path}: not a readable image ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def _batches(files: Iterable[Path], transform, batch_size: int) -> Iterator[tuple[list[Path], torch.Tensor]]:
    paths, tensors = [], []
    for path in files:
        x = _load(path, transform)
        if x is None:
            continue
        paths.append(path)
        tensors.append(x)
        if len(paths) == batch_size:
            yield paths, torch.stack(tensors)
            paths, tensors = [], []
    if paths:
        yield paths, torch.stack(tensors)


@torch.no_grad()
def predict_files(
    model: nn.Module,
    meta: dict,
    files: Sequence[Path],
    top_k: int = 3,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> list[Prediction]:
    """Top-k classes per readable file, in the order given; unreadable files are skipped with a warning."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    classes = meta["classes"]
    k = min(top_k, len(classes))
    norm = meta["normalization"]
    transform = eval_transform(meta["image_size"], norm["mean"], norm["std"])
    model.eval()
    out = []
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=None, leave=False)
    for paths, x in _batches(files, transform, batch_size):
        probs = model(x.to(device)).float().softmax(1).cpu()
        values, indices = probs.topk(k, dim=1)
        for path, p, i in zip(paths, values.tolist(), indices.tolist(), strict=True):
            out.append(Prediction(path, [(classes[c], prob) for c, prob in zip(i, p, strict=True)]))
        bar.update(len(paths))
    bar.close()
    return out


def format_prediction(pred: Prediction) -> str:
    return f"{pred.path}: " + ", ".join(f"{name} {prob:.3f}" for name, prob in pred.top)


def write_csv(predictions: Sequence[Prediction], out: Path) -> None:
    """One row per image: path, then class_1, probability_1, class_2, probability_2, ..."""
    k = max((len(p.top) for p in predictions), default=0)
    header = ["path"] + [f"{field}_{r}" for r in range(1, k + 1) for field in ("class", "probability")]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for p in predictions:
            writer.writerow([str(p.path)] + [v for name, prob in p.top for v in (name, f"{prob:.6f}")])
