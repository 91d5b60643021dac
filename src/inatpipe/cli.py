"""The `inatpipe` command: getting data into data/, using a trained checkpoint (predict, inspect, filters), and
queueing and reporting sweeps. (The pipeline itself runs through `dvc repro`.)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inatpipe.errors import UserError, exit_on_user_error

DATA = Path("data")


def cmd_sample(args: argparse.Namespace) -> None:
    from inatpipe.data.sample import build_digits_sample
    from inatpipe.data.setup import track

    n = build_digits_sample(args.out)
    print(f"wrote {n} images of the embedded digits sample to {args.out}/")
    if args.track:
        track(args.out)


def cmd_fetch(args: argparse.Namespace) -> None:
    from inatpipe.data.fetch import fetch_dataset
    from inatpipe.data.setup import track

    out = fetch_dataset(args.source, args.out, force=args.force, sha256=args.sha256)
    print(f"dataset ready in {out}/")
    if args.track:
        track(out)


def cmd_setup(args: argparse.Namespace) -> None:
    from inatpipe.data.setup import setup

    setup(DATA)


def _load(model: Path, device: str = "cpu"):
    from inatpipe.checkpoint import load_checkpoint
    from inatpipe.runtime import choose_device

    try:
        dev = choose_device(device)
    except UserError:  # its message speaks of params.yaml, which the command line does not read
        raise UserError(f"device {device!r} is not available on this machine; use --device auto or cpu") from None
    return (*load_checkpoint(model, dev), dev)


def cmd_predict(args: argparse.Namespace) -> None:
    from inatpipe.evaluation.predict import collect_images, format_prediction, predict_files, write_csv

    model, meta, device = _load(args.model, args.device)
    files = collect_images(args.inputs)
    predictions = predict_files(model, meta, files, args.top_k, args.batch_size, device, args.precision)
    for pred in predictions:
        print(format_prediction(pred))
    skipped = len(files) - len(predictions)
    if args.csv:
        write_csv(predictions, args.csv)
        print(f"wrote {len(predictions)} rows to {args.csv}", file=sys.stderr)
    if skipped:
        print(f"{skipped} of {len(files)} files skipped (not readable images)", file=sys.stderr)


def cmd_inspect(args: argparse.Namespace) -> None:
    from inatpipe.evaluation.inspection import describe

    model, meta, _ = _load(args.model)
    print(describe(model, meta))


def cmd_filters(args: argparse.Namespace) -> None:
    from inatpipe.evaluation.inspection import filters_figure, guided_backprop_figure

    model, meta, _ = _load(args.model)
    out = args.out or Path(f"{args.model.stem}_filters.png")
    print(f"wrote {filters_figure(model, out, f'{args.model.name}: first-layer filters')}")
    if args.guided:
        guided_out = args.guided_out or Path(f"{args.model.stem}_guided_backprop.png")
        print(f"wrote {guided_backprop_figure(model, meta, args.guided, guided_out)}")


def cmd_sweep_queue(args: argparse.Namespace) -> None:
    from inatpipe.sweep.space import queue_sweep

    queued = queue_sweep(
        args.space, Path("params.yaml"), args.n, args.seed, args.name or f"rs{args.seed}", args.stage, args.dry_run
    )
    for name, dvc_args in queued:
        print(("would run: dvc " if args.dry_run else f"{name}: dvc ") + " ".join(dvc_args))
    if not args.dry_run:
        print(
            f"queued {len(queued)} experiments; run them with `dvc queue start -j 2` (-j: how many at once), "
            "follow with `dvc queue status`, then `inatpipe sweep report`"
        )


def cmd_sweep_report(args: argparse.Namespace) -> None:
    from inatpipe.sweep.report import write_sweep_report

    report = write_sweep_report(args.out, all_commits=args.all_commits)
    print(report.summary())


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    from inatpipe.sweep.space import SPACE_FILE

    sweep = sub.add_parser("sweep", help="random search and sweep reports over DVC experiments")
    commands = sweep.add_subparsers(dest="sweep_command", required=True)
    queue = commands.add_parser(
        "queue", help="sample configurations from sweep.yaml and queue each as a named `dvc exp run --queue`"
    )
    queue.add_argument("--n", type=int, default=20, help="how many experiments (default: 20)")
    queue.add_argument(
        "--seed", type=int, default=0, help="sampling seed; the same seed queues the same configurations"
    )
    queue.add_argument("--space", type=Path, default=SPACE_FILE, help=f"search space (default: {SPACE_FILE})")
    queue.add_argument("--name", help="experiment name prefix (default: rs<seed>); names are PREFIX-01, PREFIX-02, ...")
    queue.add_argument(
        "--stage", action="append", default=[], help="run only this stage and what it needs (repeatable)"
    )
    queue.add_argument("--dry-run", action="store_true", help="print the dvc commands instead of queueing them")
    queue.set_defaults(func=cmd_sweep_queue)

    report = commands.add_parser(
        "report", help="rank the experiments in `dvc exp show` and plot validation accuracy against their params"
    )
    report.add_argument(
        "--out", type=Path, default=Path("reports/sweep"), help="output folder (default: reports/sweep)"
    )
    report.add_argument(
        "--all-commits", action="store_true", help="experiments of every commit, not only those based on HEAD"
    )
    report.set_defaults(func=cmd_sweep_report)


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
    predict.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast of the forward pass, as evaluate.precision (default: auto)",
    )
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

    _add_sweep(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    exit_on_user_error(lambda: args.func(args))


if __name__ == "__main__":
    main()
