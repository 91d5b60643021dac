"""A sweep's results from `dvc exp show --json`: experiments ranked by validation accuracy, plots, best-run command.

DVC's experiment refs hold the runs: this module reads them, ranks the finished experiments, and writes report.md
plus the plots of plots.py. Queued, running and failed experiments are listed as left out. With a study
(`--study NAME`), only that study's trials are ranked, and the study itself adds its optimisation history,
parameter importances and learning curves (study_plots.py) and its failed trials with their errors.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from inatpipe.atomic import write_text
from inatpipe.dvc_cli import clear_dead_temp_runs, run_dvc
from inatpipe.errors import UserError
from inatpipe.sweep.space import format_value

if TYPE_CHECKING:
    import optuna

TRAIN_METRICS = "metrics/train_flexible/metrics.json"
EVAL_METRICS = "metrics/evaluate/flexible/metrics.json"
CHECKPOINT = "models/flexible.pt"
VAL = "val_accuracy (best)"
TEST = "test_accuracy"
SECONDS = "train_seconds"
FINISHED = (None, "success")  # an experiment run in the workspace has no executor; a queued one ends as success
SWEEP_KEYS = "sweep."  # params that say which trial of which study a run is


@dataclass(frozen=True)
class Experiment:
    name: str
    rev: str
    baseline: str
    params: dict[str, Any]  # flattened: model.kernel_size -> 3
    val_accuracy: float
    val_loss: float
    test_accuracy: float | None  # None when evaluate@flexible did not score this experiment's checkpoint
    train_seconds: float | None
    num_filters: str | None  # the conv widths that ran, e.g. "32,64,128"
    stop: str = "completed"  # completed | early_stopping | time_budget | pruned
    stop_epoch: int | None = None

    @property
    def pruned(self) -> bool:
        return self.stop == "pruned"


@dataclass
class SweepReport:
    ranked: list[Experiment]
    varying: list[str]
    left_out: dict[str, str]  # name -> why
    files: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        best = self.ranked[0]
        lines = [
            f"ranked {len(self.ranked)} experiments; best: {best.name} (validation accuracy {best.val_accuracy:.4f})"
        ]
        if self.left_out:
            lines.append("left out: " + ", ".join(f"{name} ({why})" for name, why in self.left_out.items()))
        lines.append("wrote " + ", ".join(str(f) for f in self.files))
        return "\n".join(lines)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= _flatten(value, f"{prefix}{key}.")
    return out


def _metric(data: dict, path: str, *keys: str) -> Any:
    node = ((data.get("metrics") or {}).get(path) or {}).get("data")
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _params(data: dict) -> dict[str, Any]:
    return _flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})


def _test_accuracy(data: dict) -> float | None:
    """The experiment's test accuracy, unless the metrics file is the baseline's, carried over unchanged.

    An experiment that ran only train_flexible keeps the committed evaluate metrics, which scored another
    checkpoint; evaluate@flexible's recorded input then differs from the checkpoint the experiment trained.
    """
    accuracy = _metric(data, EVAL_METRICS, "test", "accuracy")
    scored = ((data.get("deps") or {}).get(CHECKPOINT) or {}).get("hash")
    trained = ((data.get("outs") or {}).get(CHECKPOINT) or {}).get("hash")
    if scored is not None and trained is not None and scored != trained:
        return None
    return accuracy


def parse_exp_show(show: list[dict]) -> tuple[list[Experiment], dict[str, str], dict[str, dict[str, Any]]]:
    """(finished experiments, {left-out name: why}, {baseline rev: its params}) from `dvc exp show --json`."""
    finished: list[Experiment] = []
    left_out: dict[str, str] = {}
    baselines: dict[str, dict[str, Any]] = {}
    for commit in show:
        if commit.get("rev") == "workspace":
            continue
        baseline = commit.get("rev", "")
        baselines[baseline] = _params(commit.get("data") or {})
        for exp in commit.get("experiments") or []:
            revs = exp.get("revs") or [{}]
            rev = revs[0]
            name = exp.get("name") or rev.get("name") or str(rev.get("rev", "?"))[:7]
            state = (exp.get("executor") or {}).get("state")
            data = rev.get("data") or {}
            val = _metric(data, TRAIN_METRICS, "best", "val_accuracy")
            if state not in FINISHED:
                left_out[name] = state
            elif rev.get("error") or not isinstance(val, (int, float)):
                left_out[name] = f"no best.val_accuracy in {TRAIN_METRICS}"
            else:
                loss = _metric(data, TRAIN_METRICS, "best", "val_loss")
                filters = _metric(data, TRAIN_METRICS, "num_filters")  # "32,64,128" as train_flexible records it
                finished.append(
                    Experiment(
                        name=name,
                        rev=str(rev.get("rev", "")),
                        baseline=baseline,
                        params=_params(data),
                        val_accuracy=float(val),
                        val_loss=float(loss) if isinstance(loss, (int, float)) else float("inf"),
                        test_accuracy=_test_accuracy(data),
                        train_seconds=_metric(data, TRAIN_METRICS, "train_seconds"),
                        num_filters=filters if isinstance(filters, str) else None,
                        stop=_metric(data, TRAIN_METRICS, "stop", "reason") or "completed",
                        stop_epoch=_metric(data, TRAIN_METRICS, "stop", "epoch"),
                    )
                )
    return finished, left_out, baselines


def rank(experiments: list[Experiment]) -> list[Experiment]:
    """Best validation accuracy first; ties go to the lower validation loss, as the training loop's best epoch does.
    Runs a pruner stopped come after the complete ones: their accuracy is that of a shorter run."""
    return sorted(experiments, key=lambda e: (e.pruned, -e.val_accuracy, e.val_loss, e.name))


def varying_params(experiments: list[Experiment]) -> list[str]:
    """Params whose values differ between the experiments, in params.yaml order (a trial's identity, sweep.*, is
    not a hyperparameter)."""
    keys: list[str] = []
    for e in experiments:
        keys += [k for k in e.params if k not in keys and not k.startswith(SWEEP_KEYS)]
    return [k for k in keys if len({json.dumps(e.params.get(k)) for e in experiments}) > 1]


def ranking_table(ranked: list[Experiment], varying: list[str]) -> pd.DataFrame:
    rows = []
    for i, e in enumerate(ranked, 1):
        row: dict[str, Any] = {"rank": i, "experiment": e.name}
        if any(x.pruned for x in ranked):
            row["stopped"] = f"pruned @ {e.stop_epoch}" if e.pruned else ""
        row |= {k: _cell(e.params.get(k)) for k in varying}
        if any(x.num_filters != ranked[0].num_filters for x in ranked) and "model.num_filters" not in varying:
            row["filters (ran)"] = _cell(e.num_filters)
        row |= {VAL: e.val_accuracy, TEST: e.test_accuracy, SECONDS: e.train_seconds}
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.astype(object).where(table.notna(), None)  # None, not NaN, so the markdown shows it as missing


def _cell(value: Any) -> Any:
    return ", ".join(map(str, value)) if isinstance(value, list) else value


def reproduce_commands(best: Experiment, baseline_params: dict[str, Any]) -> list[str]:
    """How to get the best run back: apply its results, or run it again from its baseline commit."""
    changed = [k for k, v in best.params.items() if baseline_params.get(k) != v and not k.startswith(SWEEP_KEYS)]
    sets = " ".join(f"-S {shlex.quote(f'{k}={format_value(best.params[k])}')}" for k in changed)
    return [
        f"dvc exp apply {best.name}  # its params, metrics and checkpoint into the workspace",
        f"dvc exp branch {best.name} {best.name}-branch  # or as a git branch of its own",
        f"dvc exp run{' ' + sets if sets else ''}  # or run it again, on top of commit {best.baseline[:7]}",
    ]


def to_markdown(
    report: SweepReport, table: pd.DataFrame, commands: list[str], images: list[Path], study: list[str] = ()
) -> str:
    best = report.ranked[0]
    text = [
        "# Sweep report",
        "",
        f"{len(report.ranked)} finished experiments, ranked by best validation accuracy "
        f"(`{TRAIN_METRICS}:best.val_accuracy`; ties: lower validation loss). "
        f"Written by `inatpipe sweep report` from `dvc exp show --json`.",
        "",
        table.to_markdown(
            index=False, floatfmt=[*["g"] * (len(table.columns) - 3), ".4f", ".4f", ".1f"], missingval="–"
        ),
        "",
        f"`{TEST}` is `–` where evaluate@flexible did not score the experiment's own checkpoint.",
        "",
        f"## Best run: {best.name}",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]
    text += list(study)
    if report.left_out:
        text += ["## Left out", ""]
        text += [f"- {name}: {why}" for name, why in report.left_out.items()]
        text.append("")
    if images:
        text += ["## Plots", ""]
        text += [f"![{img.stem}]({img.name})" for img in images]
        text.append("")
    return "\n".join(text)


def read_exp_show(all_commits: bool = False) -> list[dict]:
    args = ["exp", "show", "--json", *(["--all-commits"] if all_commits else [])]
    clear_dead_temp_runs()  # what a killed sweep worker left would make `dvc exp show` fail
    out = run_dvc(*args).stdout
    try:
        return json.loads(out)
    except ValueError:
        raise UserError("`dvc exp show --json` did not print JSON; is this a DVC project with experiments?") from None


def study_section(study: optuna.Study, out: Path) -> tuple[list[str], list[Path]]:
    """The study's own part of the report: how it searched, what it cost, and its plots."""
    from optuna.trial import TrialState

    from inatpipe.sweep.study import StudySettings
    from inatpipe.sweep.study_plots import history, importances, learning_curves

    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    settings = StudySettings.of(study)
    how = f"sampler {settings.sampler}, pruner {settings.pruner}; " if settings else ""
    epochs = sum(len(t.intermediate_values) for t in trials)
    lines = [
        f"## Study {study.study_name}",
        "",
        f"{how}{states[TrialState.COMPLETE]} complete, {states[TrialState.PRUNED]} pruned, "
        f"{states[TrialState.FAIL]} failed, {states[TrialState.RUNNING]} running; {epochs} epochs trained in all.",
        "",
    ]
    images = [history(trials, out / "optimization_history.png"), learning_curves(trials, out / "learning_curves.png")]
    importance, why = importances(study, out / "param_importances.png")
    if importance:
        images.append(importance)
    else:
        lines += [f"({why})", ""]
    return lines, images


