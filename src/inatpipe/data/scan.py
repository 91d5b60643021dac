"""The dirty-data scan: every file under a dataset folder is looked at once, and only images that decode are kept.

`split` runs it over the train and test folders, so no later stage meets an unreadable file. What is left out
(unreadable, empty, non-image and hidden files, hidden folders, files outside class folders) is reported with a
reason per path, never skipped without a word.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import UnidentifiedImageError
from tqdm import tqdm

from inatpipe.atomic import write_json
from inatpipe.cores import usable_cores
from inatpipe.data.images import is_image_name, open_rgb
from inatpipe.data.index import HOW_TO_GET_DATA
from inatpipe.errors import UserError

# A JPEG decodes at 1/8 scale when asked for a small draft: every byte is still read, so truncation is caught.
DRAFT_SIZE = (64, 64)
# Below this many files, starting worker processes costs more than it saves.
MIN_FILES_FOR_WORKERS = 256

# Reasons, grouped into the kinds the warning counts.
UNREADABLE = "unreadable image"
EMPTY = "empty file"
NOT_IMAGE = "not an image file"
HIDDEN_FILE = "hidden file"
HIDDEN_FOLDER = "hidden folder"
OUTSIDE_CLASS = "not in a class folder"


@dataclass
class FolderScan:
    """What the scan found under one folder (train or test), all sorted by path."""

    folder: Path
    class_folders: list[str] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (path, label) of every readable image
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    image_files: Counter = field(default_factory=Counter)  # per class: files named like images, readable or not
    bad_images: Counter = field(default_factory=Counter)  # per class: of those, the unreadable or empty ones

    @property
    def index(self) -> pd.DataFrame:
        return pd.DataFrame(self.images, columns=["path", "label"])


def check_image(path: str) -> str | None:
    """Why `path` can't be used as an image, or None when it decodes completely."""
    try:
        if os.path.getsize(path) == 0:
            return EMPTY
        open_rgb(path, draft_size=DRAFT_SIZE)
    except UnidentifiedImageError:
        return f"{UNREADABLE}: not a known image format"
    except Exception as e:  # any decoder failure (OSError, SyntaxError, ValueError, DecompressionBombError) means bad
        return f"{UNREADABLE}: {e}"
    return None


def _walk(folder: Path, scan: FolderScan) -> list[tuple[str, str]]:
    """List candidate images (path, label) under folder/<class>/; record everything else in scan.excluded."""
    candidates = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            scan.excluded.append((entry.as_posix(), HIDDEN_FOLDER if entry.is_dir() else HIDDEN_FILE))
        elif not entry.is_dir():
            scan.excluded.append((entry.as_posix(), OUTSIDE_CLASS))
        else:
            scan.class_folders.append(entry.name)
            for path, reason in _walk_class(entry):
                if reason is None:
                    candidates.append((path, entry.name))
                    scan.image_files[entry.name] += 1
                else:
                    scan.excluded.append((path, reason))
    return candidates


def _walk_class(class_dir: Path) -> Iterator[tuple[str, str | None]]:
    for parent, dirs, files in os.walk(class_dir):
        for name in [d for d in dirs if d.startswith(".")]:
            dirs.remove(name)  # don't descend: everything inside a hidden folder is left out with it
            yield Path(parent, name).as_posix(), HIDDEN_FOLDER
        dirs.sort()
        for name in sorted(files):
            path = Path(parent, name)
            if name.startswith("."):
                yield path.as_posix(), HIDDEN_FILE
            elif not is_image_name(name):
                yield path.as_posix(), NOT_IMAGE
            elif path.is_file():  # a broken symlink is not
                yield path.as_posix(), None


