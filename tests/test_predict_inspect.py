"""`inatpipe predict`, `inspect` and `filters` on a checkpoint of a model really trained on generated images."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from inatpipe.checkpoint import ModelSpec, save_checkpoint
from inatpipe.cli import main
from inatpipe.evaluation.inspection import describe, guided_backprop, layer_table
from inatpipe.models import build_model
from inatpipe.runtime import seed_everything

from .conftest import MEAN, STD, trained_checkpoint, write_image_folder
from .stages import inatpipe

CONFIG = {"image_size": 16, "num_filters": (8, 16), "dense_neurons": 32, "dropout": 0.0}
CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """FlexibleCNN trained for a few epochs on three colour-coded classes, saved as the pipeline saves it."""
    path = trained_checkpoint(tmp_path_factory.mktemp("trained"), CLASSES, CONFIG)
    return path


def test_predict_a_folder_gives_the_trained_classes_and_skips_an_unreadable_file(checkpoint: Path, tmp_path: Path):
    # New images of the trained classes (another seed), one corrupt file among them and one non-image file.
    folder = write_image_folder(tmp_path / "new", per_class=4, seed=7, ext=".jpg")
    (folder / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    result = inatpipe(tmp_path, "predict", "--model", str(checkpoint), str(folder), "--csv", "out/pred.csv")

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


def test_inspect_shows_residual_blocks_and_their_shortcuts(tmp_path: Path, capsys):
    config = {**CONFIG, "residual": True}
    model = build_model("flexible_cnn", len(CLASSES), config)
    save_checkpoint(tmp_path / "res.pt", ModelSpec("flexible_cnn", config, CLASSES, 16, MEAN, STD), model.state_dict())
    code, out, err = run_main(capsys, "inspect", "--model", str(tmp_path / "res.pt"))
    assert code == 0, err
    assert "'residual': True" in out
    # the 1x1 projection of each block (3 -> 8, 8 -> 16 channels), beside the block's conv
    assert re.search(r"^features\.0\.shortcut\.0 +Conv2d +8 x 16 x 16 +24$", out, re.M)
    assert re.search(r"^features\.2\.shortcut\.0 +Conv2d +16 x 8 x 8 +128$", out, re.M)
    assert re.search(r"^features\.0\.act +ReLU +8 x 16 x 16 ", out, re.M)


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


def hooked_guided_backprop(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Guided backprop the classic way, independently of the library: a backward hook on every ReLU keeps only the
    positive part of the gradient it passes down (Springenberg et al., 2015)."""

    def positive(_module, grad_input, _grad_output):
        return (grad_input[0].clamp(min=0),)

    handles = [m.register_full_backward_hook(positive) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        x = x.detach().clone().requires_grad_(True)
        model.eval()
        model(x.unsqueeze(0))[0, target].backward()
    finally:
        for h in handles:
            h.remove()
    return x.grad


def test_guided_backprop_equals_a_hook_based_computation():
    seed_everything(0)
    model = build_model("flexible_cnn", 3, CONFIG)
    x = torch.randn(3, 16, 16)
    guided, target = guided_backprop(model, x, target=1)
    assert target == 1 and guided.shape == x.shape and torch.isfinite(guided).all()
    torch.testing.assert_close(guided, hooked_guided_backprop(model, x, 1))
    vanilla = x.clone().requires_grad_(True)
    model(vanilla.unsqueeze(0))[0, 1].backward()
    assert not torch.allclose(guided, vanilla.grad)  # the guidance changed the gradient
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())  # hooks are removed afterwards
    assert guided_backprop(model, x)[1] == int(model(x.unsqueeze(0)).argmax())  # by default: the predicted class


def test_predict_sees_an_exif_rotated_photo_upright(checkpoint: Path, tmp_path: Path, capsys):
    """A phone photo stores its pixels sideways and says so in an EXIF tag: predict must see it as training does."""
    rng = np.random.default_rng(3)
    upright = rng.integers(0, 80, size=(20, 30, 3))
    upright[:, :15, 0] += 170  # red on the left, blue on the right: turned sideways, another picture
    upright[:, 15:, 2] += 170
    stored = np.rot90(upright.astype(np.uint8), k=1)  # turned a quarter anticlockwise; orientation 6 turns it back
    photo = Image.fromarray(np.ascontiguousarray(stored))
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "photo.jpg") as img:  # the decoded pixels, as stored (no EXIF applied)
        decoded = np.asarray(img.convert("RGB"))
    Image.fromarray(np.ascontiguousarray(np.rot90(decoded, k=-1))).save(tmp_path / "upright.png")
    Image.fromarray(decoded).save(tmp_path / "sideways.png")

    code, out, err = run_main(
        capsys,
        "predict",
        "--model",
        str(checkpoint),
        "--top-k",
        "3",
        "--csv",
        str(tmp_path / "p.csv"),
        str(tmp_path / "photo.jpg"),
        str(tmp_path / "upright.png"),
        str(tmp_path / "sideways.png"),
    )
    assert code == 0, err
    with (tmp_path / "p.csv").open() as f:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(f)}

    def probabilities(name: str) -> dict[str, float]:
        return {rows[name][f"class_{r}"]: float(rows[name][f"probability_{r}"]) for r in (1, 2, 3)}

    assert probabilities("photo.jpg") == probabilities("upright.png")
    assert probabilities("photo.jpg") != pytest.approx(probabilities("sideways.png"), abs=1e-4)
