"""Stratified train/val split of the training folder; the test folder stays untouched as the held-out set."""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

from inatpipe.errors import UserError


def stratified_split(df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows so that every class keeps (to within one image) the same share in train and val."""
    counts = df["label"].value_counts()
    too_small = counts[counts < 2]
    if not too_small.empty:
        raise UserError(
            f"class {too_small.index[0]!r} has {too_small.iloc[0]} image; a stratified split needs at least 2 per class"
        )
    n_val = round(len(df) * val_fraction)
    if n_val < len(counts) or len(df) - n_val < len(counts):
        raise UserError(
            f"data.val_fraction={val_fraction} gives {n_val} validation images for {len(counts)} classes; "
            "each side needs at least one image per class: change data.val_fraction or add images"
        )
    train, val = train_test_split(df, test_size=n_val, stratify=df["label"], random_state=seed)
    # Sorted by path so the index files, and hence DVC's hashes, depend only on the split, not on shuffle order.
    return train.sort_values("path").reset_index(drop=True), val.sort_values("path").reset_index(drop=True)


def check_test_classes(test: pd.DataFrame, classes: list[str], test_dir: str) -> list[str]:
    """Reject test classes unknown to training; return the training classes that have no test images."""
    unknown = sorted(set(test["label"]) - set(classes))
    if unknown:
        raise UserError(
            f"test folder {test_dir}/ has class {unknown[0]!r} that the training folder lacks; "
            "both need the same class folders"
        )
    return sorted(set(classes) - set(test["label"]))
