"""Getting a real dataset into data/: download the iNaturalist 12K zip, or take a zip or folder already on disk."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from tqdm import tqdm

from inatpipe.errors import UserError

INATURALIST_URL = "https://storage.googleapis.com/wandb_datasets/nature_12K.zip"
DOWNLOAD_DIR = Path("downloads")


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def download(url: str, dest_dir: Path = DOWNLOAD_DIR, sha256: str | None = None) -> Path:
    """Download `url` into `dest_dir` with a progress bar; a file an earlier run completed there is reused.

    The bytes go to a `.part` file that only becomes `dest` once its size matches Content-Length and, when
    `sha256` is given, its checksum matches too; a failed download leaves nothing behind.
    """
    dest = dest_dir / Path(urllib.parse.urlparse(url).path).name
    if dest.is_file():  # only a complete, verified download is ever renamed to its final name
        print(f"using the earlier download {dest} (delete it to download again)")
        check_sha256(dest, sha256, f"delete {dest} to download it again")
        return dest
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            dest_dir.mkdir(parents=True, exist_ok=True)
            with (
                open(part, "wb") as f,
                tqdm(total=size, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar,
            ):
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        if size is not None and part.stat().st_size != size:
            raise OSError(f"the connection closed after {part.stat().st_size:,} of {size:,} bytes")
    except (OSError, http.client.HTTPException) as e:  # URLError and socket errors are OSErrors
        part.unlink(missing_ok=True)
        raise UserError(
            f"could not download {url} ({getattr(e, 'reason', e)}); try again, or download it by other means "
            "and run `inatpipe data fetch path/to/nature_12K.zip`"
        ) from None
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        part.unlink()
        raise UserError(
            f"the download of {url} has sha256 {digest.hexdigest()}, not the expected {sha256}; "
            "it was deleted: try again, or check the --sha256 value"
        )
    os.replace(part, dest)
    return dest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str | None, fix: str) -> None:
    if expected is not None and (actual := file_sha256(path)) != expected.lower():
        raise UserError(f"{path} has sha256 {actual}, not the expected {expected}; {fix}")


def safe_member_name(name: str) -> str:
    """Where zipfile's extract puts member `name`, relative to the target: without drive, root and '.'/'..' parts."""
    parts = os.path.splitdrive(name.replace("/", os.sep))[1].split(os.sep)
    return "/".join(part for part in parts if part not in ("", os.curdir, os.pardir))


def escapes(name: str) -> bool:
    """Whether member `name`, written as is, would land outside the target folder."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or bool(os.path.splitdrive(name)[0]) or ".." in parts


def extract_zip(archive: Path, dest: Path) -> list[tuple[str, str | None]]:
    """Extract every member inside `dest`; return (name, safe name or None if skipped) for unsafe member names.

    zipfile's own extraction already strips absolute paths, drives and '..' so nothing lands outside `dest`;
    this keeps that, skips members left with no name at all, and says which members it renamed or skipped.
    """
    unsafe: list[tuple[str, str | None]] = []
    root = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in tqdm(zf.infolist(), desc=f"extracting {archive.name}", unit="file", disable=None):
                safe = safe_member_name(member.filename)
                # A member left with no name (a file called '../') has nowhere to go; a folder's is the target.
                inside = (root / safe).resolve().is_relative_to(root) and (bool(safe) or member.is_dir())
                if escapes(member.filename) or not inside:
                    unsafe.append((member.filename, safe if inside else None))
                if inside:
                    zf.extract(member, dest)
    except zipfile.BadZipFile as e:  # also a member whose CRC doesn't match: a corrupt download
        raise UserError(f"{archive} is not a valid zip file ({e}); download it again") from None
    if unsafe:
        print(
            f"warning: {archive} has {len(unsafe)} members whose names point outside the target folder: "
            f"{_listing(unsafe)}"
        )
    return unsafe


def _listing(unsafe: list[tuple[str, str | None]], shown: int = 5) -> str:
    items = [f"{name!r} written as {safe!r}" if safe else f"{name!r} skipped" for name, safe in unsafe[:shown]]
    more = f" and {len(unsafe) - shown} more" if len(unsafe) > shown else ""
    return ", ".join(items) + more


def find_dataset_root(folder: Path, train_dir: str, test_dir: str, max_depth: int = 3) -> Path:
    """The shallowest folder under `folder` holding both <train_dir>/ and <test_dir>/ (archives often nest one)."""
    level = [folder]
    for _ in range(max_depth + 1):
        for candidate in level:
            if (candidate / train_dir).is_dir() and (candidate / test_dir).is_dir():
                return candidate
        level = sorted(child for parent in level for child in parent.iterdir() if child.is_dir())
    raise UserError(
        f"no folder with both {train_dir}/ and {test_dir}/ found in the source; "
        f"expected <root>/{train_dir}/<class>/<image> and <root>/{test_dir}/<class>/<image>"
    )


def fetch_dataset(
    source: str,
    out: Path,
    *,
    force: bool = False,
    train_dir: str = "train",
    test_dir: str = "val",
    sha256: str | None = None,
) -> Path:
    """Put the dataset from `source` (URL, zip or folder) at `out`; the old `out` is replaced only with `force`.

    With `sha256`, a downloaded or given zip must have that checksum before anything is unpacked.
    """
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise UserError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")
    if out.exists() and not force:
        raise UserError(
            f"{out}/ already exists; pass --force to replace it (a version you ran `dvc add` on stays in the DVC cache)"
        )
    staging = out.with_name(f".{out.name}.incoming")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _unpack(source, out, staging, train_dir, test_dir, sha256)
    except OSError as e:  # disk full, permissions
        raise UserError(f"could not put {source} into {out}/ ({e}); free space or fix permissions and retry") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _unpack(source: str, out: Path, staging: Path, train_dir: str, test_dir: str, sha256: str | None) -> None:
    path = download(source, sha256=sha256) if is_url(source) else Path(source)
    if path.is_dir() and sha256 is not None:
        raise UserError(f"--sha256 checks a zip file, and {source} is a folder; leave it out")
    if path.is_dir():
        root = find_dataset_root(path, train_dir, test_dir)
        shutil.copytree(root, staging / "dataset")
        root = staging / "dataset"
    elif path.is_file() and zipfile.is_zipfile(path):
        if not is_url(source):
            check_sha256(path, sha256, "it is not the file you meant; get it again")
        extract_zip(path, staging)
        root = find_dataset_root(staging, train_dir, test_dir)
    elif path.exists():
        raise UserError(f"{source} is neither a zip file nor a folder")
    else:
        raise UserError(f"{source} not found; give a URL, a .zip file or a folder")
    # Swap only once the new data is complete, so a failure above leaves the old data untouched.
    if out.exists():
        shutil.rmtree(out)
    root.rename(out)