def _only_study(
    finished: list[Experiment], left_out: dict[str, str], study: optuna.Study
) -> tuple[list[Experiment], dict[str, str]]:
    """The experiments of `study`'s trials, and what the study knows of its trials that are not here."""
    from optuna.trial import TrialState

    name = study.study_name
    mine = [e for e in finished if e.params.get("sweep.study") == name]
    left = {n: why for n, why in left_out.items() if n.startswith(f"{name}-")}
    here = {e.name for e in mine}
    trials = study.get_trials(deepcopy=False)
    # A trial failed for its lost worker comes back as a new trial with the same configuration (Optuna's retry).
    retries = {t.system_attrs.get("failed_trial"): t.number for t in trials if "failed_trial" in t.system_attrs}
    for t in trials:
        exp = t.user_attrs.get("experiment", f"trial {t.number}")
        if t.state == TrialState.FAIL:
            why = t.user_attrs.get("error") or "its worker stopped beating (killed or lost)"
            retried = f"; retried as trial {retries[t.number]}" if t.number in retries else ""
            left[exp] = f"failed: {why}{retried}"
        elif t.state in (TrialState.COMPLETE, TrialState.PRUNED) and exp not in here:
            left[exp] = "finished in the study, but its experiment is not in this clone (`dvc exp pull`)"
    return mine, left


