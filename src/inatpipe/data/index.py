"""Index files: one CSV row (path, label) per image, so any source of images can feed the same dataset code."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from inatpipe.atomic import atomic_open, write_json
from inatpipe.data.images import is_image_name
from inatpipe.errors import UserError

HOW_TO_GET_DATA = "run `make data` for the embedded sample or `inatpipe data fetch` for iNaturalist 12K"


def scan_folder(folder: Path) -> pd.DataFrame:
    """Rows (path, label) for every image under folder/<class>/, sorted so the order never depends on the OS."""
    if not folder.is_dir():
        raise UserError(f"{folder}/ not found; {HOW_TO_GET_DATA}")
    rows = [
        (img.as_posix(), class_dir.name)
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        for img in sorted(class_dir.rglob("*"))
        if is_image_name(img) and img.is_file()
    ]
    if not rows:
        raise UserError(f"{folder}/ holds no images in class folders ({folder}/<class>/<image>); {HOW_TO_GET_DATA}")
    return pd.DataFrame(rows, columns=["path", "label"])


def write_index(df: pd.DataFrame, path: Path) -> None:
    with atomic_open(path) as f:
        df[["path", "label"]].to_csv(f, index=False, lineterminator="\n")


def read_index(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"{path} not found; run `dvc repro split` first")
    return pd.read_csv(path, dtype={"path": str, "label": str}, keep_default_na=False)


def write_classes(classes: list[str], path: Path) -> None:
    write_json(path, classes)


def read_classes(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path} not found; run `dvc repro split` first")
    return json.loads(path.read_text())
