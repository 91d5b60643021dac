"""Interrupted training runs resume: resume states on disk, and a real `dvc repro` killed with SIGKILL and rerun."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from inatpipe.dvc_cli import stage_spec
from inatpipe.params import read_raw
from inatpipe.training.loop import EpochMetrics
from inatpipe.training.recipe import Progress
from inatpipe.training.resume import CONTENT_LIMIT, Resumable, ResumeRun, capture_rng, fingerprint, restore_rng

from . import stages
from .conftest import write_dataset
from .project import Project, new_project
from .stages import folder_project, inside, saved_epoch, wait_for_saved_epoch

pytestmark = pytest.mark.xdist_group("resume")  # its costly fixtures are built once, on one worker

CPU = torch.device("cpu")
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


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_fingerprint_is_exactly_what_dvc_yaml_declares(tmp_path: Path):
    """A train_flexible state matches its stage's params, source files and data in dvc.yaml: an edit anywhere
    else (the sweep report, an evaluation setting) keeps it; an edit to anything it declares discards it."""
    root = folder_project(tmp_path / "project", {})
    for name, text in (("split/classes.json", '["a", "b"]'), ("stats.json", "{}"), ("prepared/meta.json", "{}")):
        (root / "artifacts" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "artifacts" / name).write_text(text)
    big = root / "artifacts" / "prepared" / "train.npy"
    big.write_bytes(b"\0" * (CONTENT_LIMIT + 1))  # too large to hash: by size and modification time
    state = Resumable(root / ".resume" / "train_flexible.pt", "train_flexible")

    def changed(change, *args) -> set[str]:
        with inside(root):
            before = fingerprint(state, CPU)
            change(*args)
            after = fingerprint(state, CPU)
        return {key for key in before if before[key] != after[key]}

    assert changed(lambda: None) == set()
    assert changed(edit, root / "src/inatpipe/sweep/report.py", '"""', '"""Edited. ') == set()
    assert changed(edit, root / "src/inatpipe/evaluation/figures.py", '"""', '"""Edited. ') == set()
    params = Project(root).set_params
    assert changed(params, {"evaluate": {"batch_size": 100}, "resnet": {"epochs": 2}}) == set()
    assert changed(params, {"train": {"learning_rate": 3.0e-3}}) == {"params"}
    assert changed(params, {"model": {"kernel_size": 5}}) == {"params"}
    assert changed(edit, root / "src/inatpipe/training/loop.py", '"""', '"""Edited. ') == {"code"}
    assert changed(edit, root / "src/inatpipe/models/flexible_cnn.py", '"""', '"""Edited. ') == {"code"}
    assert changed(edit, root / "stages/train_flexible.py", '"""', '"""Edited. ') == {"code"}
    assert changed(edit, root / "artifacts/stats.json", "{}", '{"mean": 1}') == {"data"}
    assert changed(lambda: os.utime(big, ns=(big.stat().st_atime_ns, big.stat().st_mtime_ns + 10**9))) == {"data"}
    with inside(root):
        assert fingerprint(state, torch.device("meta"))["params"] != fingerprint(state, CPU)["params"]


# Interrupted runs. The real thing once: `dvc repro` of train_flexible killed with SIGKILL mid-run, then rerun. The
# others stop in this process right after a resume state is written, which is where a kill leaves a run.

EPOCHS = 8
PARAMS = {
    # One loader worker: each epoch then starts fresh worker processes, whose seeds must come out the same too;
    # there they draw crops, a policy's operations and erased boxes.
    "data": {"image_size": 16, "num_workers": 1, "policy": "trivialaugment", "random_erasing": 0.25},
    "model": {"num_filters": [8, 16], "dense_neurons": 32},
    # A rate this high makes validation jumpy: the best epoch comes early, and the kill is placed after it, so the
    # resumed run must rewrite the best checkpoint from the weights the resume state kept, not the current ones.
    # Mixing draws in the training process, and the weight average carries state from step to step.
    "train": {"epochs": EPOCHS, "batch_size": 8, "learning_rate": 1.0e-1, "mixup": 0.2, "cutmix": 1.0, "ema": 0.5},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Project:
    """A git + DVC project whose split, prepare and stats stages have run: only train_flexible is left to run."""
    p = new_project(tmp_path_factory.mktemp("resume"), PARAMS, train_per_class=12, test_per_class=4, size=16)
    for stage in ("split", "prepare", "stats"):
        stages.run(p.root, stage)
    p.dvc("commit", "--force", "--with-deps", "stats")  # record them in dvc.lock, as `dvc repro stats` would
    p.git("add", "-A")
    p.git("commit", "-qm", "split, prepare and stats")
    return p


def copy_of(p: Project, root: Path) -> Project:
    shutil.copytree(p.root, root, symlinks=True)
    return Project(root)


def kill_after_epoch(p: Project, epoch: int, epochs: int = EPOCHS) -> int:
    """Start `dvc repro train_flexible`, SIGKILL it (DVC and the stage) once a resume state for `epoch` or later is
    saved; returns that epoch."""
    with (p.root / "killed.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro", "train_flexible"],
            cwd=p.root,
            env=p.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the kill reaches the stage's processes too
        )
        saved = wait_for_saved_epoch(p.root / STATE, epoch, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert epoch <= saved < epochs, (
        f"the run was not caught mid-way (saved epoch {saved}):\n" + (p.root / "killed.log").read_text()
    )
    return saved


class Stopped(BaseException):
    """Ends a run in this process the moment a resume state is written, as a kill then would: nothing after runs."""


def run_stopped_after(root: Path, stage: str, epoch: int, monkeypatch) -> None:
    """Run `stage` in this process and stop it right after it saved the resume state of `epoch`."""
    original = ResumeRun.save

    def save_then_stop(self, model, best_model, progress, history, elapsed_seconds):
        original(self, model, best_model, progress, history, elapsed_seconds)
        if progress.last_epoch >= epoch:
            raise Stopped

    with monkeypatch.context() as m:
        m.setattr(ResumeRun, "save", save_then_stop)
        with pytest.raises(Stopped):
            stages.run(root, stage)


def rerun_as_dvc_does(root: Path, stage: str, capsys) -> str:
    """Delete the stage's outputs (as DVC does before rerunning a stage), run it; returns what it printed."""
    spec = stage_spec(stage, read_raw(root / "params.yaml"), root / "dvc.yaml")
    for kind in ("outs", "metrics", "plots"):
        for entry in spec.get(kind) or []:
            out = root / (next(iter(entry)) if isinstance(entry, dict) else entry)
            shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)
    capsys.readouterr()
    stages.run(root, stage)
    return capsys.readouterr().out


