"""Side-by-side comparison of the trained models, from the metrics their training and evaluation stages wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from inatpipe.errors import UserError

COLUMNS = (
    "arch",
    "strategy",
    "test_accuracy",
    "macro_f1",
    "ece",
    "params_total",
    "params_trainable",
    "train_seconds",
    "infer_images_per_second",
    "pretrained",
    "weights",
)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} not found; run `dvc repro` so every model is trained and evaluated")
    return json.loads(path.read_text())


def weights_source(setting: str | None, pretrained: bool) -> str:
    """Where a model's starting weights came from: `setting` is its weights parameter, None when it has none."""
    if setting is None:
        return "none (trained from scratch)"
    if setting == "none":
        return "none (random init)"
    return f"{setting} ({'loaded' if pretrained else 'NOT loaded: random init'})"


def strategy_text(trained: dict) -> str:
    """How a model was trained, from its training metrics; models without a strategy were trained from scratch."""
    strategy = trained.get("strategy")
    if strategy is None:
        return "from scratch"
    unfrozen = trained.get("unfrozen", "none")
    return {
        "head": "head (backbone frozen)",
        "partial": f"partial (head, {unfrozen})",
        "full": "full (every layer)",
        "staged": f"staged (head, then head, {unfrozen})",
    }.get(strategy, strategy)


def compare_models(
    train_metrics: dict[str, Path], eval_metrics: dict[str, Path], weights: dict[str, str] | None = None
) -> dict[str, dict]:
    """One row per model, keyed by model name. `weights` maps a transfer-learned model to its weights setting."""
    weights = weights or {}
    rows = {}
    for name, train_path in train_metrics.items():
        trained, evaluated = _read(train_path), _read(eval_metrics[name])
        rows[name] = {
            "arch": trained.get("arch", name),
            "strategy": strategy_text(trained),
            "test_accuracy": evaluated["test"]["accuracy"],
            "macro_f1": evaluated["test"]["macro_f1"],
            "ece": evaluated["test"]["ece"],
            "params_total": trained["params_total"],
            "params_trainable": trained["params_trainable"],
            "train_seconds": trained["train_seconds"],
            "infer_images_per_second": evaluated["infer_images_per_second"],
            # Only transfer-learned models record it; a model trained from scratch has no pretrained weights.
            "pretrained": trained.get("pretrained", False),
            "weights": weights_source(weights.get(name), trained.get("pretrained", False)),
        }
    return rows


def to_markdown(rows: dict[str, dict]) -> str:
    df = pd.DataFrame.from_dict(rows, orient="index", columns=list(COLUMNS))
    df.index.name = "model"
    formats = {
        "arch": "{}",
        "strategy": "{}",
        "test_accuracy": "{:.4f}",
        "macro_f1": "{:.4f}",
        "ece": "{:.4f}",
        "params_total": "{:,}",
        "params_trainable": "{:,}",
        "train_seconds": "{:.1f}",
        "infer_images_per_second": "{:,.0f}",
        "pretrained": "{}",
        "weights": "{}",
    }
    for col, fmt in formats.items():
        df[col] = df[col].map(fmt.format)
    return df.to_markdown() + "\n"


# Row labels of the side-by-side table in reports/compare.md, in the order a reader wants them.
REPORT_ROWS = {
    "arch": "architecture",
    "strategy": "training (layers that train)",
    "test_accuracy": "test accuracy",
    "macro_f1": "macro-F1",
    "ece": "expected calibration error (lower is better)",
    "params_total": "parameters",
    "params_trainable": "trainable parameters",
    "train_seconds": "training time, s",
    "infer_images_per_second": "inference, images/s",
    "weights": "starting weights",
}

REPRODUCE = """```bash
make run                      # on a fresh clone: install, get data/, run the whole pipeline (dvc repro)
dvc repro                     # afterwards: rerun what changed; this report is the compare stage's output
dvc repro compare             # just this report and what it depends on
dvc plots show                # learning curves, confusion matrices, reliability diagrams -> dvc_plots/index.html
inatpipe inspect --model models/flexible.pt   # the architecture and parameter counts behind the table
```"""


def side_by_side(rows: dict[str, dict]) -> str:
    """Metrics down, models across."""
    table = {name: {label: rows[name][key] for key, label in REPORT_ROWS.items()} for name in rows}
    df = pd.DataFrame(table)
    for label, fmt in (
        ("test accuracy", "{:.4f}"),
        ("macro-F1", "{:.4f}"),
        ("expected calibration error (lower is better)", "{:.4f}"),
        ("parameters", "{:,}"),
        ("trainable parameters", "{:,}"),
        ("training time, s", "{:.1f}"),
        ("inference, images/s", "{:,.0f}"),
    ):
        df.loc[label] = [fmt.format(v) for v in df.loc[label]]
    df.index.name = "metric"
    return df.to_markdown(colalign=["left"] * (len(rows) + 1)) + "\n"


def report_markdown(rows: dict[str, dict], per_class: dict[str, str], bars: str) -> str:
    """reports/compare.md: image paths are relative to the reports folder, where the file lives."""
    names = list(rows)
    best = max(names, key=lambda n: rows[n]["test_accuracy"])
    parts = [
        "# Model comparison\n",
        "Written by the `compare` stage from the test-set evaluation of each model; do not edit by hand. "
        f"Best test accuracy: **{best}** ({rows[best]['test_accuracy']:.4f}).\n",
        "## Side by side\n",
        side_by_side(rows),
        f"![test accuracy, macro-F1, ECE and inference speed per model]({bars})\n",
        "## Per class (test set)\n",
    ]
    for name in names:
        parts += [f"### {name}\n", per_class[name]]
    sections = (
        ("Predictions on test images", "prediction_grid.png", "one row per class; wrong predictions in red"),
        ("Confusion matrices", "confusion_matrix.png", "true classes down, predicted classes across"),
        ("Calibration", "reliability.png", "accuracy against confidence; bars on the diagonal are calibrated"),
        ("Most confident mistakes", "confident_mistakes.png", "the wrong predictions made with most confidence"),
        (
            "Where the models look (Grad-CAM)",
            "gradcam.png",
            "the most confident mistakes, then one correct image per class; red: the regions that drove the prediction",
        ),
    )
    for title, image, note in sections:
        parts.append(f"## {title}\n\n{note[0].upper() + note[1:]}.\n")
        parts += [f"**{name}**\n\n![{name}: {title.lower()}]({name}/{image})\n" for name in names]
    parts += ["## Reproduce\n", REPRODUCE + "\n"]
    return "\n".join(parts)
