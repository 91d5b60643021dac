"""The real pipeline: `dvc repro`, `dvc exp run -S`, `dvc metrics diff` in a temporary git + DVC copy of the project.

Runs on a tiny generated dataset with small params; real DVC, real torch, real image files.
"""

from __future__ import annotations

import csv
import io
import json
import shutil

import pytest
import torch
import torchvision

from .project import SMALL_PARAMS, Project, make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """A fresh git + DVC repo holding a copy of the project and a tiny dataset, after one full `dvc repro`."""
    root = tmp_path_factory.mktemp("project")
    # A random ResNet50 state_dict stands in for the ImageNet download, which this machine can't make.
    weights = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), weights)
    p = make_project(root, {**SMALL_PARAMS, "resnet": {**SMALL_PARAMS["resnet"], "weights": str(weights)}})
    p.repro_output = p.dvc("repro").stdout
    p.git("add", "-A")
    p.git("commit", "-qm", "baseline results")
    return p


def test_repro_runs_every_stage_and_writes_metrics_for_both_models(project: Project):
    for stage in (
        "split",
        "stats",
        "train_flexible",
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
    assert compare["flexible"]["params_trainable"] == compare["flexible"]["params_total"]
    table = (project.root / "metrics" / "compare.md").read_text()
    assert "| flexible " in table and "| resnet " in table and "test_accuracy" in table

    evaluation = project.json("metrics/evaluate/flexible/metrics.json")
    assert set(evaluation["test"]) == {"loss", "accuracy", "macro_f1"}
    confusion = project.json("metrics/evaluate/flexible/plots/sklearn/confusion_matrix.json")
    assert len(confusion) == 12 and {row["actual"] for row in confusion} == {"cat", "dog", "owl"}
    per_class = project.json("metrics/evaluate/resnet/per_class.json")
    assert [row["class"] for row in per_class] == ["cat", "dog", "owl"]
    history = (project.root / "metrics" / "train_flexible" / "plots" / "metrics" / "val" / "accuracy.tsv").read_text()
    assert history.splitlines()[0] == "step\taccuracy" and len(history.splitlines()) == 3  # header + 2 epochs


def test_second_repro_finds_everything_up_to_date(project: Project):
    out = project.dvc("repro").stdout
    assert "Running stage" not in out
    assert "Data and pipelines are up to date." in out


def test_plots_render_without_network(project: Project):
    project.dvc("plots", "show", "-o", "plots_html")
    html = (project.root / "plots_html" / "index.html").read_text()
    assert "confusion" in html.lower() and "FlexibleCNN loss" in html
    shutil.rmtree(project.root / "plots_html")


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
