"""Plots of an Optuna study, drawn from the trials it stores: the optimisation history, parameter importances and
the learning curves each trial reported epoch by epoch (pruned trials faded). PNG files, Agg backend, no network.
"""

from __future__ import annotations

from pathlib import Path

import optuna
from matplotlib.ticker import MaxNLocator
from optuna.trial import FrozenTrial, TrialState

from inatpipe.sweep.plots import DPI, plt, save_png

PRUNED_STYLE = {"color": "0.6", "alpha": 0.5}
TOP_CURVES = 5


def history(trials: list[FrozenTrial], path: Path) -> Path:
    """Each finished trial's score by trial number, the best so far as a step line; pruned trials as grey crosses
    at the accuracy they had reached."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=DPI)
    done = sorted((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)), key=lambda t: t.number)
    complete = [t for t in done if t.state == TrialState.COMPLETE]
    pruned = [t for t in done if t.state == TrialState.PRUNED and t.value is not None]
    ax.scatter([t.number for t in complete], [t.value for t in complete], label="complete", zorder=3)
    if pruned:
        ax.scatter([t.number for t in pruned], [t.value for t in pruned], marker="x", label="pruned", **PRUNED_STYLE)
    best, xs, ys = float("-inf"), [], []
    for t in complete:
        best = max(best, t.value)
        xs.append(t.number)
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="C1", label="best so far")
    ax.set(xlabel="trial", ylabel="best validation accuracy", title="Optimisation history")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def importances(study: optuna.Study, path: Path) -> tuple[Path | None, str]:
    """Optuna's parameter importances (its default evaluator) over the complete trials; (None, why) when they
    can't be computed."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"parameter importances need at least 2 complete trials, the study has {len(complete)}"
    try:
        scores = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as e:  # e.g. no parameter varies among the complete trials
        return None, f"parameter importances: {str(e).splitlines()[0]}"
    if not scores:
        return None, "parameter importances: no parameter varies among the complete trials"
    names = list(scores)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5), dpi=DPI)
    ax.barh(names, [scores[n] for n in names])
    ax.set(xlabel="importance (share of the variance of the score)", title="Parameter importances")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path, ""


def learning_curves(trials: list[FrozenTrial], path: Path) -> Path:
    """Validation accuracy per epoch as each trial reported it: the top complete trials in colour, pruned faded."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=DPI)
    for t in trials:
        if t.state == TrialState.PRUNED and t.intermediate_values:
            steps = sorted(t.intermediate_values)
            ax.plot(steps, [t.intermediate_values[s] for s in steps], **PRUNED_STYLE)
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    for t in complete[:TOP_CURVES]:
        steps = sorted(t.intermediate_values)
        ax.plot(steps, [t.intermediate_values[s] for s in steps], marker="o", label=f"trial {t.number}")
    ax.plot([], [], label="pruned", **PRUNED_STYLE)
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=f"Learning curves (top {TOP_CURVES} and pruned)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path
