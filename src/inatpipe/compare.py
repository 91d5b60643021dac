"""Side-by-side comparison of the trained models, from the metrics their training and evaluation stages wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from inatpipe.errors import UserError

COLUMNS = (
    "test_accuracy",
    "macro_f1",
    "params_total",
    "params_trainable",
    "train_seconds",
    "infer_images_per_second",
    "pretrained",
)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found; run `dvc repro` so every model is trained and evaluated")
    return json.loads(path.read_text())


def compare_models(train_metrics: dict[str, Path], eval_metrics: dict[str, Path]) -> dict[str, dict]:
    """One row per model, keyed by model name."""
    rows = {}
    for name, train_path in train_metrics.items():
        trained, evaluated = _read(train_path), _read(eval_metrics[name])
        rows[name] = {
            "test_accuracy": evaluated["test"]["accuracy"],
            "macro_f1": evaluated["test"]["macro_f1"],
            "params_total": trained["params_total"],
            "params_trainable": trained["params_trainable"],
            "train_seconds": trained["train_seconds"],
            "infer_images_per_second": evaluated["infer_images_per_second"],
            # Only transfer-learned models record it; a model trained from scratch has no pretrained weights.
            "pretrained": trained.get("pretrained", False),
        }
    return rows


def to_markdown(rows: dict[str, dict]) -> str:
    df = pd.DataFrame.from_dict(rows, orient="index", columns=list(COLUMNS))
    df.index.name = "model"
    formats = {
        "test_accuracy": "{:.4f}",
        "macro_f1": "{:.4f}",
        "params_total": "{:,}",
        "params_trainable": "{:,}",
        "train_seconds": "{:.1f}",
        "infer_images_per_second": "{:,.0f}",
        "pretrained": "{}",
    }
    for col, fmt in formats.items():
        df[col] = df[col].map(fmt.format)
    return df.to_markdown() + "\n"
