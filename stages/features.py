"""Stage features: pooled backbone features of the train and val subsets, computed once for train_resnet.

Only when they can serve (strategy head, data.augment off); otherwise it writes a note of why, in an instant.
"""

import inatpipe.startup  # noqa: F401  (first of the library: see its docstring)
from inatpipe import paths
from inatpipe.errors import exit_on_user_error
from inatpipe.models.resnet import TransferResNet, load_pretrained
from inatpipe.params import Params, load_params
from inatpipe.runtime import choose_device, seed_everything
from inatpipe.training.features import describe, extract, forward_reason, subsets, write_skipped
from inatpipe.training.precision import resolve_precision


def run(p: Params) -> None:
    r = p.resnet
    reason = forward_reason(r.strategy, p.data.augment, r.mixup > 0 or r.cutmix > 0)
    if reason:
        write_skipped(reason)
        print(f"no cached features: {reason}; train_resnet runs the backbone every epoch")
        return
    device = choose_device(p.device)
    seed_everything(p.seed)
    data = subsets(p.data.image_size, device)
    model = TransferResNet(len(data.classes), r.arch)  # seeded as in train_resnet: the same random init if any
    pretrained = load_pretrained(model, r.weights, r.arch, r.require_pretrained)
    precision = resolve_precision(device, r.precision)  # as train_resnet's forward pass would run
    meta = describe(r.arch, model.backbone, p.data.image_size, data.stats["mean"], data.stats["std"], precision)
    meta = {**meta, "weights": r.weights, "pretrained": pretrained}
    features = extract(
        model.backbone, data.loaders, device, meta, data.paths, precision=precision, channels_last=r.channels_last
    )
    features.save(paths.FEATURES_FILE)
    shapes = ", ".join(f"{subset} {tuple(f.shape)}" for subset, f in features.features.items())
    print(f"{r.arch} features: {shapes} -> {paths.FEATURES_FILE}")


if __name__ == "__main__":
    exit_on_user_error(lambda: run(load_params()))
