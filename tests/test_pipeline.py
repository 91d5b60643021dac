"""The real pipeline: `dvc repro`, `dvc exp run -S`, `dvc metrics diff` in a temporary git + DVC copy of the project.

Runs on a tiny generated dataset with small params; real DVC, real torch, real image files.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import dvc_render.html
import pytest
import torch
import torchvision
from PIL import Image

from .browser import chromium, render_offline, rendered_charts
from .project import SMALL_LR, SMALL_PARAMS, Project, make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """A fresh project (`make_project`) after one full `dvc repro`."""
    # A random ResNet50 state_dict stands in for the ImageNet download, which this machine can't make.
    weights = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    p = make_project(
        tmp_path_factory.mktemp("project"),
        {**SMALL_PARAMS, "resnet": {**SMALL_PARAMS["resnet"], "weights": str(weights)}},
    )
    p.repro_output = p.dvc("repro").stdout
    p.git("add", "-A")
    p.git("commit", "-qm", "baseline results")
    return p


def test_repro_runs_every_stage_and_writes_metrics_for_both_models(project: Project):
    for stage in (
        "split",
        "stats",
        "train_flexible",
        "features",
        "train_resnet",
        "evaluate@flexible",
        "evaluate@resnet",
        "compare",
    ):
        assert f"Running stage '{stage}'" in project.repro_output
    assert (project.root / "models" / "flexible.pt").is_file() and (project.root / "models" / "resnet.pt").is_file()
    splits = {
        name: (project.root / "artifacts" / "split" / f"{name}.csv").read_text().count("\n") - 1
        for name in ("train", "val", "test")
    }
    assert splits == {"train": 29, "val": 7, "test": 12}

    compare = project.json("metrics/compare.json")
    assert set(compare) == {"flexible", "resnet"}
    for row in compare.values():
        assert 0 <= row["test_accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1
        assert row["params_total"] >= row["params_trainable"] > 0
        assert row["train_seconds"] > 0 and row["infer_images_per_second"] > 0
    assert compare["resnet"]["pretrained"] is True  # the weights file was used
    assert compare["resnet"]["params_trainable"] == 2048 * 3 + 3
    assert (compare["resnet"]["arch"], compare["resnet"]["strategy"]) == ("resnet50", "head (backbone frozen)")
    assert compare["flexible"]["strategy"] == "from scratch"
    assert compare["flexible"]["params_trainable"] == compare["flexible"]["params_total"]
    table = (project.root / "metrics" / "compare.md").read_text()
    assert "| flexible " in table and "| resnet " in table and "test_accuracy" in table

    evaluation = project.json("metrics/evaluate/flexible/metrics.json")
    assert set(evaluation["test"]) == {"loss", "accuracy", "macro_f1", "ece"}
    assert 0 <= evaluation["test"]["ece"] <= 1 and compare["flexible"]["ece"] == evaluation["test"]["ece"]
    confusion = project.json("metrics/evaluate/flexible/plots/sklearn/confusion_matrix.json")
    assert len(confusion) == 12 and {row["actual"] for row in confusion} == {"cat", "dog", "owl"}
    per_class = project.json("metrics/evaluate/resnet/per_class.json")
    assert [row["class"] for row in per_class] == ["cat", "dog", "owl"]
    history = (project.root / "metrics" / "train_flexible" / "plots" / "metrics" / "val" / "accuracy.tsv").read_text()
    assert history.splitlines()[0] == "step\taccuracy" and len(history.splitlines()) == 3  # header + 2 epochs


def test_evaluate_and_compare_write_the_report_and_its_images(project: Project):
    from inatpipe.reports import CELL_INCHES, DPI, GRID_COLUMNS

    for name in ("flexible", "resnet"):
        with Image.open(project.root / "reports" / name / "prediction_grid.png") as grid:
            assert grid.format == "PNG"  # three classes: three rows of three
            assert grid.size == (round(GRID_COLUMNS * CELL_INCHES[0] * DPI), round(3 * CELL_INCHES[1] * DPI))
        table = (project.root / "reports" / name / "per_class.md").read_text()
        assert all(f"| {row}" in table for row in ("cat", "dog", "owl", "macro avg", "weighted avg"))

    report = (project.root / "reports" / "compare.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    for expected in ("compare_bars.png", "flexible/prediction_grid.png", "resnet/confusion_matrix.png"):
        assert expected in images
    for image in images:
        with Image.open(project.root / "reports" / image) as img:
            img.verify()
    assert "| test accuracy" in report and "| trainable parameters" in report and "random init" not in report
    assert "dvc repro" in report and "| cat" in report
    # Committed like metrics/compare.md: no cache, so git sees the files.
    tracked = project.git("ls-files", "reports").stdout.split()
    assert "reports/compare.md" in tracked and "reports/flexible/prediction_grid.png" in tracked


def test_second_repro_finds_everything_up_to_date(project: Project):
    out = project.dvc("repro").stdout
    assert "Running stage" not in out
    assert "Data and pipelines are up to date." in out


@pytest.mark.skipif(
    chromium() is None,
    reason="needs Chromium to render the plots page (Debian: apt-get install chromium chromium-driver)",
)
def test_plots_render_without_network(project: Project, tmp_path: Path):
    """`dvc plots show` and `dvc plots diff`, with no flags, give pages whose every chart draws with networking off."""
    project.dvc("plots", "show", "-o", str(tmp_path / "show"))
    project.dvc("plots", "diff", "HEAD", "-o", str(tmp_path / "diff"))
    for name in ("show", "diff"):
        page = tmp_path / name / "index.html"
        html = page.read_text()
        assert "cdn.jsdelivr" not in html and "FlexibleCNN loss" in html
        expected = html.count("vegaEmbed(")
        assert expected >= 12  # 4 learning curves + overlaid curves + 2 x (confusion, per-class F1) at least
        charts = rendered_charts(render_offline(page))
        assert len(charts) == expected and all(charts.values()), charts

    # The same plots on DVC's stock page (scripts from a CDN) draw nothing offline: the check above can fail.
    stock = tmp_path / "stock.html"
    stock.write_text(dvc_render.html.PAGE_HTML)
    project.dvc("plots", "show", "--html-template", str(stock), "-o", str(tmp_path / "stock"))
    assert "cdn.jsdelivr" in (tmp_path / "stock" / "index.html").read_text()
    assert not any(rendered_charts(render_offline(tmp_path / "stock" / "index.html")).values())


def test_editing_evaluation_code_does_not_retrain(project: Project):
    source = project.root / "src" / "inatpipe" / "evaluation.py"
    original = source.read_text()
    source.write_text(original + "\n# an edit\n")
    try:
        changed = set(json.loads(project.dvc("status", "--json").stdout))
    finally:
        source.write_text(original)
    assert {s.split(":")[-1] for s in changed} == {"evaluate@flexible", "evaluate@resnet"}


def test_same_params_and_seed_give_the_same_metrics(project: Project):
    def quality(path):
        metrics = project.json(path)
        metrics.pop("train_seconds")
        return metrics

    before = quality("metrics/train_flexible/metrics.json")
    project.dvc("repro", "--force", "--single-item", "train_flexible")
    assert quality("metrics/train_flexible/metrics.json") == before


def test_bad_param_stops_the_stage_with_one_line(project: Project):
    params = project.root / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("kernel_size: 3", "kernel_size: 4"))
    try:
        result = project.dvc("repro", "train_flexible", check=False)
    finally:  # DVC clears a stage's outputs before running it: bring back the committed ones
        params.write_text(original)
        project.git("checkout", "--", "metrics")
        project.dvc("checkout", "-q")
    assert result.returncode != 0
    assert "error: params.yaml: model.kernel_size must be an odd integer" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout


def test_exp_run_with_a_param_changes_the_metrics(project: Project):
    before = project.json("metrics/train_flexible/metrics.json")
    result = project.dvc("exp", "run", "-S", "model.kernel_size=5")
    assert "Running stage 'train_flexible'" in result.stdout and "Running stage 'train_resnet'" not in result.stdout
    after = project.json("metrics/train_flexible/metrics.json")
    assert after["train"]["loss"] != before["train"]["loss"]

    diff = json.loads(project.dvc("metrics", "diff", "--json").stdout)
    assert "train.loss" in diff["metrics/train_flexible/metrics.json"]
    params_diff = json.loads(project.dvc("params", "diff", "--json").stdout)
    assert {k: params_diff["params.yaml"]["model.kernel_size"][k] for k in ("old", "new")} == {"old": 3, "new": 5}
    rows = list(csv.DictReader(io.StringIO(project.dvc("exp", "show", "--csv").stdout)))
    assert {row["model.kernel_size"] for row in rows} >= {"3", "5"}


def test_exp_run_with_a_scheduler_logs_its_learning_rate_curve(project: Project):
    def rates() -> list[float]:
        tsv = (project.root / "metrics/train_flexible/plots/metrics/train/lr.tsv").read_text().splitlines()
        assert tsv[0] == "step\tlr"
        return [float(line.split("\t")[1]) for line in tsv[1:]]

    assert rates() == [pytest.approx(SMALL_LR)] * 2  # the constant baseline: one rate per epoch
    result = project.dvc("exp", "run", "-S", "train.scheduler=cosine", "-S", "train.epochs=3")
    assert "Running stage 'train_flexible'" in result.stdout and "Running stage 'train_resnet'" not in result.stdout
    cosine = rates()
    assert len(cosine) == 3 and cosine[0] > cosine[1] > cosine[2] and cosine[2] < SMALL_LR * 0.05
    summary = project.json("metrics/train_flexible/metrics.json")
    assert summary["stop"] == {"epoch": 3, "reason": "completed"}
    plots = json.loads(project.dvc("plots", "show", "--json").stdout)
    assert "Learning rate" in plots["data"]