def results(root: Path, model: str = "flexible") -> tuple[dict, dict[str, str], dict]:
    metrics = json.loads((root / f"metrics/train_{model}/metrics.json").read_text())
    metrics.pop("train_seconds")
    plots = root / f"metrics/train_{model}/plots"
    curves = {f.relative_to(plots).as_posix(): f.read_text() for f in sorted(plots.rglob("*.tsv"))}
    ckpt = torch.load(root / f"models/{model}.pt", map_location="cpu", weights_only=True)
    return metrics, curves, ckpt


def assert_same_run(root: Path, reference: Path, model: str, epochs: int) -> None:
    """The resumed run ended as the uninterrupted one: metrics, curves, checkpoint tensor for tensor."""
    metrics, curves, ckpt = results(root, model)
    ref_metrics, ref_curves, ref_ckpt = results(reference, model)
    assert metrics == ref_metrics and metrics["stop"]["epoch"] == epochs
    assert len(curves) == 5 and curves == ref_curves
    steps = [int(line.split("\t")[0]) for line in curves["metrics/val/accuracy.tsv"].splitlines()[1:]]
    assert steps == list(range(1, epochs + 1))
    state, ref_state = ckpt.pop("state_dict"), ref_ckpt.pop("state_dict")
    assert ckpt == ref_ckpt
    # The temperature is fitted once the run ends, on the best weights: the resumed run fitted and stored it too.
    assert ckpt["temperature"] == metrics["calibration"]["temperature"] != 1.0
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(prepared: Project, tmp_path: Path):
    reference = copy_of(prepared, tmp_path / "reference")
    stages.run(reference.root, "train_flexible")  # uninterrupted, in this process: what dvc repro would run
    assert not (reference.root / STATE).exists()

    best = results(reference.root)[2]["extra"]["epoch"]
    assert best + 1 < EPOCHS, f"best epoch {best} leaves no room for a kill after it: retune PARAMS"
    p = copy_of(prepared, tmp_path / "killed")
    killed_at = kill_after_epoch(p, best + 1)
    # DVC's lock names the killed process; DVC finds it gone and clears the lock itself, so a plain rerun works.
    out = p.dvc("repro", "train_flexible").stdout
    resumed_from = int(out.split("resuming from epoch ")[1].split()[0])
    assert killed_at <= resumed_from < EPOCHS
    assert f"epoch {resumed_from}/{EPOCHS} " not in out and f"epoch {resumed_from + 1}/{EPOCHS} " in out
    assert not (p.root / STATE).exists()
    assert_same_run(p.root, reference.root, "flexible", EPOCHS)
    assert results(p.root)[2]["extra"]["epoch"] < killed_at  # the best epoch's weights came from the state


