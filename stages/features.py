"""Stage features: pooled backbone features of the train and val subsets, computed once for train_resnet.

Only when they can serve (strategy head, data.augment off); otherwise it writes a note of why, in an instant.
"""

from inatpipe import paths
from inatpipe.errors import exit_on_user_error
from inatpipe.features import describe, extract, forward_reason, subsets, write_skipped
from inatpipe.models.resnet import TransferResNet, load_pretrained
from inatpipe.params import load_params
from inatpipe.runtime import choose_device, seed_everything
from inatpipe.training import resolve_precision


def main() -> None:
    p = load_params()
    reason = forward_reason(p.resnet.strategy, p.data.augment)
    if reason:
        write_skipped(reason)
        print(f"no cached features: {reason}; train_resnet runs the backbone every epoch")
        return
    device = choose_device(p.device)
    seed_everything(p.seed)
    data = subsets(p.data, device)
    model = TransferResNet(len(data.classes), p.resnet.arch)  # seeded as in train_resnet: the same random init if any
    pretrained = load_pretrained(model, p.resnet.weights, p.resnet.arch, p.resnet.require_pretrained)
    precision = resolve_precision(device, p.resnet.precision)  # as train_resnet's forward pass would run
    stats = data.stats
    meta = describe(p.resnet.arch, model.backbone, p.data.image_size, stats["mean"], stats["std"], precision)
    meta = {**meta, "weights": p.resnet.weights, "pretrained": pretrained}
    features = extract(
        model.backbone,
        data.loaders,
        device,
        meta,
        data.paths,
        precision=precision,
        channels_last=p.resnet.channels_last,
    )
    features.save(paths.FEATURES_FILE)
    shapes = ", ".join(f"{subset} {tuple(f.shape)}" for subset, f in features.features.items())
    print(f"{p.resnet.arch} features: {shapes} -> {paths.FEATURES_FILE}")


if __name__ == "__main__":
    exit_on_user_error(main)
