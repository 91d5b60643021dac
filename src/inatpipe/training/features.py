"""Pooled backbone features, computed once: with a frozen backbone and no augmentation, every epoch would compute
the same ones, so the head can train on stored features instead of running the backbone again.

The `features` stage writes them (with what they were computed from); `train_resnet` checks that they still match
its backbone, weights, normalisation and images before it uses them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from inatpipe import torchfile
from inatpipe.atomic import write_json
from inatpipe.cores import loader_workers
from inatpipe.data.dataset import NormalizedLoader, make_loader
from inatpipe.data.index import read_classes, read_index
from inatpipe.data.prepared import PreparedDataset, read_meta
from inatpipe.data.stats import read_stats
from inatpipe.data.transforms import BatchResize
from inatpipe.errors import UserError
from inatpipe.paths import FEATURES_SKIPPED, PREPARED_DIR, SPLIT_DIR, STATS_FILE
from inatpipe.training.precision import autocast, memory_format, to_device

# The feature pass runs in eval mode, where the batch size changes nothing but speed; a param for it would make
# DVC recompute identical features whenever it changed.
BATCH_SIZE = 64
SUBSETS = ("train", "val")


def forward_reason(strategy: str, augment: bool, mixes: bool = False) -> str | None:
    """Why the full forward pass must run every epoch, or None when stored features give the same result.
    `mixes`: MixUp or CutMix is on (they mix images, before the backbone)."""
    if strategy != "head":
        return f"resnet.strategy is {strategy}: backbone layers train, so their features change with every step"
    if mixes:
        return "resnet.mixup or resnet.cutmix is on: every batch mixes new images, so new features"
    if augment:
        return "data.augment is on: every epoch sees new random crops, so new features"
    return None


def weights_fingerprint(module: nn.Module) -> str:
    """A digest of every parameter and buffer, so features are never reused with other weights than their own."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class BackboneFeatures:
    """Features and class indices of the train and val subsets, in index order, and what they were computed from."""

    features: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    paths: dict[str, list[str]]
    meta: dict  # arch, weights, fingerprint, image_size, mean, std

    def save(self, path: Path) -> None:
        """Atomically, so an interrupted run never leaves a truncated file."""
        torchfile.save(
            {"features": self.features, "targets": self.targets, "paths": self.paths, "meta": self.meta}, path
        )

    @classmethod
    def load(cls, path: Path) -> BackboneFeatures | None:
        """None when the file is absent or unreadable: the caller computes the features afresh."""
        try:
            raw = torchfile.load(path, what="features file", fix="they are computed again")
            return cls(raw["features"], raw["targets"], raw["paths"], raw["meta"])
        except (UserError, KeyError, TypeError):
            return None

    def mismatch(self, expected_meta: dict, paths: dict[str, list[str]]) -> str | None:
        """What differs between these features and the run that wants them, or None when they can be used."""
        for key, value in expected_meta.items():
            if self.meta.get(key) != value:
                return f"{key} is {value!r} now, the features were computed with {self.meta.get(key)!r}"
        for subset, listed in paths.items():
            if self.paths.get(subset) != listed:
                return f"the {subset} subset lists other images than when the features were computed"
        return None


@dataclass
class Subsets:
    """Unshuffled, unaugmented loaders of the train and val subsets over the prepared images (normalised as the
    images train_resnet sees), the image files they hold in order, and the classes and stats behind them."""

    classes: list[str]
    stats: dict
    loaders: dict[str, NormalizedLoader]
    paths: dict[str, list[str]]


def subsets(image_size: int, device: torch.device) -> Subsets:
    classes = read_classes(SPLIT_DIR / "classes.json")
    stats = read_stats(STATS_FILE, image_size)
    read_meta(PREPARED_DIR, image_size)
    loaders = {
        subset: NormalizedLoader(
            make_loader(
                PreparedDataset(PREPARED_DIR, subset, BatchResize(image_size)),
                BATCH_SIZE,
                num_workers=loader_workers(),  # the features do not depend on it: no param for it
                device=device,
            ),
            stats["mean"],
            stats["std"],
            device,
        )
        for subset in SUBSETS
    }
    # The prepared arrays hold the split's rows in index order: the paths name what each feature row comes from.
    paths = {subset: read_index(SPLIT_DIR / f"{subset}.csv")["path"].tolist() for subset in SUBSETS}
    return Subsets(classes, stats, loaders, paths)


@torch.no_grad()
def compute_features(
    backbone: nn.Module,
    loader: Iterable,
    device: torch.device,
    desc: str,
    precision: str = "fp32",
    channels_last: bool = False,
) -> tuple:
    """(features, targets) of every sample of `loader`, in its order, through `backbone` in eval mode, in the
    precision and memory layout the full forward pass would use, so the head sees the features it would see there."""
    was_training = backbone.training
    backbone.eval().to(device, memory_format=memory_format(channels_last))
    features, targets = [], []
    for x, y in tqdm(loader, desc=desc, unit="batch", disable=None, leave=False):
        with autocast(device, precision):
            features.append(backbone(to_device(x, device, channels_last)).float().cpu())
        targets.append(torch.as_tensor(y))
    backbone.train(was_training)
    return torch.cat(features), torch.cat(targets)


def extract(
    backbone: nn.Module,
    loaders: dict[str, Iterable],
    device: torch.device,
    meta: dict,
    paths: dict[str, list[str]] | None = None,
    *,
    precision: str = "fp32",
    channels_last: bool = False,
) -> BackboneFeatures:
    """One pass of `backbone` over each subset's loader; `paths` name the images behind the rows."""
    features, targets = {}, {}
    for subset, loader in loaders.items():
        features[subset], targets[subset] = compute_features(
            backbone, loader, device, f"features {subset}", precision, channels_last
        )
    return BackboneFeatures(features, targets, paths or {}, meta)


def write_skipped(reason: str, path: Path = FEATURES_SKIPPED) -> None:
    """The stage's output when features can't serve: a note of why, so the stage finishes in an instant."""
    write_json(path, {"skipped": True, "reason": reason})


def describe(
    arch: str, backbone: nn.Module, image_size: int, mean: list[float], std: list[float], precision: str
) -> dict:
    """What features depend on besides the images: reusing them takes all of it to be unchanged. `precision` is
    the one the pass runs in, resolved (bf16 or fp32, never auto)."""
    return {
        "arch": arch,
        "fingerprint": weights_fingerprint(backbone),
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "precision": precision,
    }


def load_or_extract(
    path: Path,
    backbone: nn.Module,
    image_size: int,
    device: torch.device,
    meta: dict,
    *,
    precision: str = "fp32",
    channels_last: bool = False,
) -> tuple[BackboneFeatures, str]:
    """The stored features when they match `meta` and the current subsets, else one fresh pass of `backbone`
    (still far cheaper than a pass every epoch); returns them and a line saying which."""
    current = subsets(image_size, device)
    stored = BackboneFeatures.load(path)
    why = "not found" if stored is None else stored.mismatch(meta, current.paths)
    if why is None:
        return stored, f"cached backbone features from {path} (backbone frozen, no augmentation): no backbone pass"
    note = f"cached backbone features: {path} can't serve ({why}); computing them once here"
    features = extract(
        backbone, current.loaders, device, meta, current.paths, precision=precision, channels_last=channels_last
    )
    return features, note
