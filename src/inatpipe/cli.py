"""The `inatpipe` command: getting data into data/, using a trained checkpoint (predict, inspect, filters, export,
explain, serve), finding a learning rate (lr-find), and running and reporting sweeps. (The pipeline itself runs
through `dvc repro`.) Each command imports what it needs when it runs: `predict` from an .onnx file never loads
torch."""

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


def _device(name: str):
    from inatpipe.runtime import choose_device

    try:
        return choose_device(name)
    except UserError:  # its message speaks of params.yaml, which the command line does not read
        raise UserError(f"device {name!r} is not available on this machine; use --device auto or cpu") from None


def _load(model: Path, device: str = "cpu"):
    from inatpipe.checkpoint import load_checkpoint

    dev = _device(device)
    return (*load_checkpoint(model, dev), dev)


def cmd_predict(args: argparse.Namespace) -> None:
    from inatpipe.evaluation.predict import collect_images, format_prediction, predict_files, write_csv
    from inatpipe.evaluation.predictor import load_predictor

    predictor = load_predictor(args.model, args.device, args.precision, tta=args.tta, calibrate=args.calibrate)
    files = collect_images(args.inputs)
    predictions = predict_files(predictor, files, args.top_k, args.batch_size)
    for pred in predictions:
        print(format_prediction(pred))
    skipped = len(files) - len(predictions)
    if args.csv:
        write_csv(predictions, args.csv)
        print(f"wrote {len(predictions)} rows to {args.csv}", file=sys.stderr)
    if skipped:
        print(f"{skipped} of {len(files)} files skipped (not readable images)", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    from inatpipe.evaluation.export import export_checkpoint

    done = export_checkpoint(args.model, args.format, args.out, args.exporter)
    parity = done.parity
    print(
        f"wrote {done.path} ({done.format}, {done.exporter}, {done.size_bytes / 1e6:.1f} MB); against torch on "
        f"{parity.images} random "
        f"inputs: same top-1, largest logit difference {parity.max_abs_logit_diff:.2g}"
    )


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


def cmd_lr_find(args: argparse.Namespace) -> None:
    from inatpipe.evaluation.lr_find_report import write_lr_find
    from inatpipe.params import load_params
    from inatpipe.training.lr_find import default_steps, find_lr, setup

    if args.steps is not None and args.steps < 2:
        raise UserError(f"--steps must be at least 2, got {args.steps}")
    if not 0 < args.start < args.end:
        raise UserError(f"--start must be above 0 and below --end, got --start {args.start:g} --end {args.end:g}")
    s = setup(load_params(), args.model)
    steps = args.steps or default_steps(s.steps_per_epoch)
    print(f"lr-find: {args.model}, {steps} steps from {args.start:g} to {args.end:g} ({s.steps_per_epoch} per epoch)")
    test = find_lr(s, start=args.start, end=args.end, steps=steps)
    png, json = write_lr_find(test, args.out, args.model)
    print(f"wrote {png} and {json}")
    found = test.suggestion()
    steepest = f"{found['steepest']:.2e}" if found["steepest"] is not None else "none"
    print(f"lowest loss at {found['minimum']:.2e}; steepest fall at {steepest}; {len(test.lrs)} steps ran")
    if found["note"]:
        print(f"note: {found['note']}")
    if found["recommended"] is not None:
        section = "train" if args.model == "flexible" else "resnet"
        print(f"suggested {section}.learning_rate: {found['recommended']:.1e} (minimum / 10)")
        print(f"try it: dvc exp run -S {section}.learning_rate={found['recommended']:.1e}")


def cmd_explain(args: argparse.Namespace) -> None:
    from inatpipe.evaluation.explain import Explainer, explain_files
    from inatpipe.evaluation.predict import collect_images

    model, meta, device = _load(args.model, args.device)
    files = collect_images(args.images)
    for path, label, probability, out in explain_files(Explainer(model, meta, device), files, args.out):
        print(f"{path}: {label} {probability:.3f} -> {out}")


def cmd_serve(args: argparse.Namespace) -> None:
    from inatpipe.serve.app import create_app, listening_socket, load_model, run_server

    sock = listening_socket(args.host, args.port)  # a port in use fails now, before seconds of model loading
    try:
        print(f"loading {args.model} ...", flush=True)
        predictor, explainer = load_model(args.model, _device(args.device))
    except BaseException:
        sock.close()
        raise
    run_server(create_app(predictor, explainer, args.model.name), sock)


def cmd_sweep_run(args: argparse.Namespace) -> None:
    from inatpipe.sweep.run import SweepRun, run_sweep, summary_lines
    from inatpipe.sweep.study import storage_url

    run = SweepRun(
        trials=args.trials,
        jobs=args.jobs,
        study=args.study,
        storage_url=storage_url(args.storage, Path.cwd()),
        sampler=args.sampler,
        pruner=args.pruner,
        space_path=args.space,
        seed=args.seed,
        startup_trials=args.startup_trials,
        heartbeat_s=args.heartbeat,
        stages=tuple(args.stage or ["train_flexible"]),
        git_remote=args.git_remote,
    )
    study, counts = run_sweep(run)
    print("\n".join(summary_lines(study, counts)))


def cmd_sweep_queue(args: argparse.Namespace) -> None:
    raise UserError(
        "`inatpipe sweep queue` is now `inatpipe sweep run --sampler random --trials N` (the same sweep.yaml; each "
        "trial runs as a DVC experiment straight away); see docs/sweeps.md"
    )


def cmd_sweep_report(args: argparse.Namespace) -> None:
    from inatpipe.sweep.report import write_sweep_report

    report = write_sweep_report(args.out, all_commits=args.all_commits, study=args.study, storage=args.storage)
    print(report.summary())


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    try:
        from inatpipe.sweep.space import SPACE_FILE
        from inatpipe.sweep.study import DEFAULT_DB, DEFAULT_STUDY, PRUNERS, SAMPLERS
    except ImportError as e:  # an install for predictions from ONNX files only (docs/export.md): no Optuna, no PyYAML
        missing = e.name

        def unavailable(args: argparse.Namespace) -> None:
            raise UserError(
                f"`inatpipe sweep` needs {missing}, which is not installed; install inatpipe with its dependencies"
            )

        stub = sub.add_parser("sweep", help=f"hyperparameter search (needs {missing}: not installed)")
        stub.add_argument("rest", nargs=argparse.REMAINDER)
        stub.set_defaults(func=unavailable)
        return

    sweep = sub.add_parser("sweep", help="hyperparameter search (Optuna) as DVC experiments, and its reports")
    commands = sweep.add_subparsers(dest="sweep_command", required=True)
    run = commands.add_parser(
        "run", help="ask an Optuna study for trials and run each as a DVC experiment until N have finished"
    )
    run.add_argument("--trials", type=int, default=20, help="finished trials the study should hold (default: 20)")
    run.add_argument("-j", "--jobs", type=int, default=1, help="trials at a time on this machine (default: 1)")
    run.add_argument("--sampler", default="tpe", help=f"{' | '.join(SAMPLERS)} (default: tpe, Bayesian optimisation)")
    run.add_argument(
        "--pruner", default="median", help=f"{' | '.join(PRUNERS)}: stop hopeless trials early (default: median)"
    )
    run.add_argument(
        "--study",
        default=DEFAULT_STUDY,
        help=f"study name; experiments are NAME-000, NAME-001, ... (default: {DEFAULT_STUDY})",
    )
    run.add_argument(
        "--storage",
        help=f"Optuna storage URL (default: sqlite:///{DEFAULT_DB}); postgresql://... or journal:///path for "
        "workers on several machines",
    )
    run.add_argument("--space", type=Path, default=SPACE_FILE, help=f"search space (default: {SPACE_FILE})")
    run.add_argument("--seed", type=int, help="sampler seed (default: fresh each run; each worker adds its index)")
    run.add_argument(
        "--startup-trials",
        type=int,
        default=5,
        help="finished trials before TPE models the space and the median pruner judges (default: 5)",
    )
    run.add_argument(
        "--heartbeat",
        type=int,
        default=10,
        help="seconds between a running trial's heartbeats; silent for 3x as long, it fails and is retried "
        "(default: 10)",
    )
    run.add_argument(
        "--stage",
        action="append",
        help="what each trial runs (repeatable; default: train_flexible, which the objective reads)",
    )
    run.add_argument(
        "--git-remote", default="origin", help="push each finished experiment here when it exists (default: origin)"
    )
    run.set_defaults(func=cmd_sweep_run)

    queue = commands.add_parser("queue", help="replaced by `sweep run --sampler random` (prints how)")
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
    report.add_argument(
        "--study", help="only this study's trials, with its optimisation history, importances and learning curves"
    )
    report.add_argument("--storage", help="the study's storage URL, as for `sweep run` (default: the SQLite file)")
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
    predict = sub.add_parser("predict", help="top-k classes for image files or folders, from a model file alone")
    predict.add_argument(
        "--model",
        type=Path,
        required=True,
        help=f"{model_help}, or a file exported from one: .onnx (runs on onnxruntime, without torch) or .ts",
    )
    predict.add_argument("inputs", type=Path, nargs="+", help="image files and/or folders (searched recursively)")
    predict.add_argument("--top-k", type=int, default=3, help="classes to show per image (default: 3)")
    predict.add_argument("--csv", type=Path, help="also write the predictions to this CSV file")
    predict.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    predict.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda", "mps"),
        help="for a checkpoint (exported files run on the CPU); default: auto",
    )
    predict.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast of a checkpoint's forward pass, as evaluate.precision (exported files: fp32); default: auto",
    )
    predict.add_argument(
        "--tta",
        default="none",
        choices=("none", "hflip"),  # evaluate.tta's values; importing params would load PyYAML, which .onnx needs not
        help="test-time augmentation, as evaluate.tta: hflip averages each image's and its mirror's probabilities "
        "(default: none)",
    )
    predict.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="plain softmax probabilities, without the temperature stored in the checkpoint",
    )
    predict.set_defaults(func=cmd_predict)

    export = sub.add_parser(
        "export", help="a checkpoint as an ONNX or TorchScript file that carries its classes and normalisation"
    )
    export.add_argument("--model", type=Path, required=True, help=model_help)
    # Checked by the command, not by argparse, so that a wrong value is one line like every other error.
    export.add_argument("--format", default="onnx", help="onnx | torchscript (default: onnx)")
    export.add_argument("--out", type=Path, help="file to write (default: beside the checkpoint, .onnx or .ts)")
    export.add_argument(
        "--exporter",
        default="auto",
        help="ONNX only: auto | torchscript | dynamo, as evaluate.onnx_exporter (docs/export.md); default: auto",
    )
    export.set_defaults(func=cmd_export)

    inspect = sub.add_parser("inspect", help="architecture, per-layer output shapes and parameter counts")
    inspect.add_argument("--model", type=Path, required=True, help=model_help)
    inspect.set_defaults(func=cmd_inspect)

    filters = sub.add_parser("filters", help="first-layer filters as a PNG; guided-backprop maps as an option")
    filters.add_argument("--model", type=Path, required=True, help=model_help)
    filters.add_argument("--out", type=Path, help="PNG to write (default: <model name>_filters.png)")
    filters.add_argument("--guided", type=Path, nargs="+", metavar="IMAGE", help="also draw guided-backprop maps")
    filters.add_argument("--guided-out", type=Path, help="default: <model name>_guided_backprop.png")
    filters.set_defaults(func=cmd_filters)

    lr_find = sub.add_parser(
        "lr-find", help="LR range test on the current params: loss against learning rate, and a suggested peak rate"
    )
    lr_find.add_argument(
        "--model", default="flexible", help="flexible | resnet: whose recipe and model (default: flexible)"
    )
    lr_find.add_argument(
        "--steps",
        type=int,
        help="training batches (default: a quarter of an epoch's, at least 50 and at most 200; fewer when the "
        "loss diverges)",
    )
    lr_find.add_argument("--start", type=float, default=1e-7, help="first learning rate (default: 1e-7)")
    lr_find.add_argument("--end", type=float, default=10.0, help="last learning rate (default: 10)")
    lr_find.add_argument(
        "--out", type=Path, default=Path("reports/lr_find"), help="output folder (default: reports/lr_find)"
    )
    lr_find.set_defaults(func=cmd_lr_find)

    explain = sub.add_parser("explain", help="Grad-CAM overlays: where in each image the predicted class comes from")
    explain.add_argument("--model", type=Path, required=True, help=model_help)
    explain.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="image files and/or folders")
    explain.add_argument(
        "--out", type=Path, default=Path("."), help="folder for <image name>_gradcam.png (default: the current one)"
    )
    explain.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default: auto")
    explain.set_defaults(func=cmd_explain)

    serve = sub.add_parser("serve", help="a web page and JSON API to try the model on your own images")
    serve.add_argument("--model", type=Path, required=True, help=model_help)
    serve.add_argument("--port", type=int, default=8000, help="default: 8000 (0: any free port)")
    serve.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only; 0.0.0.0: all)")
    serve.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="default: auto")
    serve.set_defaults(func=cmd_serve)

    _add_sweep(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args, unknown = p.parse_known_args(argv)
    if unknown and args.func is not cmd_sweep_queue:  # the retired command takes any arguments it used to
        p.parse_args(argv)  # argparse's own error for the unknown ones
    exit_on_user_error(lambda: args.func(args))


if __name__ == "__main__":
    main()
