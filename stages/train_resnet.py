"""Stage train_resnet: transfer learning from a torchvision ResNet (ImageNet weights when available) with the
strategy of resnet.strategy; the head trains on the features stage's output when the backbone is frozen and
nothing is augmented."""

import inatpipe.startup  # noqa: F401  (first of the library: see its docstring)
from inatpipe import paths
from inatpipe.errors import exit_on_user_error
from inatpipe.models.resnet import load_pretrained
from inatpipe.params import Params, load_params
from inatpipe.runtime import choose_device, configure_threads, seed_everything
from inatpipe.training import distributed
from inatpipe.training.features import describe, forward_reason, load_or_extract
from inatpipe.training.precision import resolve_precision
from inatpipe.training.tracking import RunOutputs, training_data
from inatpipe.training.transfer import train_transfer


def run(p: Params) -> None:
    r = p.resnet
    device = distributed.setup(choose_device(p.device))  # under torchrun: this rank's device
    generator = seed_everything(p.seed)
    configure_threads()
    data = training_data(p.data, r.batch_size, generator, device)
    spec = data.spec("resnet", {"arch": r.arch})
    model = spec.build()
    pretrained = load_pretrained(model, r.weights, r.arch, r.require_pretrained)

    features, reason = None, forward_reason(r.strategy, p.data.augment, r.mixup > 0 or r.cutmix > 0)
    if reason:
        print(f"full forward pass every epoch: {reason}")
    else:
        precision = resolve_precision(device, r.precision)
        meta = describe(r.arch, model.backbone, p.data.image_size, data.mean, data.std, precision)
        features, note = load_or_extract(
            paths.FEATURES_FILE,
            model.backbone,
            p.data.image_size,
            device,
            meta,
            precision=precision,
            channels_last=r.channels_last,
        )
        print(note)
    summary = {"pretrained": pretrained, "weights": r.weights, "backbone_features": "cached" if features else "forward"}
    train_transfer(model, spec, data, r, device, RunOutputs.of_stage("resnet"), features, summary)


if __name__ == "__main__":
    exit_on_user_error(lambda: run(load_params()))