def build_report(show: list[dict], out: Path, study: optuna.Study | None = None) -> SweepReport:
    from inatpipe.sweep.plots import parallel_coordinates, val_accuracy_by_param

    finished, left_out, baselines = parse_exp_show(show)
    if study is not None:
        finished, left_out = _only_study(finished, left_out, study)
    if not finished:
        pending = f" ({', '.join(f'{n}: {why}' for n, why in left_out.items())})" if left_out else ""
        raise UserError(
            f"no finished experiments to rank{pending}; run some with `inatpipe sweep run` (or pull them with "
            "`dvc exp pull`)"
        )
    ranked = rank(finished)
    varying = varying_params(ranked)
    report = SweepReport(ranked, varying, left_out)
    out.mkdir(parents=True, exist_ok=True)
    images: list[Path] = []
    section: list[str] = []
    if study is not None:
        section, images = study_section(study, out)
    if varying and len(ranked) >= 2:
        points = [{**e.params, VAL: e.val_accuracy} for e in ranked]
        images.append(parallel_coordinates(points, varying, VAL, out / "parallel_coordinates.png"))
        for key in varying:
            images.append(val_accuracy_by_param(points, key, VAL, out / f"val_accuracy_by_{key}.png"))
    table = ranking_table(ranked, varying)
    commands = reproduce_commands(ranked[0], baselines.get(ranked[0].baseline, {}))
    md = out / "report.md"
    write_text(md, to_markdown(report, table, commands, images, section))
    report.files = [md, *images]
    return report


def write_sweep_report(
    out: Path, all_commits: bool = False, study: str | None = None, storage: str | None = None
) -> SweepReport:
    """Read the experiments from DVC (and the study from its storage) and write report.md and the plots."""
    opened = None
    if study is not None:
        from inatpipe.sweep.study import load_study, open_storage, storage_url

        url = storage_url(storage, Path.cwd())
        opened = load_study(study, open_storage(url), url)
    return build_report(read_exp_show(all_commits), out, opened)
