"""Search strategies side by side on Fashion-MNIST: random search, TPE, and TPE + pruning (successive halving;
median and Hyperband on request), on the same search space with the same number of trials, over several seeds.
Prints each strategy's best validation accuracy and the epochs it trained, and each against random search as ratios.

A stratified subset of Fashion-MNIST's training images (the test set is never used) is written as an
iNaturalist-layout folder and taken into a temporary git + DVC copy of the project (`inatpipe data fetch`, then
`dvc repro stats`). Each trial then runs stage train_flexible's `run(params)` in this process, with sweep.study and
sweep.trial set and the study's storage in the environment: the same training code, per-epoch report to the trial
and pruning decision as a trial of `inatpipe sweep run`, and the same samplers and pruner (`inatpipe.sweep.study`).
What it leaves out is each trial's `dvc exp run` process and its start-up (about 18 s a trial on 2 cores), which
changes no epoch count.

    apt-get install -y dataset-fashion-mnist
    PYTHONPATH=src .venv/bin/python benchmarks/sweep_search.py --train 1000 --strategies random,tpe,tpe+asha
    PYTHONPATH=src .venv/bin/python benchmarks/sweep_search.py --seeds 1 --trials 6 --train 600    # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import yaml
from PIL import Image
from tqdm import tqdm

from inatpipe.errors import ConfigError
from inatpipe.params import parse_params, read_raw
from inatpipe.sweep.run import suggest
from inatpipe.sweep.space import check_space, parse_space, with_overrides
from inatpipe.sweep.study import StudySettings, make_pruner, make_sampler, open_storage
from inatpipe.sweep.trial import PRUNED_AT, STORAGE_ENV
from inatpipe.testing import copy_pipeline, pipeline_env

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import CLASSES, DEBIAN_FILES, idx_file, read_idx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPACE = {
    "parameters": {
        "model.filter_pattern": {"values": ["uniform", "doubling", "halving", "bottleneck"]},
        "model.base_filters": {"values": [8, 16]},  # halving from 32 starts at 256 filters: a minute an epoch
        "model.depth": {"values": [2, 3, 4]},
        "model.kernel_size": {"values": [3, 5]},
        "model.activation": {"values": ["ReLU", "GELU", "SiLU", "Mish"]},
        "model.dropout": {"values": [0.0, 0.2, 0.3]},
        "model.batch_norm": {"values": [True, False]},
        "train.learning_rate": {"min": 1.0e-5, "max": 1.0e-2, "log": True},
    }
}
FIXED = {
    "data.image_size": 28,
    "data.hflip": True,
    "data.rotation": 0.0,
    "data.num_workers": 0,
    "model.num_filters": [32, 64, 128, 256],  # four blocks pool 28 px to 1; the space draws patterns instead
    "model.dense_neurons": 128,
    "train.batch_size": 128,
    "train.scheduler": "cosine",
    "train.warmup_epochs": 0.5,
    # bf16 where the CPU computes it (AVX-512 BF16 or AMX: the figures in docs/benchmarks.md), fp32 where it would be
    # emulated, about 12x slower; epochs and accuracies are what the comparison counts, not minutes.
    "train.precision": "auto",
}
STRATEGIES = {
    # name: (sampler, pruner)
    "random": ("random", "none"),
    "tpe": ("tpe", "none"),
    "tpe+median": ("tpe", "median"),
    "tpe+asha": ("tpe", "asha"),
    "tpe+hyperband": ("tpe", "hyperband"),
}


def build_subset(source: Path, out: Path, n: int, seed: int) -> None:
    """out/train/<class>/ with `n` training images, the same share of each class; out/val/<class>/ (the project's
    test folder) with one image per class, never read here."""
    images = read_idx(idx_file(source, "train-images-idx3-ubyte"))
    labels = read_idx(idx_file(source, "train-labels-idx1-ubyte"))
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        picked = rng.permutation(np.flatnonzero(labels == k))[: n // len(CLASSES) + 1]
        for subset, indices in (("train", picked[:-1]), ("val", picked[-1:])):
            (out / subset / name).mkdir(parents=True, exist_ok=True)
            for i in indices:
                Image.fromarray(images[i], "L").save(out / subset / name / f"{i:05d}.png")


def load_stage(project: Path):
    spec = importlib.util.spec_from_file_location("train_flexible", project / "stages" / "train_flexible.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_study(
    name: str, sampler: str, pruner: str, seed: int, args: argparse.Namespace, url: str, base: dict, stage
) -> dict:
    """One study of `args.trials` finished trials; returns its best validation accuracy and epochs trained."""
    trials, startup, epochs = args.trials, args.startup_trials, args.epochs
    space = parse_space(SPACE)
    storage = open_storage(url)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=make_sampler(sampler, seed, startup),
        pruner=make_pruner(pruner, startup, epochs),
    )
    for key, value in StudySettings(SPACE["parameters"], sampler, pruner, startup, epochs).as_attrs().items():
        study.set_user_attr(key, value)
    done = rejected = 0
    with tqdm(total=trials, desc=name, unit="trial", leave=False) as bar:
        while done < trials:
            trial = study.ask()
            config = suggest(trial, space)
            try:
                params = parse_params(
                    with_overrides(base, {**config, "sweep.study": name, "sweep.trial": trial.number})
                )
            except ConfigError as e:  # a combination params.yaml rejects (too deep a stack): no run, not counted
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                rejected += 1
                if rejected > 100 * trials:
                    sys.exit(f"error: params.yaml rejects every configuration drawn: {e}")
                continue
            with contextlib.redirect_stdout(io.StringIO()):
                stage.run(params)
            frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
            if PRUNED_AT in frozen.user_attrs:
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, max(frozen.intermediate_values.values()))
            done += 1
            bar.update()
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    best = max(max(t.intermediate_values.values()) for t in finished if t.intermediate_values)
    return {
        "best": best,
        "epochs": sum(len(t.intermediate_values) for t in finished),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in finished),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEBIAN_FILES, help="folder with the idx files")
    parser.add_argument("--seeds", type=int, default=3, help="sampler seeds per strategy (default: 3)")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="the first of them (default: 0); to confirm a choice on fresh seeds"
    )
    parser.add_argument("--trials", type=int, default=12, help="finished trials per study (default: 12)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of a trial that is not pruned (default: 6)")
    parser.add_argument("--startup-trials", type=int, default=3, help="as `sweep run --startup-trials` (default: 3)")
    parser.add_argument("--train", type=int, default=1500, help="images taken from the training set (default: 1500)")
    parser.add_argument("--val-fraction", type=float, default=0.4, help="their share held out for validation")
    parser.add_argument(
        "--strategies",
        default="random,tpe,tpe+asha,tpe+hyperband",
        help=f"comma-separated, of {', '.join(STRATEGIES)}; the last is compared with the first",
    )
    args = parser.parse_args()
    strategies = {name: STRATEGIES[name] for name in args.strategies.split(",")}
    fixed = {**FIXED, "train.epochs": args.epochs, "data.val_fraction": args.val_fraction}

    work = Path(tempfile.mkdtemp(prefix="sweep_search_"))
    project = work / "project"
    env = pipeline_env(project)
    try:
        build_subset(args.source, work / "fmnist", args.train, seed=0)
        copy_pipeline(ROOT, project, user="bench")
        # The fixed settings in params.yaml, so that split, prepare and stats run at the images' own 28 px.
        base = with_overrides(read_raw(project / "params.yaml"), fixed)
        (project / "params.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
        for cmd in (
            [sys.executable, "-m", "inatpipe.cli", "data", "fetch", str(work / "fmnist")],
            [sys.executable, "-m", "dvc", "repro", "-q", "stats"],
            ["git", "add", "-A"],
            ["git", "commit", "-qm", "Fashion-MNIST subset, its split, prepared images and statistics"],
        ):
            result = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"error: {' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        check_space(parse_space(SPACE), base)
        url = f"sqlite:///{work / 'studies.db'}"
        os.environ[STORAGE_ENV] = url  # how each trial's training run finds its study, as under `sweep run`
        os.chdir(project)
        stage = load_stage(project)
        results: dict[str, list[dict]] = {name: [] for name in strategies}
        start = time.perf_counter()
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for name, (sampler, pruner) in strategies.items():
                study = f"{name.replace('+', '-')}-{seed}"  # a study name is letters, digits, '-', '_', '.'
                r = run_study(study, sampler, pruner, seed, args, url, base, stage)
                results[name].append(r)
                print(
                    f"seed {seed} {name:<11} best val acc {r['best']:.4f}  epochs {r['epochs']:4d}  "
                    f"pruned {r['pruned']:2d}",
                    flush=True,
                )
        minutes = (time.perf_counter() - start) / 60
    finally:
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)

    n_val = round(args.train * args.val_fraction)
    print(
        f"\ncores: {os.cpu_count()}   Fashion-MNIST subset: {args.train} training images ({n_val} held out for "
        f"validation), {args.trials} trials of at most {args.epochs} epochs per study "
        f"({args.startup_trials} startup trials), seeds {args.first_seed}-{args.first_seed + args.seeds - 1}, "
        f"{minutes:.1f} minutes in all"
    )
    print(f"{'strategy':<14} {'best val acc (mean)':>19} {'per seed':>26} {'epochs (mean)':>13} {'pruned':>7}")
    for name, rs in results.items():
        per_seed = " ".join(f"{r['best']:.4f}" for r in rs)
        print(
            f"{name:<14} {np.mean([r['best'] for r in rs]):19.4f} {per_seed:>26} "
            f"{np.mean([r['epochs'] for r in rs]):13.1f} {np.mean([r['pruned'] for r in rs]):7.1f}"
        )
    first = next(iter(results))  # the baseline the others are compared with
    for name in [n for n in results if n != first]:
        gap = np.mean([r["best"] for r in results[name]]) - np.mean([r["best"] for r in results[first]])
        ratio = np.mean([r["epochs"] for r in results[name]]) / np.mean([r["epochs"] for r in results[first]])
        print(f"{name} vs {first}: best val acc {100 * gap:+.2f} points, epochs x{ratio:.2f}")


if __name__ == "__main__":
    main()
