"""Training under torchrun: the shards of a batch; two CPU processes (gloo) train the model one process trains and
write its outputs once; killed mid-run and resumed, they end as the uninterrupted two-process run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inatpipe.checkpoint import load_checkpoint
from inatpipe.training import distributed
from inatpipe.training.distributed import Shard, ShardedBatches

from . import stages
from .conftest import write_dataset
from .processes import descendants
from .stages import folder_project, wait_for_saved_epoch

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("torchrun")]  # its fixtures: built once, on one worker

EPOCHS = 10
PARAMS = {
    "device": "cpu",
    "data": {"image_size": 16, "augment": False, "num_workers": 0},
    # No batch norm and no dropout: then only the gradient averaging differs from one process, and that is exact.
    "model": {"num_filters": [8, 16], "dense_neurons": 32, "batch_norm": False, "dropout": 0.0},
    # fp32: bf16 would round differently on half batches, and the comparison below is to 1e-5.
    "train": {
        "epochs": EPOCHS,
        "batch_size": 8,
        "scheduler": "constant",
        "warmup_epochs": 0.0,
        "learning_rate": 3.0e-3,
        "precision": "fp32",
    },
}
STATE = Path(".resume/train_flexible.pt")


@pytest.mark.parametrize(("size", "batch", "ranks"), [(29, 8, 2), (40, 8, 4), (17, 4, 2)])
def test_shards_are_disjoint_and_together_make_the_one_process_batch(size: int, batch: int, ranks: int):
    for epoch in (1, 2):
        whole = ShardedBatches(size, batch, seed=5, epoch=epoch, place=(0, 1))
        shards = [ShardedBatches(size, batch, seed=5, epoch=epoch, place=(r, ranks)) for r in range(ranks)]
        per_rank = [list(s) for s in shards]
        assert all(len(batches) == len(whole) == size // batch for batches in per_rank)  # equal steps on every rank
        for b, one in enumerate(whole):
            parts = [batches[b] for batches in per_rank]
            assert all(len(part) == batch // ranks for part in parts)
            assert [i for part in parts for i in part] == one  # rank by rank, the one-process batch
        seen = [i for batches in per_rank for part in batches for i in part]
        assert len(seen) == len(set(seen))  # no image twice in an epoch, on any rank
    assert list(ShardedBatches(size, batch, 5, epoch=1, place=(0, 1))) != list(
        ShardedBatches(size, batch, 5, 2, place=(0, 1))
    )
    evaluation = [list(Shard(size, place=(r, ranks))) for r in range(ranks)]
    assert sorted(i for shard in evaluation for i in shard) == list(range(size))


def torchrun(root: Path, procs: int = 2, **popen) -> subprocess.Popen | str:
    """`torchrun --nproc_per_node=<procs> stages/train_flexible.py` in `root`; its output, or the process when
    `popen` is given (to kill it)."""
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd.append("stages/train_flexible.py")
    if popen:
        return subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True, **popen)
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def in_a_group_of_one(root: Path, monkeypatch) -> None:
    """train_flexible in this process, as torchrun runs it with --nproc_per_node=1: a gloo group of one process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with monkeypatch.context() as m:
        for key, value in env.items():
            m.setenv(key, value)
        try:
            stages.run(root, "train_flexible")
        finally:
            distributed.leave()


def outputs(root: Path) -> tuple[dict, dict[str, str], dict[str, torch.Tensor]]:
    metrics = json.loads((root / "metrics/train_flexible/metrics.json").read_text())
    metrics.pop("train_seconds")
    plots = root / "metrics/train_flexible/plots"
    curves = {f.relative_to(plots).as_posix(): f.read_text() for f in sorted(plots.rglob("*.tsv"))}
    model, _ = load_checkpoint(root / "models/flexible.pt")
    return metrics, curves, model.state_dict()


def fresh(root: Path, name: str) -> Path:
    """A copy of the prepared project, without any training run's outputs."""
    copy = root.parent / name
    shutil.copytree(root, copy)
    for leftover in ("metrics", "models", ".resume"):
        shutil.rmtree(copy / leftover, ignore_errors=True)
    return copy


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = folder_project(tmp_path_factory.mktemp("distributed") / "project", PARAMS)
    write_dataset(root / "data", train_per_class=12, test_per_class=2, size=16)
    for stage in ("split", "prepare", "stats"):
        stages.run(root, stage)
    return root


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_and_resume_like_themselves(project: Path, monkeypatch):
    one = fresh(project, "one")
    in_a_group_of_one(one, monkeypatch)  # one process, through the same sharded sampler (drops the last partial batch)
    two = fresh(project, "two")
    out = torchrun(two)
    for epoch in range(1, EPOCHS + 1):
        assert out.count(f"epoch {epoch}/{EPOCHS} ") == 1, out  # rank 0 alone reports
    (one_metrics, _, one_weights), (two_metrics, two_curves, two_weights) = outputs(one), outputs(two)
    assert (one_metrics["processes"], two_metrics["processes"]) == (1, 2)
    assert len(two_curves["metrics/train/loss.tsv"].splitlines()) == EPOCHS + 1  # written by one process
    for key in ("train", "val"):
        for metric in ("loss", "accuracy"):
            assert two_metrics[key][metric] == pytest.approx(one_metrics[key][metric], abs=1e-5), (key, metric)
    assert one_metrics["train"]["loss"] > 0 and two_metrics["best"]["epoch"] == one_metrics["best"]["epoch"]
    # The temperature: fitted on the val logits of both ranks together, as on the one process's, and stored once.
    one_fit, two_fit = one_metrics["calibration"], two_metrics["calibration"]
    assert two_fit == pytest.approx(one_fit, rel=1e-4) and two_fit["temperature"] != 1.0
    assert load_checkpoint(two / "models/flexible.pt")[1]["temperature"] == two_fit["temperature"]
    for name, weight in one_weights.items():
        torch.testing.assert_close(two_weights[name], weight, atol=1e-5, rtol=1e-4)

    # Killed (SIGKILL, every process) once epoch 2 or later is saved, then run again: the same run, exactly.
    killed = fresh(project, "killed")
    with (killed / "killed.log").open("w") as log:
        proc = torchrun(killed, stdout=log, stderr=subprocess.STDOUT)
        wait_for_saved_epoch(killed / STATE, 2, proc)
        for pid in [proc.pid, *descendants(proc.pid)]:  # the whole run at once, as when its machine is lost
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    saved = torch.load(killed / STATE, map_location="cpu", weights_only=True)["epoch"]  # the last before the kill
    assert 2 <= saved < EPOCHS, (killed / "killed.log").read_text()
    shutil.rmtree(killed / "metrics"), shutil.rmtree(killed / "models")  # as DVC deletes them before a rerun
    out = torchrun(killed)
    assert f"resuming from epoch {saved} of {EPOCHS}" in out and f"epoch {saved + 1}/{EPOCHS} " in out
    resumed_metrics, resumed_curves, resumed_weights = outputs(killed)
    assert (resumed_metrics, resumed_curves) == (two_metrics, two_curves)
    assert all(torch.equal(resumed_weights[k], v) for k, v in two_weights.items())
