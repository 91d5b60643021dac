"""Images and tables a person reads: prediction grids, confident mistakes, reliability diagrams, confusion matrices,
the comparison bar chart and per-class tables. Drawn with matplotlib's headless Agg canvas, never a window."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # a bare Figure draws on Agg: no pyplot, no display, no global state
from PIL import Image

from inatpipe.atomic import atomic_open, write_text

# Pixel sizes are fixed (no tight bounding box), so a grid's size tells how many rows and columns it has.
DPI = 100
CELL_INCHES = (2.2, 2.5)  # one image with its three-line caption
GRID_COLUMNS = 3
MISTAKE_COLUMNS = 4
MISTAKES_SHOWN = 12
GRADCAM_MISTAKES = 8  # two rows of MISTAKE_COLUMNS, above one correct image per class
RIGHT, WRONG = "#1a7f37", "#cf222e"


def _thumbnail(image: np.ndarray, size: int = 128) -> np.ndarray:
    # Nearest keeps the pixels of tiny images (8x8 digits, 32x32 samples) visible instead of a blur.
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.NEAREST))


def _cell(ax, image: np.ndarray | None, caption: str = "", wrong: bool = False) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        ax.axis("off")
        return
    ax.imshow(_thumbnail(image))
    ax.set_title(caption, fontsize=8, color=WRONG if wrong else RIGHT)
    for spine in ax.spines.values():
        spine.set_color(WRONG if wrong else RIGHT)
        spine.set_linewidth(3 if wrong else 1)


def _caption(true: str, predicted: str, confidence: float) -> str:
    mark = "" if true == predicted else "  ✗ WRONG"
    return f"true: {true}\npred: {predicted}{mark}\nconfidence {confidence:.2f}"


def _image_grid(
    cells: Sequence[int | None],
    columns: int,
    images: Sequence[np.ndarray] | Mapping[int, np.ndarray],
    targets: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    classes: Sequence[str],
    title: str,
) -> tuple[Figure, np.ndarray]:
    """Test images row by row, `columns` to a row: each cell holds the image of that index (None: a blank cell),
    captioned with its true and predicted class and the confidence, and framed in red when wrong."""
    rows = len(cells) // columns
    # Constrained layout makes room for each caption and the title while keeping the figure size fixed.
    fig = Figure(figsize=(columns * CELL_INCHES[0], rows * CELL_INCHES[1]), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    fig.suptitle(title, fontsize=10)
    for ax, i in zip(axes.flat, cells, strict=True):
        if i is None:
            _cell(ax, None)
        else:
            caption = _caption(classes[targets[i]], classes[predicted[i]], confidence[i])
            _cell(ax, images[i], caption, wrong=predicted[i] != targets[i])
    return fig, axes


def _padded(indices: Sequence[int], length: int) -> list[int | None]:
    """`indices`, then None (blank cells) up to `length`."""
    return [*indices, *[None] * (length - len(indices))]


def save_figure(fig: Figure, out: Path) -> Path:
    """The figure as a PNG at `out`, written atomically like every file the pipeline writes."""
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=fig.dpi)
    return out


def prediction_grid(
    images: Sequence[np.ndarray],
    targets: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    classes: Sequence[str],
    out: Path,
    title: str = "",
) -> Path:
    """One row per class, GRID_COLUMNS test images of that class (the first in index order); wrong ones in red."""
    cells = []
    for k in range(len(classes)):  # fewer test images than columns: the rest of the row stays blank
        cells += _padded(np.flatnonzero(targets == k)[:GRID_COLUMNS].tolist(), GRID_COLUMNS)
    fig, _ = _image_grid(cells, GRID_COLUMNS, images, targets, predicted, confidence, classes, title)
    return save_figure(fig, out)


def _most_confident_mistakes(
    targets: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, count: int
) -> np.ndarray:
    wrong = np.flatnonzero(predicted != targets)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:count]


def confident_mistakes(
    images: Sequence[np.ndarray],
    targets: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    classes: Sequence[str],
    out: Path,
    title: str = "",
    count: int = MISTAKES_SHOWN,
) -> Path:
    """The `count` wrong predictions made with the highest confidence, most confident first."""
    worst = _most_confident_mistakes(targets, predicted, confidence, count)
    cells = _padded(worst.tolist(), max(1, -(-len(worst) // MISTAKE_COLUMNS)) * MISTAKE_COLUMNS)  # whole rows
    title = title or "most confident mistakes"
    fig, axes = _image_grid(cells, MISTAKE_COLUMNS, images, targets, predicted, confidence, classes, title)
    if len(worst) == 0:
        axes[0, 0].text(0, 0.5, "no wrong predictions on the test set", fontsize=10)
    return save_figure(fig, out)


def gradcam_selection(
    targets: np.ndarray, predicted: np.ndarray, confidence: np.ndarray, mistakes: int = GRADCAM_MISTAKES
) -> tuple[list[int], list[int]]:
    """Test indices to explain: the `mistakes` most confident wrong predictions (most confident first), and per class
    the correct prediction made with the highest confidence (classes with none are left out)."""
    worst = _most_confident_mistakes(targets, predicted, confidence, mistakes)
    best = []
    for k in np.unique(targets):
        right = np.flatnonzero((targets == k) & (predicted == k))
        if len(right):
            best.append(int(right[np.argmax(confidence[right])]))
    return worst.tolist(), best


def gradcam_grid(
    overlays: Mapping[int, np.ndarray],
    mistakes: Sequence[int],
    correct: Sequence[int],
    targets: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    classes: Sequence[str],
    out: Path,
    title: str = "",
) -> Path:
    """Grad-CAM overlays (test index -> image) in rows of MISTAKE_COLUMNS: the mistakes, then, from a new row, the
    correct ones; captioned and framed like the other grids."""
    columns = MISTAKE_COLUMNS
    cells = _padded(list(mistakes), -(-len(mistakes) // columns) * columns)
    cells += _padded(list(correct), max(1, -(-len(correct) // columns)) * columns)
    title = title or "Grad-CAM: most confident mistakes, then one correct image per class"
    fig, axes = _image_grid(cells, columns, overlays, targets, predicted, confidence, classes, title)
    if not mistakes and not correct:
        axes[0, 0].text(0, 0.5, "no test images", fontsize=10)
    return save_figure(fig, out)


def reliability_diagram(bins: Sequence[dict], ece: float, out: Path, title: str = "") -> Path:
    """Accuracy against confidence per bin; a calibrated model's bars reach the diagonal."""
    fig = Figure(figsize=(5, 5.5), dpi=DPI)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    lower = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] - b["lower"] for b in bins])
    filled = np.array([b["count"] > 0 for b in bins])
    accuracy = np.array([b["accuracy"] for b in bins])
    mean_conf = np.array([b["confidence"] for b in bins])
    top.bar(lower[filled], accuracy[filled], width=width[filled], align="edge", edgecolor="black", label="accuracy")
    centres = lower[filled] + width[filled] / 2
    top.plot(centres, mean_conf[filled], "o", color=WRONG, label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"{title}  ECE = {ece:.4f}".strip())
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(lower, [b["count"] for b in bins], width=width, align="edge", edgecolor="black", color="grey")
    bottom.set(xlabel="confidence (softmax of the predicted class)", ylabel="images")
    fig.tight_layout()
    return save_figure(fig, out)


