"""Getting a real dataset into data/: download the iNaturalist 12K zip, or take a zip or folder already on disk."""

from __future__ import annotations

import http.client
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


def download(url: str, dest_dir: Path = DOWNLOAD_DIR) -> Path:
    """Download `url` into `dest_dir` with a progress bar; a file an earlier run completed there is reused."""
    dest = dest_dir / Path(urllib.parse.urlparse(url).path).name
    if dest.is_file():  # only a complete download is ever renamed to its final name
        print(f"using the earlier download {dest} (delete it to download again)")
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            dest_dir.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        if size is not None and part.stat().st_size != size:
            raise OSError(f"the connection closed after {part.stat().st_size:,} of {size:,} bytes")
    except (OSError, http.client.HTTPException) as e:  # URLError and socket errors are OSErrors
        part.unlink(missing_ok=True)
        raise UserError(
            f"could not download {url} ({getattr(e, 'reason', e)}); try again, or download it by other means "
            "and run `inatpipe data fetch path/to/nature_12K.zip`"
        ) from None
    part.rename(dest)
    return dest


def extract_zip(archive: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in tqdm(zf.infolist(), desc=f"extracting {archive.name}", unit="file"):
                zf.extract(member, dest)  # zipfile drops absolute paths and '..' from member names
    except zipfile.BadZipFile:
        raise UserError(f"{archive} is not a valid zip file; download it again") from None


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
    source: str, out: Path, *, force: bool = False, train_dir: str = "train", test_dir: str = "val"
) -> Path:
    """Put the dataset from `source` (URL, zip or folder) at `out`; the old `out` is replaced only with `force`."""
    if out.exists() and not force:
        raise UserError(
            f"{out}/ already exists; pass --force to replace it (a version you ran `dvc add` on stays in the DVC cache)"
        )
    staging = out.with_name(f".{out.name}.incoming")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _unpack(source, out, staging, train_dir, test_dir)
    except OSError as e:  # disk full, permissions
        raise UserError(f"could not put {source} into {out}/ ({e}); free space or fix permissions and retry") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _unpack(source: str, out: Path, staging: Path, train_dir: str, test_dir: str) -> None:
    path = download(source) if is_url(source) else Path(source)
    if path.is_dir():
        root = find_dataset_root(path, train_dir, test_dir)
        shutil.copytree(root, staging / "dataset")
        root = staging / "dataset"
    elif path.is_file() and zipfile.is_zipfile(path):
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
