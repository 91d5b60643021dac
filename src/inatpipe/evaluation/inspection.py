"""Looking inside a trained model: its layers with output shapes and parameter counts, its first-layer filters, and
guided-backpropagation maps of what in an image drives a prediction."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # a bare Figure draws on Agg: no pyplot, no display
from torch import nn
from torch.nn.modules import activation as activations

from inatpipe.data.images import prepare_image
from inatpipe.data.transforms import BatchResize
from inatpipe.errors import UserError
from inatpipe.evaluation.figures import save_figure
from inatpipe.evaluation.predict import model_input
from inatpipe.models import count_parameters


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int  # counted at a module's first call only: a module used twice (ResNet's ReLU) owns its weights once


@torch.no_grad()
def layer_table(model: nn.Module, image_size: int, in_channels: int = 3) -> list[Layer]:
    """Every leaf module in the order the forward pass calls it, with the shape it outputs for one image."""
    layers: list[Layer] = []
    seen: set[int] = set()

    def hook(name: str):
        def record(module: nn.Module, _inputs, output) -> None:
            params = 0 if id(module) in seen else sum(p.numel() for p in module.parameters(recurse=False))
            seen.add(id(module))
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else ()
            layers.append(Layer(name, type(module).__name__, shape, params))

        return record

    handles = [
        m.register_forward_hook(hook(name)) for name, m in model.named_modules() if not any(m.children()) and name
    ]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        model(torch.zeros(1, in_channels, image_size, image_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return layers


def describe(model: nn.Module, meta: dict) -> str:
    """The architecture as printed by torch, then per-layer output shapes and parameters, then the totals."""
    layers = layer_table(model, meta["image_size"])
    total, trainable = count_parameters(model)
    width = max(len(layer.name) for layer in layers)
    lines = [
        f"model: {meta['model_name']}  config: {meta['model_config']}",
        f"classes ({len(meta['classes'])}): {', '.join(meta['classes'])}",
        f"input: 3 x {meta['image_size']} x {meta['image_size']}, normalised with mean {meta['normalization']['mean']}"
        f" and std {meta['normalization']['std']}",
        "",
        str(model),
        "",
        f"{'layer':<{width}}  {'type':<18} {'output shape':<22} {'params':>12}",
    ]
    for layer in layers:
        shape = " x ".join(map(str, layer.output_shape[1:]))  # without the batch dimension
        lines.append(f"{layer.name:<{width}}  {layer.kind:<18} {shape:<22} {layer.params:>12,}")
    lines += [
        "",
        f"total parameters:     {total:>14,}",
        f"trainable parameters: {trainable:>14,}",
        f"frozen parameters:    {total - trainable:>14,}",
    ]
    return "\n".join(lines)


def first_conv(model: nn.Module) -> nn.Conv2d:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise UserError(f"{type(model).__name__} has no convolution layer, so no filters to draw")
    return conv


def _unit_range(a: np.ndarray) -> np.ndarray:
    low, high = a.min(), a.max()
    return (a - low) / (high - low) if high > low else np.full_like(a, 0.5)


def filters_figure(model: nn.Module, out: Path, title: str = "") -> Path:
    """The first convolution's filters in a square grid: RGB when they read 3 channels, else their channel mean."""
    w = first_conv(model).weight.detach().cpu().float().numpy()  # (filters, channels, k, k)
    columns = math.ceil(math.sqrt(len(w)))
    rows = math.ceil(len(w) / columns)
    fig = Figure(figsize=(columns * 0.8, rows * 0.8 + 0.4), dpi=100)
    axes = fig.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(w):
            # Each filter on its own scale: their magnitudes differ, and the pattern is what is worth seeing.
            f = w[i].transpose(1, 2, 0) if w.shape[1] == 3 else w[i].mean(0)
            ax.imshow(_unit_range(f), cmap=None if f.ndim == 3 else "gray", interpolation="nearest")
    k = w.shape[-1]
    fig.suptitle(title or f"first-layer filters: {len(w)} of {w.shape[1]} x {k} x {k}", fontsize=9)
    return save_figure(fig, out)


class _PositiveGradient(torch.autograd.Function):
    """Identity going forward; lets only positive gradients back through (the 'guided' in guided backprop)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clamp(min=0)


def guided_backprop(model: nn.Module, x: torch.Tensor, target: int | None = None) -> tuple[torch.Tensor, int]:
    """Gradient of one class score with respect to the input image, with negative gradients stopped at every
    activation (Springenberg et al., 2015). Returns (gradient C x H x W, the class used: the predicted one by default).
    """
    acts = [m for m in model.modules() if type(m).__module__ == activations.__name__ and not list(m.children())]
    handles = [m.register_forward_hook(lambda _m, _i, out: _PositiveGradient.apply(out)) for m in acts]
    was_training = model.training
    try:
        model.eval()
        x = x.detach().clone().requires_grad_(True)
        scores = model(x.unsqueeze(0))[0]
        target = int(scores.argmax()) if target is None else target
        scores[target].backward()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return x.grad.detach(), target


def guided_backprop_figure(model: nn.Module, meta: dict, images: Sequence[Path], out: Path) -> Path:
    """One row per image: the image as the model sees it (read and resized as for a prediction), and its
    guided-backprop map for the predicted class."""
    fig = Figure(figsize=(4.4, 2.3 * len(images)), dpi=100)
    axes = fig.subplots(len(images), 2, squeeze=False)
    device = next(model.parameters()).device
    for row, path in zip(axes, images, strict=True):
        try:
            prepared = prepare_image(path, meta["image_size"])
        except OSError as e:
            raise UserError(f"{path} is not a readable image ({e})") from None
        grad, target = guided_backprop(model, model_input([prepared], meta, device)[0])
        g = grad.cpu().numpy().transpose(1, 2, 0)
        g = np.clip((g - g.mean()) / (g.std() + 1e-12) * 0.15 + 0.5, 0, 1)  # the usual contrast stretch
        seen = BatchResize(meta["image_size"])(torch.from_numpy(prepared).permute(2, 0, 1)[None])[0]
        row[0].imshow(seen.permute(1, 2, 0).numpy(), interpolation="nearest")
        row[0].set_title(Path(path).name, fontsize=8)
        row[1].imshow(g, interpolation="nearest")
        row[1].set_title(f"guided backprop: {meta['classes'][target]}", fontsize=8)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, out)