def confusion_matrix_image(matrix: Sequence[Sequence[int]], classes: Sequence[str], out: Path, title: str = "") -> Path:
    """Counts, true classes down and predicted classes across, each cell labelled."""
    m = np.asarray(matrix)
    side = max(4.0, 0.5 * len(classes) + 2)
    fig = Figure(figsize=(side, side), dpi=DPI)
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    threshold = m.max() / 2 if m.size else 0
    for (i, j), count in np.ndenumerate(m):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color="white" if count > threshold else "black")
    fig.tight_layout()
    return save_figure(fig, out)


def comparison_bars(rows: dict[str, dict], out: Path) -> Path:
    """Test accuracy, macro-F1 and ECE of each model, grouped; inference throughput beside them."""
    names = list(rows)
    fig = Figure(figsize=(9, 4), dpi=DPI)
    quality, speed = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    keys = ("test_accuracy", "macro_f1", "ece")
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        x = np.arange(len(keys)) + (j - (len(names) - 1) / 2) * width
        bars = quality.bar(x, [rows[name][k] for k in keys], width=width, label=name)
        quality.bar_label(bars, fmt="%.3f", fontsize=8)
    quality.set_xticks(np.arange(len(keys)), labels=["test accuracy", "macro-F1", "ECE (lower is better)"])
    quality.set(ylim=(0, 1.1), title="test set")
    quality.legend()
    bars = speed.bar(
        names, [rows[n]["infer_images_per_second"] for n in names], color=[f"C{i}" for i in range(len(names))]
    )
    speed.bar_label(bars, fmt="%.0f", fontsize=8)
    speed.set(title="inference, images/s")
    fig.tight_layout()
    return save_figure(fig, out)


def per_class_markdown(per_class: dict[str, dict], averages: dict[str, dict]) -> str:
    """Precision, recall, F1 and support per class, then the macro and weighted averages."""
    df = pd.DataFrame.from_dict({**per_class, **averages}, orient="index")[["precision", "recall", "f1", "support"]]
    df.index.name = "class"
    for col in ("precision", "recall", "f1"):
        df[col] = df[col].map("{:.4f}".format)
    return df.to_markdown(disable_numparse=True, colalign=["left", "right", "right", "right", "right"]) + "\n"


def write_model_report(
    out_dir: Path,
    name: str,
    metrics: dict,
    images: Sequence[np.ndarray],
    targets: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    classes: Sequence[str],
) -> list[Path]:
    """Everything evaluate writes under reports/<model>/: the images (the test images as prepared, (n, h, w, 3)
    uint8) and the per-class table."""
    written = [
        prediction_grid(
            images, targets, predicted, confidence, classes, out_dir / "prediction_grid.png", f"{name}: test images"
        ),
        confident_mistakes(
            images,
            targets,
            predicted,
            confidence,
            classes,
            out_dir / "confident_mistakes.png",
            f"{name}: most confident mistakes (test)",
        ),
        reliability_diagram(metrics["reliability"], metrics["ece"], out_dir / "reliability.png", name),
        confusion_matrix_image(
            metrics["confusion_matrix"], classes, out_dir / "confusion_matrix.png", f"{name}: confusion matrix (test)"
        ),
    ]
    table = out_dir / "per_class.md"
    write_text(table, per_class_markdown(metrics["per_class"], metrics["averages"]))
    return [*written, table]
