"""Shared fixtures: tiny image folders written to disk as real files, and the project's paths."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inatpipe.checkpoint import ModelSpec, save_checkpoint
from inatpipe.data.dataset import NormalizedLoader, make_loader
from inatpipe.data.index import scan_folder
from inatpipe.data.prepared import PreparedDataset, prepare
from inatpipe.data.transforms import BatchAugment, BatchResize
from inatpipe.models import build_model
from inatpipe.runtime import seed_everything
from inatpipe.training.loop import fit

ROOT = Path(__file__).resolve().parents[1]


def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "owl"),
    per_class: int = 10,
    size: int = 16,
    seed: int = 0,
    ext: str = ".png",
) -> Path:
    """root/<class>/<i><ext>: each class a different dominant colour plus noise, so it is learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 80, size=(size, size, 3))
            img[..., k % 3] += 150
            if k >= 3:  # more classes than channels: a bright stripe tells them apart
                img[(k - 3) % size, :, :] = 255
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}{ext}")
    return root


def write_dataset(root: Path, train_per_class: int = 10, test_per_class: int = 4, seed: int = 0, **kwargs) -> Path:
    """A dataset in the iNaturalist layout: root/train/<class>/, root/val/<class>/ (val is the test set)."""
    write_image_folder(root / "train", per_class=train_per_class, seed=seed, **kwargs)
    write_image_folder(root / "val", per_class=test_per_class, seed=seed + 1, **kwargs)
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data")


MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def prepared_folder(folder: Path, classes: list[str], image_size: int = 16) -> Path:
    """folder/<class>/* prepared once, as the `prepare` stage does, into a subset named `images` beside it."""
    prepared = folder.parent / f".prepared-{folder.name}-{image_size}"
    if not (prepared / "meta.json").is_file():
        prepare({"images": scan_folder(folder)}, classes, image_size, prepared)
    return prepared


def folder_loader(
    folder: Path,
    classes: list[str],
    image_size: int = 16,
    batch_size: int = 8,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: bool = False,
    mean: list[float] = MEAN,
    std: list[float] = STD,
) -> NormalizedLoader:
    """A loader over folder/<class>/* through the pipeline's own data path: the images prepared once (beside the
    folder), read back in batches, resized (or augmented) and normalised on the CPU, as the training stages load."""
    prepared = prepared_folder(folder, classes, image_size)
    transform = (
        BatchAugment(image_size, hflip=True, rotation=10.0, crop_scale=0.8) if augment else BatchResize(image_size)
    )
    dataset = PreparedDataset(prepared, "images", transform)
    loader = make_loader(dataset, batch_size, shuffle=shuffle, generator=generator or torch.Generator().manual_seed(0))
    return NormalizedLoader(loader, mean, std, torch.device("cpu"))


# The in-process pipeline: every stage's run(params) on a tiny dataset, once per test session, each stage recorded
# (params read, files opened). ResNet18 from a saved random state_dict stands in for the ImageNet download; no
# augmentation, so the features stage computes the backbone features and train_resnet trains on them.
PIPELINE_PARAMS = {
    "data": {"image_size": 16, "augment": False},
    "model": {"num_filters": [8, 16], "dense_neurons": 32},
    "train": {"epochs": 3, "batch_size": 8},
    "resnet": {"arch": "resnet18", "epochs": 2, "batch_size": 8},
    "evaluate": {"batch_size": 16},
}


@dataclass
class Pipeline:
    root: Path
    records: dict  # stage -> tests.stages.Record


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    import torchvision

    from inatpipe.testing import STAGES

    from .stages import folder_project, run

    base = tmp_path_factory.mktemp("pipeline")
    weights = base / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    params = {**PIPELINE_PARAMS, "resnet": {**PIPELINE_PARAMS["resnet"], "weights": str(weights)}}
    root = folder_project(base / "project", params)
    write_dataset(root / "data", train_per_class=12, test_per_class=4, size=16)
    return Pipeline(root, {stage: run(root, stage, record=True) for stage in STAGES})


# The slowest modules first: with the suite spread over parallel workers (`pytest -n 2 --dist loadgroup`), the long
# ones then start at once instead of last, and the workers finish together. A module whose fixtures are costly is
# marked `xdist_group` (the in-process pipeline's two modules with one name), so that one worker builds them once.
SLOWEST_FIRST = (
    "test_pipeline",
    "test_sweep_study",
    "test_sweep_postgres",
    "test_distributed",
    "test_resume",
    "test_recipe",
    "test_data",
)


def pytest_collection_finish(session) -> None:
    """After collection (every test module imported, and with them torch, DVC, Optuna and the rest): freeze what
    exists, so that the full garbage collections of a long test run skip those million-odd objects, which live as
    long as the worker anyway, as a stage process does after its imports (inatpipe.startup)."""
    gc.freeze()


def pytest_configure(config) -> None:
    """Under parallel workers, one torch thread per worker (and per stage it starts, sweep trials included): two
    workers then keep two cores busy instead of four threads taking turns on them. Every DVC command the tests start,
    through the project's own commands too, sends no analytics: each would otherwise start one more DVC process."""
    os.environ["DVC_NO_ANALYTICS"] = "1"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["INATPIPE_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list) -> None:
    def rank(item) -> int:
        module = item.module.__name__.rsplit(".", 1)[-1]
        return SLOWEST_FIRST.index(module) if module in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: within a module, tests keep their order


def trained_checkpoint(root: Path, classes: list[str], config: dict) -> Path:
    """FlexibleCNN (`config`) trained for a few epochs on colour-coded `classes` (written under root/train), saved as
    the pipeline saves it at root/flexible.pt."""
    generator = seed_everything(0)
    loader = folder_loader(
        write_image_folder(root / "train", classes=tuple(classes), per_class=10),
        classes,
        shuffle=True,
        generator=generator,
    )
    model = build_model("flexible_cnn", len(classes), config)
    for _ in fit(model, torch.optim.Adam(model.parameters(), lr=3e-3), loader, loader, 6, torch.device("cpu")):
        pass
    path = root / "flexible.pt"
    save_checkpoint(path, ModelSpec("flexible_cnn", config, classes, 16, MEAN, STD), model.state_dict())
    return path
