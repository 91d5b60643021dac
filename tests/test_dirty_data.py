"""Dirty data through the real stages: split leaves out exactly the bad files and says so; training then runs.

Each test runs the stage entry modules' run(params) in a temporary project folder holding params.yaml and data/, as
`dvc repro` would run them (in this process: a new interpreter per stage proves nothing more); the data are real
image files of every kind a downloaded folder may hold.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from inatpipe.data.scan import scan_folders

from .conftest import write_dataset
from .stages import Result, folder_project, run_cli

SMALL = {
    "data": {"image_size": 16, "augment": False},
    "model": {"num_filters": [8, 16], "dense_neurons": 16},
    "train": {"epochs": 2, "batch_size": 8},
}


def project(tmp_path: Path, overrides: dict | None = None) -> Path:
    overrides = overrides or {}
    return folder_project(tmp_path, {s: {**SMALL.get(s, {}), **overrides.get(s, {})} for s in {*SMALL, *overrides}})


def run_stage(script: str, cwd: Path) -> Result:
    """`python stages/<script>` in `cwd`, run in this process: exit status, stdout, stderr."""
    return run_cli(cwd, script.removesuffix(".py"))


def jpeg_bytes(seed: int, size: int = 64) -> bytes:
    buf = io.BytesIO()
    noise = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG")
    return buf.getvalue()


def add_dirty_files(data: Path) -> tuple[set[tuple[str, str]], set[str]]:
    """Bad files and good-but-unusual images in data/train and data/val: (expected excluded, expected kept)."""
    cat, dog, owl = (data / "train" / name for name in ("cat", "dog", "owl"))
    whole = jpeg_bytes(0)
    (cat / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (cat / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (dog / "empty.jpg").write_bytes(b"")
    (dog / "Thumbs.db").write_bytes(b"\0" * 64)
    (dog / ".DS_Store").write_bytes(b"\0" * 64)
    (owl / "notes.txt").write_text("seen at dusk")
    (owl / ".thumbnails").mkdir()
    (owl / ".thumbnails" / "small.jpg").write_bytes(jpeg_bytes(1, 8))
    (data / "train" / ".DS_Store").write_bytes(b"\0" * 64)
    (data / "train" / "README.txt").write_text("downloaded in May")
    (data / "val" / "owl" / "empty.png").write_bytes(b"")
    bad = {
        ("data/train/cat/truncated.jpg", "unreadable image"),
        ("data/train/cat/corrupt.png", "unreadable image"),
        ("data/train/dog/empty.jpg", "empty file"),
        ("data/train/dog/Thumbs.db", "not an image file"),
        ("data/train/dog/.DS_Store", "hidden file"),
        ("data/train/owl/notes.txt", "not an image file"),
        ("data/train/owl/.thumbnails", "hidden folder"),
        ("data/train/.DS_Store", "hidden file"),
        ("data/train/README.txt", "not in a class folder"),
        ("data/val/owl/empty.png", "empty file"),
    }

    Image.new("L", (16, 16), 90).save(cat / "gray.png")
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    palette.save(cat / "palette.png", transparency=0)
    Image.new("RGBA", (16, 16), (20, 200, 20, 128)).save(dog / "alpha.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(dog / "print.jpg")
    Image.fromarray(np.full((16, 16), 40000, np.uint16)).save(owl / "deep.png")
    # Stored 80 wide and 48 high, white left and black right; orientation 6 turns it a quarter clockwise: upright it
    # is white on top. Large enough that prepare decodes it in draft mode, at half scale.
    stored = np.zeros((48, 80, 3), np.uint8)
    stored[:, :40] = 255
    rotated = Image.fromarray(stored)
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(owl / "rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (16, 16), (240, 10, 10)).save(cat / "CAMERA.JPG")
    good = {f"data/train/{p}" for p in ("cat/gray.png", "cat/palette.png", "dog/alpha.png", "dog/print.jpg")}
    good |= {f"data/train/{p}" for p in ("owl/deep.png", "owl/rotated.jpg", "cat/CAMERA.JPG")}
    return bad, good


@pytest.fixture
def dirty(tmp_path: Path) -> tuple[Path, set[tuple[str, str]], set[str]]:
    root = project(tmp_path, {"data": {"max_bad_fraction": 0.2}})  # 4 of 38 image files are bad: a tiny dataset
    write_dataset(root / "data", train_per_class=6, test_per_class=3)
    bad, good = add_dirty_files(root / "data")
    return root, bad, good


def read_report(root: Path) -> dict:
    return json.loads((root / "metrics" / "data_report.json").read_text())


def test_split_leaves_out_exactly_the_bad_files_and_training_runs(dirty):
    root, bad, good = dirty
    result = run_stage("split.py", root)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning")]
    assert warnings == [
        "warning: left out 10 files (empty file: 2, hidden file: 2, hidden folder: 1, not an image file: 2, "
        "not in a class folder: 1, unreadable image: 2); every path and reason, and the images per class: "
        "metrics/data_report.json"
    ]
    report = read_report(root)
    assert {(row["path"], row["reason"].split(":")[0]) for row in report["excluded_files"]} == bad
    assert report["excluded"] == 10 and report["images"] == 18 + 9 + 7
    assert report["images_per_class"]["data/train"] == {"cat": 9, "dog": 8, "owl": 8}
    assert report["images_per_class"]["data/val"] == {"cat": 3, "dog": 3, "owl": 3}
    assert report["unreadable_fraction"] == pytest.approx(4 / (18 + 9 + 7 + 4), abs=1e-6)

    split = {name: pd.read_csv(root / "artifacts" / "split" / f"{name}.csv") for name in ("train", "val", "test")}
    listed = set(split["train"]["path"]) | set(split["val"]["path"])
    assert good <= listed, "every readable image, whatever its mode or extension case, is kept"
    assert not {path for path, _ in bad} & (listed | set(split["test"]["path"]))
    assert len(listed) == 25 and len(split["test"]) == 9

    assert run_stage("prepare.py", root).returncode == 0  # every kept image, whatever its mode, decodes
    prepared = {
        path: image
        for subset in ("train", "val")
        for path, image in zip(split[subset]["path"], np.load(root / f"artifacts/prepared/{subset}.npy"), strict=True)
    }

    def colour(name: str) -> list[int]:
        """The mean colour of a kept image as prepared: what training sees."""
        return prepared[f"data/train/{name}"].reshape(-1, 3).mean(axis=0).round().astype(int).tolist()

    assert colour("cat/gray.png") == [90, 90, 90]
    assert colour("cat/palette.png") == [200, 30, 30]
    assert colour("owl/deep.png") == [156, 156, 156]  # 40000 of 65535 is 156 of 255: scaled, not clipped at 255
    over_white = [round(c * 128 / 255 + 255 * 127 / 255) for c in (20, 200, 20)]  # half-transparent green
    assert np.abs(np.subtract(colour("dog/alpha.png"), over_white)).max() <= 1
    for red in ("dog/print.jpg", "cat/CAMERA.JPG"):  # a CMYK JPEG and an upper-case extension
        r, g, b = colour(red)
        assert r > 235 and g < 20 and b < 20, (red, colour(red))
    upright = prepared["data/train/owl/rotated.jpg"].astype(int)
    assert upright[:8].mean() > 220 and upright[-8:].mean() < 35  # white on top: turned as its EXIF tag says
    assert run_stage("stats.py", root).returncode == 0
    trained = run_stage("train_flexible.py", root)
    assert trained.returncode == 0, trained.stderr
    assert (root / "models" / "flexible.pt").is_file()


def test_too_many_unreadable_files_stop_split_naming_the_worst_folders(tmp_path: Path):
    root = project(tmp_path, {"data": {"max_bad_fraction": 0.1}})
    write_dataset(root / "data", train_per_class=10, test_per_class=3)
    for i in range(4):
        (root / "data" / "train" / "owl" / f"cut{i}.jpg").write_bytes(jpeg_bytes(i)[:300])
    (root / "data" / "val" / "dog" / "cut.jpg").write_bytes(b"")
    result = run_stage("split.py", root)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: 5 of 44 image files (11.4%) are unreadable, more than data.max_bad_fraction=0.1; worst class "
        "folders: data/train/owl/ (4 of 14), data/val/dog/ (1 of 4). Replace or remove them (every path is in "
        "metrics/data_report.json), or raise data.max_bad_fraction"
    ]
    assert len(read_report(root)["excluded_files"]) == 5, "the report is written before failing, to be read"
    assert not (root / "artifacts").exists()


def extra_test_classes(data: Path) -> None:
    for name in ("zebra", "ant"):
        (data / "val" / name).mkdir()


def empty_train_classes(data: Path) -> None:
    for name in ("zebra", "ant"):
        (data / "train" / name).mkdir()
        (data / "train" / name / "Thumbs.db").write_bytes(b"\0")


def one_image_classes(data: Path) -> None:
    for name in ("zebra", "ant"):
        (data / "train" / name).mkdir()
        (data / "train" / name / "only.png").write_bytes((data / "train" / "cat" / "000.png").read_bytes())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            extra_test_classes,
            "error: test folder val/ has class folders that the training folder lacks: 'ant', 'zebra'; "
            "both need the same class folders",
        ),
        (
            empty_train_classes,
            "error: class folders with no readable image in train/: 'ant', 'zebra'; add images or remove the folders",
        ),
        (
            one_image_classes,
            "error: class 'ant' has 1 image, class 'zebra' has 1 image; a stratified split needs at least 2 per "
            "class: add images or remove the folders",
        ),
    ],
)
def test_class_problems_are_one_line_naming_the_classes(tmp_path: Path, change, message):
    root = project(tmp_path)
    write_dataset(root / "data", train_per_class=6, test_per_class=2)
    change(root / "data")
    result = run_stage("split.py", root)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]


def test_train_classes_missing_from_the_test_folder_are_one_warning(tmp_path: Path):
    root = project(tmp_path)
    write_dataset(root / "data", train_per_class=6, test_per_class=2)
    for name in ("dog", "owl"):
        for f in (root / "data" / "val" / name).iterdir():
            f.unlink()
    (root / "data" / "val" / "owl").rmdir()
    result = run_stage("split.py", root)
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("warning")] == [
        "warning: classes with no images in val/: 'dog', 'owl'; their test metrics will be empty"
    ]


def test_params_that_are_not_yaml_stop_a_stage_with_one_line(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("seed: 42\ndata: {root: data\n")
    result = run_stage("split.py", tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: params.yaml is not valid YAML at line ")
    assert "Traceback" not in result.stderr


def test_the_scan_uses_worker_processes_and_finds_the_same(tmp_path: Path):
    write_dataset(tmp_path, train_per_class=100, test_per_class=1, size=8)
    (tmp_path / "train" / "cat" / "bad.jpg").write_bytes(b"no")
    (serial,) = scan_folders([tmp_path / "train"], workers=1)
    (parallel,) = scan_folders([tmp_path / "train"], workers=2)
    assert len(parallel.images) == 300 and parallel.images == serial.images
    assert (
        parallel.excluded
        == serial.excluded
        == [((tmp_path / "train" / "cat" / "bad.jpg").as_posix(), "unreadable image: not a known image format")]
    )
