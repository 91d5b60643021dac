"""Stage train_resnet: transfer learning from a torchvision ResNet (ImageNet weights when available) with the
strategy of resnet.strategy; the head trains on the features stage's output when the backbone is frozen and
nothing is augmented."""

from pathlib import Path

from inatpipe import distributed, paths
from inatpipe.errors import exit_on_user_error
from inatpipe.experiment import training_data
from inatpipe.features import describe, forward_reason, load_or_extract
from inatpipe.models import build_model
from inatpipe.models.resnet import load_pretrained
from inatpipe.params import load_params
from inatpipe.resume import Resumable, params_sections
from inatpipe.runtime import choose_device, configure_threads, seed_everything
from inatpipe.training import resolve_precision
from inatpipe.transfer import train_transfer

PARAMS = ("seed", "device", "data", "resnet")  # the params sections this stage reads


def main() -> None:
    p = load_params()
    device = distributed.setup(choose_device(p.device))  # under torchrun: this rank's device
    generator = seed_everything(p.seed)
    configure_threads()
    data = training_data(p.data, p.resnet.batch_size, generator, device)
    config = {"arch": p.resnet.arch}
    model = build_model("resnet", len(data.classes), config)
    pretrained = load_pretrained(model, p.resnet.weights, p.resnet.arch, p.resnet.require_pretrained)

    features, reason = None, forward_reason(p.resnet.strategy, p.data.augment)
    if reason:
        print(f"full forward pass every epoch: {reason}")
    else:
        precision = resolve_precision(device, p.resnet.precision)
        meta = describe(p.resnet.arch, model.backbone, p.data.image_size, data.mean, data.std, precision)
        features, note = load_or_extract(
            paths.FEATURES_FILE,
            model.backbone,
            p.data,
            device,
            meta,
            precision=precision,
            channels_last=p.resnet.channels_last,
        )
        print(note)
    train_transfer(
        model,
        data,
        p.resnet,
        device=device,
        generator=generator,
        features=features,
        live_dir=paths.train_metrics_dir("resnet"),
        checkpoint=paths.checkpoint("resnet"),
        model_config=config,
        # Trained on cached features, a resumed run must find the same file it started from.
        resume=Resumable(
            paths.resume_state("resnet"),
            params_sections(p, *PARAMS),
            Path(__file__),
            large_files=(paths.FEATURES_FILE,) if features else (),
        ),
        summary={
            "pretrained": pretrained,
            "weights": p.resnet.weights,
            "backbone_features": "cached" if features else "forward",
        },
    )


if __name__ == "__main__":
    exit_on_user_error(main)