@pytest.mark.slow
def test_a_state_from_other_params_is_discarded_and_training_starts_over(
    prepared: Project, tmp_path: Path, monkeypatch, capsys
):
    p = copy_of(prepared, tmp_path / "project")
    run_stopped_after(p.root, "train_flexible", 1, monkeypatch)
    assert saved_epoch(p.root / STATE) == 1
    p.set_params({"train": {"learning_rate": 1.0e-2}})
    out = rerun_as_dvc_does(p.root, "train_flexible", capsys)
    assert f"discarding the resume state {STATE}: params changed since epoch 1 was saved" in out
    assert "resuming" not in out and f"epoch 1/{EPOCHS} " in out
    assert not (p.root / STATE).exists()
    assert json.loads((p.root / "metrics/train_flexible/metrics.json").read_text())["stop"]["epoch"] == EPOCHS


# train_resnet the same way: staged fine-tuning on images (stopped in or after the switch), the head on features.

RESNET_PARAMS = {
    "data": {"image_size": 32, "augment": False, "num_workers": 0},
    "resnet": {"arch": "resnet18", "epochs": 8, "batch_size": 8, "learning_rate": 1.0e-2, "warmup_epochs": 0.0},
}
# The head on features (the fixture's params) takes an instant per epoch: 8 epochs leave room to stop it mid-way.
# Staged epochs run the backbone; augmented, as by default, so the resumed run must draw the same random crops.
RESNET_RUNS = {
    "head": {},
    "staged": {
        "resnet": {
            "strategy": "staged",
            "unfreeze": 1,
            "head_epochs": 1,
            "epochs": 3,
            "batch_size": 16,
            "mixup": 0.2,
            "cutmix": 1.0,
            "ema": 0.9,
        },
        "data": {"augment": True, "policy": "randaugment", "random_erasing": 0.5},
    },
}


@pytest.fixture(scope="module")
def resnet_prepared(tmp_path_factory) -> Path:
    """A project with resnet18 weights from a file, whose stages up to features have run (strategy head)."""
    root = tmp_path_factory.mktemp("resume_resnet")
    weights = root / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    params = {**RESNET_PARAMS, "resnet": {**RESNET_PARAMS["resnet"], "weights": str(weights)}}
    project = folder_project(root / "project", params)
    write_dataset(project / "data", train_per_class=12, test_per_class=4, size=16)
    for stage in ("split", "prepare", "stats", "features"):
        stages.run(project, stage)
    return project


@pytest.mark.slow
@pytest.mark.parametrize("strategy", RESNET_RUNS)
def test_a_stopped_resnet_run_resumes_and_ends_as_an_uninterrupted_one(
    resnet_prepared: Path, tmp_path: Path, strategy: str, monkeypatch, capsys
):
    base = tmp_path / "base"
    shutil.copytree(resnet_prepared, base)
    if RESNET_RUNS[strategy]:
        Project(base).set_params(RESNET_RUNS[strategy])
        stages.run(base, "features")  # a note that the backbone runs every epoch
    epochs = {**RESNET_PARAMS["resnet"], **RESNET_RUNS[strategy].get("resnet", {})}["epochs"]
    reference, root = tmp_path / "reference", tmp_path / "stopped"
    shutil.copytree(base, reference)
    shutil.copytree(base, root)
    capsys.readouterr()
    stages.run(reference, "train_resnet")
    out = capsys.readouterr().out
    assert "resuming" not in out and not (reference / RESNET_STATE).exists()
    assert ("cached backbone features from artifacts/features/backbone.pt" in out) == (strategy == "head")

    run_stopped_after(root, "train_resnet", 1, monkeypatch)
    out = rerun_as_dvc_does(root, "train_resnet", capsys)
    resumed_from = int(out.split("resuming from epoch ")[1].split()[0])
    assert resumed_from == 1
    assert f"epoch {resumed_from}/{epochs} " not in out and f"epoch {resumed_from + 1}/{epochs} " in out
    assert not (root / RESNET_STATE).exists()
    assert_same_run(root, reference, "resnet", epochs)
    assert results(root, "resnet")[0]["strategy"] == strategy
