"""Sweep plots as PNG files: parallel coordinates over the params that vary, and the target against each param.

Matplotlib with the Agg backend: no display and no network needed. Categorical params (names, booleans, lists)
get evenly spaced positions; numeric ones a linear axis, or a log axis when they span more than a decade.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files, whatever display the machine has

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from inatpipe.atomic import atomic_open  # noqa: E402

DPI = 100


def _label(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class Axis:
    """Maps one param's values to [0, 1], with tick positions and labels."""

    def __init__(self, values: list[Any]):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        self.categorical = not numeric or len(set(values)) <= 1
        if self.categorical:
            self.categories = sorted({json.dumps(v) for v in values}, key=lambda c: _sort_key(json.loads(c)))
            n = len(self.categories)
            self.ticks = [i / (n - 1) if n > 1 else 0.5 for i in range(n)]
            self.labels = [_label(json.loads(c)) for c in self.categories]
            return
        low, high = min(values), max(values)
        self.log = low > 0 and high / low > 10
        self.low, self.high = (math.log10(low), math.log10(high)) if self.log else (low, high)
        distinct = sorted(set(values))
        if all(isinstance(v, int) for v in values) and len(distinct) <= 8 and not self.log:
            self.ticks = [self.position(v) for v in distinct]  # integers (kernel sizes, widths): label each one
            self.labels = [str(v) for v in distinct]
            return
        ticks = np.linspace(self.low, self.high, 5)
        self.ticks = [float(t) for t in np.linspace(0, 1, 5)]
        self.labels = [_label(float(10**t) if self.log else float(t)) for t in ticks]

    def position(self, value: Any) -> float:
        if self.categorical:
            return self.ticks[self.categories.index(json.dumps(value))]
        x = math.log10(value) if self.log else value
        return (x - self.low) / (self.high - self.low)


def save_png(fig: plt.Figure, path: Path) -> None:
    with atomic_open(path, "wb") as f:  # as every file the project writes: the old file or the new one, whole
        fig.savefig(f, format="png")
    plt.close(fig)


def _sort_key(value: Any) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, _label(value))


def parallel_coordinates(points: list[dict[str, Any]], keys: list[str], target: str, path: Path) -> Path:
    """One vertical axis per param plus the target; one line per experiment, coloured by the target."""
    columns = [*keys, target]
    axes = [Axis([p[k] for p in points]) for k in columns]
    scores = np.array([p[target] for p in points], dtype=float)
    span = scores.max() - scores.min()
    colour = plt.get_cmap("viridis")((scores - scores.min()) / span if span > 0 else np.ones_like(scores))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(columns)), 4.5), dpi=DPI)
    xs = np.arange(len(columns))
    for i in np.argsort(scores):  # the best lines are drawn last, on top
        ys = [axis.position(points[i][k]) for axis, k in zip(axes, columns, strict=True)]
        ax.plot(xs, ys, color=colour[i], alpha=0.8, linewidth=1.5)
    for x, axis in zip(xs, axes, strict=True):
        ax.axvline(x, color="0.3", linewidth=0.8)
        for tick, label in zip(axis.ticks, axis.labels, strict=True):
            ax.text(x + 0.03, tick, label, fontsize=7, va="center", ha="left", color="0.2")
    ax.set_xticks(xs, [c.replace(".", ".\n", 1) for c in columns], fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(-0.2, len(columns) - 0.5)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    mappable = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(scores.min(), scores.max()))
    fig.colorbar(mappable, ax=ax, label=target, fraction=0.03, pad=0.02)
    ax.set_title(f"{len(points)} experiments, coloured by {target}", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    return path


def val_accuracy_by_param(points: list[dict[str, Any]], key: str, target: str, path: Path) -> Path:
    """The target of every experiment against one param's value; categories also show their mean."""
    axis = Axis([p[key] for p in points])
    scores = np.array([p[target] for p in points], dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=DPI)
    if axis.categorical:
        rng = np.random.default_rng(0)  # jitter only spreads overlapping points; fixed so reruns draw the same PNG
        positions = np.array([axis.ticks.index(axis.position(p[key])) for p in points], dtype=float)
        ax.scatter(positions + rng.uniform(-0.12, 0.12, len(points)), scores, alpha=0.7, label="experiment")
        means = [scores[positions == i].mean() for i in range(len(axis.labels))]
        ax.scatter(range(len(means)), means, marker="_", s=600, color="C3", label="mean")
        ax.set_xticks(range(len(axis.labels)), axis.labels, rotation=20 if len(axis.labels) > 3 else 0)
        ax.set_xlim(-0.5, len(axis.labels) - 0.5)
        ax.legend(fontsize=8)
    else:
        ax.scatter([p[key] for p in points], scores, alpha=0.7)
        if axis.log:
            ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(target)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    return path
