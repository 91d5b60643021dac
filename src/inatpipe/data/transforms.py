"""Train and eval transforms, side by side so their differences are easy to see.

`BatchResize` (evaluation) and `BatchAugment` (training) take a whole batch of prepared uint8 images,
(n, 3, side, side), and return uint8 batches at the training size: one vectorised operation per batch instead of a
Python call per image (what makes small images cheap to load). Scaling and normalisation follow on the device
(`dataset.normalize`). Predictions on image files go through the same two steps (evaluation/predict.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
