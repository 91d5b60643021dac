"""The real pipeline through DVC: `dvc repro`, `dvc exp run -S`, `dvc status`, `dvc metrics diff`, `dvc plots` in a
temporary git + DVC copy of the project, on a tiny generated dataset with small params (real DVC, real torch, real
image files). What a stage computes is tested in process (test_stages.py); here, what DVC makes of the stages.

ResNet18 from a saved random state_dict stands in for the ImageNet download; without augmentation its head trains
on the cached backbone features, so experiments on the head's recipe show whether DVC reuses them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import dvc_render.html
import pytest
import torch
import torchvision
import yaml

from inatpipe import testing
from inatpipe.checkpoint import load_checkpoint

from .browser import chromium, rendered_charts
from .project import SMALL_LR, SMALL_PARAMS, Project, make_project
from .stages import inatpipe

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("dvc_pipeline")]  # its fixtures: built once, on one worker
# dvc.yaml's stages, foreach items by their stage's name (as `stale` reports them)
STAGES = ("split", "prepare", "stats", "train_flexible", "features", "train_resnet", "evaluate", "export", "compare")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    """A fresh project (`make_project`) after one full `dvc repro`, committed."""
    weights = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    resnet = {**SMALL_PARAMS["resnet"], "arch": "resnet18", "weights": str(weights), "epochs": 2}
    p = make_project(
        tmp_path_factory.mktemp("project"),
        {**SMALL_PARAMS, "data": {"image_size": 16, "augment": False}, "resnet": resnet},
    )
    p.weights = weights
    p.repro_output = p.dvc("repro").stdout
    p.git("add", "-A")
    p.git("commit", "-qm", "baseline results")
    return p


def stale(p: Project) -> set[str]:
    """The stages `dvc status` finds out of date (a foreach stage by its name, evaluate@flexible as evaluate)."""
    return {name.split(":")[-1].split("@")[0] for name in json.loads(p.dvc("status", "--json").stdout)}


def test_repro_runs_every_stage_and_writes_metrics_for_both_models(project: Project):
    for stage in testing.STAGES:
        assert f"Running stage '{stage}'" in project.repro_output
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
    assert compare["resnet"]["params_trainable"] == 512 * 3 + 3
    assert (compare["resnet"]["arch"], compare["resnet"]["strategy"]) == ("resnet18", "head (backbone frozen)")
    assert project.json("metrics/train_resnet/metrics.json")["backbone_features"] == "cached"
    assert "resnet18 features: train (29, 512), val (7, 512)" in project.repro_output
    assert compare["flexible"]["params_trainable"] == compare["flexible"]["params_total"]
    table = (project.root / "metrics" / "compare.md").read_text()
    assert "| flexible " in table and "| resnet " in table and "test_accuracy" in table
    confusion = project.json("metrics/evaluate/flexible/plots/sklearn/confusion_matrix.json")
    assert len(confusion) == 12 and {row["actual"] for row in confusion} == {"cat", "dog", "owl"}
    history = (project.root / "metrics/train_flexible/plots/metrics/val/accuracy.tsv").read_text()
    assert history.splitlines()[0] == "step\taccuracy" and len(history.splitlines()) == 3  # header + 2 epochs
    rates = (project.root / "metrics/train_flexible/plots/metrics/train/lr.tsv").read_text().splitlines()
    assert [float(line.split("\t")[1]) for line in rates[1:]] == [pytest.approx(SMALL_LR)] * 2  # constant
    # Committed like metrics/compare.md: no cache, so git sees the files.
    tracked = project.git("ls-files", "reports", "metrics").stdout.split()
    assert "reports/compare.md" in tracked and "reports/flexible/prediction_grid.png" in tracked
    assert "metrics/evaluate/flexible/predictions.csv" in tracked


def test_export_records_parity_and_predict_from_onnx_equals_predict_from_the_checkpoint(project: Project, tmp_path):
    """`dvc repro` exported both models with parity measured on every test image; `inatpipe predict` on the test
    folder gives the same top-1 (and probabilities) from models/<model>.onnx as from the checkpoint in fp32."""
    for name in ("flexible", "resnet"):
        parity = project.json(f"metrics/export/{name}.json")
        assert parity["images"] == 12 and parity["top1_mismatches"] == 0 and parity["top1_agreement"] == 1.0
        assert 0 <= parity["max_abs_logit_diff"] < 1e-3 and parity["onnx_megabytes"] > 0
        assert parity["exporter"] == "torchscript"  # evaluate.onnx_exporter: auto, on a torch that still ships it
        results = {}
        for suffix, extra in ((".pt", ["--precision", "fp32"]), (".onnx", [])):
            out = tmp_path / f"{name}{suffix}.csv"
            model = f"models/{name}{suffix}"
            result = inatpipe(project.root, "predict", "--model", model, *extra, "--csv", str(out), "data/val")
            assert result.returncode == 0, result.stderr
            with out.open() as f:
                results[suffix] = {row["path"]: row for row in csv.DictReader(f)}
        assert len(results[".pt"]) == 12 and results[".onnx"].keys() == results[".pt"].keys()
        for path, row in results[".onnx"].items():
            reference = results[".pt"][path]
            assert [row[f"class_{r}"] for r in (1, 2, 3)] == [reference[f"class_{r}"] for r in (1, 2, 3)]
            for r in (1, 2, 3):
                assert float(row[f"probability_{r}"]) == pytest.approx(float(reference[f"probability_{r}"]), abs=1e-5)
    # Metrics for `dvc metrics show`, the ONNX files as DVC outputs (cached, not in git).
    shown = json.loads(project.dvc("metrics", "show", "--json").stdout)
    assert any("metrics/export/flexible.json" in str(entry) for entry in shown.values())
    assert "models/flexible.onnx" not in project.git("ls-files", "models").stdout


def test_second_repro_finds_everything_up_to_date(project: Project):
    out = project.dvc("repro").stdout
    assert "Running stage" not in out
    assert "Data and pipelines are up to date." in out


@pytest.mark.parametrize(
    ("source", "stages"),
    [
        ("src/inatpipe/training/precision.py", {"features", "train_flexible", "train_resnet", "evaluate"}),
        ("src/inatpipe/evaluation/export.py", {"export"}),
        ("src/inatpipe/sweep/report.py", set()),
    ],
)
def test_editing_code_reruns_exactly_the_stages_that_import_it(project: Project, source: str, stages: set[str]):
    path = project.root / source
    original = path.read_text()
    path.write_text(original + "\n# an edit\n")
    try:
        assert stale(project) == stages
    finally:
        path.write_text(original)


@pytest.mark.parametrize(
    ("params", "stages"),
    [
        ({"data": {"image_size": 24}}, {"prepare", "stats", "train_flexible", "features", "train_resnet"}),
        ({"resnet": {"learning_rate": 3.0e-3}}, {"train_resnet"}),  # a head experiment reuses the features
    ],
)
def test_changing_a_param_reruns_exactly_the_stages_that_read_it(project: Project, params: dict, stages: set[str]):
    """`dvc status` lists the stages whose own params changed (the stages after them follow once their inputs do)."""
    project.set_params(params)
    try:
        assert stale(project) == stages
    finally:
        project.git("checkout", "--", "params.yaml")


@pytest.mark.skipif(
    chromium() is None and not os.environ.get("CI"),
    reason="needs Chromium to render the plots page (Debian: apt-get install chromium chromium-driver)",
)
def test_plots_render_without_network(project: Project, tmp_path: Path):
    """`dvc plots show`, with no flags, gives a page whose every chart draws with networking off; DVC's stock page
    (scripts from a CDN) draws none of the same charts: the check can fail. (`dvc plots diff` writes the same
    page: both read .dvc/config's template.)"""
    assert chromium(), "CI runs every test: .ci/run installs Chromium"
    project.dvc("plots", "show", "-o", str(tmp_path / "show"))
    page = tmp_path / "show" / "index.html"
    html = page.read_text()
    assert "cdn.jsdelivr" not in html and "FlexibleCNN loss" in html and "Learning rate" in html
    charts = rendered_charts(page)
    assert len(charts) == html.count("vegaEmbed(") >= 12, charts  # curves, confusion and F1 of both models
    assert all(charts.values()), charts

    stock = tmp_path / "stock.html"
    stock.write_text(dvc_render.html.PAGE_HTML)
    project.dvc("plots", "show", "--html-template", str(stock), "-o", str(tmp_path / "stock"))
    page = tmp_path / "stock" / "index.html"
    assert "cdn.jsdelivr" in page.read_text()
    charts = rendered_charts(page)
    assert len(charts) >= 12 and not any(charts.values()), charts


def test_a_one_key_smoke_experiment_runs_and_retrains_only_what_it_changes(project: Project):
    """`dvc exp run -S train.epochs=1`, the first thing people try: every other setting as shipped, so the
    warm-up (train.warmup_epochs: 1.0) is longer than the run; it is shortened, said so, and the run goes on.
    (Run up to train_flexible: what follows it, evaluate and compare, reads no train param.)"""
    before = project.json("metrics/train_flexible/metrics.json")
    result = project.dvc("exp", "run", "-S", "train.epochs=1", "train_flexible")
    assert (
        "train.warmup_epochs (1) is not shorter than train.epochs (1): warming up over the first half of the run "
        "(0.5 epochs) instead" in result.stdout
    )
    ran = {stage for stage in STAGES if f"Running stage '{stage}'" in result.stdout}
    assert ran == {"train_flexible"}  # the split, prepared images and stats are reused
    after = project.json("metrics/train_flexible/metrics.json")
    assert after["stop"] == {"epoch": 1, "reason": "completed"} and after["train"]["loss"] != before["train"]["loss"]

    diff = json.loads(project.dvc("metrics", "diff", "--json").stdout)
    assert "train.loss" in diff["metrics/train_flexible/metrics.json"]
    params_diff = json.loads(project.dvc("params", "diff", "--json").stdout)
    assert {k: params_diff["params.yaml"]["train.epochs"][k] for k in ("old", "new")} == {"old": 2, "new": 1}
    rows = list(csv.DictReader(io.StringIO(project.dvc("exp", "show", "--csv").stdout)))
    assert {row["train.epochs"] for row in rows} >= {"1", "2"}


def test_dvc_artifacts_get_fetches_a_registered_model_through_a_second_clone(project: Project, tmp_path: Path):
    """The models are DVC artifacts: with a DVC remote and a version registered (a GTO tag, `gto register`), `dvc
    artifacts get <repository> flexible` fetches the checkpoint from a clone whose cache is empty, so it came from
    the remote. (Last in this module: it adds a remote, a commit and a tag to the shared project.)"""
    artifacts = yaml.safe_load((project.root / "dvc.yaml").read_text())["artifacts"]
    assert {name: (a["type"], a["path"]) for name, a in artifacts.items()} == {
        "flexible": ("model", "models/flexible.pt"),
        "resnet": ("model", "models/resnet.pt"),
    }
    project.dvc("remote", "add", "-d", "store", str(tmp_path / "dvc-remote"))
    project.git("add", ".dvc/config")
    project.git("commit", "-qm", "a DVC remote")
    project.dvc("push", "-q", "--all-commits")  # an experiment may have left other outputs in the workspace
    project.run("gto", "register", "flexible", "--version", "v1.0.0")
    clone = tmp_path / "clone"
    project.run("git", "clone", "-q", str(project.root), str(clone))
    assert not (clone / ".dvc" / "cache").exists() and not (clone / "models").exists()

    fetched = tmp_path / "fetched" / "flexible.pt"
    fetched.parent.mkdir()
    result = project.run(
        sys.executable, "-m", "dvc", "artifacts", "get", str(clone), "flexible", "-o", str(fetched), check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lock = yaml.safe_load(project.git("show", "flexible@v1.0.0:dvc.lock").stdout)
    expected = next(
        out["md5"] for out in lock["stages"]["train_flexible"]["outs"] if out["path"] == "models/flexible.pt"
    )
    assert hashlib.md5(fetched.read_bytes()).hexdigest() == expected
    model, meta = load_checkpoint(fetched)
    assert meta["classes"] == ["cat", "dog", "owl"] and meta["model_name"] == "flexible_cnn"
