"""Stage split: scan data/ once (unreadable files are left out and reported), then a stratified train/val split.

data/<test_dir> stays the held-out test set.
"""

from pathlib import Path

from inatpipe.atomic import write_json
from inatpipe.data.index import HOW_TO_GET_DATA, write_classes, write_index
from inatpipe.data.scan import check_bad_share, report, scan_folders, warning_line
from inatpipe.data.split import check_class_folders, check_test_classes, stratified_split
from inatpipe.errors import UserError, exit_on_user_error
from inatpipe.params import load_params
from inatpipe.paths import DATA_REPORT, SPLIT_DIR


def main() -> None:
    p = load_params()
    root = Path(p.data.root)
    folders = [root / p.data.train_dir, root / p.data.test_dir]
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{folder}/ not found; {HOW_TO_GET_DATA}")
    train_scan, test_scan = scans = scan_folders(folders)
    data_report = report(scans)
    write_json(DATA_REPORT, data_report)
    if line := warning_line(data_report, DATA_REPORT):
        print(line)
    check_bad_share(scans, p.data.max_bad_fraction, DATA_REPORT)
    for scan in scans:
        if not scan.images:
            raise UserError(
                f"{scan.folder}/ holds no readable images in class folders ({scan.folder}/<class>/<image>); "
                f"{HOW_TO_GET_DATA}"
            )
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
    exit_on_user_error(main)
