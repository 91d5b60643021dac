"""Grad-CAM (Selvaraju et al., 2017): which regions of an image drive a prediction, as a heatmap over the image.

The class score's gradient with respect to the last convolutional feature maps, averaged over each map, weighs the
maps; their weighted sum, through a ReLU, is the map. Two hooks' worth of code on the models as they are (no
library): a forward hook keeps the feature maps, `torch.autograd.grad` gives their gradient. The maps come from
FlexibleCNN's last conv block (its activation, before the block's pooling) and from the ResNet's `layer4`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from inatpipe.checkpoint import load_checkpoint, temperature_of
from inatpipe.data.images import DECODE_ERRORS, open_rgb, prepare_image
from inatpipe.errors import UserError
from inatpipe.evaluation.figures import gradcam_grid, gradcam_selection, save_figure
from inatpipe.evaluation.predict import model_input
from inatpipe.models.flexible_cnn import FlexibleCNN
from inatpipe.models.resnet import TransferResNet
from inatpipe.training.precision import autocast

COLORMAP = "jet"  # the usual Grad-CAM colours: blue where the map is 0, red where it peaks
IMAGE_WEIGHT = 0.5  # share of the image in the blend; the heatmap makes up the rest
DISPLAY_SIDE = 320  # longest side of an overlay drawn for one image (explain, serve)
THUMBNAIL_SIDE = 128  # the report grids' cell images


def gradcam_layer(model: nn.Module) -> nn.Module:
    """The module whose output Grad-CAM weighs: the last convolutional feature maps before any pooling to a vector."""
    if isinstance(model, FlexibleCNN):
        # features ends with the last block's pool; the module before it is the block's last activation.
        return model.features[-2]
    if isinstance(model, TransferResNet):
        return model.backbone.layer4
    raise UserError(f"no Grad-CAM layer known for {type(model).__name__}; known: FlexibleCNN, TransferResNet")


def grad_cam(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps of a normalised batch `x` for class `targets` (default: each image's predicted class).

    Returns (maps (n, h, w) scaled to [0, 1] by each map's maximum, at the feature maps' resolution; logits (n, C)).
    In eval mode each image's score depends on its own feature maps only, so one backward pass serves the batch.
    """
    captured: list[torch.Tensor] = []
    handle = gradcam_layer(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            # An input that asks for gradients makes a frozen backbone's feature maps carry them too.
            logits = model(x.detach().float().requires_grad_(True))
            targets = logits.argmax(1) if targets is None else targets.to(logits.device)
            (grads,) = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), captured[-1])
    finally:
        handle.remove()
        model.train(was_training)
    maps = captured[-1].detach()
    cam = (grads.mean((2, 3), keepdim=True) * maps).sum(1).clamp(min=0)
    peak = cam.amax((1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp(min=1e-12), cam), logits.detach()


def upsample(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map (h, w) stretched bilinearly over an image of height x width: the model saw the whole picture squashed
    to a square, so the map's grid spans the whole picture."""
    t = torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The map, in COLORMAP's colours, blended over `image` ((h, w, 3) uint8) at the image's own size."""
    heat = matplotlib.colormaps[COLORMAP](upsample(cam, *image.shape[:2]).clip(0, 1))[..., :3] * 255
    return (IMAGE_WEIGHT * image + (1 - IMAGE_WEIGHT) * heat).round().clip(0, 255).astype(np.uint8)


def display_image(img: Image.Image, side: int = DISPLAY_SIDE) -> np.ndarray:
    """An image scaled so its longest side is `side`, aspect kept: pixel blocks for small images (as the report
    grids draw them), a smooth resize for large ones."""
    scale = side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    method = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BILINEAR
    return np.asarray(img.resize(size, method))


def class_probabilities(logits: torch.Tensor, meta: dict) -> torch.Tensor:
    """Softmax of a checkpoint's logits in float64 at its temperature (1 for a checkpoint without one), as
    `inatpipe predict` gives them."""
    return (logits.double() / temperature_of(meta)).softmax(1)


class Explainer:
    """A checkpoint's model and what using it takes (classes, image size, normalisation): class probabilities and
    Grad-CAM maps for images prepared as `inatpipe predict` prepares them ((side, side, 3) uint8)."""

    def __init__(self, model: nn.Module, meta: dict, device: torch.device | str = "cpu", precision: str = "auto"):
        self.model, self.meta = model.eval(), meta
        self.device, self.precision = torch.device(device), precision

    @classmethod
    def from_checkpoint(cls, path: Path, device: torch.device | str = "cpu") -> Explainer:
        model, meta = load_checkpoint(path, device)
        return cls(model, meta, device)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def image_size(self) -> int:
        return self.meta["image_size"]

    @torch.no_grad()
    def probabilities(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(n, classes) float64, as `inatpipe predict` computes them (same input, precision and softmax)."""
        with autocast(self.device, self.precision):
            logits = self.model(model_input(images, self.meta, self.device))
        return class_probabilities(logits, self.meta).cpu().numpy()

    def gradcam(self, images: Sequence[np.ndarray], targets: Sequence[int]) -> np.ndarray:
        """(n, h, w) float32 maps in [0, 1] for class targets[i] of image i, computed in fp32."""
        x = model_input(images, self.meta, self.device)
        cams, _ = grad_cam(self.model, x, torch.as_tensor(list(targets), dtype=torch.long))
        return cams.cpu().numpy()

    def explain(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, classes), maps (n, h, w)): each map for the image's most probable class."""
        probs = self.probabilities(images)
        return probs, self.gradcam(images, probs.argmax(1).tolist())


def overlay_figure(image: Image.Image, cam: np.ndarray, title: str, out: Path) -> Path:
    """The image beside its Grad-CAM overlay, both at display size, `title` above them."""
    shown = display_image(image)
    fig = Figure(figsize=(6.6, 3.7), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(shown)
    right.imshow(overlay(shown, cam))
    for ax in (left, right):
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, out)


def overlay_paths(files: Sequence[Path], out_dir: Path) -> list[Path]:
    """out_dir/<stem>_gradcam.png per file; a name that comes again gets -2, -3, ...: no overlay overwrites another."""
    taken: dict[str, int] = {}
    paths = []
    for f in files:
        name = f"{f.stem}_gradcam"
        taken[name] = taken.get(name, 0) + 1
        paths.append(out_dir / f"{name}{'' if taken[name] == 1 else f'-{taken[name]}'}.png")
    return paths


def explain_files(explainer: Explainer, files: Sequence[Path], out_dir: Path) -> list[tuple[Path, str, float, Path]]:
    """One overlay PNG per image file, titled with the predicted class and its probability. Every file is read first
    (as `inatpipe predict` reads it): an unreadable one stops the command before anything is written.
    Returns (file, class, probability, overlay written) per file."""

    def read(f: Path, decode: Callable[[Path], Any]) -> Any:
        try:
            return decode(f)
        except DECODE_ERRORS as e:
            raise UserError(f"{f} is not a readable image ({type(e).__name__}: {e})") from None

    prepared = [read(f, lambda f: prepare_image(f, explainer.image_size)) for f in files]  # as `predict` reads
    done = []
    for f, image, out in zip(files, prepared, overlay_paths(files, out_dir), strict=True):
        probs, cams = explainer.explain([image])
        k = int(probs[0].argmax())
        title = f"{f.name}: {explainer.classes[k]} ({probs[0, k]:.3f})"
        overlay_figure(read(f, lambda f: open_rgb(f, draft_size=(DISPLAY_SIDE, DISPLAY_SIDE))), cams[0], title, out)
        done.append((f, explainer.classes[k], float(probs[0, k]), out))
    return done


def read_upload(data: bytes, image_size: int) -> np.ndarray:
    """Uploaded bytes as `prepare` would store the same file; raises one of DECODE_ERRORS for no readable image."""
    return prepare_image(io.BytesIO(data), image_size)


def overlay_png(explainer: Explainer, image: np.ndarray, data: bytes) -> tuple[bytes, str, float]:
    """The overlay of an uploaded image as PNG bytes (display size, no figure around it), with the predicted class
    and its probability. `image`: the upload as `read_upload` prepared it; `data`: its bytes, decoded again at
    display size."""
    probs, cams = explainer.explain([image])
    k = int(probs[0].argmax())
    shown = display_image(open_rgb(io.BytesIO(data), draft_size=(DISPLAY_SIDE, DISPLAY_SIDE)))
    buffer = io.BytesIO()
    Image.fromarray(overlay(shown, cams[0])).save(buffer, format="PNG")
    return buffer.getvalue(), explainer.classes[k], float(probs[0, k])


def write_gradcam_report(
    explainer: Explainer,
    images: np.ndarray,
    targets: np.ndarray,
    predicted: np.ndarray,
    confidence: np.ndarray,
    out: Path,
    title: str = "",
) -> Path:
    """reports/<model>/gradcam.png: overlays of the most confident mistakes, then of one correct test image per
    class (`images`: the test images as prepared, (n, side, side, 3) uint8), each for its predicted class."""
    mistakes, correct = gradcam_selection(targets, predicted, confidence)
    chosen = [*mistakes, *correct]
    cams = explainer.gradcam([images[i] for i in chosen], predicted[chosen].tolist()) if chosen else []
    thumbs = {i: display_image(Image.fromarray(np.asarray(images[i])), THUMBNAIL_SIDE) for i in chosen}
    overlays = {i: overlay(thumbs[i], cam) for i, cam in zip(chosen, cams, strict=True)}
    return gradcam_grid(overlays, mistakes, correct, targets, predicted, confidence, explainer.classes, out, title)
