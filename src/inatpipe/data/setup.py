"""Getting data/ ready on any machine, without network: keep it, restore it from DVC, or build the embedded sample;
and tracking a folder of data with `dvc add`."""

from __future__ import annotations

from pathlib import Path

import yaml

from inatpipe.atomic import write_text
from inatpipe.data.sample import build_digits_sample
from inatpipe.dvc_cli import run_dvc


def track(out: Path) -> None:
    """`dvc add` the data: data.dvc records it and the DVC cache holds it, where queued experiments check it out."""
    if not Path(".dvc").is_dir():
        print(f"not in a DVC project; run `dvc add {out}` yourself to track {out}/")
        return
    run_dvc("add", str(out))
    print(f"{out}/ is tracked by {out}.dvc; commit it with: git add {out}.dvc && git commit -m 'Update data'")


def setup(data: Path = Path("data")) -> None:
    """Make `data` exist without network: keep it, else restore it from the DVC cache or a remote, else build the
    sample. Its .dvc file is only rewritten when it records nothing else: a committed one for another dataset is kept.
    """
    if data.is_dir():
        print(f"{data}/ is present; leaving it as it is")
        return
    tracked = Path(f"{data}.dvc")
    if tracked.is_file():
        if run_dvc("checkout", str(tracked), check=False).returncode == 0 and data.is_dir():
            print(f"restored {data}/ from the DVC cache")
            return
        if run_dvc("remote", "list", check=False).stdout.strip():
            if run_dvc("pull", str(tracked), check=False).returncode == 0 and data.is_dir():
                print(f"pulled {data}/ from the DVC remote")
                return
            print(f"dvc pull did not bring {data}/; building the embedded sample instead")
    n = build_digits_sample(data)
    print(f"wrote {n} images of the embedded digits sample to {data}/")
    if not (tracked.is_file() and Path(".dvc").is_dir()):
        track(data)
        return
    if not _matches_record(tracked, data):
        print(
            f"warning: {tracked} records other data than the embedded sample, and neither the DVC cache nor a remote "
            f"has it; {tracked} is left unchanged. Get that data (`inatpipe data fetch --force ...`) or track the "
            f"sample with `dvc add {data}`."
        )
        return
    run_dvc("commit", "--force", "--quiet", str(tracked))
    print(f"{data}/ is the data {tracked} records; it is now in the DVC cache")


def _matches_record(tracked: Path, data: Path) -> bool:
    """Whether data/ hashes, by DVC's own reckoning, to the md5 that `tracked` records.

    `dvc status` can't tell: without a cached copy it says "not in cache" whether or not the data differ. So hash
    data/ with `dvc add --no-commit` (which fills no cache) and put the recorded file back exactly as it was.
    """
    recorded = tracked.read_text()
    try:
        run_dvc("add", "--no-commit", "--quiet", str(data))
        built = _recorded_md5(tracked.read_text())
    finally:
        write_text(tracked, recorded)  # atomic: a kill here must not leave the user's data.dvc half-written
    return built is not None and built == _recorded_md5(recorded)


def _recorded_md5(text: str) -> str | None:
    try:
        return yaml.safe_load(text)["outs"][0]["md5"]
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        return None
