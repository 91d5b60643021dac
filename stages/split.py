"""Stage split: stratified train/val split of data/<train_dir>; data/<test_dir> stays the held-out test set."""

from pathlib import Path

from inatpipe.data.index import scan_folder, write_classes, write_index
from inatpipe.data.split import check_test_classes, stratified_split
from inatpipe.errors import exit_on_user_error
from inatpipe.params import load_params
from inatpipe.paths import SPLIT_DIR


def main() -> None:
    p = load_params()
    root = Path(p.data.root)
    pool = scan_folder(root / p.data.train_dir)
    test = scan_folder(root / p.data.test_dir)
    classes = sorted(pool["label"].unique())
    for name in check_test_classes(test, classes, p.data.test_dir):
        print(f"warning: class {name!r} has no images in {p.data.test_dir}/; its test metrics will be empty")
    train, val = stratified_split(pool, p.data.val_fraction, p.seed)
    for name, index in (("train", train), ("val", val), ("test", test)):
        write_index(index, SPLIT_DIR / f"{name}.csv")
    write_classes(classes, SPLIT_DIR / "classes.json")
    print(f"{len(classes)} classes: {len(train)} train, {len(val)} val, {len(test)} test images -> {SPLIT_DIR}/")


if __name__ == "__main__":
    exit_on_user_error(main)
