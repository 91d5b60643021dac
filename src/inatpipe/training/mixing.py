"""MixUp and CutMix on whole training batches (`mixup`, `cutmix`, `mix_switch_prob` in the recipe).

torchvision's transforms do the mixing: one Beta(alpha, alpha) weight per batch, each image mixed with the image
one place further in the (shuffled) batch, and soft targets that the recipe's cross-entropy (with its label
smoothing) takes as they are. Validation and test batches are never mixed. The draws come from torch's global
generator, which a resume state saves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from inatpipe.params import RecipeParams

# (images, class indices) -> (mixed images, soft targets of shape (n, classes))
Mixer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batch_mixer(recipe: RecipeParams, num_classes: int) -> Mixer | None:
    """The recipe's mixing of training batches, or None when both MixUp and CutMix are off. With both on, each batch
    gets CutMix with probability `mix_switch_prob`, else MixUp."""
    if recipe.cutmix <= 0 and recipe.mixup <= 0:
        return None
    from torchvision.transforms import v2  # here: a run without mixing does not pay for importing torchvision

    mixes = []
    if recipe.cutmix > 0:
        mixes.append((v2.CutMix(alpha=recipe.cutmix, num_classes=num_classes), recipe.mix_switch_prob))
    if recipe.mixup > 0:
        mixes.append((v2.MixUp(alpha=recipe.mixup, num_classes=num_classes), 1 - recipe.mix_switch_prob))
    if len(mixes) == 1:
        return mixes[0][0]
    return v2.RandomChoice([mix for mix, _ in mixes], p=[p for _, p in mixes])