def _checked(paths: list[str], workers: int) -> Iterable[str | None]:
    if workers <= 1 or len(paths) < MIN_FILES_FOR_WORKERS:
        return map(check_image, paths)
    executor = ProcessPoolExecutor(max_workers=workers)
    # Big chunks: one image takes about a millisecond, so per-task overhead would otherwise dominate.
    chunksize = max(16, min(256, len(paths) // (workers * 8)))
    return _closing(executor, executor.map(check_image, paths, chunksize=chunksize))


def _closing(executor: ProcessPoolExecutor, results: Iterator[str | None]) -> Iterator[str | None]:
    with executor:
        yield from results


def scan_dataset(folders: list[Path], max_bad_fraction: float, report_path: Path) -> list[FolderScan]:
    """What `split` runs: scan the folders, write the report, warn in one line, and stop on data too broken to use."""
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"{folder}/ not found; {HOW_TO_GET_DATA}")
    scans = scan_folders(folders)
    data_report = report(scans)
    write_json(report_path, data_report)
    if line := warning_line(data_report, report_path):
        print(line)
    check_bad_share(scans, max_bad_fraction, report_path)
    for scan in scans:
        if not scan.images:
            raise UserError(
                f"{scan.folder}/ holds no readable images in class folders ({scan.folder}/<class>/<image>); "
                f"{HOW_TO_GET_DATA}"
            )
    return scans


def scan_folders(folders: list[Path], workers: int | None = None) -> list[FolderScan]:
    """Scan each folder/<class>/ once, decoding every image-named file in parallel across `workers` processes."""
    scans = [FolderScan(folder) for folder in folders]
    candidates = [(scan, path, label) for scan in scans for path, label in _walk(scan.folder, scan)]
    workers = usable_cores() if workers is None else workers
    paths = [path for _, path, _ in candidates]
    results = _checked(paths, workers)
    bar = tqdm(results, total=len(paths), desc="checking images", unit="file", disable=None, leave=False)
    for (scan, path, label), reason in zip(candidates, bar, strict=True):
        if reason is None:
            scan.images.append((path, label))
        else:
            scan.excluded.append((path, reason))
            scan.bad_images[label] += 1
    for scan in scans:
        scan.excluded.sort()
    return scans


def report(scans: list[FolderScan]) -> dict:
    """The data report: counts per class and every left-out path with its reason."""
    excluded = sorted(item for scan in scans for item in scan.excluded)
    image_files = sum(sum(scan.image_files.values()) for scan in scans)
    bad = sum(sum(scan.bad_images.values()) for scan in scans)
    return {
        "images": sum(len(scan.images) for scan in scans),
        "excluded": len(excluded),
        "unreadable_fraction": round(bad / image_files, 6) if image_files else 0.0,
        "excluded_by_reason": dict(sorted(Counter(kind(reason) for _, reason in excluded).items())),
        "images_per_class": {scan.folder.as_posix(): images_per_class(scan) for scan in scans},
        "excluded_files": [{"path": path, "reason": reason} for path, reason in excluded],
    }


def images_per_class(scan: FolderScan) -> dict[str, int]:
    counts = Counter(label for _, label in scan.images)
    return {name: counts[name] for name in scan.class_folders}


def kind(reason: str) -> str:
    """The short kind of a reason ("unreadable image: image file is truncated ..." -> "unreadable image")."""
    return reason.split(":", 1)[0]


def bad_share_by_class(scans: list[FolderScan]) -> list[tuple[str, int, int]]:
    """(class folder, bad, image-named files) for folders with bad files, worst share first."""
    rows = [
        ((scan.folder / name).as_posix(), scan.bad_images[name], scan.image_files[name])
        for scan in scans
        for name in scan.class_folders
        if scan.bad_images[name]
    ]
    return sorted(rows, key=lambda row: (-row[1] / row[2], -row[1], row[0]))


def warning_line(data_report: dict, report_path: Path) -> str | None:
    """One line saying how many files were left out and why, or None when nothing was."""
    if not data_report["excluded"]:
        return None
    kinds = ", ".join(f"{k}: {n}" for k, n in data_report["excluded_by_reason"].items())
    return (
        f"warning: left out {data_report['excluded']} files ({kinds}); "
        f"every path and reason, and the images per class: {report_path}"
    )


def check_bad_share(scans: list[FolderScan], max_fraction: float, report_path: Path) -> None:
    """Stop when more than `max_fraction` of the image files are unreadable: the data, not a few files, is broken."""
    image_files = sum(sum(scan.image_files.values()) for scan in scans)
    bad = sum(sum(scan.bad_images.values()) for scan in scans)
    if not image_files or bad / image_files <= max_fraction:
        return
    worst = ", ".join(f"{folder}/ ({n} of {total})" for folder, n, total in bad_share_by_class(scans)[:3])
    raise UserError(
        f"{bad} of {image_files} image files ({bad / image_files:.1%}) are unreadable, more than "
        f"data.max_bad_fraction={max_fraction}; worst class folders: {worst}. Replace or remove them (every path is "
        f"in {report_path}), or raise data.max_bad_fraction"
    )
