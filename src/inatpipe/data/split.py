"""Stratified train/val split of the training folder; the test folder stays untouched as the held-out set."""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

from inatpipe.errors import UserError


def stratified_split(df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows so that every class keeps (to within one image) the same share in train and val."""
    counts = df["label"].value_counts()
    too_small = counts[counts < 2].sort_index()
    if not too_small.empty:
        named = ", ".join(f"class {name!r} has {n} image" for name, n in too_small.items())
        raise UserError(f"{named}; a stratified split needs at least 2 per class: add images or remove the folders")
    n_val = round(len(df) * val_fraction)
    if n_val < len(counts) or len(df) - n_val < len(counts):
        raise UserError(
            f"data.val_fraction={val_fraction} gives {n_val} validation images for {len(counts)} classes; "
            "each side needs at least one image per class: change data.val_fraction or add images"
        )
    train, val = train_test_split(df, test_size=n_val, stratify=df["label"], random_state=seed)
    # Sorted by path so the index files, and hence DVC's hashes, depend only on the split, not on shuffle order.
    return train.sort_values("path").reset_index(drop=True), val.sort_values("path").reset_index(drop=True)


def check_class_folders(class_folders: list[str], labels: pd.Series, folder: str) -> None:
    """Reject class folders left with no readable image: the model would get an output for a class it never sees."""
    empty = sorted(set(class_folders) - set(labels))
    if empty:
        raise UserError(
            f"class folders with no readable image in {folder}/: {_names(empty)}; add images or remove the folders"
        )


def check_test_classes(
    test: pd.DataFrame, classes: list[str], test_dir: str, test_folders: list[str] | None = None
) -> list[str]:
    """Reject test class folders unknown to training; return the training classes that have no test images."""
    unknown = sorted((set(test["label"]) | set(test_folders or [])) - set(classes))
    if unknown:
        raise UserError(
            f"test folder {test_dir}/ has class folders that the training folder lacks: {_names(unknown)}; "
            "both need the same class folders"
        )
    return sorted(set(classes) - set(test["label"]))


def _names(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names)
