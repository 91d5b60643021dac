"""The range test's report: loss against learning rate as a PNG (suggestions marked) and the curve as JSON."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure  # a bare Figure draws on Agg: no pyplot, no display

from inatpipe.atomic import write_json
from inatpipe.evaluation.figures import save_figure
from inatpipe.training.lr_find import RangeTest

PNG, JSON = "lr_find.png", "lr_find.json"


def lr_find_figure(test: RangeTest, out: Path, title: str = "") -> Path:
    """Batch losses (faint) and their moving average against the rate on a log axis, the suggestions as lines;
    `title` names what was tested (the model), beside the steps run."""
    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.subplots()
    ax.plot(test.lrs, test.losses, color="#bbbbbb", linewidth=0.8, label="batch loss")
    ax.plot(test.lrs, test.smoothed, color="#0969da", linewidth=1.8, label="smoothed loss")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    # The raw losses past divergence would squash the curve: show it from its lowest point to twice its start.
    low, first = min(test.smoothed), test.smoothed[0]
    ax.set_ylim(low - 0.1 * (first - low) - 1e-3, max(first, low) * 2)
    s = test.suggestion()
    marks = [("minimum", s["minimum"], "#8c959f", ":"), ("steepest", s["steepest"], "#bf8700", "--")]
    marks.append(("recommended (minimum / 10)", s["recommended"], "#cf222e", "-"))
    for label, lr, color, style in marks:
        if lr is not None:
            ax.axvline(lr, color=color, linestyle=style, linewidth=1.2, label=f"{label}: {lr:.2e}")
    ax.legend(fontsize=8, loc="upper left")
    stopped = "the loss diverged" if test.diverged else "no divergence"
    name = f", {title}" if title else ""
    ax.set_title(f"LR range test{name}: {len(test.lrs)} of {test.steps} steps, {stopped}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out)


def write_lr_find(test: RangeTest, out_dir: Path, title: str = "") -> tuple[Path, Path]:
    """`out_dir`/lr_find.png and `out_dir`/lr_find.json, each written atomically; returns their paths."""
    png, json = out_dir / PNG, out_dir / JSON
    lr_find_figure(test, png, title)
    write_json(json, test.as_json())
    return png, json
