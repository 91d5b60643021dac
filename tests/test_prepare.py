"""Decode once: the prepared arrays equal decoding the originals, loaders read them, and the worker count resolves
from the cores. (That an experiment on a training param reuses them is DVC's part: tests/test_pipeline.py.)"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms import v2

from inatpipe.cores import loader_workers, usable_cores
from inatpipe.data.dataset import NormalizedLoader, make_loader
from inatpipe.data.images import decode, open_rgb, prepared_side
from inatpipe.data.index import scan_folder
from inatpipe.data.prepared import PreparedDataset, prepare, read_meta
from inatpipe.data.transforms import BatchAugment, BatchResize
from inatpipe.errors import ConfigError, UserError
from inatpipe.params import parse_params

from .conftest import ROOT
from .test_params import with_value

CLASSES = ["cat", "dog"]


def write_photos(folder: Path) -> Path:
    """Big smooth JPEGs (as photos are; draft mode decodes them at reduced scale), one portrait, plus a palette PNG."""
    yy, xx = np.mgrid[0:1:120j, 0:1:160j]
    for k, name in enumerate(CLASSES):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            img = np.stack([xx * 255, yy * 255, np.full_like(xx, 60 + 60 * k + 20 * i)], axis=-1).astype(np.uint8)
            if i == 1:
                img = img.transpose(1, 0, 2)  # portrait
            Image.fromarray(img).save(folder / name / f"{i}.jpg", quality=95)
    Image.new("P", (40, 30), 3).save(folder / "dog" / "3.png")
    return folder


def test_prepared_images_equal_decoding_the_originals(tmp_path):
    index = scan_folder(write_photos(tmp_path / "photos"))
    meta = prepare({"train": index}, CLASSES, image_size=16, folder=tmp_path / "prepared")
    side = prepared_side(16)
    assert side == 19 and meta == {"image_size": 16, "side": side, "classes": CLASSES, "counts": {"train": 7}}

    images = np.load(tmp_path / "prepared" / "train.npy")
    assert images.shape == (7, side, side, 3) and images.dtype == np.uint8
    assert np.load(tmp_path / "prepared" / "train_labels.npy").tolist() == [0, 0, 0, 1, 1, 1, 1]
    for prepared, path in zip(images, index["path"], strict=True):
        full = decode(open_rgb(path), side).astype(int)  # decoded at full scale, then resized
        diff = np.abs(prepared.astype(int) - full)
        assert diff.mean() < 2.0 and diff.max() <= 24, path  # draft decoding and resizing differ a little
    assert read_meta(tmp_path / "prepared", 16)["side"] == side
    with pytest.raises(UserError, match="prepared for image size 16, not data.image_size=32"):
        read_meta(tmp_path / "prepared", 32)


def test_loader_over_prepared_images_normalises_like_the_per_image_transform(tmp_path):
    index = scan_folder(write_photos(tmp_path / "photos"))
    prepare({"train": index}, CLASSES, image_size=16, folder=tmp_path / "prepared")
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    dataset = PreparedDataset(tmp_path / "prepared", "train", BatchResize(16))
    x, y = dataset[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 1
    assert len(pickle.dumps(dataset)) < 2000  # a worker gets the path, not the pixels

    loader = NormalizedLoader(make_loader(dataset, 4, num_workers=1), mean, std, torch.device("cpu"))
    batches = list(loader)
    assert len(loader) == 2 and loader.batch_size == 4
    # The per-image way, with torchvision's own transforms: resize each image, scale to [0, 1], normalise.
    per_image = v2.Compose(
        [
            v2.Resize((16, 16), antialias=True),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
    images = np.load(tmp_path / "prepared" / "train.npy")
    expected = torch.stack([per_image(Image.fromarray(img)) for img in images])
    got = torch.cat([x for x, _ in batches])
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-5)
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 0, 1, 1, 1, 1]


def halves(n: int, side: int = 40) -> torch.Tensor:
    """n copies of an image, dark on the left half and bright on the right: (n, 3, side, side) uint8."""
    x = torch.full((n, 3, side, side), 40, dtype=torch.uint8)
    x[..., side // 2 :] = 220
    return x


def test_batch_augment_crops_flips_and_turns_each_image_on_its_own():
    x = halves(400)
    torch.manual_seed(0)
    plain = BatchAugment(32, hflip=False, rotation=0.0, crop_scale=0.5)(x)
    assert plain.shape == (400, 3, 32, 32) and plain.dtype == torch.uint8
    left, right = plain[..., :8].float().mean(dim=(1, 2, 3)), plain[..., -8:].float().mean(dim=(1, 2, 3))
    assert (left < 60).all() and (right > 200).all()  # no flip: every crop keeps dark left, bright right
    edge = (plain[:, 0, 16].float().diff(dim=1).abs() > 50).float().argmax(dim=1)
    assert edge.unique().numel() > 5  # crops of different sizes and places put the edge in different columns

    torch.manual_seed(0)
    flipped = BatchAugment(32, hflip=True, rotation=0.0, crop_scale=0.5)(x)
    mirrored = (flipped[..., :8].float().mean(dim=(1, 2, 3)) > 200).float().mean()
    assert 0.4 < mirrored < 0.6  # about half are mirrored, each image drawn on its own

    turned = BatchAugment(32, hflip=False, rotation=30.0, crop_scale=1.0)(x)
    corners = turned[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 0).any(dim=(1, 2)).float().mean() > 0.5  # turned in from outside the image: black corners

    torch.manual_seed(1)
    again = BatchAugment(32, hflip=True, rotation=10.0, crop_scale=0.5)(x)
    torch.manual_seed(1)
    assert torch.equal(again, BatchAugment(32, hflip=True, rotation=10.0, crop_scale=0.5)(x))  # seeded: repeatable


def test_batch_resize_matches_pil_resizing_of_each_image():
    images = np.random.default_rng(0).integers(0, 256, (5, 37, 37, 3), dtype=np.uint8)
    got = BatchResize(32)(torch.from_numpy(images).permute(0, 3, 1, 2))
    expected = np.stack(
        [np.asarray(Image.fromarray(img).resize((32, 32), Image.Resampling.BILINEAR)) for img in images]
    )
    diff = np.abs(got.permute(0, 2, 3, 1).numpy().astype(int) - expected)
    assert got.dtype == torch.uint8 and diff.max() <= 1  # PIL and torch round differently, by one level at most


def test_missing_prepared_folder_says_how_to_make_it(tmp_path):
    with pytest.raises(UserError, match="run `dvc repro prepare` first"):
        PreparedDataset(tmp_path, "train")


# Loader workers for `auto` by usable cores: one core is left to training, and more than 4 only queue batches.
AUTO_WORKERS = {1: 0, 2: 1, 3: 2, 4: 3, 5: 4, 6: 4, 8: 4, 64: 4}


def test_num_workers_auto_follows_the_cores_this_process_may_use():
    cores = sorted(os.sched_getaffinity(0))
    try:
        for n in [n for n in AUTO_WORKERS if n <= len(cores)]:
            os.sched_setaffinity(0, cores[:n])  # as taskset or a container's cpuset narrows it
            assert (usable_cores(), loader_workers("auto")) == (n, AUTO_WORKERS[n])
    finally:
        os.sched_setaffinity(0, cores)
    assert loader_workers(3) == 3 and loader_workers(0) == 0  # a number is taken as it is

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert parse_params(with_value(raw, "data.num_workers", "auto")).data.num_workers == "auto"
    assert parse_params(with_value(raw, "data.num_workers", 2)).data.num_workers == 2
    for bad in ("many", -1, 1.5, True):
        with pytest.raises(ConfigError, match="data.num_workers must be"):
            parse_params(with_value(raw, "data.num_workers", bad))
