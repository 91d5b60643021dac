"""`inatpipe predict`, `inspect` and `filters` on a checkpoint of a model really trained on generated images."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from inatpipe.checkpoint import save_checkpoint
from inatpipe.cli import main
from inatpipe.data.dataset import IndexDataset, make_loader
from inatpipe.data.index import scan_folder
from inatpipe.data.transforms import eval_transform
from inatpipe.inspection import describe, guided_backprop, layer_table
from inatpipe.models import build_model
from inatpipe.runtime import seed_everything
from inatpipe.training import fit

from .conftest import ROOT, write_image_folder

CONFIG = {"image_size": 16, "num_filters": (8, 16), "dense_neurons": 32, "dropout": 0.0}
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """FlexibleCNN trained for a few epochs on three colour-coded classes, saved as the pipeline saves it."""
    root = tmp_path_factory.mktemp("trained")
    generator = seed_everything(0)
    dataset = IndexDataset(
        scan_folder(write_image_folder(root / "train", per_class=10)), CLASSES, eval_transform(16, MEAN, STD)
    )
    loader = make_loader(dataset, 8, shuffle=True, generator=generator)
    model = build_model("flexible_cnn", len(CLASSES), CONFIG)
    for _ in fit(model, torch.optim.Adam(model.parameters(), lr=3e-3), loader, loader, 6, torch.device("cpu")):
        pass
    path = root / "flexible.pt"
    save_checkpoint(
        path, model, model_name="flexible_cnn", model_config=CONFIG, classes=CLASSES, image_size=16, mean=MEAN, std=STD
    )
    return path


def inatpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "inatpipe.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_predict_a_folder_gives_the_trained_classes_and_skips_an_unreadable_file(checkpoint: Path, tmp_path: Path):
    # New images of the trained classes (another seed), one corrupt file among them and one non-image file.
    folder = write_image_folder(tmp_path / "new", per_class=4, seed=7, ext=".jpg")
    (folder / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    result = inatpipe("predict", "--model", str(checkpoint), str(folder), "--csv", "out/pred.csv", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "warning: skipping" in result.stderr and "broken.jpg" in result.stderr and "Traceback" not in result.stderr
    assert "notes.txt" not in result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 12 and all(line.count(",") == 2 for line in lines)  # three classes shown per image
    with (tmp_path / "out" / "pred.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    for row in rows:
        probs = [float(row[f"probability_{r}"]) for r in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-4)
        assert {row[f"class_{r}"] for r in (1, 2, 3)} == set(CLASSES)
    right = sum(row["class_1"] == Path(row["path"]).parent.name for row in rows)
    assert right >= 11, rows  # colour-coded classes: the trained model gets (nearly) all of them


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The same CLI in this process (faster than a new interpreter for each small case): exit code, stdout, stderr."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_reports_bad_input_in_one_line(checkpoint: Path, tmp_path: Path, capsys):
    for args, message in (
        (("--model", str(tmp_path / "missing.pt"), str(tmp_path)), "missing.pt not found"),
        (("--model", str(checkpoint), str(tmp_path / "nowhere")), "nowhere not found"),
        (("--model", str(checkpoint), str(tmp_path)), "no image files"),
        (("--model", str(checkpoint), "--top-k", "0", str(checkpoint)), "--top-k must be at least 1"),
        (("--model", str(checkpoint), "--batch-size", "0", str(checkpoint)), "--batch-size must be at least 1"),
    ):
        code, _, err = run_main(capsys, "predict", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "name, config, image_size",
    [("flexible_cnn", CONFIG, 16), ("resnet", {"arch": "resnet18", "freeze_backbone": True}, 32)],
)
def test_inspect_counts_match_the_parameters(name: str, config: dict, image_size: int):
    model = build_model(name, 3, config)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = layer_table(model, image_size)
    assert sum(layer.params for layer in layers) == total
    assert layers[-1].output_shape == (1, 3)
    meta = {
        "model_name": name,
        "model_config": config,
        "classes": CLASSES,
        "image_size": image_size,
        "normalization": {"mean": MEAN, "std": STD},
    }
    text = describe(model, meta)
    counts = dict(re.findall(r"^(total|trainable) parameters:\s+([\d,]+)$", text, re.MULTILINE))
    assert counts == {"total": f"{total:,}", "trainable": f"{trainable:,}"}
    assert (trainable < total) == (name == "resnet")


def test_inspect_command(checkpoint: Path, capsys):
    code, out, err = run_main(capsys, "inspect", "--model", str(checkpoint))
    assert code == 0, err
    assert "features.0  Conv2d             8 x 16 x 16" in out and "head.4      Linear             3 " in out


def test_filters_and_guided_backprop_images(checkpoint: Path, tmp_path: Path, capsys):
    images = sorted((write_image_folder(tmp_path / "imgs", per_class=1)).rglob("*.png"))
    guided = [str(p) for p in images]
    code, _, err = run_main(
        capsys,
        "filters",
        "--model",
        str(checkpoint),
        "--out",
        str(tmp_path / "f.png"),
        "--guided",
        *guided,
        "--guided-out",
        str(tmp_path / "g.png"),
    )
    assert code == 0, err
    with Image.open(tmp_path / "f.png") as img:
        assert img.format == "PNG" and img.size == (240, 280)  # 8 filters: a 3 x 3 grid of 0.8-inch cells
    with Image.open(tmp_path / "g.png") as img:
        assert img.format == "PNG" and img.size == (440, 230 * len(images))


def test_guided_backprop_passes_only_positive_gradients_through_activations():
    seed_everything(0)
    model = build_model("flexible_cnn", 3, CONFIG)
    x = torch.randn(3, 16, 16)
    guided, target = guided_backprop(model, x, target=1)
    vanilla = x.clone().requires_grad_(True)
    model.eval()
    model(vanilla.unsqueeze(0))[0, 1].backward()
    assert target == 1 and guided.shape == x.shape and torch.isfinite(guided).all()
    assert not torch.allclose(guided, vanilla.grad)  # the guidance changed the gradient
    assert not any(m._forward_hooks for m in model.modules())  # hooks are removed afterwards
