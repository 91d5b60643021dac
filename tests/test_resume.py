"""Interrupted training runs resume: resume states on disk, and a real `dvc repro` killed with SIGKILL and rerun."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from inatpipe.recipe import Progress
from inatpipe.resume import (
    Resumable,
    ResumeRun,
    capture_rng,
    fingerprint,
    restore_rng,
)
from inatpipe.training import EpochMetrics

from .project import Project, new_project

STATE = Path(".resume/train_flexible.pt")
RESNET_STATE = Path(".resume/train_resnet.pt")


def draws(generator: torch.Generator) -> list:
    return [
        random.random(),
        np.random.rand(3).tolist(),
        torch.rand(3).tolist(),
        torch.randperm(10, generator=generator).tolist(),
    ]


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path):
    generator = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    draws(generator)  # not at a seed's start, where a broken restore could still match by luck
    torch.save(capture_rng(generator), tmp_path / "rng.pt")
    expected = draws(generator)
    assert draws(generator) != expected
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True), torch.Generator())  # a different generator...
    assert draws(generator)[:3] == expected[:3]
    restored = torch.Generator()
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True), restored)
    assert draws(restored) == expected  # ...gets the saved loader state


def small_run(path: Path, fp: dict[str, str]) -> tuple[ResumeRun, nn.Module]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)  # doubles after every good step
    return ResumeRun.begin(path, fp, model, optimizer, scheduler, scaler, torch.Generator().manual_seed(0)), model


def train_a_step(run: ResumeRun, model: nn.Module) -> None:
    run.optimizer.zero_grad()
    loss = model(torch.randn(5, 4)).square().mean()
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()


FP = {"params": "p", "code": "c", "data": "d"}


def saved_state(path: Path) -> tuple[ResumeRun, nn.Module]:
    run, model = small_run(path, FP)
    assert run.start is None and run.start_epoch == 0
    train_a_step(run, model)
    progress = Progress(epochs=5)
    metrics = EpochMetrics(1, 1.0, 0.5, 1.1, 0.4, 0.1, 1e-2)
    progress.update(metrics)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    train_a_step(run, model)
    progress.update(EpochMetrics(2, 0.9, 0.5, 1.2, 0.3, 0.1, 5e-3))
    run.save(model, best, progress, [metrics], elapsed_seconds=2.5)
    return run, model


def test_a_saved_run_restores_model_optimizer_schedule_and_progress(tmp_path: Path):
    path = tmp_path / ".resume" / "train_x.pt"
    run, model = saved_state(path)
    resumed, fresh = small_run(path, FP)
    assert resumed.start is not None and resumed.start_epoch == 2
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.scheduler.state_dict() == run.scheduler.state_dict()
    assert resumed.scaler.get_scale() == run.scaler.get_scale() == 2.0**12
    assert resumed.optimizer.param_groups[0]["lr"] == run.optimizer.param_groups[0]["lr"]
    assert resumed.start.progress.best_epoch == 1 and resumed.start.progress.epochs_without_improvement == 1
    assert resumed.start.history == [EpochMetrics(1, 1.0, 0.5, 1.1, 0.4, 0.1, 1e-2)]
    assert resumed.start.elapsed_seconds == 2.5
    assert not torch.equal(resumed.start.best_model["0.weight"], fresh.state_dict()["0.weight"])
    # The next step of both runs is the same: optimizer moments and schedule came back too.
    torch.manual_seed(5)
    train_a_step(run, model)
    torch.manual_seed(5)
    train_a_step(resumed, fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    (path.parent / f".{path.name}.999.tmp").write_bytes(b"half")  # left by a run killed while writing
    resumed.finish()
    assert not path.exists() and not path.parent.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_state_is_discarded_with_one_line(tmp_path: Path, capsys, damage: str):
    path = tmp_path / "train_x.pt"
    saved_state(path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a state", "empty": b""}[damage])
    capsys.readouterr()
    run, _ = small_run(path, FP)
    out = capsys.readouterr().out.strip()
    assert run.start is None and not path.exists()
    assert out.count("\n") == 0 and "discarding the resume state" in out and "not a readable resume state" in out
    assert "training from epoch 1" in out


@pytest.mark.parametrize("changed", [["params"], ["code"], ["data"], ["params", "data"]])
def test_a_state_from_other_params_code_or_data_is_discarded_saying_which(tmp_path: Path, capsys, changed):
    path = tmp_path / "train_x.pt"
    saved_state(path)
    capsys.readouterr()
    run, _ = small_run(path, {**FP, **{key: "other" for key in changed}})
    out = capsys.readouterr().out
    assert run.start is None and not path.exists()
    assert f"{' and '.join(changed)} changed since epoch 2 was saved" in out


def test_fingerprint_follows_params_code_and_data(tmp_path: Path):
    stage = tmp_path / "stage.py"
    stage.write_text("print('stage')\n")
    index, image = tmp_path / "train.csv", tmp_path / "a.png"
    index.write_text("path,label\na.png,cat\n")
    image.write_bytes(b"png")
    base = Resumable(tmp_path / "s.pt", {"train": {"learning_rate": 0.1}}, stage)
    cpu = torch.device("cpu")

    def fp(resumable: Resumable = base) -> dict[str, str]:
        return fingerprint(resumable, cpu, [index], [str(image)])

    first = fp()
    assert fp() == first
    assert fp(Resumable(base.path, {"train": {"learning_rate": 0.2}}, stage))["params"] != first["params"]
    assert fingerprint(base, torch.device("meta"), [index], [str(image)])["params"] != first["params"]
    stage.write_text("print('changed')\n")
    assert fp()["code"] != first["code"]
    stage.write_text("print('stage')\n")
    image.write_bytes(b"png, rewritten")
    assert fp()["data"] != first["data"]
    assert {key for key in first if fp()[key] != first[key]} == {"data"}


# The real thing: `dvc repro` of train_flexible killed with SIGKILL mid-run, then rerun.

EPOCHS = 8
PARAMS = {
    # One loader worker: each epoch then starts fresh worker processes, whose seeds must come out the same too.
    "data": {"image_size": 16, "num_workers": 1},
    "model": {"num_filters": [8, 16], "dense_neurons": 32},
    # A rate this high makes validation jumpy: the best epoch comes early, and the kill is placed after it, so the
    # resumed run must rewrite the best checkpoint from the weights the resume state kept, not the current ones.
    "train": {"epochs": EPOCHS, "batch_size": 8, "learning_rate": 1.0e-1},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Project:
    """A project whose split and stats stages have run: only train_flexible is left to run."""
    p = new_project(tmp_path_factory.mktemp("resume"), PARAMS, train_per_class=12, test_per_class=4, size=16)
    p.dvc("repro", "stats")
    p.git("add", "-A")
    p.git("commit", "-qm", "split and stats")
    return p


def copy_of(p: Project, root: Path) -> Project:
    shutil.copytree(p.root, root, symlinks=True)
    return Project(root)


def saved_epoch(p: Project, state: Path = STATE) -> int:
    try:  # mmap: the epoch without reading a ResNet's weights
        return torch.load(p.root / state, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except Exception:  # not written yet; written atomically, so never half-read
        return 0


def kill_after_epoch(p: Project, epoch: int, *cmd: str, model: str = "flexible", epochs: int = EPOCHS) -> int:
    """Start `cmd` (`dvc repro train_<model>`), SIGKILL it (DVC and the stage) once a resume state for `epoch` or
    later is saved; returns that epoch."""
    state = Path(f".resume/train_{model}.pt")
    with (p.root / "killed.log").open("w") as log:
        proc = subprocess.Popen(
            cmd or [sys.executable, "-m", "dvc", "repro", f"train_{model}"],
            cwd=p.root,
            env=p.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches the stage's processes too
        )
        deadline = time.monotonic() + 120
        while (saved := saved_epoch(p, state)) < epoch and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert epoch <= saved < epochs, (
        f"the run was not caught mid-way (saved epoch {saved}):\n" + (p.root / "killed.log").read_text()
    )
    return saved


def results(p: Project, model: str = "flexible") -> tuple[dict, dict[str, str], dict]:
    metrics = p.json(f"metrics/train_{model}/metrics.json")
    metrics.pop("train_seconds")
    plots = p.root / f"metrics/train_{model}/plots"
    curves = {f.relative_to(plots).as_posix(): f.read_text() for f in sorted(plots.rglob("*.tsv"))}
    ckpt = torch.load(p.root / f"models/{model}.pt", map_location="cpu", weights_only=True)
    return metrics, curves, ckpt


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(prepared: Project, tmp_path: Path):
    reference = copy_of(prepared, tmp_path / "reference")
    out = reference.dvc("repro", "train_flexible").stdout
    assert "resuming" not in out and not (reference.root / STATE).exists()
    ref_metrics, ref_curves, ref_ckpt = results(reference)

    best = ref_ckpt["extra"]["epoch"]
    assert best + 1 < EPOCHS, f"best epoch {best} leaves no room for a kill after it: retune PARAMS"
    p = copy_of(prepared, tmp_path / "killed")
    killed_at = kill_after_epoch(p, best + 1)
    # DVC's lock names the killed process; DVC finds it gone and clears the lock itself, so a plain rerun works.
    out = p.dvc("repro", "train_flexible").stdout
    resumed_from = int(out.split("resuming from epoch ")[1].split()[0])
    assert killed_at <= resumed_from < EPOCHS
    assert f"epoch {resumed_from}/{EPOCHS} " not in out and f"epoch {resumed_from + 1}/{EPOCHS} " in out
    assert not (p.root / STATE).exists()

    metrics, curves, ckpt = results(p)
    assert metrics == ref_metrics
    assert len(curves) == 5 and curves == ref_curves
    steps = [int(line.split("\t")[0]) for line in curves["metrics/val/accuracy.tsv"].splitlines()[1:]]
    assert steps == list(range(1, EPOCHS + 1))
    state, ref_state = ckpt.pop("state_dict"), ref_ckpt.pop("state_dict")
    assert ckpt == ref_ckpt and ckpt["extra"]["epoch"] < killed_at
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)


@pytest.mark.slow
def test_a_state_from_other_params_is_discarded_and_training_starts_over(prepared: Project, tmp_path: Path):
    p = copy_of(prepared, tmp_path / "project")
    kill_after_epoch(p, 1, sys.executable, "stages/train_flexible.py")  # without DVC: quicker, the same state
    p.set_params({"train": {"learning_rate": 1.0e-2}})
    out = p.dvc("repro", "train_flexible").stdout
    assert f"discarding the resume state {STATE}: params changed since epoch" in out
    assert "resuming" not in out and f"epoch 1/{EPOCHS} " in out
    assert not (p.root / STATE).exists()
    assert p.json("metrics/train_flexible/metrics.json")["stop"]["epoch"] == EPOCHS


# train_resnet the same way: staged fine-tuning on images (killed in or after the switch), the head on features.

RESNET_PARAMS = {
    "data": {"image_size": 32, "augment": False, "num_workers": 0},
    "resnet": {"arch": "resnet18", "epochs": 8, "batch_size": 8, "learning_rate": 1.0e-2, "warmup_epochs": 0.0},
}
# The head on features (the fixture's params) takes an instant per epoch: 8 epochs leave time to kill it mid-way.
# Staged epochs run the backbone; augmented, as by default, so the resumed run must draw the same random crops.
RESNET_RUNS = {
    "head": {},
    "staged": {
        "resnet": {"strategy": "staged", "unfreeze": 1, "head_epochs": 1, "epochs": 3, "batch_size": 16},
        "data": {"augment": True},
    },
}


@pytest.fixture(scope="module")
def resnet_prepared(tmp_path_factory) -> Project:
    """A project with resnet18 weights from a file, whose stages up to features have run (strategy head)."""
    root = tmp_path_factory.mktemp("resume_resnet")
    weights = root / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    params = {**RESNET_PARAMS, "resnet": {**RESNET_PARAMS["resnet"], "weights": str(weights)}}
    p = new_project(root / "project", params, train_per_class=12, test_per_class=4, size=16)
    p.dvc("repro", "features")
    p.git("add", "-A")
    p.git("commit", "-qm", "split, prepare, stats and features")
    return p


@pytest.mark.slow
@pytest.mark.parametrize("strategy", RESNET_RUNS)
def test_a_killed_resnet_run_resumes_and_ends_as_an_uninterrupted_one(
    resnet_prepared: Project, tmp_path: Path, strategy: str
):
    base = copy_of(resnet_prepared, tmp_path / "base")
    if RESNET_RUNS[strategy]:
        base.set_params(RESNET_RUNS[strategy])
        base.dvc("repro", "features")  # a note that the backbone runs every epoch
    epochs = {**RESNET_PARAMS["resnet"], **RESNET_RUNS[strategy].get("resnet", {})}["epochs"]
    reference, p = copy_of(base, tmp_path / "reference"), copy_of(base, tmp_path / "killed")
    out = reference.run(sys.executable, "stages/train_resnet.py").stdout  # what dvc repro runs, a little quicker
    assert "resuming" not in out and not (reference.root / RESNET_STATE).exists()
    assert ("cached backbone features from artifacts/features/backbone.pt" in out) == (strategy == "head")
    ref_metrics, ref_curves, ref_ckpt = results(reference, "resnet")

    # Killed without DVC (quicker, the same state; the flexible test kills DVC too), resumed by dvc repro, which
    # deletes the outputs the resumed run must then rewrite.
    killed_at = kill_after_epoch(p, 1, sys.executable, "stages/train_resnet.py", model="resnet", epochs=epochs)
    if strategy == "head":  # the cached features are part of the data a state must match
        other = copy_of(p, tmp_path / "other_features")
        features = other.root / "artifacts/features/backbone.pt"
        os.utime(features, ns=(features.stat().st_atime_ns, features.stat().st_mtime_ns + 10**9))
        out = other.run(sys.executable, "stages/train_resnet.py").stdout
        assert f"discarding the resume state {RESNET_STATE}: data changed since epoch" in out
        assert "resuming" not in out and f"epoch 1/{epochs} " in out
    out = p.dvc("repro", "train_resnet").stdout
    resumed_from = int(out.split("resuming from epoch ")[1].split()[0])
    assert killed_at <= resumed_from < epochs
    assert f"epoch {resumed_from}/{epochs} " not in out and f"epoch {resumed_from + 1}/{epochs} " in out
    assert not (p.root / RESNET_STATE).exists()

    metrics, curves, ckpt = results(p, "resnet")
    assert metrics == ref_metrics and metrics["strategy"] == strategy and metrics["stop"]["epoch"] == epochs
    assert len(curves) == 5 and curves == ref_curves
    state, ref_state = ckpt.pop("state_dict"), ref_ckpt.pop("state_dict")
    assert ckpt == ref_ckpt
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
