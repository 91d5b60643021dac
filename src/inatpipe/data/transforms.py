"""Train and eval transforms, side by side so their differences are easy to see.

`BatchResize` (evaluation) and `BatchAugment` (training) take a whole batch of prepared uint8 images,
(n, 3, side, side), and return uint8 batches at the training size: one vectorised operation per batch instead of a
Python call per image (what makes small images cheap to load). Scaling and normalisation follow on the device
(`dataset.normalize`). Predictions on image files go through the same two steps (evaluation/predict.py).
`training_transform` chains what `data` asks for on training batches: the crop, flip and rotation, a policy
(`BatchPolicy`) and random erasing (`BatchErase`). They run where the batch is loaded (in the loader workers).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from inatpipe.params import DataParams

BatchTransform = Callable[[torch.Tensor], torch.Tensor]


class BatchResize:
    """Squash every image of a uint8 batch to image_size x image_size: antialiased bilinear, as PIL resizes."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.image_size, self.image_size):
            return x
        size = (self.image_size, self.image_size)
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


class BatchAugment:
    """Random resized crop, optional horizontal flip and rotation of a uint8 batch, each image drawn on its own.

    All three are one affine map per image (crop scale and aspect, mirror, turn about the crop's centre), sampled in
    a single `grid_sample` over the batch. As RandomResizedCrop: the crop covers a uniform share in [crop_scale, 1]
    of the image with a log-uniform aspect ratio in [3/4, 4/3] (a side that would leave the image is cut to fit) at
    a uniform position; the angle is uniform in [-rotation, rotation] degrees, and corners turned in from outside
    the image are black, as RandomRotation leaves them. Draws come from torch's global generator, which loader
    workers seed from the loader's generator, so an epoch's crops depend only on the seed.
    """

    def __init__(self, image_size: int, *, hflip: bool, rotation: float, crop_scale: float):
        self.image_size = image_size
        self.hflip, self.rotation, self.crop_scale = hflip, rotation, crop_scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        area = torch.empty(n).uniform_(self.crop_scale, 1.0)
        log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3))
        # Crop width and height as fractions of the image's, which is also their half-extent in [-1, 1] coordinates.
        w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
        h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
        cx = (torch.rand(n) * 2 - 1) * (1 - w)
        cy = (torch.rand(n) * 2 - 1) * (1 - h)
        mirror = torch.where(torch.rand(n) < 0.5, -1.0, 1.0) if self.hflip else torch.ones(n)
        angle = torch.empty(n).uniform_(-self.rotation, self.rotation).deg2rad()
        cos, sin = angle.cos(), angle.sin()
        # Output pixel centres (u, v) in [-1, 1] map to input: centre + rotation @ diag(mirror * w, h) @ (u, v).
        # The grid is built by broadcasting: affine_grid's batched matmul costs more than the sampling here.
        steps = (torch.arange(self.image_size) * 2 + 1) / self.image_size - 1
        u, v = steps.view(1, 1, -1), steps.view(1, -1, 1)
        a, b = (cos * w * mirror).view(-1, 1, 1), (-sin * h).view(-1, 1, 1)
        c, d = (sin * w * mirror).view(-1, 1, 1), (cos * h).view(-1, 1, 1)
        grid = torch.stack([a * u + b * v + cx.view(-1, 1, 1), c * u + d * v + cy.view(-1, 1, 1)], dim=-1)
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.add_(0.5).to(torch.uint8)  # round: bilinear weights keep values within [0, 255]


class BatchPolicy:
    """An augmentation policy of torchvision (TrivialAugmentWide, RandAugment with its defaults) on a uint8 batch:
    each image gets its own draw of operation and strength, from torch's global generator, as the crops do."""

    POLICIES = {"trivialaugment": "TrivialAugmentWide", "randaugment": "RandAugment"}  # name -> v2 transform

    def __init__(self, name: str):
        # torchvision is imported here, not with the module: importing it costs seconds (it loads torch._dynamo),
        # which every process of the pipeline that trains or evaluates FlexibleCNN without a policy is spared.
        from torchvision.transforms import v2

        self.name = name
        self.policy = getattr(v2, self.POLICIES[name])()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.policy(image) for image in x])


class BatchErase:
    """Random erasing of a uint8 batch, each image drawn on its own, vectorised: with probability `p`, a box of
    uniform noise covering a uniform share in [0.02, 1/3] of the image, with a log-uniform aspect ratio in
    [0.3, 3.3], at a uniform position (the ranges of torchvision's RandomErasing, with its value="random"). Every
    image draws the same count of numbers whether erased or not, so the stream of draws does not depend on `p`."""

    SCALE = (0.02, 1 / 3)
    RATIO = (0.3, 3.3)

    def __init__(self, p: float):
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        erased = torch.rand(n) < self.p
        area = torch.empty(n).uniform_(*self.SCALE) * (h * w)
        ratio = torch.empty(n).uniform_(math.log(self.RATIO[0]), math.log(self.RATIO[1])).exp()
        box_h = (area * ratio).sqrt().round().clamp(1, h)
        box_w = (area / ratio).sqrt().round().clamp(1, w)
        top = (torch.rand(n) * (h - box_h + 1)).floor().view(-1, 1, 1)
        left = (torch.rand(n) * (w - box_w + 1)).floor().view(-1, 1, 1)
        rows, cols = torch.arange(h).view(1, -1, 1), torch.arange(w).view(1, 1, -1)
        inside = (
            (rows >= top) & (rows < top + box_h.view(-1, 1, 1)) & (cols >= left) & (cols < left + box_w.view(-1, 1, 1))
        )
        noise = torch.randint(0, 256, x.shape, dtype=torch.uint8)
        return torch.where((inside & erased.view(-1, 1, 1)).unsqueeze(1), noise, x)


class Chain:
    """Batch transforms applied one after the other."""

    def __init__(self, *steps: BatchTransform):
        self.steps = steps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x


def training_transform(data: DataParams) -> BatchTransform:
    """What training batches go through: with `data.augment`, the crop, flip and rotation, then `data.policy`'s
    operations and `data.random_erasing`; without it, the resize alone (as validation), whatever those say."""
    crop = BatchAugment(data.image_size, hflip=data.hflip, rotation=data.rotation, crop_scale=data.crop_scale)
    policy, erasing = data.policy, data.random_erasing  # read either way: the stage declares them all
    if not data.augment:
        return BatchResize(data.image_size)
    steps: list[BatchTransform] = [crop]
    if policy != "basic":
        steps.append(BatchPolicy(policy))
    if erasing > 0:
        steps.append(BatchErase(erasing))
    return steps[0] if len(steps) == 1 else Chain(*steps)
