"""Stage train_resnet: ResNet50 transfer learning, frozen backbone (ImageNet weights when available), new head."""

import torch

from inatpipe import paths
from inatpipe.errors import exit_on_user_error
from inatpipe.experiment import train_and_track, training_data
from inatpipe.models import build_model
from inatpipe.models.resnet import load_pretrained
from inatpipe.params import load_params
from inatpipe.runtime import choose_device, configure_threads, seed_everything

ARCH = "resnet50"


def main() -> None:
    p = load_params()
    device = choose_device(p.device)
    generator = seed_everything(p.seed)
    configure_threads()
    data = training_data(p.data, p.resnet.batch_size, generator, device)
    config = {"arch": ARCH, "freeze_backbone": True}
    model = build_model("resnet", len(data.classes), config)
    pretrained = load_pretrained(model, p.resnet.weights, ARCH, p.resnet.require_pretrained)
    head = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.Adam(head, lr=p.resnet.learning_rate, weight_decay=p.resnet.weight_decay)
    train_and_track(
        model,
        optimizer,
        data,
        epochs=p.resnet.epochs,
        device=device,
        live_dir=paths.train_metrics_dir("resnet"),
        checkpoint=paths.checkpoint("resnet"),
        model_name="resnet",
        model_config=config,
        summary={"pretrained": pretrained},
    )


if __name__ == "__main__":
    exit_on_user_error(main)
