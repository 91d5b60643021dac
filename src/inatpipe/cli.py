"""The `inatpipe` command: getting data into data/, and using a trained checkpoint: predict, inspect, filters.
(The pipeline itself runs through `dvc repro`.)"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from inatpipe.atomic import write_text
from inatpipe.errors import UserError, exit_on_user_error

DATA = Path("data")


def _dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # The DVC installed beside this package, whatever PATH says.
    result = subprocess.run([sys.executable, "-m", "dvc", *args], text=True, capture_output=True)
    if check and result.returncode != 0:
        last = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise UserError(f"`dvc {' '.join(args)}` failed: {last[0]}")
    return result


def _track(out: Path) -> None:
    """`dvc add` the data: data.dvc records it and the DVC cache holds it, where queued experiments check it out."""
    if not Path(".dvc").is_dir():
        print(f"not in a DVC project; run `dvc add {out}` yourself to track {out}/")
        return
    _dvc("add", str(out))
    print(f"{out}/ is tracked by {out}.dvc; commit it with: git add {out}.dvc && git commit -m 'Update data'")


def cmd_sample(args: argparse.Namespace) -> None:
    from inatpipe.data.sample import build_digits_sample

    n = build_digits_sample(args.out)
    print(f"wrote {n} images of the embedded digits sample to {args.out}/")
    if args.track:
        _track(args.out)


def cmd_fetch(args: argparse.Namespace) -> None:
    from inatpipe.data.fetch import fetch_dataset

    out = fetch_dataset(args.source, args.out, force=args.force, sha256=args.sha256)
    print(f"dataset ready in {out}/")
    if args.track:
        _track(out)


def cmd_setup(args: argparse.Namespace) -> None:
    """Make data/ exist without network: keep it, else restore it from the DVC cache or a remote, else build the sample.

    data.dvc is only rewritten when it records nothing else: a committed data.dvc for another dataset is kept.
    """
    from inatpipe.data.sample import build_digits_sample

    if DATA.is_dir():
        print(f"{DATA}/ is present; leaving it as it is")
        return
    tracked = Path(f"{DATA}.dvc")
    if tracked.is_file():
        if _dvc("checkout", str(tracked), check=False).returncode == 0 and DATA.is_dir():
            print(f"restored {DATA}/ from the DVC cache")
            return
        if _dvc("remote", "list", check=False).stdout.strip():
            if _dvc("pull", str(tracked), check=False).returncode == 0 and DATA.is_dir():
                print(f"pulled {DATA}/ from the DVC remote")
                return
            print(f"dvc pull did not bring {DATA}/; building the embedded sample instead")
    n = build_digits_sample(DATA)
    print(f"wrote {n} images of the embedded digits sample to {DATA}/")
    if not (tracked.is_file() and Path(".dvc").is_dir()):
        _track(DATA)
        return
    if not _matches_record(tracked):
        print(
            f"warning: {tracked} records other data than the embedded sample, and neither the DVC cache nor a remote "
            f"has it; {tracked} is left unchanged. Get that data (`inatpipe data fetch --force ...`) or track the "
            f"sample with `dvc add {DATA}`."
        )
        return
    _dvc("commit", "--force", "--quiet", str(tracked))
    print(f"{DATA}/ is the data {tracked} records; it is now in the DVC cache")


def _matches_record(tracked: Path) -> bool:
    """Whether data/ hashes, by DVC's own reckoning, to the md5 that `tracked` records.

    `dvc status` can't tell: without a cached copy it says "not in cache" whether or not the data differ. So hash
    data/ with `dvc add --no-commit` (which fills no cache) and put the recorded file back exactly as it was.
    """
    recorded = tracked.read_text()
    try:
        _dvc("add", "--no-commit", "--quiet", str(DATA))
        built = _recorded_md5(tracked.read_text())
    finally:
        write_text(tracked, recorded)  # atomic: a kill here must not leave the user's data.dvc half-written
    return built is not None and built == _recorded_md5(recorded)


def _recorded_md5(text: str) -> str | None:
    try:
        return yaml.safe_load(text)["outs"][0]["md5"]
    except (yaml.YAMLError, KeyError, IndexError, TypeError):
        return None


def _load(model: Path, device: str = "cpu"):
    from inatpipe.checkpoint import load_checkpoint
    from inatpipe.runtime import choose_device

    try:
        dev = choose_device(device)
    except UserError:  # its message speaks of params.yaml, which the command line does not read
        raise UserError(f"device {device!r} is not available on this machine; use --device auto or cpu") from None
    return (*load_checkpoint(model, dev), dev)


def cmd_predict(args: argparse.Namespace) -> None:
    from inatpipe.predict import collect_images, format_prediction, predict_files, write_csv

    model, meta, device = _load(args.model, args.device)
    files = collect_images(args.inputs)
    predictions = predict_files(model, meta, files, args.top_k, args.batch_size, device)
    for pred in predictions:
        print(format_prediction(pred))
    skipped = len(files) - len(predictions)
    if args.csv:
        write_csv(predictions, args.csv)
        print(f"wrote {len(predictions)} rows to {args.csv}", file=sys.stderr)
    if skipped:
        print(f"{skipped} of {len(files)} files skipped (not readable images)", file=sys.stderr)


def cmd_inspect(args: argparse.Namespace) -> None:
    from inatpipe.inspection import describe

    model, meta, _ = _load(args.model)
    print(describe(model, meta))


def cmd_filters(args: argparse.Namespace) -> None:
    from inatpipe.inspection import filters_figure, guided_backprop_figure

    model, meta, _ = _load(args.model)
    out = args.out or Path(f"{args.model.stem}_filters.png")
    print(f"wrote {filters_figure(model, out, f'{args.model.name}: first-layer filters')}")
    if args.guided:
        guided_out = args.guided_out or Path(f"{args.model.stem}_guided_backprop.png")
        print(f"wrote {guided_backprop_figure(model, meta, args.guided, guided_out)}")


def parser() -> argparse.ArgumentParser:
    from inatpipe.data.fetch import INATURALIST_URL

    p = argparse.ArgumentParser(prog="inatpipe", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="get a dataset into data/").add_subparsers(dest="data_command", required=True)

    setup = data.add_parser("setup", help="materialise data/: dvc pull if a remote has it, else the embedded sample")
    setup.set_defaults(func=cmd_setup)

    sample = data.add_parser("sample", help="build the embedded digits sample (1,797 images, 10 classes)")
    sample.add_argument("--out", type=Path, default=DATA, help="folder to create (default: data)")
    sample.add_argument("--no-track", dest="track", action="store_false", help="skip `dvc add`")
    sample.set_defaults(func=cmd_sample)

    fetch = data.add_parser("fetch", help="download iNaturalist 12K, or take a zip or folder you already have")
    fetch.add_argument(
        "source", nargs="?", default=INATURALIST_URL, help=f"URL, .zip or folder (default: {INATURALIST_URL})"
    )
    fetch.add_argument("--out", type=Path, default=DATA, help="folder to create (default: data)")
    fetch.add_argument("--force", action="store_true", help="replace an existing data folder")
    fetch.add_argument("--sha256", help="expected SHA-256 of the zip (downloaded or given); checked before unpacking")
    fetch.add_argument("--no-track", dest="track", action="store_false", help="skip `dvc add`")
    fetch.set_defaults(func=cmd_fetch)

    model_help = "a checkpoint written by the pipeline, e.g. models/flexible.pt"
    predict = sub.add_parser("predict", help="top-k classes for image files or folders, from a checkpoint alone")
    predict.add_argument("--model", type=Path, required=True, help=model_help)
    predict.add_argument("inputs", type=Path, nargs="+", help="image files and/or folders (searched recursively)")
    predict.add_argument("--top-k", type=int, default=3, help="classes to show per image (default: 3)")
    predict.add_argument("--csv", type=Path, help="also write the predictions to this CSV file")
    predict.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    predict.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default: auto")
    predict.set_defaults(func=cmd_predict)

    inspect = sub.add_parser("inspect", help="architecture, per-layer output shapes and parameter counts")
    inspect.add_argument("--model", type=Path, required=True, help=model_help)
    inspect.set_defaults(func=cmd_inspect)

    filters = sub.add_parser("filters", help="first-layer filters as a PNG; guided-backprop maps as an option")
    filters.add_argument("--model", type=Path, required=True, help=model_help)
    filters.add_argument("--out", type=Path, help="PNG to write (default: <model name>_filters.png)")
    filters.add_argument("--guided", type=Path, nargs="+", metavar="IMAGE", help="also draw guided-backprop maps")
    filters.add_argument("--guided-out", type=Path, help="default: <model name>_guided_backprop.png")
    filters.set_defaults(func=cmd_filters)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    exit_on_user_error(lambda: args.func(args))


if __name__ == "__main__":
    main()
