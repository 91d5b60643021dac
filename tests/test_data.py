"""Data layer: folder scanning, the stratified split, channel statistics, the embedded sample and fetching."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from inatpipe.data.dataset import make_loader
from inatpipe.data.fetch import fetch_dataset
from inatpipe.data.index import read_index, scan_folder, write_index
from inatpipe.data.prepared import IndexImages, prepare
from inatpipe.data.sample import build_digits_sample
from inatpipe.data.split import check_test_classes, stratified_split
from inatpipe.data.stats import compute_stats
from inatpipe.errors import UserError, one_line

from .conftest import ROOT, write_dataset, write_image_folder
from .stages import Result, inatpipe


def test_scan_lists_every_image_with_its_folder_as_label(tmp_path: Path):
    write_image_folder(tmp_path, classes=("b", "a"), per_class=3)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    df = scan_folder(tmp_path)
    assert len(df) == 6
    assert df["label"].tolist() == ["a"] * 3 + ["b"] * 3
    assert all(Path(p).suffix == ".png" for p in df["path"])


def test_scan_errors_say_how_to_get_data(tmp_path: Path):
    with pytest.raises(UserError, match="not found; run `make data`"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        scan_folder(tmp_path / "empty")


def uneven_pool(tmp_path: Path) -> pd.DataFrame:
    for name, n in (("a", 30), ("b", 17), ("c", 9)):
        write_image_folder(tmp_path, classes=(name,), per_class=n, size=4)
    return scan_folder(tmp_path)


def test_split_is_stratified_disjoint_and_complete(tmp_path: Path):
    pool = uneven_pool(tmp_path)
    train, val = stratified_split(pool, val_fraction=0.25, seed=0)
    assert not set(train["path"]) & set(val["path"])
    assert sorted([*train["path"], *val["path"]]) == sorted(pool["path"])
    for label, n in pool["label"].value_counts().items():
        expected = n * 0.25
        assert abs((val["label"] == label).sum() - expected) <= 1, label


def test_split_is_deterministic_and_depends_on_the_seed(tmp_path: Path):
    pool = uneven_pool(tmp_path)
    first, again, other = (stratified_split(pool, 0.25, seed)[1] for seed in (3, 3, 4))
    assert first.equals(again)
    assert not first.equals(other)


def test_split_needs_two_images_per_class(tmp_path: Path):
    write_image_folder(tmp_path, classes=("a",), per_class=5, size=4)
    write_image_folder(tmp_path, classes=("lonely",), per_class=1, size=4)
    with pytest.raises(UserError, match="class 'lonely' has 1 image"):
        stratified_split(scan_folder(tmp_path), 0.2, 0)


def test_test_folder_must_not_bring_new_classes(tmp_path: Path):
    test = scan_folder(write_image_folder(tmp_path, classes=("a", "zebra"), per_class=1, size=4))
    with pytest.raises(UserError, match="class folders that the training folder lacks: 'zebra'"):
        check_test_classes(test, ["a", "b"], "val")
    assert check_test_classes(test, ["a", "b", "zebra"], "val") == ["b"]


def test_index_round_trip_keeps_labels_as_strings(tmp_path: Path):
    df = pd.DataFrame({"path": ["x/1.png", "x/2.png"], "label": ["007", "NA"]})
    write_index(df, tmp_path / "i.csv")
    assert read_index(tmp_path / "i.csv").equals(df)


def test_stats_equal_a_numpy_computation_over_train_only(tmp_path: Path):
    data = write_dataset(tmp_path / "data", train_per_class=5, test_per_class=3, size=12)
    train = scan_folder(data / "train")
    prepare({"train": train}, sorted(train["label"].unique()), 12, tmp_path / "prepared")
    stats = compute_stats(tmp_path / "prepared", image_size=12)
    # The prepared images (14 px) brought back to 12 px, as the stage measures them
    prepared = np.load(tmp_path / "prepared" / "train.npy")
    resized = [Image.fromarray(img).resize((12, 12), Image.Resampling.BILINEAR) for img in prepared]
    pixels = np.stack([np.asarray(img, dtype=np.float64) / 255 for img in resized])
    np.testing.assert_allclose(stats["mean"], pixels.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], pixels.std(axis=(0, 1, 2)), rtol=1e-6)
    assert stats["num_images"] == 15 and stats["image_size"] == 12
    # and close to the statistics of the original files
    originals = np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) / 255 for p in train["path"]])
    np.testing.assert_allclose(stats["mean"], originals.mean(axis=(0, 1, 2)), atol=0.01)
    np.testing.assert_allclose(stats["std"], originals.std(axis=(0, 1, 2)), atol=0.03)


def test_dataset_reports_unreadable_images(tmp_path: Path):
    bad = tmp_path / "a" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not a jpeg")
    ds = IndexImages(pd.DataFrame({"path": [str(bad)], "label": ["a"]}), ["a"], 16)
    with pytest.raises(UserError, match="broken.jpg is not a readable image"):
        ds[0]


def test_errors_from_loader_workers_still_print_as_one_line(tmp_path: Path):
    bad = tmp_path / "a" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not a jpeg")
    ds = IndexImages(pd.DataFrame({"path": [str(bad)], "label": ["a"]}), ["a"], 16)
    with pytest.raises(UserError) as err:
        next(iter(make_loader(ds, 1, num_workers=1)))
    assert "Original Traceback" in str(err.value)  # how torch re-raises a worker's error
    assert one_line(err.value).startswith(f"{bad} is not a readable image")
    assert "\n" not in one_line(err.value)


def test_sample_never_overwrites(tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="already exists"):
        build_digits_sample(tmp_path / "data")
    assert (tmp_path / "data" / "mine.txt").read_text() == "keep"


def make_zip(tmp_path: Path) -> Path:
    """A small archive shaped like nature_12K.zip: inaturalist_12K/{train,val}/<class>/*.jpg."""
    src = write_dataset(tmp_path / "src" / "inaturalist_12K", train_per_class=3, test_per_class=2, ext=".jpg")
    archive = tmp_path / "nature_12K.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.rglob("*.jpg")):
            zf.write(f, f.relative_to(src.parent))
    return archive


def test_fetch_from_a_zip_unpacks_the_nested_dataset(tmp_path: Path):
    out = fetch_dataset(str(make_zip(tmp_path)), tmp_path / "data")
    assert len(scan_folder(out / "train")) == 9 and len(scan_folder(out / "val")) == 6
    assert not list(tmp_path.glob(".data.*")), "staging folders are cleaned up"


def test_fetch_from_a_folder_copies_it(tmp_path: Path):
    src = write_dataset(tmp_path / "mine", train_per_class=2, test_per_class=1)
    out = fetch_dataset(str(src), tmp_path / "data")
    assert len(scan_folder(out / "train")) == 6
    assert len(scan_folder(src / "train")) == 6, "the source folder is left as it was"


def test_fetch_refuses_to_replace_data_without_force_and_keeps_it_on_failure(tmp_path: Path):
    archive = make_zip(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists; pass --force"):
        fetch_dataset(str(archive), data)
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("readme.txt", "no dataset here")
    with pytest.raises(UserError, match="no folder with both train/ and val/"):
        fetch_dataset(str(bad), data, force=True)
    assert (data / "keep.txt").read_text() == "mine"
    fetch_dataset(str(archive), data, force=True)
    assert not (data / "keep.txt").exists() and (data / "train").is_dir()


def test_fetch_rejects_what_is_not_a_zip_or_folder(tmp_path: Path):
    (tmp_path / "x.tar").write_text("tar?")
    with pytest.raises(UserError, match="neither a zip file nor a folder"):
        fetch_dataset(str(tmp_path / "x.tar"), tmp_path / "data")
    with pytest.raises(UserError, match="not found"):
        fetch_dataset(str(tmp_path / "nothing.zip"), tmp_path / "data")


@pytest.fixture
def http_server(tmp_path: Path):
    """A real HTTP server on localhost serving tmp_path."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_downloads_a_url_then_unpacks_it(tmp_path: Path, http_server: str, monkeypatch):
    make_zip(tmp_path)
    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    out = fetch_dataset(f"{http_server}/nature_12K.zip", Path("data"))
    assert len(scan_folder(out / "val")) == 6
    assert (work / "downloads" / "nature_12K.zip").stat().st_size == (tmp_path / "nature_12K.zip").stat().st_size
    with pytest.raises(UserError, match="could not download"):
        fetch_dataset(f"{http_server}/missing.zip", Path("data2"))


class TruncatingHandler(http.server.BaseHTTPRequestHandler):
    """Promises 1,000 bytes and sends 10: a connection that drops mid-download."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"PK" + b"\0" * 8)

    def log_message(self, *args):
        pass


def test_a_cut_off_download_is_an_error_and_leaves_no_file(tmp_path: Path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TruncatingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(UserError, match="could not download .*closed after 10 of 1,000 bytes"):
            fetch_dataset(f"http://127.0.0.1:{server.server_address[1]}/nature_12K.zip", Path("data"))
    finally:
        server.shutdown()
    assert list((tmp_path / "downloads").iterdir()) == []
    assert not (tmp_path / "data").exists()


def test_a_completed_download_is_reused_without_network(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "downloads").mkdir()
    shutil.copy(make_zip(tmp_path), tmp_path / "downloads" / "nature_12K.zip")
    # Port 9 on localhost has no server: any attempt to connect would fail.
    out = fetch_dataset("http://127.0.0.1:9/nature_12K.zip", Path("data"))
    assert len(scan_folder(out / "train")) == 9


def run_cli(*args: str, cwd: Path) -> Result:
    return inatpipe(cwd, *args)


def test_cli_fetch_tracks_the_data_with_dvc(tmp_path: Path):
    archive = make_zip(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    result = run_cli("data", "fetch", str(archive), cwd=project)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["nfiles"] == 15
    again = run_cli("data", "fetch", str(archive), cwd=project)
    assert again.returncode == 2
    assert again.stderr.startswith("error: data/ already exists") and len(again.stderr.strip().splitlines()) == 1


def dvc_project(path: Path) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, check=True)
    return path


def tracked_project_without_data(tmp_path: Path) -> tuple[Path, str]:
    """A DVC project whose data.dvc records a small dataset that was then deleted; returns (project, data.dvc)."""
    project = dvc_project(tmp_path / "project")
    write_dataset(project / "data", train_per_class=2, test_per_class=1)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "data"], cwd=project, check=True)
    shutil.rmtree(project / "data")
    return project, (project / "data.dvc").read_text()


def test_setup_restores_data_from_the_dvc_cache(tmp_path: Path):
    project, recorded = tracked_project_without_data(tmp_path)
    result = run_cli("data", "setup", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "restored data/ from the DVC cache" in result.stdout
    assert len(scan_folder(project / "data" / "train")) == 6
    assert (project / "data.dvc").read_text() == recorded


def test_setup_never_rewrites_a_data_dvc_that_records_other_data(tmp_path: Path):
    project, recorded = tracked_project_without_data(tmp_path)
    shutil.rmtree(project / ".dvc" / "cache")  # as on a fresh clone: nothing cached, no remote
    result = run_cli("data", "setup", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "records other data than the embedded sample" in result.stdout
    assert (project / "data.dvc").read_text() == recorded
    assert len(scan_folder(project / "data" / "train")) == 1797 - 355  # the sample was built


def test_setup_on_a_fresh_clone_builds_the_committed_sample_without_a_false_alarm(tmp_path: Path):
    """A fresh clone has the committed data.dvc and no cache: `dvc status` says "not in cache", yet the data match.
    Setup builds the sample, finds (by DVC's own hashing) that it is what data.dvc records, and caches it: this
    build is, byte for byte, the one that wrote the committed data.dvc."""
    project = dvc_project(tmp_path / "project")
    shutil.copy(ROOT / "data.dvc", project / "data.dvc")
    recorded = (project / "data.dvc").read_text()
    result = run_cli("data", "setup", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout + result.stderr
    assert "is now in the DVC cache" in result.stdout
    assert (project / "data.dvc").read_text() == recorded
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", "data.dvc"], cwd=project, capture_output=True, text=True
    )
    assert status.stdout.strip() == "{}", "the sample is cached: data.dvc is fully satisfied"

    built = project / "data"
    assert len(list(built.rglob("*.bmp"))) == 1797
    train, test = scan_folder(built / "train"), scan_folder(built / "val")
    assert train["label"].nunique() == 10 and len(test) == 355 and len(train) == 1797 - 355
    with Image.open(train["path"].iloc[0]) as img:
        assert img.mode == "RGB" and img.size == (32, 32)


def test_archive_members_that_escape_are_kept_inside_and_named(tmp_path: Path, capsys):
    archive = make_zip(tmp_path)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("../escaped.txt", "up one")
        zf.writestr("inaturalist_12K/../../../deeper.txt", "up three")
        zf.writestr("/tmp/absolute.txt", "absolute")
        zf.writestr("..", "no name left")
    work = tmp_path / "work"
    work.mkdir()
    before = {p for p in tmp_path.rglob("*") if "work" not in p.parts}
    absolute_existed = Path("/tmp/absolute.txt").exists()
    out = fetch_dataset(str(archive), work / "data")
    assert len(scan_folder(out / "train")) == 9
    after = {p for p in tmp_path.rglob("*") if "work" not in p.parts}
    assert after == before, "nothing was written outside the target"
    assert Path("/tmp/absolute.txt").exists() == absolute_existed
    # The one renamed member that lands inside the dataset root stays, where the warning says; the staging folder
    # with the others is gone.
    assert [p.relative_to(work).as_posix() for p in work.rglob("*.txt")] == ["data/deeper.txt"]
    assert (out / "deeper.txt").read_text() == "up three"
    assert [p.name for p in work.iterdir()] == ["data"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert lines == [
        f"warning: {archive} has 4 members whose names point outside the target folder: "
        "'../escaped.txt' written as 'escaped.txt', 'inaturalist_12K/../../../deeper.txt' written as "
        "'inaturalist_12K/deeper.txt', '/tmp/absolute.txt' written as 'tmp/absolute.txt', '..' skipped"
    ]


def test_fetch_checks_a_given_sha256_before_unpacking(tmp_path: Path):
    archive = make_zip(tmp_path)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    with pytest.raises(UserError, match=f"has sha256 {digest}, not the expected 0{{64}}"):
        fetch_dataset(str(archive), tmp_path / "data", sha256="0" * 64)
    assert not (tmp_path / "data").exists() and archive.is_file()
    with pytest.raises(UserError, match="must be 64 hexadecimal digits"):
        fetch_dataset(str(archive), tmp_path / "data", sha256="abc")
    out = fetch_dataset(str(archive), tmp_path / "data", sha256=digest.upper())
    assert len(scan_folder(out / "train")) == 9


def test_a_download_with_the_wrong_sha256_is_deleted_and_replaces_nothing(
    tmp_path: Path, http_server: str, monkeypatch
):
    archive = make_zip(tmp_path)
    work = tmp_path / "project"
    (work / "data").mkdir(parents=True)
    (work / "data" / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    with pytest.raises(UserError, match="the download of .* has sha256 .*it was deleted"):
        fetch_dataset(f"{http_server}/nature_12K.zip", Path("data"), force=True, sha256="f" * 64)
    assert list((work / "downloads").iterdir()) == []
    assert (work / "data" / "keep.txt").read_text() == "mine"
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    fetch_dataset(f"{http_server}/nature_12K.zip", Path("data"), force=True, sha256=digest)
    assert len(scan_folder(work / "data" / "val")) == 6
