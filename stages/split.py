"""Stage split: scan data/ once (unreadable files are left out and reported), then a stratified train/val split.

data/<test_dir> stays the held-out test set.
"""

from pathlib import Path

import inatpipe.startup  # noqa: F401  (first of the library: see its docstring)
from inatpipe.data.index import write_classes, write_index
from inatpipe.data.scan import scan_dataset
from inatpipe.data.split import check_class_folders, check_test_classes, stratified_split
from inatpipe.errors import exit_on_user_error
from inatpipe.params import Params, load_params
from inatpipe.paths import DATA_REPORT, SPLIT_DIR


def run(p: Params) -> None:
    root = Path(p.data.root)
    folders = [root / p.data.train_dir, root / p.data.test_dir]
    train_scan, test_scan = scan_dataset(folders, p.data.max_bad_fraction, DATA_REPORT)
    pool, test = train_scan.index, test_scan.index
    check_class_folders(train_scan.class_folders, pool["label"], p.data.train_dir)
    classes = sorted(pool["label"].unique())
    missing = check_test_classes(test, classes, p.data.test_dir, test_scan.class_folders)
    if missing:
        print(
            f"warning: classes with no images in {p.data.test_dir}/: {', '.join(map(repr, missing))}; "
            "their test metrics will be empty"
        )
    train, val = stratified_split(pool, p.data.val_fraction, p.seed)
    for name, index in (("train", train), ("val", val), ("test", test)):
        write_index(index, SPLIT_DIR / f"{name}.csv")
    write_classes(classes, SPLIT_DIR / "classes.json")
    print(f"{len(classes)} classes: {len(train)} train, {len(val)} val, {len(test)} test images -> {SPLIT_DIR}/")


if __name__ == "__main__":
    exit_on_user_error(lambda: run(load_params()))
